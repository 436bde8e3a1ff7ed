"""The closed-loop nodes on real rclpy: world_bridge, encoder_node, waypoint_node, controller_node.

Each node is its own process (`python -m <module> --ros-args ...`, what the launch files start). The test asks
the nodes' real parameter services for types and descriptions, exchanges real messages with them over DDS
(CDR from our codec, handed to rclpy), checks the QoS they chose per stream, and stops them with SIGINT.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace as Ns
from typing import Any

import numpy as np
import pytest
from rcl_interfaces.msg import ParameterType
from rclpy.qos import ReliabilityPolicy

from flad_edge.celladapt.stream import WaypointNodeConfig
from flad_sim import bridge as B
from flad_sim.closed_loop import WorldBridgeConfig
from flad_vehicle.control.loop import ControllerConfig
from flad_vehicle.control.pid import PIDConfig
from flad_vehicle.encoder.stream import EncoderNodeConfig

from ros_testing import start, stop

S, D, INT, BOOL, SA = (ParameterType.PARAMETER_STRING, ParameterType.PARAMETER_DOUBLE, ParameterType.PARAMETER_INTEGER,
                     ParameterType.PARAMETER_BOOL, ParameterType.PARAMETER_STRING_ARRAY)
WP = np.array([[2.0, 1.0], [4.0, 2.0], [6.0, 3.0], [8.0, 4.0], [10.0, 5.0]])


def _help(cls: type, name: str) -> str:
    return cls.__dataclass_fields__[name].metadata["help"]


def _node(module: str, name: str, *params: str) -> list[str]:
    return [sys.executable, "-m", module, "--ros-args", "-r", f"__node:={name}", *params]


def _alive(tag: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if tag in cmd and ") Z " not in stat:
                pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def rosbus():
    """This test process's own RosBus (real rclpy node, own executor thread)."""
    import rclpy

    from flad_core.bus_ros import RosBus

    bus = RosBus(f"b1_probe_{os.getpid()}")
    yield bus
    bus.close()
    if rclpy.ok():
        rclpy.shutdown()


def _describe(bus: Any, node_fqn: str, names: list[str], timeout: float = 60.0) -> dict[str, tuple[int, str]]:
    from rcl_interfaces.srv import DescribeParameters

    client = bus.node.create_client(DescribeParameters, f"{node_fqn}/describe_parameters")
    try:
        end = time.monotonic() + timeout
        while not client.wait_for_service(timeout_sec=0.5):
            assert time.monotonic() < end, f"{node_fqn}/describe_parameters did not appear"
        future = client.call_async(DescribeParameters.Request(names=names))
        while not future.done():
            assert time.monotonic() < end, f"no answer from {node_fqn}/describe_parameters"
            time.sleep(0.05)
        return {d.name: (d.type, d.description) for d in future.result().descriptors}
    finally:
        bus.node.destroy_client(client)


class _Inbox:
    def __init__(self, bus: Any, topics: dict[str, str]) -> None:
        self.got: dict[str, list] = {t: [] for t in topics}
        self.cond = threading.Condition()
        for topic, typename in topics.items():
            bus.subscribe(topic, typename, lambda m, t=topic: self._on(t, m))

    def _on(self, topic: str, msg: Any) -> None:
        with self.cond:
            self.got[topic].append(msg)
            self.cond.notify_all()

    def wait_for(self, topic: str, pred: Any, timeout: float = 5.0) -> Any:
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                hit = [m for m in self.got[topic] if pred(m)]
                if hit or time.monotonic() > end:
                    return hit[0] if hit else None
                self.cond.wait(0.1)


def test_nodes_declare_typed_described_parameters_and_stop_cleanly_on_sigint(tmp_path: Path, rosbus: Any) -> None:
    tag = f"b1p{os.getpid()}"
    procs = {
        "world": start(_node("flad_sim.nodes.world_bridge", f"{tag}_world", "-p", "sensors_every:=0",
                              "-p", f"roles:=[{tag}]"), tmp_path / "world.log"),
        "encoder": start(_node("flad_vehicle.nodes.encoder_node", f"{tag}_enc", "-p", f"role_name:={tag}"),
                          tmp_path / "encoder.log"),
        "waypoint": start(_node("flad_edge.nodes.waypoint_node", f"{tag}_wp", "-p", f"vehicle_ids:=[{tag}]"),
                           tmp_path / "waypoint.log"),
        "controller": start(_node("flad_vehicle.nodes.controller_node", f"{tag}_ctl", "-p", f"vehicle_id:={tag}",
                                   "-p", "role_name:=nobody"), tmp_path / "controller.log"),
    }
    try:
        world = _describe(rosbus, f"/{tag}_world", ["town", "seed", "roles", "route_length_m", "duration_s", "rig",
                                                     "synchronous", "tick_timeout_s"])
        for name, kind in [("town", S), ("seed", INT), ("roles", SA), ("route_length_m", D), ("duration_s", D),
                           ("rig", S), ("synchronous", BOOL), ("tick_timeout_s", D)]:
            assert world[name] == (kind, _help(WorldBridgeConfig, name)), name
        enc = _describe(rosbus, f"/{tag}_enc", ["checkpoint", "waypoint_source", "threads", "vehicle_id"])
        for name, kind in [("checkpoint", S), ("waypoint_source", S), ("threads", INT), ("vehicle_id", S)]:
            assert enc[name] == (kind, _help(EncoderNodeConfig, name)), name
        wp = _describe(rosbus, f"/{tag}_wp", ["vehicle_ids", "model_dir", "max_batch", "max_wait_ms"])
        for name, kind in [("vehicle_ids", SA), ("model_dir", S), ("max_batch", INT), ("max_wait_ms", D)]:
            assert wp[name] == (kind, _help(WaypointNodeConfig, name)), name
        ctl = _describe(rosbus, f"/{tag}_ctl", ["waypoint_source", "max_waypoint_age_s", "pid.turn_kp", "pid.speed_n"])
        assert ctl["waypoint_source"] == (S, _help(ControllerConfig, "waypoint_source"))
        assert ctl["max_waypoint_age_s"] == (D, _help(ControllerConfig, "max_waypoint_age_s"))
        assert ctl["pid.turn_kp"] == (D, _help(PIDConfig, "turn_kp"))
        assert ctl["pid.speed_n"] == (INT, _help(PIDConfig, "speed_n"))
    finally:
        codes = {name: stop(p) for name, p in procs.items()}
    logs = {n: (tmp_path / f"{n}.log").read_text(errors="replace")[-2000:] for n in procs}
    assert codes == {"world": 0, "encoder": 0, "waypoint": 0, "controller": 0}, logs
    assert _alive(tag) == []


@pytest.mark.parametrize(("module", "params", "named"), [
    ("flad_sim.nodes.world_bridge", ["-p", "town:=Atlantis"], "world_bridge.town"),
    ("flad_sim.nodes.world_bridge", ["-p", "tick_timeout_s:=0.0"], "world_bridge.tick_timeout_s: must be > 0"),
    ("flad_vehicle.nodes.controller_node", ["-p", "max_waypoint_age_s:=-1.0"], "controller_node.max_waypoint_age_s"),
    ("flad_vehicle.nodes.controller_node", ["-p", "waypoint_source:=oracle"], "controller_node.waypoint_source"),
    ("flad_vehicle.nodes.encoder_node", ["-p", "threads:=many"], "parameter 'threads' to 'many'"),
    ("flad_vehicle.nodes.encoder_node", ["-p", "checkpoint:=/nonexistent/encoder.safetensors"],
     "/nonexistent/encoder.safetensors"),
    ("flad_edge.nodes.waypoint_node", ["-p", "vehicle_ids:=[v0, v0]"], "waypoint_node.vehicle_ids"),
], ids=["unknown-town", "zero-timeout", "negative-age", "bad-source", "string-for-int", "missing-checkpoint",
        "duplicate-vehicles"])
def test_bad_parameter_fails_naming_it(module: str, params: list[str], named: str) -> None:
    out = subprocess.run([sys.executable, "-m", module, "--ros-args", *params], capture_output=True, text=True,
                         timeout=180)
    assert out.returncode != 0
    assert named in out.stderr, out.stderr[-3000:]


def _odometry(t: float, x: float = 0.0, y: float = 0.0, yaw: float = 0.0, speed: float = 0.0) -> Any:
    return B.odometry_msg(Ns(x=x, y=y, z=0.0, yaw=yaw, speed=speed, yaw_rate=0.0, time_s=t), "b1hero")


def test_controller_node_turns_path_and_odometry_into_the_pids_control(tmp_path: Path, rosbus: Any) -> None:
    tag = f"b1c{os.getpid()}"
    role = "b1hero"
    proc = start(_node("flad_vehicle.nodes.controller_node", f"{tag}_ctl", "-p", f"vehicle_id:={tag}",
                        "-p", f"role_name:={role}", "-p", "max_waypoint_age_s:=0.5",
                        "-p", "pid.startup_brake_ticks:=0"), tmp_path / "ctl.log")
    inbox = _Inbox(rosbus, {f"/carla/{role}/vehicle_control_cmd": "carla_msgs/msg/CarlaEgoVehicleControl"})
    ctl_topic = f"/carla/{role}/vehicle_control_cmd"
    try:
        # discovery: a frame at t = -1 (no plan: brake, PID not stepped) until its control comes back
        end = time.monotonic() + 90
        while inbox.wait_for(ctl_topic, lambda m: B.stamp_key(m.header) == B.time_key(-1.0), 0.5) is None:
            assert time.monotonic() < end and proc.poll() is None, (tmp_path / "ctl.log").read_text()[-2000:]
            rosbus.publish(f"/carla/{role}/odometry", _odometry(-1.0))
        # the waypoints subscription is matched once the node's Path subscriber shows up
        while not rosbus.node.get_subscriptions_info_by_topic(f"/flad/{tag}/waypoints"):
            assert time.monotonic() < end
            time.sleep(0.1)
        rosbus.publish(f"/flad/{tag}/waypoints", B.path_msg(WP, 3.0, f"{tag}/base_link"))
        time.sleep(0.5)
        rosbus.publish(f"/carla/{role}/odometry", _odometry(3.0, x=5.0, y=-2.0, yaw=0.3, speed=2.0))
        c = inbox.wait_for(ctl_topic, lambda m: B.stamp_key(m.header) == B.time_key(3.0), 30.0)
        assert c is not None, (tmp_path / "ctl.log").read_text()[-2000:]
        # LMDrive's PID by hand (fresh windows of 40 zeros): aim = mean of the first two waypoints in (x right,
        # y forward) = (-1.5, 3) -> angle -0.29517; steer = (1.25 + 0.75/40 + 0.3) * angle; desired speed
        # |w1 - w0| / 0.5 = 4.47 m/s, speed error clipped to 0.35 -> throttle min(0.75, 6.0125 * 0.35); LMDrive
        # scales the steer by 0.8 (the start-up brake is off here; this is the node's second frame, which LMDrive's
        # every-other-tick rule still computes)
        angle = math.degrees(math.pi / 2 - math.atan2(3.0, -1.5)) / 90
        assert c.steer == pytest.approx(0.8 * (1.25 + 0.75 / 40 + 0.3) * angle, abs=1e-5)
        assert c.steer == pytest.approx(0.8 * -0.46305, abs=1e-4)
        assert (c.throttle, c.brake) == pytest.approx((0.75, 0.0), abs=1e-6)
        # the plan is now 0.6 s old: safety brake
        rosbus.publish(f"/carla/{role}/odometry", _odometry(3.6, x=6.0, y=-2.0, yaw=0.3, speed=2.0))
        c2 = inbox.wait_for(ctl_topic, lambda m: B.stamp_key(m.header) == B.time_key(3.6), 30.0)
        assert c2 is not None and (c2.throttle, c2.steer, c2.brake) == (0.0, 0.0, 1.0)
        # QoS: control reliable (the world must get every tick's command)
        pubs = rosbus.node.get_publishers_info_by_topic(ctl_topic)
        assert pubs and all(p.qos_profile.reliability == ReliabilityPolicy.RELIABLE for p in pubs)
    finally:
        code = stop(proc)
    assert code == 0, (tmp_path / "ctl.log").read_text()[-2000:]
    assert _alive(tag) == []


def test_encoder_and_waypoint_nodes_answer_a_world_frame(tmp_path: Path, rosbus: Any) -> None:
    """A frame published by the world bridge's code on rclpy -> encoder_node -> waypoint_node: features [31, 64]
    and 5 waypoints come back with the frame's stamp; sensors are subscribed best-effort, features reliable."""
    from flad_sim.closed_loop import ClosedLoopWorld

    tag = f"b1e{os.getpid()}"
    role = f"{tag}r"
    procs = {
        "encoder": start(_node("flad_vehicle.nodes.encoder_node", f"{tag}_enc", "-p", f"vehicle_id:={tag}",
                                "-p", f"role_name:={role}"), tmp_path / "encoder.log"),
        "waypoint": start(_node("flad_edge.nodes.waypoint_node", f"{tag}_wp", "-p", f"vehicle_ids:=[{tag}]"),
                           tmp_path / "waypoint.log"),
    }
    inbox = _Inbox(rosbus, {f"/flad/{tag}/features": "flad_msgs/msg/EncodedFeatures",
                            f"/flad/{tag}/waypoints": "nav_msgs/msg/Path"})
    world = ClosedLoopWorld(rosbus, WorldBridgeConfig(roles=[role], expert_waypoints=False))
    try:
        key = B.time_key(world.world.time_s)
        end = time.monotonic() + 180
        path = None
        while path is None:        # re-published (same stamp) while the nodes start and discover us
            assert time.monotonic() < end, {n: (tmp_path / f"{n}.log").read_text()[-1500:] for n in procs}
            world.publish_frame()
            path = inbox.wait_for(f"/flad/{tag}/waypoints", lambda m: B.stamp_key(m.header) == key, 3.0)
        feats = inbox.wait_for(f"/flad/{tag}/features", lambda m: B.stamp_key(m.header) == key)
        assert tuple(feats.shape) == (31, 64) and feats.dtype == "float32" and feats.vehicle_id == tag
        assert len(path.poses) == 5 and path.header.frame_id == f"{tag}/base_link"
        assert np.isfinite(B.waypoints_from_path(path)).all()
        subs = rosbus.node.get_subscriptions_info_by_topic(f"/carla/{role}/rgb_front/image")
        assert subs and all(s.qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT for s in subs)
        subs = rosbus.node.get_subscriptions_info_by_topic(f"/flad/{tag}/features")
        assert any(s.node_name == f"{tag}_wp" and s.qos_profile.reliability == ReliabilityPolicy.RELIABLE
                   for s in subs)
    finally:
        codes = {n: stop(p) for n, p in procs.items()}
    assert codes == {"encoder": 0, "waypoint": 0}, {n: (tmp_path / f"{n}.log").read_text()[-1500:] for n in procs}
    assert _alive(tag) == []
