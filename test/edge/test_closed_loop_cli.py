"""`flad edge closed-loop` and `flad bench ros` on the ZeroMQ transport (the main tier has no rclpy): node
processes drive the embedded world with the full learned chain; asking for ROS here fails with a clear error."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

FLAD = [sys.executable, "-m", "flad_core.cli"]
NO_RCLPY = importlib.util.find_spec("rclpy") is None


def test_learned_chain_drives_30_simulated_seconds_over_zmq(tmp_path) -> None:
    """sensors -> encoder_node -> waypoint_node (tiny ADM) -> controller_node -> world_bridge, as 4 processes."""
    out = subprocess.run([*FLAD, "edge", "closed-loop", "--transport", "zmq", "--source", "edge", "--duration-s", "30",
                          "--runs-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout)
    assert res["exit_codes"] == {"world_bridge": 0, "waypoint_node": 0, "encoder_v0": 0, "controller_v0": 0}
    assert res["sim_time_s"] == pytest.approx(30.0) and res["ticks"] == 600 and res["synchronous"] is True
    (ego,) = res["egos"]
    assert ego["missed_ticks"] == 0 and ego["commands"] >= 600 and ego["status"] in ("stopped", "completed",
                                                                                        "route_deviation", "blocked")
    assert 0.0 <= res["ds"] <= 100.0 and res["ds"] == pytest.approx(ego["rc"] * ego["is"])
    logs = {p.name: p.read_text() for p in (tmp_path.glob("*/*.log"))}
    assert "RANDOMLY INITIALISED" in logs["encoder_v0.log"] and "RANDOMLY INITIALISED" in logs["waypoint_node.log"]


@pytest.mark.skipif(not NO_RCLPY, reason="rclpy imports here: the ROS tier runs the ros transport")
def test_ros_transport_without_rclpy_is_a_clear_error(tmp_path) -> None:
    out = subprocess.run([*FLAD, "edge", "closed-loop", "--transport", "ros", "--runs-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "needs rclpy" in out.stderr and "--transport zmq" in out.stderr
    out = subprocess.run([*FLAD, "bench", "ros", "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "ROS tier" in out.stderr and "--transports zmq" in out.stderr


def test_bench_ros_zmq_only_runs_in_the_main_environment(tmp_path) -> None:
    out = subprocess.run([*FLAD, "bench", "ros", "--json", "--", "--transports", "zmq", "--frames", "3", "--warmup",
                          "1", "--logdir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout)
    z = res["results"]["zmq"]
    assert z["e2e_ms"]["n"] == 3 and z["lost_frames"] == 0 and z["e2e_ms"]["p50"] <= z["e2e_ms"]["p99"]
    assert z["stages_ms"]["sensors_to_features"]["n"] == 3
    assert set(res["conditions"]) >= {"cpus", "load_average_before", "torch", "libzmq"}
    assert res["exit_codes"] == {"zmq-encoder": 0, "zmq-waypoint": 0, "zmq-controller": 0}
