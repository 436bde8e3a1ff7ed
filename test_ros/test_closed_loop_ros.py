"""The embedded-world closed loop through real ROS 2 topics: world_bridge + vehicle (+ edge) nodes as separate
processes, synchronous mode with /clock, leaderboard scores at the end (`flad edge closed-loop --transport ros`).

- expert waypoints (plumbing): world_bridge -> controller_node; the route is driven to the end and scores like
  the privileged expert itself, and exactly like the same processes on the ZeroMQ bus (the world is seeded
  and synchronous, so the transport must not change a single tick);
- the learned chain: sensors -> encoder_node -> waypoint_node (tiny random ADM) -> controller_node, 30 simulated
  seconds; the scores are reported as they come (a random model drives badly).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

FLAD = [sys.executable, "-m", "flad_core.cli"]


def _closed_loop(tmp: Path, *args: str, timeout: int = 600) -> dict:
    out = subprocess.run([*FLAD, "edge", "closed-loop", *args, "--runs-dir", str(tmp)], capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-2000:]
    return json.loads(out.stdout)


def test_expert_waypoints_over_ros_drive_the_route_like_the_expert(tmp_path: Path) -> None:
    from flad_sim.agent import RouteRunner
    from flad_sim.expert import ExpertAgent
    from flad_sim.route import seeded_routes
    from flad_sim.world import World

    ros = _closed_loop(tmp_path / "ros", "--transport", "ros", "--source", "expert", "--route-length-m", "150")
    assert ros["exit_codes"] == {"world_bridge": 0, "controller_v0": 0} and ros["transport"] == "ros"
    (ego,) = ros["egos"]
    assert ego["status"] == "completed" and ros["sim_time_s"] >= 30.0 and ego["missed_ticks"] == 0
    assert ego["commands"] >= ros["ticks"]
    w = World("Town01", seed=0)
    route = seeded_routes(w.town, 0, 1, min_length=150.0, max_length=1.25 * 150.0)[0]
    rec = RouteRunner(w, route, ExpertAgent(w), privileged=True).run()
    assert ego["route_id"] == route.route_id and rec.status == "completed"
    assert ego["ds"] >= 0.9 * rec.ds and ros["ds"] == pytest.approx(ego["ds"])
    zmq = _closed_loop(tmp_path / "zmq", "--transport", "zmq", "--source", "expert", "--route-length-m", "150")
    assert (zmq["ticks"], zmq["ds"], zmq["rc"], zmq["is"]) == (ros["ticks"], ros["ds"], ros["rc"], ros["is"])


def test_learned_chain_over_ros_drives_30_simulated_seconds(tmp_path: Path) -> None:
    res = _closed_loop(tmp_path, "--transport", "ros", "--source", "edge", "--duration-s", "30")
    assert res["exit_codes"] == {"world_bridge": 0, "waypoint_node": 0, "encoder_v0": 0, "controller_v0": 0}
    assert res["sim_time_s"] == pytest.approx(30.0) and res["ticks"] == 600 and res["synchronous"] is True
    (ego,) = res["egos"]
    assert ego["missed_ticks"] == 0 and ego["commands"] >= 600
    assert 0.0 <= ego["rc"] <= 100.0 and 0.0 <= ego["is"] <= 1.0 and ego["ds"] == pytest.approx(ego["rc"] * ego["is"])
    print(json.dumps({k: res[k] for k in ("transport", "source", "sim_time_s", "rc", "is", "ds")}))
