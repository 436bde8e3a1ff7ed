"""Edge, cloud and stage-worker nodes on real rclpy: typed/described parameters, bad parameters, clean SIGINT.

Each node runs as its own process (`python -m <module> --ros-args ...`, what `flad launch` and launch_ros
start); the test asks the node's real parameter services for types and descriptions, and watches real
ROS topics.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest
from rcl_interfaces.msg import ParameterType

from flad_core import codec
from flad_edge.nodes.cloud import CloudNodeConfig
from flad_edge.nodes.orchestrator import OrchestratorNodeConfig
from flad_vehicle.nodes.stage_worker import StageWorkerNodeConfig

from ros_testing import describe, node_cmd, processes_mentioning, small_fleet, start, stop

pytestmark = pytest.mark.ros


def _help(cls: type, name: str) -> str:
    return next(f.metadata["help"] for f in cls.__dataclass_fields__.values() if f.name == name)


def test_parameters_are_typed_and_described(tmp_path: Path) -> None:
    fleet, _, base = small_fleet(tmp_path)
    tag = f"b2desc{base}"
    procs = {
        "orch": start(node_cmd("flad_edge.nodes.orchestrator", "-r", f"__node:={tag}_orch", "-p", f"fleet:={fleet}",
                               "-p", f"port_base:={base}", "-p", "mode:=control_plane", "-p", "duration_s:=0.0",
                               "-p", "expect:=0"), tmp_path / "orch.log"),
        "cloud": start(node_cmd("flad_edge.nodes.cloud", "-r", f"__node:={tag}_cloud", "-p", f"fleet:={fleet}",
                                "-p", f"port_base:={base}"), tmp_path / "cloud.log"),
        "worker": start(node_cmd("flad_vehicle.nodes.stage_worker", "-r", f"__node:={tag}_sw", "-r", "__ns:=/v000",
                                 "-p", "vehicle_id:=v000", "-p", f"fleet:={fleet}", "-p", f"port_base:={base}",
                                 "-p", "mode:=control_plane"), tmp_path / "worker.log"),
    }
    try:
        orch = describe(f"/{tag}_orch", ["rounds", "duration_s", "cloud", "mode", "fleet"])
        assert orch["rounds"] == (ParameterType.PARAMETER_INTEGER, _help(OrchestratorNodeConfig, "rounds"))
        assert orch["duration_s"] == (ParameterType.PARAMETER_DOUBLE, _help(OrchestratorNodeConfig, "duration_s"))
        assert orch["cloud"] == (ParameterType.PARAMETER_BOOL, _help(OrchestratorNodeConfig, "cloud"))
        assert orch["mode"] == (ParameterType.PARAMETER_STRING, _help(OrchestratorNodeConfig, "mode"))
        cloud = describe(f"/{tag}_cloud", ["deadline_s", "edges"])
        assert cloud["deadline_s"] == (ParameterType.PARAMETER_DOUBLE, _help(CloudNodeConfig, "deadline_s"))
        assert cloud["edges"] == (ParameterType.PARAMETER_STRING, _help(CloudNodeConfig, "edges"))
        worker = describe(f"/v000/{tag}_sw", ["threads", "edge_address", "vehicle_id"])
        assert worker["threads"] == (ParameterType.PARAMETER_INTEGER, _help(StageWorkerNodeConfig, "threads"))
        assert worker["edge_address"][1] == _help(StageWorkerNodeConfig, "edge_address")
        assert _help(StageWorkerNodeConfig, "vehicle_id") in worker["vehicle_id"][1]
    finally:
        codes = {name: stop(p) for name, p in procs.items()}
    logs = {n: (tmp_path / f"{n}.log").read_text(errors="replace")[-2000:] for n in procs}
    assert codes == {"orch": 0, "cloud": 0, "worker": 0}, logs
    assert processes_mentioning(tag) == []


@pytest.mark.parametrize(("module", "args", "named"), [
    ("flad_edge.nodes.orchestrator", ["-p", "rounds:=-1"], "orchestrator.rounds"),
    ("flad_edge.nodes.orchestrator", ["-p", "rounds:=many"], "parameter 'rounds' to 'many'"),
    ("flad_edge.nodes.orchestrator", ["-p", "mode:=train"], "orchestrator.mode"),
    ("flad_edge.nodes.cloud", ["-p", "deadline_s:=0.0"], "cloud.deadline_s"),
    ("flad_vehicle.nodes.stage_worker", [], "stage_worker.vehicle_id"),
    ("flad_vehicle.nodes.stage_worker", ["-p", "vehicle_id:=v999"], "stage_worker.vehicle_id: vehicle 'v999' is not"),
], ids=["negative-rounds", "string-for-int", "bad-mode", "zero-deadline", "missing-id", "unknown-vehicle"])
def test_bad_parameter_fails_naming_it(module: str, args: list[str], named: str) -> None:
    out = subprocess.run(node_cmd(module, *args), capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert named in out.stderr, out.stderr[-2000:]


def test_control_plane_over_ros_topics_and_clean_sigint(tmp_path: Path) -> None:
    """Orchestrator + 2 vehicles: registration (ZeroMQ) and heartbeats on /flad/heartbeat (ROS, no ZeroMQ hub);
    SIGINT mid-run stops every node with exit 0."""
    import rclpy
    import rclpy.executors

    # heartbeats go over ROS: on a loaded 2-core host DDS discovery between the orchestrator and a vehicle can
    # take longer than the fleet's 3 s timeout, and a vehicle marked lost before its first heartbeat arrives
    # is never "departed" (the goodbye this test checks); a missing goodbye still shows with 15 s
    fleet, _, base = small_fleet(tmp_path, ids=("v000", "v001"), heartbeat_timeout_s=15.0)
    common = ["-p", f"fleet:={fleet}", "-p", f"port_base:={base}", "-p", "mode:=control_plane"]
    seen: dict[str, int] = {}
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    node = rclpy.create_node(f"hb_probe_{base}", context=ctx)
    from flad_core.bus_ros import ros_message_type

    def on_raw(data: bytes) -> None:
        msg = codec.decode(data, "flad_msgs/msg/Heartbeat")
        seen[msg.vehicle_id] = seen.get(msg.vehicle_id, 0) + 1

    node.create_subscription(ros_message_type("flad_msgs/msg/Heartbeat"), "/flad/heartbeat", on_raw, 50, raw=True)
    executor = rclpy.executors.SingleThreadedExecutor(context=ctx)
    executor.add_node(node)
    spin = threading.Thread(target=executor.spin, daemon=True)
    spin.start()
    procs = {
        "orch": start(node_cmd("flad_edge.nodes.orchestrator", *common, "-p", "duration_s:=0.0",
                               "-p", f"run_dir:={tmp_path}"), tmp_path / "orch.log"),
        **{vid: start(node_cmd("flad_vehicle.nodes.stage_worker", "-r", f"__ns:=/{vid}", *common,
                               "-p", f"vehicle_id:={vid}"), tmp_path / f"{vid}.log") for vid in ("v000", "v001")},
    }
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not (seen.get("v000", 0) >= 3 and seen.get("v001", 0) >= 3):
            assert all(p.poll() is None for p in procs.values()), "a node died early"
            time.sleep(0.2)
        assert seen.get("v000", 0) >= 3 and seen.get("v001", 0) >= 3, seen
    finally:
        # vehicles first, while they run (their own SIGINT path), then the edge
        codes = {name: stop(procs[name]) for name in ("v000", "v001", "orch")}
        executor.shutdown()
        rclpy.shutdown(context=ctx)
    logs = {n: (tmp_path / f"{n}.log").read_text(errors="replace")[-2000:] for n in procs}
    assert codes == {"orch": 0, "v000": 0, "v001": 0}, logs
    for vid in ("v000", "v001"):
        assert "stage_worker: stop requested" in logs[vid], logs[vid]     # stopped by the SIGINT, not by the edge
    orch_log = (tmp_path / "orch.log").read_text(errors="replace")
    assert "admitted v000" in orch_log and "admitted v001" in orch_log
    # SIGINT let each vehicle say goodbye over ROS before its node went down: a departure, not a loss
    assert "v000 departed" in orch_log and "v001 departed" in orch_log, orch_log[-3000:]
    assert not any("Traceback" in (tmp_path / f"{n}.log").read_text(errors="replace") for n in procs), logs
    assert processes_mentioning(str(fleet)) == []
