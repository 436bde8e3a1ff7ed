"""Stress the shutdown of the ROS processes the real-ROS tier starts; count crashes and hangs.

    source .ros-ws/env.sh && python test_ros/stress_shutdown.py --rounds 30 [--scenario peer chain ...] [--out DIR]

Not a test (pytest does not collect it): a measuring tool for the shutdown path (RosBus.close, ros_node.run_node,
node_main, role_node). Each round starts the processes of every chosen scenario together (so they load the
machine and discover each other, as in the tier) while this process publishes into their input topics, waits until
each says it is ready (a line of its log), lets traffic flow 0.2-2 s more -- or, in the --early fraction of rounds,
signals 0.5-4 s after the start, while they still build themselves -- then signals them as the tests do, in a
random order, and waits up to --timeout seconds for each. Outcomes per process: ok (exit 0), sigsegv (-11), sigabrt
(-6), hang (still alive after --timeout: SIGUSR1 for a stack dump, then SIGKILL), forced (exit 3: ros_node's
shutdown watchdog ended a hung teardown), other exit codes as rcN, and "dirty" for an exit 0 whose log holds a
traceback, a fatal-error dump or a watchdog line. Processes run with `-X faulthandler` in their own folder under
--out, with core dumps on (where the system writes them to the working folder: `gdb python core` gives the native
backtrace). Logs of rounds with a bad outcome are kept. The last line printed is one JSON object with the counts.

Scenarios (what the tests do):
  peer      test_bus_ros: ros_bus_peer.py (a RosBus with its own node and executor thread) echoing heartbeats
            this process publishes; SIGTERM.
  chain     test_nodes_closed_loop: encoder_node + waypoint_node fed world frames; SIGINT.
  control   test_nodes_closed_loop / flad edge closed-loop: controller_node fed odometry; SIGTERM (ProcessGroup).
  role      test_nodes_edge: orchestrator (control_plane) + one stage_worker registering with it; SIGINT.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CHILD_PYTHONPATH = ""   # --child-pythonpath
# a log with one of these is "dirty" even at exit 0 (the last three: ros_node's shutdown watchdog, its exit timer,
# threads left running after a node's teardown)
FATAL = ("Fatal Python error", "Traceback (most recent call last)", "terminate called", "Segmentation fault",
         "ros shutdown watchdog", "Timeout (0:", "threads still running after the teardown")


class Proc:
    def __init__(self, name: str, cmd: list[str], folder: Path, sig: int, ready: str) -> None:
        self.name, self.sig, self.folder, self.ready = name, sig, folder, ready
        folder.mkdir(parents=True, exist_ok=True)
        self.log = folder / f"{name}.log"
        fh = open(self.log, "wb")  # noqa: SIM115 - the child keeps it
        env = dict(os.environ)
        if CHILD_PYTHONPATH:
            env["PYTHONPATH"] = os.pathsep.join([CHILD_PYTHONPATH, env.get("PYTHONPATH", "")])
        self.p = subprocess.Popen([sys.executable, "-X", "faulthandler", *cmd], stdout=fh, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, cwd=folder, env=env, preexec_fn=_cores_on)
        fh.close()


def _cores_on() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def _ros_args(*pairs: str) -> list[str]:
    return ["--ros-args", *pairs]


def start_scenarios(names: list[str], folder: Path, k: int) -> list[Proc]:
    tag = f"st{os.getpid()}_{k}"
    procs: list[Proc] = []
    if "peer" in names:
        procs.append(Proc("peer", [str(HERE / "ros_bus_peer.py"), f"{tag}_peer"], folder, signal.SIGTERM,
                          "ready"))
    if "chain" in names:
        procs.append(Proc("encoder", ["-m", "flad_vehicle.nodes.encoder_node", *_ros_args(
            "-r", f"__node:={tag}_enc", "-p", f"vehicle_id:={tag}", "-p", f"role_name:={tag}r")], folder,
            signal.SIGINT, "-> /flad/"))
        procs.append(Proc("waypoint", ["-m", "flad_edge.nodes.waypoint_node", *_ros_args(
            "-r", f"__node:={tag}_wp", "-p", f"vehicle_ids:=[{tag}]")], folder, signal.SIGINT,
            "waypoint node: serving"))
    if "control" in names:
        procs.append(Proc("controller", ["-m", "flad_vehicle.nodes.controller_node", *_ros_args(
            "-r", f"__node:={tag}_ctl", "-p", f"vehicle_id:={tag}", "-p", f"role_name:={tag}c",
            "-p", "pid.startup_brake_ticks:=0")], folder, signal.SIGTERM,
            "vehicle_control_cmd"))
    if "role" in names:
        sys.path.insert(0, str(HERE))
        from ros_testing import small_fleet

        fleet, _, base = small_fleet(folder, ids=("v000", "v001"))
        common = ["-p", f"fleet:={fleet}", "-p", f"port_base:={base}", "-p", "mode:=control_plane"]
        procs.append(Proc("orch", ["-m", "flad_edge.nodes.orchestrator", *_ros_args(
            "-r", f"__node:={tag}_orch", *common, "-p", "duration_s:=0.0", "-p", "expect:=0")], folder, signal.SIGINT,
            "admitted v000"))
        procs.append(Proc("worker", ["-m", "flad_vehicle.nodes.stage_worker", *_ros_args(
            "-r", f"__node:={tag}_sw", "-r", "__ns:=/v000", *common, "-p", "vehicle_id:=v000")], folder, signal.SIGINT,
            "registered"))
    return procs


class Traffic:
    """Publishes into the scenarios' input topics from this process (a RosBus of its own) until stopped."""

    def __init__(self, names: list[str], tag: str) -> None:
        from flad_core import codec
        from flad_core.bus_ros import RosBus

        self.stop = threading.Event()
        self.bus = RosBus(f"stress_{tag}")
        self.jobs: list[Any] = []
        if "peer" in names:
            hb = codec.new("flad_msgs/msg/Heartbeat", header=codec.header(1.0), vehicle_id="v0", seq=1, state=1,
                           round=0)
            self.jobs.append(lambda: self.bus.publish("/rosbus_test/in/heartbeat", hb))
        if "chain" in names:
            from flad_sim.closed_loop import ClosedLoopWorld, WorldBridgeConfig

            world = ClosedLoopWorld(self.bus, WorldBridgeConfig(roles=[f"{tag}r"], expert_waypoints=False))
            self.jobs.append(world.publish_frame)
        if "control" in names:
            from types import SimpleNamespace as Ns

            from flad_sim import bridge as B

            def odo() -> None:
                st = Ns(x=0.0, y=0.0, z=0.0, yaw=0.0, speed=1.0, yaw_rate=0.0, time_s=time.monotonic() % 1000)
                self.bus.publish(f"/carla/{tag}c/odometry", B.odometry_msg(st, f"{tag}c"))
            self.jobs.append(odo)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            for job in self.jobs:
                try:
                    job()
                except Exception as exc:   # the tool measures the peers, not itself
                    print(f"traffic: {exc}", file=sys.stderr)
            self.stop.wait(0.05)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.bus.close()


def classify(proc: Proc, timeout: float) -> tuple[str, float]:
    t0 = time.monotonic()
    if proc.p.poll() is None:
        proc.p.send_signal(proc.sig)
    try:
        rc = proc.p.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.p.send_signal(signal.SIGUSR1)   # faulthandler dump where registered (else the default action ends it)
        time.sleep(1.0)
        proc.p.kill()
        proc.p.wait()
        return "hang", time.monotonic() - t0
    took = time.monotonic() - t0
    text = proc.log.read_text(errors="replace")
    if rc == 0:
        return ("dirty" if any(f in text for f in FATAL) else "ok"), took
    return {-11: "sigsegv", -6: "sigabrt", 3: "forced"}.get(rc, f"rc{rc}"), took


def run_round(args: argparse.Namespace, folder: Path, k: int) -> tuple[bool, dict[str, tuple[str, float]]]:
    """One round: start, (wait until ready,) signal every process in a random order; (early?, outcomes)."""
    procs = start_scenarios(args.scenario, folder, k)
    traffic = Traffic(args.scenario, f"st{os.getpid()}_{k}")
    early = random.random() < args.early
    if early:       # a signal while the processes still build themselves (a launch stopping a short plan)
        time.sleep(random.uniform(0.5, 4.0))
    else:           # up and exchanging messages, then some more traffic
        end = time.monotonic() + 90
        while time.monotonic() < end and not all(
                p.p.poll() is not None or p.ready in p.log.read_text(errors="replace") for p in procs):
            time.sleep(0.2)
        time.sleep(random.uniform(0.2, 2.0))
    results: dict[str, tuple[str, float]] = {}
    for proc in procs:
        if proc.p.poll() is not None:
            results[proc.name] = (f"died-early-rc{proc.p.returncode}", 0.0)
        elif not early and proc.ready not in proc.log.read_text(errors="replace"):
            results[proc.name] = ("not-ready", 0.0)
            proc.p.kill()
            proc.p.wait()
    threads = []
    for proc in random.sample(procs, len(procs)):
        if proc.name in results:
            continue
        time.sleep(random.uniform(0.0, 0.3))
        t = threading.Thread(target=lambda pr=proc: results.__setitem__(pr.name, classify(pr, args.timeout)))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    traffic.close()
    return early, {p.name: results[p.name] for p in procs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--scenario", nargs="+", default=["peer", "chain", "control", "role"])
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds a signalled process may take to exit")
    ap.add_argument("--out", type=Path, default=None, help="folder for logs and cores (default: a new temp dir)")
    ap.add_argument("--early", type=float, default=0.0,
                    help="fraction of rounds that signal during start-up instead of once every process is ready")
    ap.add_argument("--child-pythonpath", default="",
                    help="put this first on the processes' PYTHONPATH (not this one's): to measure another flad_core, "
                         "e.g. the committed one, `git archive HEAD src/flad_core/flad_core | tar -x -C DIR` and "
                         "pass DIR/src/flad_core")
    ap.add_argument("--keep-ok", action="store_true", help="keep the logs of rounds without a bad outcome")
    args = ap.parse_args()
    global CHILD_PYTHONPATH
    CHILD_PYTHONPATH = args.child_pythonpath
    out = args.out or Path(tempfile.mkdtemp(prefix="ros_stress_"))
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    durations: dict[str, list[float]] = collections.defaultdict(list)
    bad_rounds = []
    t_start = time.monotonic()
    for k in range(args.rounds):
        folder = out / f"round{k:03d}"
        early, results = run_round(args, folder, k)
        for name, (outcome, took) in results.items():
            counts[name][outcome] += 1
            durations[name].append(took)
        cores = sorted(str(c.relative_to(out)) for c in folder.glob("core*"))
        line = " ".join(f"{n}={o}({t:.1f}s)" for n, (o, t) in results.items())
        print(f"round {k:3d}{' (early)' if early else ''}: {line}{'  cores: ' + ', '.join(cores) if cores else ''}",
              flush=True)
        if any(o != "ok" for o, _ in results.values()):
            bad_rounds.append(k)
        elif not args.keep_ok:
            for f in folder.iterdir():
                if f.is_file():
                    f.unlink()
            folder.rmdir()
    summary = {"rounds": args.rounds, "scenarios": args.scenario, "early": args.early,
               "child_pythonpath": args.child_pythonpath,
               "seconds": round(time.monotonic() - t_start), "out": str(out), "bad_rounds": bad_rounds,
               "counts": {n: dict(c) for n, c in counts.items()},
               "max_stop_s": {n: round(max(d), 2) for n, d in durations.items()}}
    print(json.dumps(summary))
    return 0 if not bad_rounds else 1


if __name__ == "__main__":
    sys.exit(main())
