"""CARLA Leaderboard 1.0 scoring, exactly per docs/architecture.md, "Evaluation definitions".

The reference is the leaderboard's own code, read at these commits:

- LB = carla-simulator/leaderboard @ 2165f5e4a53be8e96c501fa39965800489b1a0a5 (branch leaderboard-1.0):
  `leaderboard/utils/statistics_manager.py` (penalties, per-route and global statistics) and
  `leaderboard/scenarios/route_scenario.py` (route timeout, the criteria a route runs with);
- SR = carla-simulator/scenario_runner @ b9c342eee4ba03cfdec58b184f10f89b7053b65e (head of its branch
  leaderboard-1.0, the same day as LB): `srunner/scenariomanager/scenarioatomics/atomic_criteria.py`
  (CollisionTest, OutsideRouteLanesTest, InRouteTest, RouteCompletionTest, RunningRedLightTest,
  RunningStopTest, ActorSpeedAboveThresholdTest) and `srunner/scenariomanager/timer.py` (TimeOut).

Per route: RC = 100 x route distance up to the farthest route point passed / route length, set to 100 when
RC > 99 and the ego is strictly closer than 10 m to the goal (no other cap); IS = product of the penalties
(pedestrian collision x0.50, vehicle x0.60, static x0.65, red light x0.70, stop sign x0.80, outside route
lanes x(1 - distance driven outside / route distance completed so far)); DS = RC x IS. Early termination:
30 m or more from the route (or more than 30 % of the route driven 15 m or more off it), blocked (below
0.1 m/s for more than 180 simulated seconds), or past the timeout int(0.8 s/m x length + 5 s). Collisions
follow CollisionTest: the same actor is not counted again while it is remembered (5 s after the last
counted collision), and a new collision within 3 m of a remembered collision location is ignored; a
location is forgotten once the ego is more than 5 m from it. Global figures (`summarize`) are means over
routes with sample standard deviations and per-km infraction rates summed route by route.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from flad_sim import scene
from flad_sim.route import Route
from flad_sim.towns import CONTROL_LIGHT, CONTROL_STOP, DIRS, Town

log = logging.getLogger(__name__)

# LB statistics_manager.py: PENALTY_COLLISION_PEDESTRIAN/VEHICLE/STATIC, PENALTY_TRAFFIC_LIGHT, PENALTY_STOP
PENALTY = {
    "collision_pedestrian": 0.50,
    "collision_vehicle": 0.60,
    "collision_static": 0.65,
    "red_light": 0.70,
    "stop_sign": 0.80,
}
# SR CollisionTest: MIN_AREA_OF_COLLISION = 3, MAX_AREA_OF_COLLISION = 5, MAX_ID_TIME = 5
COLLISION_MIN_AREA_M = 3.0        # a new collision this close (<=) to a remembered location is ignored
COLLISION_MAX_AREA_M = 5.0        # a remembered location is forgotten once the ego is farther (>) than this
COLLISION_ID_TIME_S = 5.0         # the last actor is forgotten this long (>) after the last counted collision
COLLISION_AREA_M = COLLISION_MAX_AREA_M     # former name, kept for importers
# CARLA's map layout (buildings, poles, ...) collides as actor id 0, which CollisionTest never remembers as
# `last_id`; the world reports its town scenery as -1 - box index (> LAYOUT_ID_FLOOR) and spawned obstacles
# (World.add_static_obstacle, real actors in CARLA) as -100000 - k.
LAYOUT_ID_FLOOR = -100000
# SR RouteCompletionTest: DISTANCE_THRESHOLD = 10.0, `> 99.0 and location.distance(target) < DISTANCE_THRESHOLD`
RC_GOAL_DIST_M = 10.0
RC_MIN_PCT = 99.0
RC_WINDOW = 2                     # SR RouteCompletionTest.WINDOWS_SIZE (route points ahead checked per tick)
OUTSIDE_WINDOW = 3                # SR OutsideRouteLanesTest.WINDOWS_SIZE
OUTSIDE_ALLOWED_M = 1.3           # SR OutsideRouteLanesTest.ALLOWED_OUT_DISTANCE (beyond the lane's edge)
IN_ROUTE_WINDOW = 5               # SR InRouteTest.WINDOWS_SIZE
DEVIATION_M = 30.0                # LB route_scenario.py: InRouteTest(offroad_max=30); SR: offroad_min = max / 2
DEVIATION_SAFE_M = DEVIATION_M / 2
DEVIATION_MAX_PCT = 30.0          # SR InRouteTest.MAX_ROUTE_PERCENTAGE
BLOCKED_SPEED = 0.1               # LB route_scenario.py: ActorSpeedAboveThresholdTest(speed_threshold=0.1,
BLOCKED_TIME_S = 180.0            #   below_threshold_max_time=180.0)
TIMEOUT_S_PER_M = 0.8             # LB route_scenario.py: SECONDS_GIVEN_PER_METERS
TIMEOUT_EXTRA_S = 5.0             # LB route_scenario.py: INITIAL_SECONDS_DELAY
RC_ADVANCE_DIST_M = 10.0          # `RouteScorer.progress` (agents' route position) only advances this close

STATUS_RUNNING = "running"
STATUS_COMPLETED = "completed"
STATUS_DEVIATION = "route_deviation"
STATUS_BLOCKED = "blocked"
STATUS_TIMEOUT = "timeout"
STATUS_FAILED = "agent_failed"

# LB statistics_manager.py RouteRecord.infractions keys -> our infraction kinds
LEADERBOARD_INFRACTIONS = {
    "collisions_pedestrian": "collision_pedestrian",
    "collisions_vehicle": "collision_vehicle",
    "collisions_layout": "collision_static",
    "red_light": "red_light",
    "stop_infraction": "stop_sign",
    "outside_route_lanes": "outside_route_lanes",
    "route_dev": STATUS_DEVIATION,
    "route_timeout": STATUS_TIMEOUT,
    "vehicle_blocked": STATUS_BLOCKED,
}

_DRIVABLE = np.zeros(len(scene.SURFACE_NAMES), bool)
_DRIVABLE[[scene.SURFACE_ROAD, scene.SURFACE_LANE_MARKING, scene.SURFACE_CENTER_LINE, scene.SURFACE_CROSSWALK,
           scene.SURFACE_STOP_LINE]] = True
_RING = 16                        # directions sampled at OUTSIDE_ALLOWED_M around the ego


@dataclass
class Infraction:
    """One logged event; `penalty` is its IS factor (1.0 for informational events such as terminations)."""

    kind: str
    time_s: float
    x: float
    y: float
    actor_id: int = -1
    penalty: float = 1.0
    info: str = ""


@dataclass
class RouteRecord:
    """The leaderboard record of one route."""

    route_id: str
    town: str
    route_length_m: float
    rc: float
    is_: float
    ds: float
    status: str
    duration_s: float
    outside_lanes_fraction: float
    infractions: list[Infraction] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["is"] = d.pop("is_")
        return d

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for inf in self.infractions:
            out[inf.kind] = out.get(inf.kind, 0) + 1
        return out


def infraction_score(infractions: list[Infraction], outside_fraction: float = 0.0) -> float:
    """IS: product of the penalties, times (1 - fraction of the completed route driven outside route lanes).

    LB statistics_manager.compute_route_statistics: `score_penalty *= PENALTY_*` per event and
    `*= (1 - percentage / 100)` for OUTSIDE_ROUTE_LANES_INFRACTION, with SR OutsideRouteLanesTest's
    percentage = 100 x wrong distance / route distance travelled so far (`outside_fraction` here)."""
    score = 1.0
    for inf in infractions:
        score *= inf.penalty
    return score * (1.0 - min(max(outside_fraction, 0.0), 1.0))


def target_reached(pct: float, dist_to_goal_m: float) -> bool:
    """SR RouteCompletionTest: `percentage > 99.0 and location.distance(target) < DISTANCE_THRESHOLD`."""
    return pct > RC_MIN_PCT and dist_to_goal_m < RC_GOAL_DIST_M


def route_completion(progress_m: float, route_length_m: float, dist_to_goal_m: float) -> float:
    """RC in %: 100 x progress / length (0..100, uncapped below 100), or 100 once the goal is reached.

    SR RouteCompletionTest: `100 * accum_meters[current_index] / accum_meters[-1]`, set to 100 when more
    than 99 % is done and the ego is strictly closer than 10 m to the route's last point."""
    pct = 100.0 * min(max(progress_m / max(route_length_m, 1e-9), 0.0), 1.0)
    return 100.0 if target_reached(pct, dist_to_goal_m) else pct


def route_timeout(route_length_m: float) -> float:
    """LB route_scenario._estimate_route_timeout: `int(SECONDS_GIVEN_PER_METERS * length + INITIAL_SECONDS_DELAY)`."""
    return float(int(TIMEOUT_S_PER_M * route_length_m + TIMEOUT_EXTRA_S))


def _std(values: list[float]) -> float:
    """LB compute_global_statistics: sqrt(sum((x - mean)^2) / (n - 1)); 'NaN' for a single route."""
    if len(values) < 2:
        return math.nan
    return float(np.std(values, ddof=1))


def infractions_per_km(records: list[RouteRecord]) -> dict[str, float]:
    """LB compute_global_statistics: for every infraction kind, the *sum over routes* of
    count / (RC / 100 x route length in km), skipping routes with RC == 0 (not a mean, not total / total km).

    Always has the nine leaderboard kinds (under our names, see LEADERBOARD_INFRACTIONS), plus any other
    kind the records hold (e.g. agent_failed), computed the same way."""
    kinds = list(LEADERBOARD_INFRACTIONS.values())
    kinds += sorted({k for r in records for k in r.counts()} - set(kinds))
    out = dict.fromkeys(kinds, 0.0)
    for r in records:
        if r.rc == 0:
            continue
        km = r.rc / 100 * r.route_length_m / 1000.0
        for k, n in r.counts().items():
            out[k] += n / km
    return out


def summarize(records: list[RouteRecord]) -> dict[str, Any]:
    """The leaderboard's global record (LB statistics_manager.compute_global_statistics) of these routes.

    ds, rc, is: means over routes (so mean DS != mean RC x mean IS); ds_std, rc_std, is_std: their sample
    standard deviations (divisor n - 1; NaN for one route, where the leaderboard writes 'NaN');
    infractions: totals per kind; infractions_per_km: see `infractions_per_km`; statuses: routes per status;
    total_length_m, duration_s: sums (the leaderboard's meta total_length and duration_game)."""
    if not records:
        return {"n_routes": 0, "ds": 0.0, "rc": 0.0, "is": 0.0, "ds_std": math.nan, "rc_std": math.nan,
                "is_std": math.nan, "infractions": {}, "infractions_per_km": infractions_per_km([]),
                "statuses": {}, "total_length_m": 0.0, "duration_s": 0.0}
    totals: dict[str, int] = {}
    for r in records:
        for k, v in r.counts().items():
            totals[k] = totals.get(k, 0) + v
    ds, rc, is_ = [r.ds for r in records], [r.rc for r in records], [r.is_ for r in records]
    return {
        "n_routes": len(records),
        "ds": float(np.mean(ds)),
        "rc": float(np.mean(rc)),
        "is": float(np.mean(is_)),
        "ds_std": _std(ds),
        "rc_std": _std(rc),
        "is_std": _std(is_),
        "infractions": totals,
        "infractions_per_km": infractions_per_km(records),
        "statuses": {s: sum(r.status == s for r in records) for s in {r.status for r in records}},
        "total_length_m": float(sum(r.route_length_m for r in records)),
        "duration_s": float(sum(r.duration_s for r in records)),
    }


class LaneChecker:
    """'Is the ego outside its route's lanes?' for a town (SR OutsideRouteLanesTest's two tests).

    Outside driving lanes: no drivable surface within OUTSIDE_ALLOWED_M (1.3 m) of the ego's centre (SR:
    distance to the nearest driving lane's centre > lane width / 2 + 1.3 m; here every drivable surface is
    a driving lane, sampled on a ring of 16 directions). Wrong lane: outside junctions, the lanes nearest
    the ego all run against its heading."""

    def __init__(self, town: Town) -> None:
        self.town = town
        starts, dirs, lengths, halfw = [], [], [], []
        for lk in town.links:
            u = DIRS[lk.dir]
            starts.append(town.lane_point(lk.id, 0, 0.0))
            dirs.append(u)
            lengths.append(lk.length)
            halfw.append(lk.n_lanes)
        self.start = np.array(starts)
        self.dir = np.array(dirs)
        self.length = np.array(lengths)
        self.n_lanes = np.array(halfw)
        a = np.linspace(0.0, 2 * math.pi, _RING, endpoint=False)
        self._ring = np.concatenate([[[0.0, 0.0]], OUTSIDE_ALLOWED_M * np.stack([np.cos(a), np.sin(a)], 1)])

    def off_lanes(self, xy: np.ndarray) -> bool:
        """SR `_is_outside_driving_lanes`: more than 1.3 m beyond the drivable surface."""
        pts = np.asarray(xy, float)[None, :2] + self._ring
        return not bool(_DRIVABLE[self.town.ground.lookup(pts[:, 0], pts[:, 1])].any())

    def wrong_lane(self, xy: np.ndarray, yaw: float) -> bool:
        """SR `_is_at_wrong_lane` (never in junctions): the nearest lane bands all run against the heading."""
        if self.town.is_junction_area(np.array([xy[0]]), np.array([xy[1]]))[0]:
            return False
        rel = np.asarray(xy, float)[None, :2] - self.start
        along = np.sum(rel * self.dir, 1)
        rn = np.stack([self.dir[:, 1], -self.dir[:, 0]], 1)
        lat = np.sum(rel * rn, 1) + 0.5 * 3.5          # from the centre line, positive to the link's right
        on_link = (along >= -1.0) & (along <= self.length + 1.0)
        if not on_link.any():
            return False
        gap = np.maximum(np.maximum(-lat, lat - self.n_lanes * 3.5), 0.0)     # lateral distance to the band
        gap = np.where(on_link, gap, np.inf)
        nearest = gap <= gap.min() + 1e-9
        u = np.array([math.cos(yaw), math.sin(yaw)])
        return bool(np.all(self.dir[nearest] @ u < 0.0))

    def outside(self, xy: np.ndarray, yaw: float) -> bool:
        """Outside the driving lanes, or in a lane of the opposite direction (SR: either counts)."""
        return self.off_lanes(xy) or self.wrong_lane(xy, yaw)


class RouteScorer:
    """Feeds on the ego's state and world events each tick; decides termination; produces the RouteRecord.

    Each tick mirrors one leaderboard tick: the tick's collision/stop-line events first (CARLA's sensor
    callbacks arrive before the criteria tree ticks), then RouteCompletionTest, OutsideRouteLanesTest,
    CollisionTest.update (forgetting), InRouteTest, ActorSpeedAboveThresholdTest and the route's TimeOut.
    Route points are the route's polyline vertices (1 m apart on lanes, as CARLA's interpolated route;
    0.5 m in junctions)."""

    def __init__(self, route: Route, town: Town, lane_checker: LaneChecker | None = None,
                 timeout_s: float | None = None) -> None:
        self.route = route
        self.town = town
        self.lanes = lane_checker or LaneChecker(town)
        self.timeout_s = route_timeout(route.length) if timeout_s is None else timeout_s
        self.progress = 0.0               # continuous route position for agents and labels (not scored)
        self.infractions: list[Infraction] = []
        self.status = STATUS_RUNNING
        self.t_start: float | None = None
        self.t_last = 0.0
        self._pts = np.asarray(route.points, float)
        self._dirs = np.stack([np.cos(route.heading), np.sin(route.heading)], 1)
        self._accum = np.asarray(route.s, float)           # SR `_accum_meters`
        # RouteCompletionTest
        self._rc_index = 0
        self.completion_pct = 0.0
        # OutsideRouteLanesTest
        self._ol_index = 0
        self.travelled_m = 0.0            # SR `_total_distance`: route distance travelled so far
        self.outside_m = 0.0              # SR `_wrong_distance`
        # InRouteTest
        self._ir_index = 0
        self._in_safe_route = True
        self.off_route_m = 0.0
        # ActorSpeedAboveThresholdTest
        self._last_valid_t: float | None = None
        # CollisionTest
        self._coll_locations: list[np.ndarray] = []
        self._last_id: int | None = None
        self._collision_time = -math.inf
        # RunningRedLightTest
        self._last_red_light: int | None = None
        self.dist_to_goal = float(np.linalg.norm(route.goal - route.points[0]))

    # ------------------------------------------------------------------------------------ events
    def _collision(self, ev: dict[str, Any], xy: np.ndarray) -> None:
        """SR CollisionTest._count_collisions (the sensor callback); `xy` is the ego's location."""
        aid = int(ev["actor_id"])
        if self._last_id is not None and self._last_id == aid:
            return
        for p in self._coll_locations:
            if math.hypot(xy[0] - p[0], xy[1] - p[1]) <= COLLISION_MIN_AREA_M:
                return
        t = float(ev["t"])
        kind = int(ev["kind"])
        name = ("collision_pedestrian" if kind == scene.BOX_PEDESTRIAN else
                "collision_vehicle" if kind == scene.BOX_VEHICLE else "collision_static")
        self.infractions.append(Infraction(name, t, float(ev["x"]), float(ev["y"]), aid, PENALTY[name],
                                           scene.BOX_NAMES[kind]))
        self._collision_time = t
        self._coll_locations.append(np.array(xy[:2], float))
        if not LAYOUT_ID_FLOOR < aid < 0:         # SR: `if event.other_actor.id != 0: self.last_id = ...`
            self._last_id = aid

    def _forget_collisions(self, t: float, xy: np.ndarray) -> None:
        """SR CollisionTest.update: keep locations within 5 m (<=); drop the last id 5 s (>) after."""
        self._coll_locations = [p for p in self._coll_locations
                                if math.hypot(xy[0] - p[0], xy[1] - p[1]) <= COLLISION_MAX_AREA_M]
        if self._last_id is not None and t - self._collision_time > COLLISION_ID_TIME_S:
            self._last_id = None

    def add_event(self, ev: dict[str, Any], xy: np.ndarray) -> None:
        if ev["type"] == "collision":
            self._collision(ev, np.asarray(xy, float))
        elif ev["type"] == "stop_line":
            if ev["control"] == CONTROL_LIGHT and ev["state"] == scene.TL_RED:
                # SR RunningRedLightTest: the light last run is skipped (`_last_red_light_id`)
                if self._last_red_light == int(ev["index"]):
                    return
                self._last_red_light = int(ev["index"])
                self.infractions.append(Infraction("red_light", float(ev["t"]), float(ev["x"]), float(ev["y"]), -1,
                                                   PENALTY["red_light"], f"stop line {ev['index']}"))
            elif ev["control"] == CONTROL_STOP and not ev["stopped"]:
                self.infractions.append(Infraction("stop_sign", float(ev["t"]), float(ev["x"]), float(ev["y"]), -1,
                                                   PENALTY["stop_sign"], f"stop line {ev['index']}"))

    # ------------------------------------------------------------------------------------ criteria
    def _passed(self, i: int, xy: np.ndarray) -> bool:
        """SR: `dot(location - waypoint, waypoint forward) > 0`."""
        return float((xy[0] - self._pts[i, 0]) * self._dirs[i, 0] + (xy[1] - self._pts[i, 1]) * self._dirs[i, 1]) > 0

    def _update_completion(self, xy: np.ndarray) -> None:
        """SR RouteCompletionTest.update: the farthest passed point among current .. current + 2."""
        n = len(self._pts)
        for i in range(self._rc_index, min(self._rc_index + RC_WINDOW + 1, n)):
            if self._passed(i, xy):
                self._rc_index = i
                self.completion_pct = 100.0 * self._accum[i] / max(self._accum[-1], 1e-9)

    def _update_outside_lanes(self, xy: np.ndarray, yaw: float) -> None:
        """SR OutsideRouteLanesTest.update: route distance passed this tick, and whether outside meanwhile
        (SR evaluates that every tick; it only matters, so it is only computed, when a point is passed)."""
        outside: bool | None = None
        n = len(self._pts)
        for i in range(self._ol_index + 1, min(self._ol_index + OUTSIDE_WINDOW + 1, n)):
            if self._passed(i, xy):
                new = float(np.linalg.norm(self._pts[i] - self._pts[self._ol_index]))
                self._ol_index = i
                self.travelled_m += new
                if outside is None:
                    outside = self.lanes.outside(xy, yaw)
                if outside:
                    self.outside_m += new

    def _update_in_route(self, xy: np.ndarray) -> float | None:
        """SR InRouteTest.update: the distance that deviates (>= 30 m, or > 30 % of the route driven at
        15 m or more off it), else None."""
        n = len(self._pts)
        seg = self._pts[self._ir_index:min(self._ir_index + IN_ROUTE_WINDOW + 1, n)]
        d = np.hypot(seg[:, 0] - xy[0], seg[:, 1] - xy[1])
        k = len(d) - 1 - int(np.argmin(d[::-1]))          # SR `distance <= shortest`: the last of equals
        closest, shortest = self._ir_index + k, float(d[k])
        off_route = True
        if shortest < DEVIATION_M:
            off_route = False
            self._in_safe_route = shortest < DEVIATION_SAFE_M
        if closest != self._ir_index:
            if not self._in_safe_route:
                self.off_route_m += float(self._accum[closest] - self._accum[self._ir_index])
                if 100 * self.off_route_m / max(self._accum[-1], 1e-9) > DEVIATION_MAX_PCT:
                    off_route = True
            self._ir_index = closest
        return shortest if off_route else None

    def _update_blocked(self, t: float, speed: float) -> bool:
        """SR ActorSpeedAboveThresholdTest.update: below 0.1 m/s for more than 180 s since the last tick at
        or above it (or the first tick). SR tests `self._time_last_valid_state` for truth, so a game time of
        exactly 0.0 would not count as set there; here any time does."""
        if abs(speed) < BLOCKED_SPEED and self._last_valid_t is not None:
            return t - self._last_valid_t > BLOCKED_TIME_S
        self._last_valid_t = t
        return False

    def _track_progress(self, xy: np.ndarray) -> None:
        s, d = self.route.project(xy, self.progress, back=5.0, ahead=30.0)
        if d <= RC_ADVANCE_DIST_M and s > self.progress:
            self.progress = s

    # ------------------------------------------------------------------------------------ update
    def update(self, t: float, xy: np.ndarray, yaw: float, speed: float, events: list[dict[str, Any]] = ()) -> str:
        """One tick: ego reference point (box centre), heading, speed and the world's events; returns status."""
        if self.status != STATUS_RUNNING:
            return self.status
        xy = np.asarray(xy, float)
        if self.t_start is None:
            self.t_start = t
        self.t_last = t
        for ev in events:
            self.add_event(ev, xy)
        self._track_progress(xy)
        self._update_completion(xy)
        self._update_outside_lanes(xy, yaw)
        self._forget_collisions(t, xy)
        self.dist_to_goal = float(np.linalg.norm(self.route.goal - xy))
        if target_reached(self.completion_pct, self.dist_to_goal):
            self.completion_pct = 100.0
            self.status = STATUS_COMPLETED
            return self.status
        # early termination
        deviation = self._update_in_route(xy)
        if deviation is not None:
            self._terminate(STATUS_DEVIATION, t, xy, f"{deviation:.1f} m from the route")
        elif self._update_blocked(t, speed):
            self._terminate(STATUS_BLOCKED, t, xy, f"below {BLOCKED_SPEED} m/s for {BLOCKED_TIME_S:.0f} s")
        elif t - self.t_start > self.timeout_s:       # SR TimeOut: elapsed > timeout ("greaterThan")
            self._terminate(STATUS_TIMEOUT, t, xy, f"route timeout {self.timeout_s:.0f} s")
        return self.status

    def _terminate(self, status: str, t: float, xy: np.ndarray, info: str) -> None:
        self.status = status
        self.infractions.append(Infraction(status, t, float(xy[0]), float(xy[1]), -1, 1.0, info))

    def fail(self, t: float, info: str) -> None:
        """The agent crashed: end the route here."""
        self.status = STATUS_FAILED
        self.infractions.append(Infraction(STATUS_FAILED, t, 0.0, 0.0, -1, 1.0, info))

    # ------------------------------------------------------------------------------------ result
    @property
    def outside_fraction(self) -> float:
        """SR OutsideRouteLanesTest.terminate: wrong distance / route distance travelled (not route length)."""
        return self.outside_m / self.travelled_m if self.travelled_m > 0 else 0.0

    @property
    def rc(self) -> float:
        return 100.0 if self.status == STATUS_COMPLETED else self.completion_pct

    def record(self) -> RouteRecord:
        rc = self.rc
        is_ = infraction_score(self.infractions, self.outside_fraction)
        infr = list(self.infractions)
        if self.outside_m > 0:
            infr.append(Infraction("outside_route_lanes", self.t_last, 0.0, 0.0, -1, 1.0 - self.outside_fraction,
                                   f"{self.outside_m:.1f} m, {100 * self.outside_fraction:.2f} % of the "
                                   "completed route"))
        return RouteRecord(self.route.route_id, self.town.name, self.route.length, rc, is_, max(rc * is_, 0.0),
                           STATUS_RUNNING if self.status == STATUS_RUNNING else self.status,
                           self.t_last - (self.t_start or 0.0), self.outside_fraction, infr)
