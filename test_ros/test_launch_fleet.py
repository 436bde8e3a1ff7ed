"""`flad launch` brings up a plan's nodes on real rclpy: cloud + orchestrator + 3 stage workers train one FL
round (FHDP: one vehicle alone, one 2-vehicle cluster as a pipeline over the ZeroMQ data links; heartbeats,
status and round control on ROS topics), then everything exits 0 and nothing is left running.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ros_testing import processes_mentioning, small_fleet

pytestmark = pytest.mark.ros


def _launch(plan: str, *args: str, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "flad_core.cli", "launch", plan, *args, "--run-dir", str(run_dir)]


def test_fleet_plan_trains_one_round_over_ros(tmp_path: Path) -> None:
    fleet, fhdp, base = small_fleet(tmp_path)
    run = tmp_path / "run"
    out = subprocess.run(_launch("fleet", f"fleet:={fleet}", f"fhdp_config:={fhdp}", f"port_base:={base}",
                                 "rounds:=1", "--timeout", "480", run_dir=run),
                         capture_output=True, text=True, timeout=560)
    logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in sorted(run.glob("node*.log")))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:] + logs
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["exit_codes"] == {"/cloud": 0, "/orchestrator": 0, "/v000/stage_worker": 0,
                                    "/v002/stage_worker": 0, "/v003/stage_worker": 0}, logs
    rounds = [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "round" in m]
    assert [r["round"] for r in rounds] == [0]
    (r,) = rounds
    assert r["accepted"] == r["clients"] == 2 and not r["errors"], r
    assert set(r["per_client"]) == {"v000", "cluster1"}
    assert r["per_client"]["cluster1"]["pipelines"] == 2           # both members' data trained (FHDP rotation)
    assert (run / "global_encoder.safetensors").stat().st_size > 0
    orch_log = (run / "node_orchestrator.log").read_text(errors="replace")
    assert "cloud aggregated" in orch_log
    # no ZeroMQ hub runs: heartbeats (and the goodbye that marks a departure) came over ROS topics
    for vid in ("v000", "v002", "v003"):
        row = re.search(rf"│ {vid} .*│\s+(\d+) │\s+\d+ │\s+\d+ │ (\w+)\s+│", orch_log)
        assert row and int(row.group(1)) > 0 and row.group(2) == "departed", (vid, orch_log[-3000:])
    # the parameters each node got are the plan's
    params = yaml.safe_load((run / "params_v002_stage_worker.yaml").read_text())
    assert params["/v002/stage_worker"]["ros__parameters"]["vehicle_id"] == "v002"
    time.sleep(0.5)
    assert processes_mentioning(str(run)) == []


def test_flad_launch_sigint_stops_every_node_cleanly(tmp_path: Path) -> None:
    fleet, _, base = small_fleet(tmp_path, ids=("v000", "v001"))
    run = tmp_path / "run"
    proc = subprocess.Popen(_launch("fleet", f"fleet:={fleet}", f"port_base:={base}", "mode:=control_plane",
                                    run_dir=run), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        log = run / "node_orchestrator.log"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace") if log.exists() else ""
            if "admitted v000" in text and "admitted v001" in text:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.3)
        assert "admitted v001" in log.read_text(errors="replace")
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["exit_codes"] == {"/orchestrator": 0, "/v000/stage_worker": 0, "/v001/stage_worker": 0}, stderr
    assert processes_mentioning(str(run)) == []
