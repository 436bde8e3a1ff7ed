"""Node modules on the ZeroMQ transport (same command line as on ROS): bad parameters fail naming them, and a
node stops cleanly on SIGINT. (The same on real rclpy: test_ros/test_nodes_closed_loop.py.)"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flad_core.config import ConfigError
from flad_core.node_main import parse_params

from flad_testing import processes_mentioning


@pytest.mark.parametrize(("module", "param", "named"), [
    ("flad_vehicle.nodes.controller_node", "max_waypoint_age_s:=-1.0", "controller_node.max_waypoint_age_s"),
    ("flad_vehicle.nodes.controller_node", "pid.turn_kp:=fast", "controller_node.pid.turn_kp"),
    ("flad_sim.nodes.world_bridge", "town:=Atlantis", "world_bridge.town"),
    ("flad_edge.nodes.waypoint_node", "vehicle_ids:=[v0, v0]", "waypoint_node.vehicle_ids"),
    ("flad_vehicle.nodes.encoder_node", "waypoint_source:=expert", "encoder_node.waypoint_source"),
])
def test_bad_parameter_exits_2_naming_it(module: str, param: str, named: str) -> None:
    out = subprocess.run([sys.executable, "-m", module, "--transport", "zmq", "--ros-args", "-p", param],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and named in out.stderr, out.stderr[-2000:]


def test_sigint_stops_a_node_cleanly(port_base: int) -> None:
    tag = f"tcp://127.0.0.1:{port_base}"
    proc = subprocess.Popen([sys.executable, "-m", "flad_vehicle.nodes.controller_node", "--transport", "zmq",
                             "--hub-pub", tag, "--hub-sub", f"tcp://127.0.0.1:{port_base + 1}", "--host-hub"],
                            stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        end = time.monotonic() + 60
        while "controller:" not in line and time.monotonic() < end:
            line = proc.stderr.readline()
        assert "controller:" in line
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert processes_mentioning(tag) == []


def test_parse_params_nests_dotted_names_and_reads_yaml() -> None:
    args = ["--ros-args", "-p", "pid.turn_kp:=2.5", "--param", "roles:=[a, b]", "-r", "__node:=x", "-p", "name:=",
            "-p", "sync:=true"]
    assert parse_params(args) == {"pid": {"turn_kp": 2.5}, "roles": ["a", "b"], "name": "", "sync": True}
    with pytest.raises(ConfigError, match="name:=value"):
        parse_params(["-p", "oops"])


@given(st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                 st.lists(st.integers(), max_size=4)))
def test_parse_params_round_trips_yaml_scalars_and_lists(value) -> None:
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    assert parse_params(["-p", f"k:={text}"]) == {"k": value}
