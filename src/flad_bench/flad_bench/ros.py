"""`flad bench ros`: end-to-end latency sensors -> features -> waypoints -> control, ROS 2 topics vs the ZeroMQ bus.

The same three node processes per transport (the `nodes/` modules: encoder_node, waypoint_node with a CELLAdapt
ADM, controller_node; same models, same seeds) form the vehicle/edge chain; this process plays the world: it
publishes one frame (4 cameras, LiDAR, navigation, odometry, as the world bridge does), waits for the control
stamped with that frame, then publishes the next. Latency = control received - first sensor message sent;
the stage split comes from this process also subscribing the features and waypoints. With both transports
the two chains run at the same time and frames alternate between them in blocks, so a load change on a shared
machine hits both alike. Loopback only; figures depend on the host (see `conditions`).

    flad bench ros --json                       # both transports: needs the ROS tier environment
    flad bench ros --json -- --transports zmq   # ZeroMQ only: runs in the main environment too
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import sys
import threading
import time
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DT = 0.05


def _percentiles(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"n": 0}
    a = np.asarray(xs) * 1000.0
    return {"n": len(xs), "p50": round(float(np.percentile(a, 50)), 3), "p99": round(float(np.percentile(a, 99)), 3),
            "mean": round(float(a.mean()), 3), "min": round(float(a.min()), 3), "max": round(float(a.max()), 3)}


class _Driver:
    """The world side of one chain: publishes frames on its bus, times the answers by header stamp."""

    def __init__(self, bus: Any, frame: list[tuple[str, Any]], vid: str = "v0", role: str = "hero") -> None:
        from flad_sim import bridge as B

        self.B = B
        self.bus = bus
        self.frame = frame
        self.cond = threading.Condition()
        self.seen: dict[str, dict[int, float]] = {"features": {}, "waypoints": {}, "control": {}}
        bus.subscribe(B.topic(role, "vehicle_control_cmd"), "carla_msgs/msg/CarlaEgoVehicleControl",
                      lambda m: self._on("control", m))
        bus.subscribe(f"/flad/{vid}/features", "flad_msgs/msg/EncodedFeatures", lambda m: self._on("features", m))
        bus.subscribe(f"/flad/{vid}/waypoints", "nav_msgs/msg/Path", lambda m: self._on("waypoints", m))

    def _on(self, kind: str, msg: Any) -> None:
        now = time.perf_counter()
        with self.cond:
            self.seen[kind].setdefault(self.B.stamp_key(msg.header), now)
            self.cond.notify_all()

    def publish(self, t: float) -> tuple[int, float]:
        stamp = _time_msg(t)
        for _, msg in self.frame:
            msg.header.stamp = stamp
        t0 = time.perf_counter()
        for topic, msg in self.frame:
            self.bus.publish(topic, msg)
        return self.B.stamp_key(stamp), t0

    def wait(self, key: int, timeout_s: float) -> bool:
        end = time.monotonic() + timeout_s
        with self.cond:
            while key not in self.seen["control"]:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.5))
        return True

    def startup(self, timeout_s: float) -> None:
        """Re-send frame 0 until the chain answers: discovery and model loading take their time."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            key, _ = self.publish(0.0)
            if self.wait(key, 2.0):
                return
        raise TimeoutError(f"the chain did not answer within {timeout_s:.0f} s (see the node logs)")

    def one(self, t: float, timeout_s: float) -> dict[str, float] | None:
        key, t0 = self.publish(t)
        if not self.wait(key, timeout_s):
            return None
        with self.cond:
            f, w, c = (self.seen[k].get(key) for k in ("features", "waypoints", "control"))
        out = {"e2e": c - t0}
        if f is not None and w is not None:
            out.update(sensors_to_features=f - t0, features_to_waypoints=w - f, waypoints_to_control=c - w)
        return out


def _time_msg(t: float) -> Any:
    """A builtin_interfaces/Time for `t` seconds (the stamp the world bridge puts in its headers)."""
    from flad_core import codec

    sec = int(math.floor(t))
    return codec.new("builtin_interfaces/msg/Time", sec=sec, nanosec=int(round((t - sec) * 1e9)) % 1_000_000_000)


def _frame_messages(seed: int = 0) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    """One rendered frame of the embedded world as the world bridge publishes it (odometry last)."""
    from flad_sim import bridge as B
    from flad_sim.labels import LabelMaker
    from flad_sim.route import seeded_routes
    from flad_sim.sensors import SensorRig
    from flad_sim.world import World

    w = World("Town01", seed=seed)
    route = seeded_routes(w.town, seed, 1, min_length=100.0, max_length=150.0)[0]
    ego = w.spawn_ego(route)
    for _ in range(20):
        w.step()
    rig = SensorRig()
    obs = rig.observe(w.scene_view(ego))
    st = w.ego_state(ego)
    role = "hero"
    msgs = [(B.topic(role, c.name), B.image_msg(obs[c.name], 0.0, f"{role}/{c.name}")) for c in rig.config.cameras]
    msgs.append((B.topic(role, "lidar"), B.pointcloud_msg(obs["lidar"], 0.0, f"{role}/lidar")))
    labels = LabelMaker(w, ego, route).current()
    msgs.append((B.topic(role, "navigation"), B.navigation_msg(labels, 0.0, role, route.length)))
    msgs.append((B.topic(role, "odometry"), B.odometry_msg(st, role)))
    from flad_core import codec

    sizes = {t: len(codec.encode(m)) for t, m in msgs}
    return msgs, {"bytes_per_frame": sum(sizes.values()), "cameras": rig.config.camera_sizes,
                  "lidar_points": int(msgs[-3][1].width)}


def _chain(transport: str, hub: tuple[str, str] | None, threads: int, logdir: str) -> list[tuple[str, list[str]]]:
    def tr(name: str) -> list[str]:
        if transport == "ros":
            return ["--ros-args", "-r", f"__node:=bench_{name}"]
        assert hub is not None
        return ["--transport", "zmq", "--hub-pub", hub[0], "--hub-sub", hub[1], "--ros-args"]

    return [
        ("encoder", ["flad_vehicle.nodes.encoder_node", *tr("encoder"), "-p", f"threads:={threads}"]),
        ("waypoint", ["flad_edge.nodes.waypoint_node", *tr("waypoint"), "-p", f"threads:={threads}",
                      "-p", "max_wait_ms:=0.0"]),
        # hold every odometry until its own frame's waypoints are in (a period of 1 ms < one frame)
        ("controller", ["flad_vehicle.nodes.controller_node", *tr("controller"), "-p", "sync_plan_period_s:=0.001",
                        "-p", "max_waypoint_age_s:=1000000.0"]),
    ]


def _conditions(transports: list[str]) -> dict[str, Any]:
    import torch
    import zmq

    from flad_core.device import device_info

    cond: dict[str, Any] = {
        "host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
        "cpus": os.cpu_count(), "device": device_info("auto"),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__, "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
        "loopback": True, "models": "encoder: tiny, randomly initialised (seed 0); waypoint: CELLAdapt student (ADM), "
                                    "tiny, randomly initialised; same in both chains",
        "threads_per_process": 1}
    if "ros" in transports:
        from importlib.metadata import PackageNotFoundError, version

        import rclpy

        cond["rmw"] = rclpy.get_rmw_implementation_identifier()
        for dist in ("ros-jazzy-rclpy", "ros-rclpy", "ros-jazzy-rmw-fastrtps-cpp"):
            with contextlib.suppress(PackageNotFoundError):
                cond[dist] = version(dist)
        cond["ros_domain_id"] = os.environ.get("ROS_DOMAIN_ID", "0")
        cond["ros_localhost_only"] = os.environ.get("ROS_LOCALHOST_ONLY") or os.environ.get(
            "ROS_AUTOMATIC_DISCOVERY_RANGE")
    return cond


def _start_chain(group: Any, transport: str, threads: int, logdir: str, frame: list[tuple[str, Any]],
                 closers: list[Any]) -> _Driver:
    """Start one transport's bus (a hub of its own for ZeroMQ) and its three node processes; the driver that
    plays the world on it. Whatever must be closed afterwards is appended to `closers`."""
    from flad_core.bus import BusConfig, BusHub, ZmqBus
    from flad_core.procs import free_port_base, python_module_cmd

    hub = None
    if transport == "zmq":
        base = free_port_base(2)
        hub = (f"tcp://127.0.0.1:{base}", f"tcp://127.0.0.1:{base + 1}")
        cfg = BusConfig(hub_pub=hub[0], hub_sub=hub[1])
        h = BusHub(cfg)
        bus: Any = ZmqBus("bench_driver", cfg)
        closers += [bus, h]
    else:
        from flad_core.bus_ros import RosBus

        bus = RosBus("bench_driver")
        closers.append(bus)
    for name, argv in _chain(transport, hub, threads, logdir):
        group.start(f"{transport}-{name}", python_module_cmd(*argv),
                    log_path=os.path.join(logdir, f"{transport}-{name}.log"))
    return _Driver(bus, [(t, _copy(m)) for t, m in frame])


def _drive(drivers: dict[str, _Driver], frames: int, warmup: int, block: int, timeout_s: float
           ) -> tuple[dict[str, list[dict[str, float]]], dict[str, int]]:
    """Start-up, `warmup` untimed frames per chain, then `frames` timed ones alternating between the chains in
    blocks of `block`; (samples, lost frames) per transport."""
    samples: dict[str, list[dict[str, float]]] = {t: [] for t in drivers}
    lost = dict.fromkeys(drivers, 0)
    for drv in drivers.values():
        drv.startup(timeout_s)
    t = DT
    for _ in range(warmup):
        for drv in drivers.values():
            drv.one(t, timeout_s)
        t += DT
    done = 0
    while done < frames:
        n = min(block, frames - done)
        for transport, drv in drivers.items():
            for i in range(n):
                s = drv.one(t + i * DT, timeout_s)
                if s is None:
                    lost[transport] += 1
                else:
                    samples[transport].append(s)
        t += n * DT
        done += n
    return samples, lost


def _close_buses(closers: list[Any], transports: list[str]) -> None:
    for c in closers:
        c.close()
    if "ros" in transports:
        import rclpy

        if rclpy.ok():
            rclpy.shutdown()


def _results(transports: list[str], samples: dict[str, list[dict[str, float]]], lost: dict[str, int]
             ) -> dict[str, Any]:
    """Per transport: end-to-end and per-stage latency percentiles (ms) and the lost frames."""
    results: dict[str, Any] = {}
    for transport in transports:
        ss = samples[transport]
        results[transport] = {
            "e2e_ms": _percentiles([s["e2e"] for s in ss]),
            "stages_ms": {k: _percentiles([s[k] for s in ss if k in s])
                          for k in ("sensors_to_features", "features_to_waypoints", "waypoints_to_control")},
            "lost_frames": lost[transport]}
    return results


def run(transports: list[str], frames: int, warmup: int, block: int, threads: int, timeout_s: float,
        logdir: str) -> dict[str, Any]:
    from flad_core.procs import ProcessGroup

    frame, frame_info = _frame_messages()
    load_before = os.getloadavg()
    drivers: dict[str, _Driver] = {}
    closers: list[Any] = []
    with ProcessGroup(grace_s=10.0) as group:
        for transport in transports:
            drivers[transport] = _start_chain(group, transport, threads, logdir, frame, closers)
        try:
            samples, lost = _drive(drivers, frames, warmup, block, timeout_s)
        finally:
            _close_buses(closers, transports)
        codes = group.stop()
    results = _results(transports, samples, lost)
    out: dict[str, Any] = {"benchmark": "ros", "frames_per_transport": frames, "warmup_frames": warmup,
                           "block": block, "results": results, "frame": frame_info,
                           "exit_codes": codes}
    if {"ros", "zmq"} <= set(transports) and results["zmq"]["e2e_ms"].get("n"):
        for q in ("p50", "p99"):
            out[f"ros_over_zmq_{q}"] = round(results["ros"]["e2e_ms"][q] / results["zmq"]["e2e_ms"][q], 3)
    cond = _conditions(transports)
    cond["load_average_before"] = [round(x, 2) for x in load_before]
    cond["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    out["conditions"] = cond
    return out


def _copy(msg: Any) -> Any:
    import copy

    return copy.deepcopy(msg)


def _ros_missing() -> str | None:
    """Why the ros transport cannot run here (None: it can)."""
    try:
        import rclpy  # noqa: F401

        from flad_core.bus_ros import RosBus  # noqa: F401
    except ImportError as exc:
        return f"the ros transport needs rclpy and the generated FLAD messages ({exc})"
    return None


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str], dict[str, str], str | None]:
    """Arguments, the transports to run, those skipped (--quick without ROS) and what is wrong (None: nothing)."""
    parser = argparse.ArgumentParser(prog="flad bench ros", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--transports", default=None,
                        help="comma-separated: zmq, ros (default: zmq,ros; --quick: zmq, and ros where rclpy is)")
    parser.add_argument("--frames", type=int, default=None, help="timed frames per transport (default: 40; --quick: 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed frames per transport first (5; --quick: 1)")
    parser.add_argument("--block", type=int, default=None, help="frames per transport before alternating (10)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per node process")
    parser.add_argument("--timeout-s", type=float, default=180.0, help="start-up / per-frame wall limit")
    parser.add_argument("--logdir", default=None, help="node logs (default: a runs/ folder)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 5 frames per transport; without rclpy, ZeroMQ only (says so)")
    args = parser.parse_args([a for a in (sys.argv[1:] if argv is None else argv) if a != "--"])
    for key, full, quick in (("frames", 40, 5), ("warmup", 5, 1), ("block", 10, 5)):
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    skipped: dict[str, str] = {}
    if args.transports is None:
        args.transports = "zmq,ros"
        why = _ros_missing() if args.quick else None
        if why:
            args.transports = "zmq"
            skipped["ros"] = f"{why}; --quick ran ZeroMQ only"
    transports = [t for t in args.transports.split(",") if t]
    bad = [t for t in transports if t not in ("zmq", "ros")]
    if bad or not transports or args.frames < 1 or args.block < 1 or args.warmup < 0:
        return args, transports, skipped, (f"--transports takes zmq and/or ros, got {args.transports!r}; "
                                           "--frames and --block >= 1, --warmup >= 0")
    why = _ros_missing() if "ros" in transports else None
    if why:
        return args, transports, skipped, (f"{why}; run it in the ROS tier environment (scripts/ros_tier.sh, then "
                                           "source .ros-ws/env.sh), or pass `-- --transports zmq`")
    return args, transports, skipped, None


def main(argv: list[str] | None = None) -> int:
    args, transports, skipped, error = _parse(argv)
    if error:
        print(f"flad bench ros: {error}", file=sys.stderr)
        return 2
    if skipped:
        log.warning("flad bench ros --quick: ros transport skipped: %s", skipped["ros"])
    from flad_core.runs import RunDir, setup_logging

    setup_logging(logging.WARNING)
    logdir = args.logdir
    if logdir is None:
        logdir = str(RunDir.create("bench-ros", {"transports": transports, "frames": args.frames}).path)
    os.makedirs(logdir, exist_ok=True)
    try:
        out = run(transports, args.frames, args.warmup, args.block, args.threads, args.timeout_s, logdir)
    except TimeoutError as exc:
        print(f"flad bench ros: {exc} ({logdir})", file=sys.stderr)
        return 1
    out["logdir"] = logdir
    if skipped:
        out["skipped_transports"] = skipped
    if args.quick:
        out["quick"] = "smoke run: numbers are not meaningful"
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for t, r in out["results"].items():
            e = r["e2e_ms"]
            print(f"{t:4s} e2e p50 {e.get('p50')} ms  p99 {e.get('p99')} ms  ({e.get('n')} frames, "
                  f"{r['lost_frames']} lost)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
