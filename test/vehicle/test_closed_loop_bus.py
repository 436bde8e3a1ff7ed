"""The synchronous embedded-world closed loop on a real ZeroMQ bus (the transport-agnostic classes the ROS
nodes run): world bridge + PID controller on the privileged expert's waypoints drive like the expert."""

from __future__ import annotations

import time

import pytest

from flad_core.bus import BusConfig, BusHub, ZmqBus
from flad_core.config import ConfigError, from_dict
from flad_sim.agent import RouteRunner
from flad_sim.closed_loop import ClosedLoopWorld, ExpertPlanner, WorldBridgeConfig
from flad_sim.expert import ExpertAgent
from flad_sim.route import seeded_routes
from flad_sim.world import World
from flad_vehicle.control.loop import ControllerConfig, ControllerLoop


def _buses(port_base: int, n: int) -> tuple[BusHub, list[ZmqBus]]:
    cfg = BusConfig(hub_pub=f"tcp://127.0.0.1:{port_base}", hub_sub=f"tcp://127.0.0.1:{port_base + 1}")
    return BusHub(cfg), [ZmqBus(f"p{i}", cfg) for i in range(n)]


def test_expert_waypoints_through_the_pid_score_like_the_expert(port_base: int) -> None:
    hub, (wb, cb) = _buses(port_base, 2)
    world = ClosedLoopWorld(wb, from_dict(WorldBridgeConfig, {"sensors_every": 0, "route_length_m": 150.0}))
    ctl = ControllerLoop(cb, from_dict(ControllerConfig, {"waypoint_source": "expert", "sync_plan_period_s": 0.05}))
    ctl.start()
    try:
        res = world.run()
    finally:
        ctl.close()
        for b in (wb, cb, hub):
            b.close()
    ego = res["egos"][0]
    assert ego["missed_ticks"] == 0 and ego["commands"] >= res["ticks"]
    assert res["sim_time_s"] >= 30.0 and ego["status"] == "completed"
    # the expert itself on the same world and route
    w = World("Town01", seed=0)
    route = seeded_routes(w.town, 0, 1, min_length=150.0, max_length=1.25 * 150.0)[0]
    assert route.route_id == ego["route_id"]
    rec = RouteRunner(w, route, ExpertAgent(w), privileged=True).run()
    assert rec.status == "completed"
    assert ego["ds"] >= 0.9 * rec.ds and ego["rc"] == pytest.approx(rec.rc, abs=1.0)


def test_duration_two_egos_and_final_scores(port_base: int) -> None:
    """Two egos in one world, stopped after 2 simulated seconds: both driven every tick, scores published."""
    hub, (wb, c0, c1, probe) = _buses(port_base, 4)
    cfg = from_dict(WorldBridgeConfig, {"roles": ["hero0", "hero1"], "sensors_every": 0, "duration_s": 2.0})
    world = ClosedLoopWorld(wb, cfg)
    scores: list = []
    for role in cfg.roles:
        probe.subscribe(f"/carla/{role}/driving_score", "flad_msgs/msg/DrivingScore", scores.append)
    ctls = [ControllerLoop(b, from_dict(ControllerConfig, {"vehicle_id": f"v{i}", "role_name": f"hero{i}",
                                                           "waypoint_source": "expert", "sync_plan_period_s": 0.05}))
            for i, b in enumerate((c0, c1))]
    for c in ctls:
        c.start()
    try:
        res = world.run()
        time.sleep(0.5)
    finally:
        for c in ctls:
            c.close()
        for b in (wb, c0, c1, probe, hub):
            b.close()
    assert res["ticks"] == 40 and res["sim_time_s"] == pytest.approx(2.0)
    assert [e["role"] for e in res["egos"]] == ["hero0", "hero1"]
    assert all(e["status"] == "stopped" and e["missed_ticks"] == 0 and e["commands"] >= 40 for e in res["egos"])
    assert all(c.controls == 40 for c in ctls)          # one per stepped frame: t = 0 .. 1.95 s
    final = [s for s in scores if s.final]
    assert sorted(s.role_name for s in final) == ["hero0", "hero1"] and all(s.status == "stopped" for s in final)
    assert any(not s.final for s in scores)             # running scores once per simulated second


def test_no_controller_fails_after_startup_timeout(port_base: int, tmp_path) -> None:
    hub, (wb,) = _buses(port_base, 1)
    out = tmp_path / "scores.json"
    world = ClosedLoopWorld(wb, from_dict(WorldBridgeConfig, {"sensors_every": 0, "startup_timeout_s": 1.0,
                                                             "tick_timeout_s": 0.5, "result_path": str(out)}))
    try:
        res = world.run()
    finally:
        wb.close()
        hub.close()
    assert world.exit_code == 1 and res["completed"] is False and res["ticks"] == 0 and out.is_file()


def test_expert_planner_waypoints_follow_the_route_ahead() -> None:
    from flad_sim.agent import RouteInfo

    w = World("Town01", seed=0)
    route = seeded_routes(w.town, 0, 1, min_length=150.0, max_length=200.0)[0]
    ego = w.spawn_ego(route)
    planner = ExpertPlanner(w)
    planner.reset(RouteInfo(route, w.town.name, ego, route.route_id, w))
    wp0 = planner.waypoints()                        # standing: accelerating from 0
    assert wp0.shape == (5, 2) and (wp0[:, 0] >= -1e-6).all() and (abs(wp0[:, 1]) < 1.0).all()
    assert (abs(wp0[:, 0]) < 8.0).all()              # 2.5 s from standstill at <= 2.5 m/s^2
    expert = ExpertAgent(w)
    expert.reset(RouteInfo(route, w.town.name, ego, route.route_id, w))
    for _ in range(100):
        w.step({ego: expert.run_step()})
    wp = planner.waypoints()
    assert (abs(wp[:, 1]) < 3.0).all() and (abs(wp[-1]) > 5.0).any()
    d = abs(wp[:, 0]).tolist()
    assert d == sorted(d)                            # ahead and moving on (no reversing)


def test_world_bridge_config_is_validated(tmp_path) -> None:
    for bad, key in [({"town": "Atlantis"}, "town"), ({"roles": ["a", "a"]}, "roles"), ({"roles": ["x/y"]}, "roles"),
                     ({"tick_timeout_s": 0.0}, "tick_timeout_s"), ({"rig": str(tmp_path / "none.yaml")}, "rig"),
                     ({"sensors_every": -1}, "sensors_every")]:
        with pytest.raises(ConfigError, match=key):
            from_dict(WorldBridgeConfig, bad)


def test_asynchronous_mode_steps_without_waiting(port_base: int) -> None:
    """CARLA's asynchronous mode: the world does not wait for controls (none here: the ego holds the brake)."""
    hub, (wb,) = _buses(port_base, 1)
    world = ClosedLoopWorld(wb, from_dict(WorldBridgeConfig, {"sensors_every": 0, "synchronous": False,
                                                             "real_time_factor": 0.0, "duration_s": 1.0}))
    try:
        res = world.run()
    finally:
        wb.close()
        hub.close()
    assert res["ticks"] == 20 and res["synchronous"] is False and world.exit_code == 0
    assert res["egos"][0]["commands"] == 0 and res["egos"][0]["rc"] < 1.0
