"""`flad chaos`: hurt vehicles, edges and the cloud during FHDP training and check that nothing is lost.

`--scope fleet` (default): the whole fixed fleet as processes -- vehicles killed, stopped and cut off, the edge
and the cloud SIGKILLed, one vehicle poisoned -- audited from the run's own records (`fleet_chaos.py`).

`--scope cluster`: one cluster of vehicle processes trains the encoder with quick recovery
(`RecoveringFhdpEdge`, in this process). Every round one chaos event hits a random member of a random
pipeline at a random step:
  kill     SIGKILL (a vehicle that vanishes; detected by its dropped connection),
  stop     SIGSTOP until the round ends (a frozen vehicle; detected by missing heartbeats),
  cutoff   SIGSTOP for a while, then SIGCONT (a temporary link outage: its TCP connection stays up
           but nothing gets through; detected by missing heartbeats; it comes back on its own),
  planned  the mobility model predicts that it leaves shortly: the edge hands over its layers at a
           step boundary, then the vehicle is killed (no step may be lost).
Between rounds everything hurt comes back (restarted, or continued) and is re-admitted. The run passes
when every round completes with its client's update counted exactly once, every unplanned recovery lost
at most `backup_every` steps (plus the steps completed while the last backup was in flight) and every
planned departure lost none. No root needed: a cut-off is emulated by stopping the process (no netns).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from flad_edge.fhdp.config import FhdpConfig
from flad_edge.fhdp.recovery.records import RecoveryConfig

log = logging.getLogger(__name__)

KINDS = ("kill", "stop", "cutoff", "planned")


def run_chaos(args: argparse.Namespace) -> dict[str, Any]:
    from flad_edge.fhdp.recovery.live import LiveFleet

    rng = random.Random(args.seed)
    ids = [f"v{i}" for i in range(args.vehicles)]
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="flad-chaos-"))
    cfg = FhdpConfig(local_steps=args.steps, batch_size=4, n_micro=2, time_scale=0.02, planner="exact",
                     round_deadline_s=300, seed=args.seed)
    rcfg = RecoveryConfig(backup_every=args.backup_every, link_timeout_s=30.0, templates_f=min(2, len(ids) - 1))
    kinds = [k for k in args.events.split(",") if k]  # --scope cluster: event kinds
    bad = set(kinds) - set(KINDS)
    if bad:
        raise ValueError(f"unknown chaos events {sorted(bad)} (known: {', '.join(KINDS)})")
    t0 = time.time()
    live = LiveFleet(workdir, ids, cfg, rcfg, heartbeat_timeout_s=args.heartbeat_timeout)
    events: list[dict[str, Any]] = []
    rounds: list[dict[str, Any]] = []
    try:
        client = live.edge.cluster_client(ids, "cluster1")
        for rnd in range(args.rounds):
            _bring_back(live, ids)
            kind = kinds[rnd % len(kinds)] if args.cycle else rng.choice(kinds)
            pipe = rng.choice(client.pipelines)
            first = pipe[0][0]
            victim = rng.choice([v for v, _, _ in pipe])
            at_step = rng.randint(1, max(1, args.steps - 2))
            ev: dict[str, Any] = {"round": rnd, "kind": kind, "vehicle": victim, "pipeline_first": first,
                                  "at_step": at_step}
            events.append(ev)
            trigger = _arm(live, rnd, kind, victim, first, at_step, ev)
            summary = live.edge.run_round(rnd, [client])
            if trigger is not None:
                trigger.join(10)
            if kind == "planned" and live.alive(victim):
                ev["killed_after_handover_at"] = live.kill(victim)
            rounds.append(summary)
            log.info("round %d (%s on %s): accepted %d, loss %.4f, recoveries %d, handovers %d", rnd, kind, victim,
                     summary["accepted"], summary["train_loss"], len(summary["recoveries"]), len(summary["handovers"]))
    finally:
        live.close()
    return _verdict(args, rounds, events, live, time.time() - t0)


def _arm(live, rnd: int, kind: str, victim: str, first: str, at_step: int, ev: dict) -> threading.Thread | None:
    prefix = f"r{rnd}-cluster1-{first}-"
    if kind == "kill":
        return live.when(prefix, at_step, lambda: ev.__setitem__("t", live.kill(victim)))
    if kind == "stop":
        return live.when(prefix, at_step, lambda: ev.__setitem__("t", live.kill(victim, signal.SIGSTOP)))
    if kind == "cutoff":
        outage = live.fleet.heartbeat.timeout_s * 2

        def cut() -> None:
            ev["t"] = live.kill(victim, signal.SIGSTOP)
            time.sleep(outage)
            live.kill(victim, signal.SIGCONT)
            ev["outage_s"] = outage

        return live.when(prefix, at_step, cut)
    # planned: the prediction lands before the pipeline starts; the hand-over happens at a step boundary
    step_s = live.edge.step_time or 0.3
    ev["t"] = time.time()
    live.edge.predict_departure(victim, time.time() + live.edge.rcfg.handover_margin_s + at_step * step_s)
    return None


def _bring_back(live, ids: list[str]) -> None:
    """Everything hurt in the last round returns (restarted or continued) and is re-admitted next round."""
    for v in ids:
        if v in live.stopped and live.alive(v):
            live.kill(v, signal.SIGCONT)
    time.sleep(live.fleet.heartbeat.interval_s * 3)
    for v in ids:
        if not live.alive(v):
            live.restart(v)
    live.edge.predicted_departures.clear()


def _verdict(args, rounds: list[dict], events: list[dict], live, seconds: float) -> dict[str, Any]:
    e = args.backup_every
    problems = []
    for r in rounds:
        if r["accepted"] != 1 or r["missing"] or r["errors"]:
            problems.append(f"round {r['round']}: accepted {r['accepted']}, errors {r['errors']}")
    recoveries = [rec for r in rounds for rec in r["recoveries"]]
    handovers = [h for r in rounds for h in r["handovers"]]
    for rec in recoveries:
        # a backup is taken every e steps and sent off the critical path: at most e steps, plus one if the
        # departure came while the last backup was still on the wire
        if rec["steps_lost"] > e + 1:
            problems.append(f"round {rec['round']}: {rec['steps_lost']} steps lost > backup interval {e} (+1)")
    for h in handovers:
        if h["steps_lost"]:
            problems.append(f"planned departure lost {h['steps_lost']} steps")
    planned = [ev for ev in events if ev["kind"] == "planned"]
    if planned and not handovers:
        problems.append("planned departures were predicted but no hand-over happened")
    lost = [rec["steps_lost"] for rec in recoveries]
    return {
        "ok": not problems, "problems": problems, "seconds": round(seconds, 1),
        "conditions": {"vehicles": args.vehicles, "rounds": args.rounds, "steps_per_pipeline": args.steps,
                       "backup_every": e, "heartbeat_timeout_s": args.heartbeat_timeout, "seed": args.seed,
                       "device_figures": "emulated (time_scale 0.02)",
                       "cutoff": "emulated by SIGSTOP/SIGCONT (no network namespace)"},
        "events": events,
        "rounds": [{"round": r["round"], "accepted": r["accepted"], "samples": r["samples"],
                    "train_loss": r["train_loss"], "recoveries": len(r["recoveries"]),
                    "handovers": len(r["handovers"]), "errors": r["errors"]} for r in rounds],
        "recoveries": [{k: rec[k] for k in ("round", "departed", "reason", "completed_before", "steps_lost",
                                            "moved_bytes", "departed_share_bytes", "recovery_s")}
                       for rec in recoveries],
        "handovers": [{k: h.get(k) for k in ("round", "leaving", "steps_lost", "planned_moved_bytes")}
                      for h in handovers],
        "steps_lost": {"unplanned_max": max(lost, default=0), "unplanned_total": sum(lost),
                       "planned_total": sum(h["steps_lost"] for h in handovers)},
        "readmitted": len(live.edge.readmitted),
    }


CLUSTER_DEFAULTS = {"rounds": 4, "steps": 6, "heartbeat_timeout": 1.0}
FLEET_DEFAULTS = {"rounds": 30, "steps": 3, "heartbeat_timeout": 3.0}


def main_fleet(args: argparse.Namespace) -> int:
    from flad_core.runs import RunDir
    from flad_edge.fhdp.recovery.fleet_chaos import run_fleet_chaos

    run = None
    if not args.workdir:
        run = RunDir.create("chaos", vars(args) | {"func": None}, root=args.runs_dir)
        args.workdir = str(run.path)
    try:
        out = run_fleet_chaos(args)
    except (ValueError, RuntimeError, TimeoutError, OSError) as exc:
        print(f"flad chaos: {exc}", file=sys.stderr)
        return 1
    Path(args.workdir, "chaos.json").write_text(json.dumps(out, default=str, indent=1))
    if args.json:
        print(json.dumps(out, default=str))
    else:
        c = out["chaos"]
        print(f"{out['events_total']} events {out['events_by_kind']}; restarts {c['restarts']}; "
              f"edge resumed {c['edge_resumes']}x; {out['seconds']} s; records in {args.workdir}")
        for name, g in out["goals"].items():
            print(f"  {'ok  ' if g['met'] else 'FAIL'} {name}: {g['value']}")
        print("PASS" if out["ok"] else "FAIL")
    return 0 if out["ok"] else 1


def main(args: argparse.Namespace) -> int:
    for key, value in (FLEET_DEFAULTS if args.scope == "fleet" else CLUSTER_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.scope == "fleet":
        return main_fleet(args)
    try:
        out = run_chaos(args)
    except (ValueError, RuntimeError, TimeoutError) as exc:
        print(f"flad chaos: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out, default=str))
    else:
        for ev, r in zip(out["events"], out["rounds"], strict=False):
            print(f"round {r['round']}: {ev['kind']:8s} {ev['vehicle']} (pipeline of {ev['pipeline_first']}, "
                  f"step {ev['at_step']}) -> accepted {r['accepted']}, loss {r['train_loss']:.4f}, "
                  f"recoveries {r['recoveries']}, hand-overs {r['handovers']}")
        print(f"steps lost: {out['steps_lost']}; re-admitted {out['readmitted']}; {out['seconds']} s")
        print("PASS" if out["ok"] else "FAIL: " + "; ".join(out["problems"]))
    return 0 if out["ok"] else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("chaos", help="kill, stop and cut off random vehicles during FHDP training",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scope", choices=("fleet", "cluster"), default="fleet",
                   help="fleet: every tier as processes, edge and cloud kills, a poisoned vehicle (default); "
                        "cluster: one cluster, one vehicle event per round")
    p.add_argument("--rounds", type=int, default=None,
                   help=f"FL rounds (default: fleet {FLEET_DEFAULTS['rounds']}, cluster {CLUSTER_DEFAULTS['rounds']})")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps per pipeline per round (default: fleet {FLEET_DEFAULTS['steps']}, "
                        f"cluster {CLUSTER_DEFAULTS['steps']})")
    p.add_argument("--heartbeat-timeout", type=float, default=None,
                   help="detection timeout in seconds (default: fleet 3, cluster 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="folder for the fleet file and logs (default: fleet: a new "
                                                  "runs/<id>/; cluster: a temp dir)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    cluster = p.add_argument_group("--scope cluster")
    cluster.add_argument("--vehicles", type=int, default=3, help="cluster size (default 3)")
    cluster.add_argument("--backup-every", type=int, default=2, help="edge backup interval e in steps (default 2)")
    cluster.add_argument("--events", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    cluster.add_argument("--cycle", action="store_true", help="take the events in order instead of at random")
    fleet = p.add_argument_group("--scope fleet")
    fleet.add_argument("--target-events", type=int, default=50,
                       help="events the edge kills are spread over (default 50; events go on until the edge is done)")
    fleet.add_argument("--interval", type=float, default=2.0, help="seconds between events (default 2)")
    fleet.add_argument("--first-event-s", type=float, default=20.0,
                       help="seconds after start before the first event (default 20: processes start)")
    fleet.add_argument("--outage", type=float, default=4.0,
                       help="seconds a killed or stopped vehicle stays down (default 4)")
    fleet.add_argument("--max-down", type=int, default=2, help="vehicles down at the same time at most (default 2)")
    fleet.add_argument("--round-deadline", type=float, default=60.0,
                       help="a round closes this long after it started with the updates it has (default 60 s)")
    fleet.add_argument("--edge-kills", type=int, default=4, help="SIGKILLs of the edge process (default 4)")
    fleet.add_argument("--no-cloud-kill", dest="cloud_kill", action="store_false", help="do not kill the cloud")
    fleet.add_argument("--poison", default="scale:100",
                       help="attack of the extra vehicle v006 (scale:K, nan, noise:S; '' for none; default scale:100)")
    fleet.add_argument("--frames", type=int, default=48, help="collected frames per vehicle (default 48)")
    fleet.add_argument("--loss-tolerance", type=float, default=0.10,
                       help="final held-out loss at most this much above the event-free run's (default 0.10)")
    fleet.add_argument("--no-reference", dest="reference", action="store_false",
                       help="skip the event-free reference run (no loss comparison)")
    fleet.add_argument("--timeout", type=float, default=1800.0, help="give up on a run after this many seconds")
    fleet.add_argument("--runs-dir", type=Path, default=None, help="where runs/<id>/ goes (default: ./runs)")
    p.set_defaults(func=main)


if __name__ == "__main__":   # `python -m flad_edge.fhdp.recovery.chaos ...` also works without the `flad` script
    from flad_core.runs import setup_logging

    _parser = argparse.ArgumentParser(prog="flad")
    register(_parser.add_subparsers(dest="command"))
    _args = _parser.parse_args(["chaos", *sys.argv[1:]])
    setup_logging(logging.INFO)
    sys.exit(_args.func(_args))
