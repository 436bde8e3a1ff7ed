"""Helpers for the edge/vehicle node tests on real rclpy: a small fleet, node processes, parameter look-ups."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from flad_core.procs import free_port_base

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "test"))
from flad_testing import processes_mentioning  # one copy, in the main tier's helpers

__all__ = ["describe", "node_cmd", "processes_mentioning", "small_fleet", "start", "stop"]

REPO = Path(__file__).resolve().parents[1]


def small_fleet(tmp: Path, ids: tuple[str, ...] = ("v000", "v002", "v003"), clusters: list[list[str]] | None = None,
                rounds: int = 1, heartbeat_timeout_s: float | None = None) -> tuple[Path, Path, int]:
    """A copy of launch/fleet.yaml with only `ids`, on fresh ports, and a tiny FHDP config (one cluster);
    `heartbeat_timeout_s` replaces the fleet's heartbeat timeout."""
    fleet = yaml.safe_load((REPO / "launch" / "fleet.yaml").read_text())
    fleet["vehicles"] = [v for v in fleet["vehicles"] if v["id"] in ids]
    if heartbeat_timeout_s is not None:
        fleet.setdefault("heartbeat", {})["timeout_s"] = heartbeat_timeout_s
    fleet_file = tmp / "fleet.yaml"
    fleet_file.write_text(yaml.safe_dump(fleet, sort_keys=False))
    fhdp = {"rounds": rounds, "local_steps": 2, "batch_size": 4, "n_micro": 2, "schedule": "1f1b",
            "time_scale": 0.02, "round_deadline_s": 300, "quorum": 1, "planner": "exact", "encoder": "tiny",
            "seed": 7, "clusters": clusters if clusters is not None else [list(ids[1:3])]}
    fhdp_file = tmp / "fhdp.yaml"
    fhdp_file.write_text(yaml.safe_dump(fhdp, sort_keys=False))
    return fleet_file, fhdp_file, free_port_base(24)


def node_cmd(module: str, *ros_args: str) -> list[str]:
    return [sys.executable, "-m", module, "--ros-args", *ros_args]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    fh = open(log, "wb")  # noqa: SIM115 - the child keeps it; closed when the test's tmp dir goes
    return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=dict(os.environ))


def stop(proc: subprocess.Popen, timeout: float = 20.0) -> int:
    """SIGINT (what ros2 launch sends first), then wait; kill only if it hangs (the test then fails)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return -9


def describe(node_fqn: str, names: list[str], timeout: float = 30.0) -> dict[str, Any]:
    """Types and descriptions of a running node's parameters, asked over its real parameter services."""
    import rclpy
    import rclpy.executors
    from rcl_interfaces.srv import DescribeParameters

    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    try:
        node = rclpy.create_node(f"probe_{os.getpid()}_{int(time.time() * 1000) % 100000}", context=ctx)
        client = node.create_client(DescribeParameters, f"{node_fqn}/describe_parameters")
        executor = rclpy.executors.SingleThreadedExecutor(context=ctx)
        executor.add_node(node)
        deadline = time.monotonic() + timeout
        while not client.wait_for_service(timeout_sec=0.5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{node_fqn}/describe_parameters did not appear")
        future = client.call_async(DescribeParameters.Request(names=names))
        executor.spin_until_future_complete(future, timeout_sec=timeout)
        result = future.result()
        assert result is not None, "no answer from describe_parameters"
        return {d.name: (d.type, d.description) for d in result.descriptors}
    finally:
        rclpy.shutdown(context=ctx)
