"""`flad bench recovery`: quick recovery vs a full relaunch vs torchrun elastic, in one run, one model.

The fleet: a cluster of 3 emulated Jetson Nano vehicle processes training the tiny vision encoder with
SWIFT's 3-stage essential pipelines (edge in this process, loopback ZeroMQ). For each figure, a stage's
process is SIGKILLed after 3 completed steps (--kill-after) and the clock runs until the first training step completed
afterwards:
  quick      FLAD (§4.2): detection (dropped connection; heartbeat timeout as the fallback), re-plan
             (abort survivors, pre-generated template, plan_moves), redeploy (only moved layers, the
             departed vehicle's from the edge backup), resume (first step). Processes stay up.
  relaunch   stop every vehicle process, reload the checkpoint, re-plan with SWIFT, start the survivors'
             processes again, deploy every stage's layers from the edge, first step.
  torchrun   real `torchrun` (c10d rendezvous on localhost, one agent per vehicle, --nnodes 2:3, gloo data
             parallelism over the same encoder, checkpoint every e steps): a node is SIGKILLed; default
             rendezvous settings (last_call_timeout 30 s) and a tuned short last call.
Device speeds are emulated (time_scale 0.02); the host is shared, so the JSON reports the load.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

IDS = ["v0", "v1", "v2"]


def _pct(xs: list[float], q: float) -> float | None:
    xs = sorted(x for x in xs if x == x)
    if not xs:
        return None
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _summ(rows: list[dict], keys: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(rows)}
    for k in keys:
        xs = [r[k] for r in rows if r.get(k) is not None]
        out[k] = {"p50": _pct(xs, 0.5), "p95": _pct(xs, 0.95), "min": min(xs, default=None),
                  "max": max(xs, default=None)}
    return out


# -- quick recovery ------------------------------------------------------------------------------------
def bench_quick(live, client, kills: int, kill_after: int) -> list[dict[str, Any]]:
    rows = []
    for k in range(kills):
        for v in IDS:
            if not live.alive(v):
                live.restart(v)
        live.edge.readmit()
        pipe = client.pipelines[0]
        first, mid = pipe[0][0], pipe[1][0]
        killer = live.when(f"r{k}-c1-{first}-", kill_after, lambda mid=mid: live.kill(mid))
        summary = live.edge.run_round(k, [client])
        killer.join(10)
        t_kill = killer.result.get("value")
        recs = [r for r in live.edge.records if r.round == k]
        if t_kill is None or not recs or summary["errors"]:
            log.warning("kill %d: no clean recovery (%s)", k, summary["errors"])
            rows.append({"kill": k, "ok": False})
            continue
        r = recs[0]
        rows.append({"kill": k, "ok": True, "victim": mid,
                     "detection_s": r.t_failure - t_kill, "replan_s": r.t_replanned - r.t_failure,
                     "redeploy_s": r.t_redeployed - r.t_replanned, "resume_s": r.t_resumed - r.t_redeployed,
                     "total_s": r.t_resumed - t_kill, "total_excl_detection_s": r.t_resumed - r.t_failure,
                     "moved_bytes": r.moved_bytes, "planned_moved_bytes": r.planned_moved_bytes,
                     "departed_share_bytes": r.departed_share_bytes, "model_bytes": r.model_bytes,
                     "steps_lost": r.steps_lost, "template_precomputed": r.template_precomputed,
                     "reason": r.reason, "accepted": summary["accepted"]})
    return rows


# -- full relaunch -------------------------------------------------------------------------------------
def bench_relaunch(live, client, trials: int, rnd0: int) -> list[dict[str, Any]]:
    from flad_core.atomic import atomic_write_bytes
    from flad_core.protocol import EDGE_OWNER, SERVICE_ASSIGN, SERVICE_START
    from flad_core.weights import from_bytes, to_bytes
    from flad_edge.fhdp.control import READY, REPORT

    edge = live.edge
    rows = []
    for j in range(trials):
        rnd = rnd0 + j
        for v in IDS:
            if not live.alive(v):
                live.restart(v)
        _forget(edge, IDS)
        pipe = client.pipelines[0]
        first, mid = pipe[0][0], pipe[1][0]
        # the same kill, landing between steps (the relaunch throws the running round away either way)
        time.sleep(0.5)
        t_kill = live.kill(mid)
        t_fail = _wait_failure(edge, mid, 30)
        # 1. stop everything
        for v in IDS:
            if live.alive(v):
                live.group.procs[v].terminate()
        for v in IDS:
            try:
                live.group.procs[v].wait(15)
            except subprocess.TimeoutExpired:
                live.group.procs[v].kill()
                live.group.procs[v].wait(10)
        t_stopped = time.time()
        # 2. reload the checkpoint (the edge's model, written and read back atomically) and re-plan
        ckpt = live.workdir / "relaunch.safetensors"
        atomic_write_bytes(ckpt, to_bytes(edge.model.state_dict()))
        edge.model.load_state_dict(from_bytes(ckpt.read_bytes(), what="checkpoint"))
        survivors = [v for v in IDS if v != mid]
        new = edge.essential_pipelines(survivors)
        new_pipe = next(p for p in new if p[0][0] == first)
        t_replanned = time.time()
        # 3. restart the survivors' processes
        live.restart(survivors)          # all at once, from this thread (see LiveFleet.restart)
        t_started = time.time()
        _forget(edge, IDS)
        # 4. deploy every stage from the edge, then run to the first step
        b = edge.control.assignment(client.id, client.members, new_pipe, [EDGE_OWNER] * len(edge.layers), rnd,
                                    edge.cfg.local_steps, pipeline_id=f"r{rnd}-c1-{first}-relaunched", attempt=1)
        b.publish_progress = True
        client.command(SERVICE_ASSIGN, b)
        ready = client.wait_reports(READY, b, 120)
        t_deployed = time.time()
        client.command(SERVICE_START, b)
        deadline = time.monotonic() + 120
        while edge.progress.first_step_at(b.pipeline_id) is None and time.monotonic() < deadline:
            time.sleep(0.002)
        t_resumed = edge.progress.first_step_at(b.pipeline_id)
        client.wait_reports(REPORT, b, 120)
        rows.append({"trial": j, "victim": mid, "detection_s": t_fail - t_kill if t_fail else None,
                     "stop_s": t_stopped - (t_fail or t_kill), "reload_replan_s": t_replanned - t_stopped,
                     "restart_processes_s": t_started - t_replanned, "redeploy_s": t_deployed - t_started,
                     "resume_s": (t_resumed - t_deployed) if t_resumed else None,
                     "total_s": (t_resumed - t_kill) if t_resumed else None,
                     "moved_bytes": sum(r.layer_bytes_fetched for r in ready.values())})
        live.restart(mid)
    _forget(edge, IDS)
    return rows


def _wait_failure(edge, vid: str, timeout_s: float) -> float | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        hit = edge.membership.failure_of(vid)
        if hit:
            return hit[1]
        time.sleep(0.002)
    return None


def _forget(edge, ids: list[str]) -> None:
    """The relaunch baseline manages membership itself: clear the recovering edge's bookkeeping."""
    time.sleep(0.3)
    edge.membership.forget(ids)


# -- torchrun elastic ------------------------------------------------------------------------------------
def _kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    import psutil

    try:
        proc = psutil.Process(pid)
        for child in proc.children(recursive=True):
            child.send_signal(sig)
        proc.send_signal(sig)
    except psutil.NoSuchProcess:
        pass


def _wait_listening(port: int, timeout_s: float) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"torchrun's rendezvous store did not listen on {port}")


def _start_agents(workdir: Path, tag: str, port: int, last_call_s: int | None, ckpt_every: int, ckpt: Path,
                  progress: Path) -> list[tuple[subprocess.Popen, Any]]:
    """Start the 3 torchrun agents (one node each); returns (process, its open log file) per node."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    agents = []
    # With the rendezvous' shared TCP store (the default), restarted workers read the previous incarnation's
    # gloo peer addresses (worker keys carry no per-round prefix) and never connect; a store per attempt,
    # hosted by the new rank 0, is torch's own switch for that.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LOGLEVEL": "WARNING", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    for node in range(3):
        cmd = [torchrun, "--nnodes=2:3", "--nproc-per-node=1", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=flad-{tag}", "--max-restarts=3"]
        if last_call_s is not None:
            cmd += ["--rdzv-conf", f"last_call_timeout={int(last_call_s)}"]   # torch wants whole seconds
        cmd += ["-m", "flad_bench.recovery_torchrun", "--ckpt", str(ckpt), "--ckpt-every", str(ckpt_every),
                "--progress", str(progress)]
        log_f = open(workdir / f"torchrun-{tag}-node{node}.log", "wb")  # noqa: SIM115 - closed in _stop_agents
        agents.append((subprocess.Popen(cmd, stdout=log_f, stderr=subprocess.STDOUT, env=env,
                                        stdin=subprocess.DEVNULL), log_f))
        if node == 0:   # node 0 must host the c10d store (the node we kill must not): wait until it listens
            _wait_listening(port, 90)
    return agents


def _kill_after_two_steps(progress: Path, agents: list, deadline: float) -> float | None:
    """SIGKILL node 2's agent tree once 2 steps are logged; the kill's wall time (None: never got there)."""
    while time.monotonic() < deadline:
        steps = [ln for ln in progress.read_text().splitlines() if ln.startswith("step")]
        if len(steps) >= 2:
            t_kill = time.time()
            _kill_tree(agents[2][0].pid)
            return t_kill
        if all(p.poll() is not None for p, _ in agents):
            return None
        time.sleep(0.01)
    return None


def _wait_resumed(progress: Path, agents: list, t_kill: float, deadline: float
                  ) -> tuple[float | None, float | None, list[str]]:
    """Follow the progress log after the kill: (workers restarted at, first step after that, the log's lines)."""
    t_restart = t_resumed = None
    lines: list[str] = []
    while time.monotonic() < deadline and any(p.poll() is None for p, _ in agents[:2]):
        lines = progress.read_text().splitlines()
        for ln in lines:
            parts = ln.split()
            if parts[0] == "start" and float(parts[2]) > t_kill and t_restart is None:
                t_restart = float(parts[2])
            if parts[0] == "step" and t_restart is not None and float(parts[2]) > t_restart:
                t_resumed = float(parts[2])
                break
        if t_resumed:
            break
        time.sleep(0.05)
    return t_restart, t_resumed, lines


def _steps_lost(lines: list[str], t_kill: float, t_restart: float | None) -> int:
    """The last step completed before the kill minus the step the restarted workers started from."""
    before = [int(ln.split()[1]) for ln in lines if ln.startswith("step") and float(ln.split()[2]) <= t_kill]
    restart_from = next(int(ln.split()[1]) for ln in lines if ln.startswith("start")
                        and float(ln.split()[2]) == t_restart)
    return max(before, default=0) - restart_from


def _stop_agents(agents: list) -> None:
    """SIGTERM the agents still running, SIGKILL those still up a second later; close their logs."""
    for p, _ in agents:
        if p.poll() is None:
            _kill_tree(p.pid, signal.SIGTERM)
    time.sleep(1.0)
    for p, f in agents:
        if p.poll() is None:
            _kill_tree(p.pid)
        p.wait(10)
        f.close()


def torchrun_trial(workdir: Path, tag: str, last_call_s: int | None, ckpt_every: int,
                   timeout_s: float = 150.0) -> dict[str, Any]:
    from flad_edge.fhdp.recovery.live import free_port_base

    port = free_port_base(2)
    progress = workdir / f"torchrun-{tag}.progress"
    ckpt = workdir / f"torchrun-{tag}.safetensors"
    for f in (progress, ckpt):
        f.unlink(missing_ok=True)
    progress.touch()
    agents = _start_agents(workdir, tag, port, last_call_s, ckpt_every, ckpt, progress)
    try:
        deadline = time.monotonic() + timeout_s
        t_kill = _kill_after_two_steps(progress, agents, deadline)
        if t_kill is None:
            return {"tag": tag, "ok": False, "error": "did not reach 2 steps"}
        t_restart, t_resumed, lines = _wait_resumed(progress, agents, t_kill, deadline)
        lost = _steps_lost(lines, t_kill, t_restart) if t_resumed else None
        return {"tag": tag, "ok": t_resumed is not None, "last_call_timeout_s": last_call_s if last_call_s else 30.0,
                "total_s": (t_resumed - t_kill) if t_resumed else None,
                "to_workers_restarted_s": (t_restart - t_kill) if t_restart else None,
                "resume_s": (t_resumed - t_restart) if t_resumed else None, "steps_lost": lost}
    finally:
        _stop_agents(agents)


# -- the run -------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    from flad_core.device import device_info
    from flad_edge.fhdp.config import FhdpConfig
    from flad_edge.fhdp.recovery.live import LiveFleet
    from flad_edge.fhdp.recovery.records import RecoveryConfig

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="flad-bench-recovery-"))
    load_before = os.getloadavg()
    t0 = time.time()
    cfg = FhdpConfig(local_steps=args.steps, batch_size=4, n_micro=2, time_scale=0.02, planner="exact",
                     round_deadline_s=300)
    rcfg = RecoveryConfig(backup_every=args.backup_every, link_timeout_s=30.0)
    out: dict[str, Any] = {"benchmark": "recovery"}
    live = LiveFleet(workdir / "fleet", IDS, cfg, rcfg, heartbeat_timeout_s=args.heartbeat_timeout)
    try:
        client = live.edge.cluster_client(IDS, "c1")
        n_layers = len(live.edge.layers)
        tpl_ready = live.edge.templates["c1"].wait(60)
        quick = bench_quick(live, client, args.kills, args.kill_after)
        ok = [r for r in quick if r.get("ok")]
        out["quick_recovery"] = {
            **_summ(ok, ["detection_s", "replan_s", "redeploy_s", "resume_s", "total_s", "total_excl_detection_s"]),
            "failed": len(quick) - len(ok), "templates_pregenerated": tpl_ready,
            "template_generation_s": live.edge.templates["c1"].generation_time_s,
            "detection": "dropped TCP connection (ZMQ monitor); heartbeat timeout "
                         f"{args.heartbeat_timeout} s as the fallback", "samples": quick}
        if ok:
            moved = [r["moved_bytes"] for r in ok]
            share = [r["departed_share_bytes"] for r in ok]
            out["bytes"] = {"model_bytes": ok[0]["model_bytes"], "moved_bytes_p50": _pct(moved, 0.5),
                            "departed_share_bytes_p50": _pct(share, 0.5),
                            "moved_over_model": _pct(moved, 0.5) / ok[0]["model_bytes"],
                            "moved_over_departed_share_max": max(m / s for m, s in zip(moved, share, strict=True)
                                                                 if s),
                            "note": "model/share bytes: weights + AdamW m, v, step (tensor bytes); moved: the "
                                    "safetensors payloads the new owners fetched"}
        if args.relaunches:
            try:
                rel = bench_relaunch(live, client, args.relaunches, rnd0=1000)
            except Exception as exc:  # report what was measured, and why the rest was not
                log.exception("relaunch baseline failed")
                rel = [{"error": f"{type(exc).__name__}: {exc}"}]
            out["relaunch"] = {**_summ(rel, ["detection_s", "stop_s", "reload_replan_s", "restart_processes_s",
                                             "redeploy_s", "resume_s", "total_s"]), "samples": rel}
    finally:
        live.close()
    if args.torchrun_trials:
        out["torchrun_elastic"] = {}
        for tag, last_call in (("default", None), ("tuned", args.tuned_last_call)):
            trials = [torchrun_trial(workdir, f"{tag}{i}", last_call, args.backup_every)
                      for i in range(args.torchrun_trials)]
            good = [t for t in trials if t["ok"]]
            out["torchrun_elastic"][tag] = {**_summ(good, ["total_s", "to_workers_restarted_s", "resume_s"]),
                                            "failed": len(trials) - len(good), "samples": trials}
    q50 = out.get("quick_recovery", {}).get("total_s", {}).get("p50")
    goals: dict[str, Any] = {}
    if q50:
        excl = out["quick_recovery"]["total_excl_detection_s"]["p50"]
        goals["recovery_p50_excl_detection_s"] = excl
        goals["recovery_p50_excl_detection_le_1s"] = excl is not None and excl <= 1.0
        for name, ref in (("relaunch", out.get("relaunch", {}).get("total_s", {}).get("p50")),
                          ("torchrun_default", out.get("torchrun_elastic", {}).get("default", {})
                           .get("total_s", {}).get("p50")),
                          ("torchrun_tuned", out.get("torchrun_elastic", {}).get("tuned", {})
                           .get("total_s", {}).get("p50"))):
            if ref:
                goals[f"speedup_vs_{name}"] = ref / q50
                goals[f"speedup_vs_{name}_ge_10x"] = ref / q50 >= 10
        if "bytes" in out:
            goals["moved_le_departed_share_plus_5pct"] = out["bytes"]["moved_over_departed_share_max"] <= 1.05
    out["goals"] = goals
    out["conditions"] = {"host": platform.node(), "cpus": os.cpu_count(), "load_avg_before": load_before,
                         "load_avg_after": os.getloadavg(), "python": platform.python_version(),
                         "device": device_info("auto"),
                         "model": f"tiny vision encoder ({n_layers} layers)",
                         "fleet": "3 x jetson_nano (emulated, time_scale 0.02), one cluster, SWIFT 3-stage "
                                  "essential pipelines", "steps_per_pipeline": args.steps,
                         "backup_every": args.backup_every, "heartbeat_timeout_s": args.heartbeat_timeout,
                         "kill_after_steps": args.kill_after, "seconds": round(time.time() - t0, 1),
                         "workdir": str(workdir)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flad bench recovery", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--kills", type=int, default=10, help="quick-recovery kills (p50/p95 over these)")
    parser.add_argument("--relaunches", type=int, default=3, help="full-relaunch trials (0: skip)")
    parser.add_argument("--torchrun-trials", type=int, default=2, help="torchrun trials per setting (0: skip)")
    parser.add_argument("--tuned-last-call", type=int, default=1, help="tuned torchrun last_call_timeout (whole s)")
    parser.add_argument("--steps", type=int, default=5, help="steps per pipeline per round")
    parser.add_argument("--kill-after", type=int, default=3, help="quick recovery: SIGKILL after this many steps")
    parser.add_argument("--backup-every", type=int, default=2)
    parser.add_argument("--heartbeat-timeout", type=float, default=1.0)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: one quick-recovery kill, no relaunch or torchrun baselines (the last two "
                             "default to 0; given explicitly, they run)")
    args = parser.parse_args(argv)
    if args.quick:
        given = set(argv if argv is not None else sys.argv[1:])
        args.kills = args.kills if "--kills" in given else 1
        args.relaunches = args.relaunches if "--relaunches" in given else 0
        args.torchrun_trials = args.torchrun_trials if "--torchrun-trials" in given else 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    out = run(args)
    if args.json:
        print(json.dumps(out, default=str))
    else:
        q = out.get("quick_recovery", {})
        print(f"quick recovery p50 {q.get('total_s', {}).get('p50')} s (n={q.get('n')}); goals: {out['goals']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
