"""`flad launch closed_loop_embedded` (the plan behind closed_loop_embedded.launch.py) on real rclpy.

A short plumbing run: world bridge + one vehicle (stage worker, encoder, controller) + the edge
(orchestrator, waypoint node), the controller on the expert's waypoints. The world bridge ends the plan
after 5 simulated seconds; every node must exit 0 and the controller must have answered every tick.
The closed loop's driving quality is helper B1's test (test_closed_loop*.py); this checks the launch plan.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ros_testing import processes_mentioning, small_fleet

pytestmark = pytest.mark.ros


def test_closed_loop_plan_runs_every_node_and_ends_cleanly(tmp_path: Path) -> None:
    fleet, _, base = small_fleet(tmp_path, ids=("v000", "v001"))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "flad_core.cli", "launch", "closed_loop_embedded", f"fleet:={fleet}",
           f"port_base:={base}", "duration_s:=5", "waypoint_source:=expert", "--run-dir", str(run),
           "--timeout", "240"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in sorted(run.glob("node*.log")))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:] + logs
    codes = json.loads(out.stdout.strip().splitlines()[-1])["exit_codes"]
    assert codes == {"/world_bridge": 0, "/v000/stage_worker": 0, "/v000/encoder": 0, "/v000/controller": 0,
                     "/orchestrator": 0, "/waypoint": 0}, logs
    result = json.loads((run / "closed_loop_result.json").read_text())
    assert result["sim_time_s"] == pytest.approx(5.0) and result["synchronous"] is True
    (ego,) = result["egos"]
    assert ego["role"] == "v000"
    assert ego["commands"] == result["ticks"] and ego["missed_ticks"] == 0, ego
    assert "admitted v000" in (run / "node_orchestrator.log").read_text(errors="replace")
    assert processes_mentioning(str(run)) == []
