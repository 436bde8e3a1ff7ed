"""Route scoring against the CARLA Leaderboard 1.0 code, rule by rule, on hand-built infraction lists and
hand-built trajectories.

Reference: carla-simulator/leaderboard @ 2165f5e4a53be8e96c501fa39965800489b1a0a5 (statistics_manager.py,
route_scenario.py) and carla-simulator/scenario_runner @ b9c342eee4ba03cfdec58b184f10f89b7053b65e (branch
leaderboard-1.0: atomic_criteria.py, timer.py). Expected numbers are written by hand from those formulas; the
global statistics are also checked against a transcription of `compute_global_statistics`.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from flad_sim import scene
from flad_sim.metrics import (
    STATUS_BLOCKED,
    STATUS_COMPLETED,
    STATUS_DEVIATION,
    STATUS_RUNNING,
    STATUS_TIMEOUT,
    Infraction,
    LaneChecker,
    RouteRecord,
    RouteScorer,
    infraction_score,
    route_completion,
    route_timeout,
    summarize,
)
from flad_sim.route import Route, build_route
from flad_sim.towns import CONTROL_LIGHT, CONTROL_STOP, DIRS, LANE_WIDTH_M, build_town

TOWN = SimpleNamespace(name="Test")


def line_route(length: float, route_id: str = "line") -> Route:
    """A straight route along +x from (0, 0): a point every metre (CARLA's hop resolution), the last one at
    `length`."""
    x = np.arange(0.0, math.floor(length) + 1.0)
    if x[-1] < length - 1e-9:
        x = np.append(x, length)
    pts = np.stack([x, np.zeros_like(x)], 1)
    return Route("Test", pts, np.zeros(len(x)), x.copy(), np.zeros(len(x), int), [], [], route_id=route_id)


class Lanes:
    """A lane checker that says 'outside' where `fn(x)` is true."""

    def __init__(self, fn=lambda x: False) -> None:
        self.fn = fn

    def outside(self, xy, yaw) -> bool:
        return bool(self.fn(float(xy[0])))


def scorer(length: float, outside=lambda x: False, timeout_s: float | None = None) -> tuple[RouteScorer, Route]:
    route = line_route(length)
    return RouteScorer(route, TOWN, Lanes(outside), timeout_s=timeout_s), route


def drive(sc: RouteScorer, xs, y=0.0, t0: float = 0.0, speed: float = 5.0, events=None) -> str:
    """One tick per x (20 Hz from t0); `y` a number or one per x; `events(i, t, xy)` the tick's events."""
    ys = np.broadcast_to(np.asarray(y, float), np.shape(xs))
    status = STATUS_RUNNING
    for i, (x, yy) in enumerate(zip(xs, ys, strict=True)):
        t = t0 + i / 20
        xy = np.array([x, yy])
        status = sc.update(t, xy, 0.0, speed, events(i, t, xy) if events else [])
        if status != STATUS_RUNNING:
            break
    return status


# ------------------------------------------------------------------------------------------------ penalties
def test_penalty_per_infraction_kind() -> None:
    sc, _ = scorer(100.0)
    xy = np.array([0.0, 0.0])
    coll = [(1, scene.BOX_PEDESTRIAN), (2, scene.BOX_VEHICLE), (-3, scene.BOX_BUILDING)]
    for x, (aid, kind) in zip((0.0, 10.0, 20.0), coll, strict=True):      # 10 m apart: all counted
        p = np.array([x, 0.0])
        sc.update(x / 10, p, 0.0, 5.0, [{"type": "collision", "actor_id": aid, "kind": kind, "x": x, "y": 0.0,
                                          "t": x / 10}])
    for k, (ctrl, state) in enumerate([(CONTROL_LIGHT, scene.TL_RED), (CONTROL_STOP, scene.TL_NONE)]):
        sc.add_event({"type": "stop_line", "index": k, "control": ctrl, "state": state, "stopped": False,
                      "x": 0.0, "y": 0.0, "t": 3.0}, xy)
    assert [(i.kind, i.penalty) for i in sc.infractions] == [
        ("collision_pedestrian", 0.50), ("collision_vehicle", 0.60), ("collision_static", 0.65),
        ("red_light", 0.70), ("stop_sign", 0.80)]
    assert sc.record().is_ == pytest.approx(0.50 * 0.60 * 0.65 * 0.70 * 0.80)
    # terminations weigh nothing; outside route lanes multiplies by (1 - percentage / 100)
    infs = [Infraction("collision_vehicle", 1, 0, 0, 3, 0.6), Infraction("route_deviation", 2, 0, 0, -1, 1.0)]
    assert infraction_score(infs, outside_fraction=0.25) == pytest.approx(0.6 * 0.75)


def test_same_red_light_is_not_counted_twice_in_a_row() -> None:
    """RunningRedLightTest skips the light it last reported (`_last_red_light_id`)."""
    sc, _ = scorer(100.0)

    def red(k: int) -> dict:
        return {"type": "stop_line", "index": k, "control": CONTROL_LIGHT, "state": scene.TL_RED, "stopped": False,
                "x": 0.0, "y": 0.0, "t": 1.0}

    for k in (4, 4, 6, 4):
        sc.add_event(red(k), np.zeros(2))
    assert [i.info for i in sc.infractions] == ["stop line 4", "stop line 6", "stop line 4"]


# ------------------------------------------------------------------------------------------ outside lanes
def test_outside_lanes_is_a_fraction_of_the_completed_route() -> None:
    """Route 1000 m, the ego drives 200 m of it, 50 m of those outside its lanes: x0.75 (not 1 - 50/1000)."""
    sc, _ = scorer(1000.0, outside=lambda x: 100.0 < x <= 150.0)
    assert drive(sc, np.arange(0.0, 200.25 + 1e-9, 0.25)) == STATUS_RUNNING
    # each route point i is passed at the first tick with x > i; points 100..149 are passed while outside
    assert sc.travelled_m == 200.0 and sc.outside_m == 50.0
    rec = sc.record()
    assert rec.rc == pytest.approx(20.0)
    assert rec.is_ == pytest.approx(0.75) and rec.is_ != pytest.approx(0.95)
    assert rec.ds == pytest.approx(15.0)
    assert rec.outside_lanes_fraction == pytest.approx(0.25)
    assert rec.infractions[-1].kind == "outside_route_lanes" and rec.infractions[-1].penalty == pytest.approx(0.75)


def test_lane_checker_allows_1_3_m_beyond_the_road() -> None:
    """OutsideRouteLanesTest: outside only when more than lane_width / 2 + 1.3 m from the nearest lane centre,
    i.e. the ego's centre more than 1.3 m beyond the edge of the road; one lane over to the left is the
    opposite direction (wrong lane)."""
    town = build_town("Town01")
    lk = next(lk for lk in town.links if lk.length > 60)
    route = build_route(town, [lk.id], lk.n_lanes - 1, 2.0, lk.length - 2.0)     # the outermost lane
    lanes = LaneChecker(town)
    u = DIRS[lk.dir]
    right = np.array([u[1], -u[0]])
    yaw = route.heading_at(30.0)
    on = route.point_at(30.0)
    edge = on + right * LANE_WIDTH_M / 2                                   # the road's outer edge
    assert not lanes.outside(on, yaw)
    assert not lanes.outside(edge + right * 1.0, yaw)                      # on the sidewalk, within 1.3 m
    assert lanes.outside(edge + right * 1.6, yaw)
    inner = build_route(town, [lk.id], 0, 2.0, lk.length - 2.0).point_at(30.0)
    assert lanes.outside(inner - right * LANE_WIDTH_M, yaw)                # the opposite direction's lane
    assert not lanes.outside(inner - right * LANE_WIDTH_M, yaw + math.pi)


# ------------------------------------------------------------------------------------------ route completion
def test_route_completion_function() -> None:
    assert route_completion(999.0, 1000.0, 9.99) == 100.0
    assert route_completion(999.0, 1000.0, 10.0) == pytest.approx(99.9)      # strictly closer than 10 m
    assert route_completion(990.0, 1000.0, 1.0) == pytest.approx(99.0)       # strictly more than 99 %
    assert route_completion(1000.0, 1000.0, 10.0) == 100.0                   # no 99.99 cap
    assert route_completion(0.0, 1000.0, 1000.0) == 0.0


def test_completion_needs_more_than_99_pct_and_strictly_under_10_m() -> None:
    sc, _ = scorer(1000.0)
    # at x = 990.5 the last point passed is 990: 99.0 %, not > 99, though 9.5 m from the goal
    assert drive(sc, np.arange(0.0, 990.5 + 1e-9, 0.5)) == STATUS_RUNNING
    assert sc.record().rc == pytest.approx(99.0)
    assert drive(sc, [991.0], t0=100.0) == STATUS_RUNNING                    # on point 991: not passed yet
    assert drive(sc, [991.25], t0=100.1) == STATUS_COMPLETED                 # 99.1 %, 8.75 m
    assert sc.record().rc == 100.0 and sc.record().ds == 100.0

    sc, _ = scorer(1000.0)
    # 8 m to the side of the route: at x = 994 the ego has passed point 993 (99.3 %) and is exactly 10.0 m away
    assert drive(sc, np.arange(0.0, 994.0 + 1e-9, 0.5), y=8.0) == STATUS_RUNNING
    assert sc.dist_to_goal == 10.0
    assert sc.record().rc == pytest.approx(99.3) and sc.record().status == STATUS_RUNNING
    assert drive(sc, [994.0], y=math.sqrt(9.99 ** 2 - 36.0), t0=200.0) == STATUS_COMPLETED     # 9.99 m
    assert sc.dist_to_goal == pytest.approx(9.99) and sc.record().rc == 100.0


def test_rc_is_100_without_the_goal_and_never_99_99() -> None:
    """Past the last route point but 12 m to its side: RC is 100 % (no cap), the route is not completed."""
    sc, _ = scorer(1000.0)
    assert drive(sc, np.arange(0.0, 1000.5 + 1e-9, 0.5), y=12.0) == STATUS_RUNNING
    rec = sc.record()
    assert rec.rc == 100.0 and rec.status == STATUS_RUNNING


def test_rc_counts_route_points_passed() -> None:
    """RouteCompletionTest: 100 x accum[farthest point passed] / route length, with the ego beyond the
    point's normal (dot product > 0), however far to the side."""
    sc, _ = scorer(80.0)
    drive(sc, np.arange(0.0, 37.9 + 1e-9, 0.1), y=np.linspace(0.0, 14.0, len(np.arange(0.0, 37.9 + 1e-9, 0.1))))
    assert sc.record().rc == pytest.approx(100 * 37.0 / 80.0)


# ------------------------------------------------------------------------------------------ global figures
LB_KEYS = {"collisions_pedestrian": "collision_pedestrian", "collisions_vehicle": "collision_vehicle",
           "collisions_layout": "collision_static", "red_light": "red_light", "stop_infraction": "stop_sign",
           "outside_route_lanes": "outside_route_lanes", "route_dev": "route_deviation",
           "route_timeout": "timeout", "vehicle_blocked": "blocked"}


def reference_global_statistics(records: list[RouteRecord]) -> tuple[dict, dict, dict]:
    """statistics_manager.compute_global_statistics, transcribed (infraction lists become our records)."""
    total_routes = len(records)
    scores = {"score_route": 0, "score_penalty": 0, "score_composed": 0}
    std = {"score_route": 0, "score_penalty": 0, "score_composed": 0}
    infractions = {key: 0 for key in LB_KEYS}
    as_lb = [{"scores": {"score_route": r.rc, "score_penalty": r.is_, "score_composed": r.ds},
              "meta": {"route_length": r.route_length_m},
              "infractions": {key: [i for i in r.infractions if i.kind == kind] for key, kind in LB_KEYS.items()}}
             for r in records]
    for route_record in as_lb:
        for key in scores:
            scores[key] += route_record["scores"][key]
        for key in infractions:
            if route_record["scores"]["score_route"] == 0:
                continue
            route_length_kms = (route_record["scores"]["score_route"] / 100
                                * route_record["meta"]["route_length"] / 1000.0)
            infractions[key] += len(route_record["infractions"][key]) / route_length_kms
    for key in scores:
        scores[key] /= float(total_routes)
    if total_routes == 1:
        std = dict.fromkeys(std, "NaN")
    else:
        for route_record in as_lb:
            for key in std:
                std[key] += math.pow(route_record["scores"][key] - scores[key], 2)
        for key in std:
            std[key] = math.sqrt(std[key] / float(total_routes - 1))
    return scores, std, infractions


def _rec(name: str, length: float, rc: float, is_: float, status: str, kinds: list[str]) -> RouteRecord:
    infs = [Infraction(k, 1.0, 0.0, 0.0) for k in kinds]
    return RouteRecord(name, "T", length, rc, is_, rc * is_, status, 10.0, 0.0, infs)


def test_global_means_and_sample_std() -> None:
    recs = [_rec("a", 100, 100.0, 1.0, STATUS_COMPLETED, []), _rec("b", 100, 60.0, 0.5, STATUS_TIMEOUT, []),
            _rec("c", 100, 20.0, 0.0, STATUS_BLOCKED, [])]
    s = summarize(recs)
    assert s["rc"] == pytest.approx(60.0) and s["rc_std"] == pytest.approx(40.0)        # sqrt((40² + 0 + 40²) / 2)
    assert s["is"] == pytest.approx(0.5) and s["is_std"] == pytest.approx(0.5)
    ds = [100.0, 30.0, 0.0]
    assert s["ds"] == pytest.approx(130.0 / 3)
    assert s["ds_std"] == pytest.approx(math.sqrt(sum((d - 130.0 / 3) ** 2 for d in ds) / 2))
    assert s["ds_std"] != pytest.approx(float(np.std(ds)))                              # not the population std
    scores, std, _ = reference_global_statistics(recs)
    assert (s["rc"], s["is"], s["ds"]) == pytest.approx((scores["score_route"], scores["score_penalty"],
                                                         scores["score_composed"]))
    assert (s["rc_std"], s["is_std"], s["ds_std"]) == pytest.approx((std["score_route"], std["score_penalty"],
                                                                     std["score_composed"]))
    one = summarize(recs[:1])
    assert one["n_routes"] == 1 and math.isnan(one["ds_std"]) and math.isnan(one["rc_std"])
    assert reference_global_statistics(recs[:1])[1]["score_composed"] == "NaN"
    for key in ("n_routes", "ds", "rc", "is", "infractions", "infractions_per_km", "statuses"):
        assert key in s


def test_per_km_rates_are_summed_route_by_route_skipping_rc_0() -> None:
    recs = [
        _rec("a", 2000, 50.0, 0.252, STATUS_TIMEOUT, ["collision_vehicle", "collision_vehicle", "red_light",
                                                      "timeout"]),    # 1.0 km driven
        _rec("b", 500, 100.0, 0.54, STATUS_COMPLETED, ["collision_vehicle", "outside_route_lanes"]),  # 0.5 km
        _rec("c", 1000, 0.0, 0.6, STATUS_BLOCKED, ["collision_vehicle", "blocked"]),    # RC 0: skipped
    ]
    per_km = summarize(recs)["infractions_per_km"]
    assert per_km["collision_vehicle"] == pytest.approx(2 / 1.0 + 1 / 0.5)      # 4.0, not 3 / 1.5 km = 2.0
    assert per_km["red_light"] == pytest.approx(1.0)
    assert per_km["outside_route_lanes"] == pytest.approx(2.0)
    assert per_km["timeout"] == pytest.approx(1.0)
    assert per_km["blocked"] == 0.0 and per_km["collision_pedestrian"] == 0.0
    _, _, reference = reference_global_statistics(recs)
    assert {LB_KEYS[k]: v for k, v in reference.items()} == pytest.approx(per_km)
    assert summarize(recs)["infractions"]["collision_vehicle"] == 4         # totals count every route


# ------------------------------------------------------------------------------------------ collisions
def _coll(actor: int, kind: int = scene.BOX_VEHICLE):
    def make(t: float, xy: np.ndarray) -> dict:
        return {"type": "collision", "actor_id": actor, "kind": kind, "x": float(xy[0]), "y": float(xy[1]), "t": t}
    return make


def _run(xs, hits: dict[int, object]) -> RouteScorer:
    """Ticks at 20 Hz along x; at tick i the collision events hits[i] (a maker or a list of makers)."""
    sc, _ = scorer(200.0, timeout_s=1e9)

    def events(i: int, t: float, xy: np.ndarray) -> list[dict]:
        h = hits.get(i, [])
        return [m(t, xy) for m in (h if isinstance(h, list) else [h])]

    drive(sc, xs, events=events)
    return sc


def test_collision_same_actor_within_5_s() -> None:
    xs = np.linspace(10.0, 60.0, 121)               # 6 s, ~0.42 m per tick: far from the first location
    # tick 98 = 4.9 s after the collision at tick 0: same actor, ignored
    assert len(_run(xs, {0: _coll(7), 98: _coll(7)}).infractions) == 1
    # tick 102 = 5.1 s after: counted (the id was forgotten in the criterion's tick at 5.05 s)
    assert len(_run(xs, {0: _coll(7), 102: _coll(7)}).infractions) == 2
    # tick 101 = 5.05 s: the event arrives before that tick's forgetting, as CARLA's callback does
    assert len(_run(xs, {0: _coll(7), 101: _coll(7)}).infractions) == 1
    # a counted collision with another actor replaces the remembered id ...
    assert len(_run(xs, {0: _coll(7), 60: _coll(8), 80: _coll(7)}).infractions) == 3
    # ... one with the map layout (never remembered by id) renews the 5 s of the remembered one
    assert len(_run(xs, {0: _coll(7), 60: _coll(-3, scene.BOX_BUILDING), 102: _coll(7)}).infractions) == 2


def test_collision_min_area_3_m() -> None:
    # collision at x = 10, the ego then stops 2.9 m / 3.1 m further on and hits another actor
    for dx, counted in ((2.9, 1), (3.1, 2)):
        xs = np.concatenate([np.linspace(10.0, 10.0 + dx, 11), np.full(5, 10.0 + dx)])
        sc = _run(xs, {0: _coll(7), 12: _coll(8, scene.BOX_PEDESTRIAN)})
        assert len(sc.infractions) == counted, dx
    # several actors in one tick: the first registers its location, the others are within 3 m of it
    assert len(_run(np.full(3, 10.0), {0: [_coll(7), _coll(8), _coll(-3, scene.BOX_BUILDING)]}).infractions) == 1


def test_collision_location_forgotten_beyond_5_m() -> None:
    # collide at x = 10, drive 4.9 m / 5.5 m away, come back to x = 12 (2 m from it) and hit another actor
    for far, counted in ((14.9, 1), (15.5, 2)):
        xs = np.concatenate([np.linspace(10.0, far, 20), np.linspace(far, 12.0, 20)])
        sc = _run(xs, {0: _coll(7), 39: _coll(8)})
        assert len(sc.infractions) == counted, far


def test_map_layout_is_not_remembered_by_id() -> None:
    """CARLA's map layout collides as actor id 0, never kept as the last id; spawned props are actors."""
    xs = np.linspace(10.0, 30.0, 41)                # 1 s later the ego is 10 m on
    assert len(_run(xs, {0: _coll(-5, scene.BOX_BUILDING), 20: _coll(-5, scene.BOX_BUILDING)}).infractions) == 2
    prop = -100000
    assert len(_run(xs, {0: _coll(prop, scene.BOX_STATIC), 20: _coll(prop, scene.BOX_STATIC)}).infractions) == 1


# ------------------------------------------------------------------------------------------ terminations
def test_route_timeout_is_an_int() -> None:
    assert route_timeout(1000.0) == 805.0
    assert route_timeout(87.9) == 75.0                              # int(75.32)
    sc, _ = scorer(25.4)
    assert sc.timeout_s == 25.0                                     # int(0.8 x 25.4 + 5) = int(25.32)
    xs = np.arange(0, 600) * 0.01                                   # far too slow to finish
    assert drive(sc, xs[:501], speed=1.0) == STATUS_RUNNING         # t = 25.0: elapsed == timeout
    assert drive(sc, xs[501:], t0=25.05, speed=1.0) == STATUS_TIMEOUT  # TimeOut succeeds when elapsed > timeout
    assert sc.t_last == 25.05 and sc.record().infractions[-1].kind == STATUS_TIMEOUT


def test_route_deviation_30_m() -> None:
    sc, _ = scorer(100.0)
    assert drive(sc, [0.0, 0.5, 1.0], y=[0.0, 10.0, 29.99]) == STATUS_RUNNING
    assert drive(sc, [1.0], y=30.0, t0=1.0) == STATUS_DEVIATION      # InRouteTest: off unless distance < 30
    assert sc.record().infractions[-1].kind == STATUS_DEVIATION


def test_route_deviation_30_pct_of_the_route_15_m_off() -> None:
    """InRouteTest: the route distance advanced while 15 m or more off the route, above 30 % of its length."""
    sc, _ = scorer(100.0)
    xs = np.arange(0.0, 60.0, 0.5)
    assert drive(sc, xs, y=20.0) == STATUS_DEVIATION
    # at x = 30.5 points 30 and 31 tie and the later one is taken: 31 m advanced > 30 % of 100 m
    assert sc.t_last == pytest.approx(61 / 20)
    assert sc.off_route_m == pytest.approx(31.0)
    sc, _ = scorer(100.0)
    assert drive(sc, xs, y=14.9) == STATUS_RUNNING                   # in the safe band: nothing accumulates


def test_blocked_after_more_than_180_s_below_0_1_m_s() -> None:
    """ActorSpeedAboveThresholdTest: blocked once more than 180 s have passed since the last tick at or above
    0.1 m/s (or the first tick)."""
    sc, _ = scorer(1000.0, timeout_s=1e9)
    status = []
    for i in range(3802):                          # t = i / 20: moving up to t = 10 s, then 0.05 m/s
        x = min(i, 200) * 0.25
        status.append(sc.update(i / 20, np.array([x, 0.0]), 0.0, 5.0 if i <= 200 else 0.05))
    assert status[3800] == STATUS_RUNNING          # t = 190.0: 180 s after the last valid tick, not more
    assert status[3801] == STATUS_BLOCKED          # t = 190.05
    assert sc.record().infractions[-1].kind == STATUS_BLOCKED
    sc, _ = scorer(1000.0, timeout_s=1e9)
    speeds = [0.0] * 3000 + [0.1] + [0.0] * 3000    # exactly 0.1 m/s is not below it
    for i, v in enumerate(speeds):
        assert sc.update(i / 20, np.array([5.0, 0.0]), 0.0, v) == STATUS_RUNNING
