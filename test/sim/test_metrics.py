"""Leaderboard arithmetic (docs/architecture.md, "Evaluation definitions") on synthetic drives: RC/IS/DS,
collision de-duplication, light/stop events, outside-lane fraction and every early-termination rule."""

from __future__ import annotations

import numpy as np
import pytest

from flad_sim import scene
from flad_sim.metrics import (
    PENALTY,
    STATUS_BLOCKED,
    STATUS_COMPLETED,
    STATUS_DEVIATION,
    STATUS_RUNNING,
    STATUS_TIMEOUT,
    Infraction,
    RouteRecord,
    RouteScorer,
    infraction_score,
    route_completion,
    summarize,
)
from flad_sim.route import build_route
from flad_sim.towns import CONTROL_LIGHT, CONTROL_STOP, DIRS, LANE_WIDTH_M, build_town


@pytest.fixture(scope="module")
def straight():
    """A straight 2-lane-per-direction route in Town01 along one link, and its town."""
    town = build_town("Town01")
    lk = next(lk for lk in town.links if lk.length > 60)
    route = build_route(town, [lk.id], 0, 2.0, lk.length - 2.0, route_id="straight")
    return town, route, lk


def test_penalties_are_the_leaderboard_ones() -> None:
    assert PENALTY == {"collision_pedestrian": 0.5, "collision_vehicle": 0.6, "collision_static": 0.65,
                       "red_light": 0.7, "stop_sign": 0.8}


def test_is_rc_ds_arithmetic() -> None:
    infs = [Infraction("collision_vehicle", 1, 0, 0, 3, 0.6), Infraction("red_light", 2, 0, 0, -1, 0.7),
            Infraction("timeout", 3, 0, 0, -1, 1.0)]
    assert infraction_score(infs) == pytest.approx(0.42)
    assert infraction_score(infs, outside_fraction=0.25) == pytest.approx(0.42 * 0.75)
    assert route_completion(99.5, 100.0, 9.0) == 100.0
    assert route_completion(99.5, 100.0, 12.0) == pytest.approx(99.5)   # > 99 % but not within 10 m
    assert route_completion(98.0, 100.0, 2.0) == pytest.approx(98.0)
    assert route_completion(-3.0, 100.0, 2.0) == 0.0


def test_summary_is_mean_over_routes_not_product_of_means() -> None:
    a = RouteRecord("a", "T", 100, 100.0, 0.5, 50.0, STATUS_COMPLETED, 10, 0.0, [])
    b = RouteRecord("b", "T", 100, 50.0, 1.0, 50.0, STATUS_TIMEOUT, 10, 0.0, [])
    s = summarize([a, b])
    assert s["ds"] == pytest.approx(50.0) and s["rc"] == pytest.approx(75.0) and s["is"] == pytest.approx(0.75)
    assert s["ds"] != pytest.approx(s["rc"] * s["is"])
    assert s["statuses"] == {STATUS_COMPLETED: 1, STATUS_TIMEOUT: 1}


def _drive(scorer: RouteScorer, route, s_values, t0: float = 0.0, dt: float = 0.05, offset=(0.0, 0.0), events=None):
    """Feed the scorer ego positions along the route at the given arc lengths."""
    status = STATUS_RUNNING
    for i, s in enumerate(s_values):
        xy = route.point_at(s) + np.asarray(offset)
        ev = events(i) if events else []
        status = scorer.update(t0 + i * dt, xy, route.heading_at(s), 5.0, ev)
        if status != STATUS_RUNNING:
            break
    return status


def test_completion_and_clean_drive(straight) -> None:
    town, route, _ = straight
    sc = RouteScorer(route, town)
    assert _drive(sc, route, np.arange(0.0, route.length + 0.5, 0.25)) == STATUS_COMPLETED
    rec = sc.record()
    assert rec.rc == 100.0 and rec.is_ == 1.0 and rec.ds == 100.0 and rec.outside_lanes_fraction == 0.0


def test_collisions_same_actor_5s_and_3m_5m_areas(straight) -> None:
    """CollisionTest (scenario_runner leaderboard-1.0): events are checked as they arrive, forgetting happens
    in the criterion's tick, so the scorer must see every tick (the full rules: test_leaderboard_scoring.py)."""
    town, route, _ = straight
    sc = RouteScorer(route, town, timeout_s=1e9)

    def ev(t: float, actor: int, kind: int, xy) -> dict:
        return {"type": "collision", "actor_id": actor, "kind": kind, "x": xy[0], "y": xy[1], "t": t}

    def tick(t: float, s: float, *events) -> None:
        xy = route.point_at(s)
        sc.update(t, xy, route.heading_at(s), 5.0, [ev(t, a, k, xy) for a, k in events])

    for k in range(20):                           # 1 s of continuous contact with vehicle 7
        tick(1.0 + 0.05 * k, 10.0 + 0.05 * k, (7, scene.BOX_VEHICLE))
    assert len(sc.infractions) == 1
    tick(3.0, 17.0, (7, scene.BOX_VEHICLE))       # moved 7 m, but the same actor within 5 s: ignored
    assert len(sc.infractions) == 1
    t = 3.0
    while t < 6.05:                               # standing still: vehicle 7 is forgotten 5 s after t = 1
        t += 0.05
        tick(t, 17.0)
    tick(6.1, 17.0, (7, scene.BOX_VEHICLE))       # same actor again, far from the first location
    assert len(sc.infractions) == 2
    tick(6.15, 19.0, (9, scene.BOX_PEDESTRIAN))   # another actor 2 m from the location just registered
    assert len(sc.infractions) == 2
    tick(6.2, 40.0, (9, scene.BOX_PEDESTRIAN))    # another actor, elsewhere
    tick(6.25, 55.0, (-5, scene.BOX_BUILDING))
    kinds = [i.kind for i in sc.infractions]
    assert kinds == ["collision_vehicle", "collision_vehicle", "collision_pedestrian", "collision_static"]
    assert all(i.actor_id in (7, 9, -5) and i.time_s > 0 for i in sc.infractions)
    assert sc.record().is_ == pytest.approx(0.6 * 0.6 * 0.5 * 0.65)


def test_light_and_stop_events(straight) -> None:
    town, route, _ = straight
    sc = RouteScorer(route, town)
    xy = route.point_at(5.0)

    def sl(control: int, state: int, stopped: bool) -> dict:
        return {"type": "stop_line", "index": 0, "control": control, "state": state, "stopped": stopped,
                "x": 1.0, "y": 2.0, "t": 4.0}

    sc.add_event(sl(CONTROL_LIGHT, scene.TL_GREEN, False), xy)
    sc.add_event(sl(CONTROL_LIGHT, scene.TL_YELLOW, False), xy)
    sc.add_event(sl(CONTROL_STOP, scene.TL_NONE, True), xy)
    assert sc.infractions == []
    sc.add_event(sl(CONTROL_LIGHT, scene.TL_RED, False), xy)
    sc.add_event(sl(CONTROL_STOP, scene.TL_NONE, False), xy)
    assert [(i.kind, i.penalty) for i in sc.infractions] == [("red_light", 0.7), ("stop_sign", 0.8)]
    assert sc.infractions[0].x == 1.0 and sc.infractions[0].time_s == 4.0


def test_outside_route_lanes_fraction(straight) -> None:
    town, route, lk = straight
    sc = RouteScorer(route, town)
    u = DIRS[lk.dir]
    left = np.array([-u[1], u[0]]) * LANE_WIDTH_M          # one lane to the left: the opposite direction
    s_all = np.arange(0.0, route.length + 0.5, 0.25)
    wrong = (s_all >= 20.0) & (s_all < 40.0)
    for i, s in enumerate(s_all):
        xy = route.point_at(s) + (left if wrong[i] else 0.0)
        if sc.update(i * 0.05, xy, route.heading_at(s), 5.0) != STATUS_RUNNING:
            break
    rec = sc.record()
    frac = 20.0 / route.length
    assert rec.outside_lanes_fraction == pytest.approx(frac, abs=0.6 / route.length)
    assert rec.is_ == pytest.approx(1.0 - rec.outside_lanes_fraction)
    assert rec.ds == pytest.approx(100.0 * (1.0 - rec.outside_lanes_fraction))
    assert rec.infractions[-1].kind == "outside_route_lanes"
    # off the road entirely (on the sidewalk/grass) also counts
    sc2 = RouteScorer(route, town)
    right = np.array([u[1], -u[0]]) * (lk.n_lanes * LANE_WIDTH_M + 1.0)
    _drive(sc2, route, np.arange(0.0, 30.0, 0.25), offset=right)
    assert sc2.outside_m == pytest.approx(30.0 - 0.25, abs=1.0)


def test_early_termination_route_deviation(straight) -> None:
    town, route, lk = straight
    sc = RouteScorer(route, town)
    _drive(sc, route, np.arange(0.0, 30.0, 0.25))
    u = DIRS[lk.dir]
    side = np.array([-u[1], u[0]])
    status = STATUS_RUNNING
    t = 10.0
    for d in np.arange(0.0, 40.0, 0.5):
        t += 0.05
        status = sc.update(t, route.point_at(30.0) + side * d, route.heading[0], 5.0)
        if status != STATUS_RUNNING:
            break
    assert status == STATUS_DEVIATION and 30.0 <= d < 31.0
    rec = sc.record()
    # RC counts route points passed (1 m apart): the last one behind the ego is the one at s = 29 m
    assert rec.status == STATUS_DEVIATION and rec.rc == pytest.approx(100 * 29.0 / route.length)
    assert rec.is_ == 1.0 and rec.ds == pytest.approx(rec.rc)
    assert sc.update(t + 1, route.point_at(40.0), 0.0, 5.0) == STATUS_DEVIATION   # ended stays ended


def test_early_termination_blocked(straight) -> None:
    town, route, _ = straight
    sc = RouteScorer(route, town, timeout_s=1e9)      # the real timeout of this short route comes first
    _drive(sc, route, np.arange(0.0, 20.0, 0.25))
    xy = route.point_at(20.0)
    t = 5.0
    status = STATUS_RUNNING
    while status == STATUS_RUNNING and t < 400:
        t += 0.05
        status = sc.update(t, xy, route.heading[0], 0.05 if int(t * 20) % 2 else 0.0)
    assert status == STATUS_BLOCKED
    t_moving = 79 * 0.05                          # the last tick at or above 0.1 m/s: blocked > 180 s after it
    assert 180.0 < t - t_moving <= 180.05 + 1e-6
    rec = sc.record()
    # standing exactly on the route point at s = 20 m has not passed it (the dot product must be > 0)
    assert rec.rc == pytest.approx(100 * 19.0 / route.length) and rec.is_ == 1.0


def test_blocked_timer_resets_when_moving(straight) -> None:
    town, route, _ = straight
    sc = RouteScorer(route, town, timeout_s=1e9)
    xy = route.point_at(5.0)
    t = 0.0
    for _ in range(3):
        for _ in range(int(170 / 0.05)):
            t += 0.05
            assert sc.update(t, xy, route.heading[0], 0.0) == STATUS_RUNNING
        t += 0.05
        sc.update(t, xy, route.heading[0], 0.5)   # a moment of motion
    assert sc.status == STATUS_RUNNING


def test_early_termination_timeout(straight) -> None:
    town, route, _ = straight
    sc = RouteScorer(route, town)
    limit = int(0.8 * route.length + 5.0)
    assert sc.timeout_s == limit and limit < 0.8 * route.length + 5.0
    s_values = np.linspace(0.0, route.length * 0.5, int(limit / 0.05) + 40)   # too slow to finish
    status = _drive(sc, route, s_values)
    assert status == STATUS_TIMEOUT
    assert sc.t_last == pytest.approx(limit, abs=0.051)
    rec = sc.record()
    assert 0.0 < rec.rc < 50.0 and rec.infractions[-1].kind == STATUS_TIMEOUT and rec.infractions[-1].penalty == 1.0
