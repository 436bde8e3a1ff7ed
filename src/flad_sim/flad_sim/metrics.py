"""CARLA Leaderboard 1.0 scoring, exactly per docs/architecture.md, "Evaluation definitions".

Per route: RC = % of route distance completed (100 only if > 99 % and within 10 m of the goal);
IS = product of penalties (pedestrian collision x0.50, vehicle x0.60, static x0.65, red light x0.70,
stop sign x0.80, outside route lanes x(1 - fraction of the route driven outside));
DS = RC x IS. Early termination: >= 30 m from the route (route deviation), < 0.1 m/s for 180 simulated
seconds (blocked), or exceeding 0.8 s per metre + 5 s (timeout). Collisions follow CARLA's
CollisionTest: an event is ignored when the ego is within 5 m of a previously registered collision
location, or when it is with the same actor as the last registered one less than 5 s ago.
Summaries are means over routes (so mean DS != mean RC x mean IS).
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

PENALTY = {
    "collision_pedestrian": 0.50,
    "collision_vehicle": 0.60,
    "collision_static": 0.65,
    "red_light": 0.70,
    "stop_sign": 0.80,
}
COLLISION_AREA_M = 5.0
COLLISION_ID_TIME_S = 5.0
RC_GOAL_DIST_M = 10.0
RC_ADVANCE_DIST_M = 10.0          # route progress only counts while within this distance of the route
DEVIATION_M = 30.0
BLOCKED_SPEED = 0.1
BLOCKED_TIME_S = 180.0
TIMEOUT_S_PER_M = 0.8
TIMEOUT_EXTRA_S = 5.0

STATUS_RUNNING = "running"
STATUS_COMPLETED = "completed"
STATUS_DEVIATION = "route_deviation"
STATUS_BLOCKED = "blocked"
STATUS_TIMEOUT = "timeout"
STATUS_FAILED = "agent_failed"

_DRIVABLE = np.zeros(len(scene.SURFACE_NAMES), bool)
_DRIVABLE[[scene.SURFACE_ROAD, scene.SURFACE_LANE_MARKING, scene.SURFACE_CENTER_LINE, scene.SURFACE_CROSSWALK,
           scene.SURFACE_STOP_LINE]] = True


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
    """IS: product of the penalties, times (1 - fraction of the route driven outside route lanes)."""
    score = 1.0
    for inf in infractions:
        score *= inf.penalty
    return score * (1.0 - min(max(outside_fraction, 0.0), 1.0))


def route_completion(progress_m: float, route_length_m: float, dist_to_goal_m: float) -> float:
    """RC in %: progress / length, but 100 only when > 99 % done and within 10 m of the goal."""
    pct = 100.0 * min(max(progress_m / max(route_length_m, 1e-9), 0.0), 1.0)
    if pct > 99.0 and dist_to_goal_m <= RC_GOAL_DIST_M:
        return 100.0
    return min(pct, 99.99) if pct >= 100.0 else pct


def summarize(records: list[RouteRecord]) -> dict[str, Any]:
    """Means over routes of DS, RC, IS (leaderboard convention) plus infraction totals per km."""
    if not records:
        return {"n_routes": 0, "ds": 0.0, "rc": 0.0, "is": 0.0}
    km = sum(r.route_length_m * r.rc / 100.0 for r in records) / 1000.0
    totals: dict[str, int] = {}
    for r in records:
        for k, v in r.counts().items():
            totals[k] = totals.get(k, 0) + v
    return {
        "n_routes": len(records),
        "ds": float(np.mean([r.ds for r in records])),
        "rc": float(np.mean([r.rc for r in records])),
        "is": float(np.mean([r.is_ for r in records])),
        "infractions": totals,
        "infractions_per_km": {k: v / km for k, v in totals.items()} if km > 0 else {},
        "statuses": {s: sum(r.status == s for r in records) for s in {r.status for r in records}},
    }


class LaneChecker:
    """Vectorised 'is this point outside the driving lanes of its direction?' for a town."""

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

    def outside(self, xy: np.ndarray, yaw: float) -> bool:
        """Off the drivable surface, or (outside junctions) in a lane of the opposite direction."""
        cls = self.town.ground.lookup(np.array([xy[0]]), np.array([xy[1]]))[0]
        if not _DRIVABLE[cls]:
            return True
        if self.town.is_junction_area(np.array([xy[0]]), np.array([xy[1]]))[0]:
            return False
        # links whose lane band (innermost lane's left edge to the outer edge) contains the point
        rel = np.asarray(xy)[None, :] - self.start
        along = np.sum(rel * self.dir, 1)
        rn = np.stack([self.dir[:, 1], -self.dir[:, 0]], 1)
        lat = np.sum(rel * rn, 1) + 0.5 * 3.5          # from the centre line, positive to the link's right
        inside = (along >= -1.0) & (along <= self.length + 1.0) & (lat >= 0.0) & (lat <= self.n_lanes * 3.5)
        if not inside.any():
            return False
        u = np.array([math.cos(yaw), math.sin(yaw)])
        return bool(np.all(self.dir[inside] @ u < 0.0))


class RouteScorer:
    """Feeds on the ego's state and world events each tick; decides termination; produces the RouteRecord."""

    def __init__(self, route: Route, town: Town, lane_checker: LaneChecker | None = None,
                 timeout_s: float | None = None) -> None:
        self.route = route
        self.town = town
        self.lanes = lane_checker or LaneChecker(town)
        self.timeout_s = TIMEOUT_S_PER_M * route.length + TIMEOUT_EXTRA_S if timeout_s is None else timeout_s
        self.progress = 0.0
        self.outside_m = 0.0
        self.infractions: list[Infraction] = []
        self.status = STATUS_RUNNING
        self.t_start: float | None = None
        self.t_last = 0.0
        self.blocked_since: float | None = None
        self._coll_locations: list[np.ndarray] = []
        self._last_id: int | None = None
        self._last_id_time = -math.inf
        self.dist_to_goal = float(np.linalg.norm(route.goal - route.points[0]))

    # ------------------------------------------------------------------------------------ events
    def _collision(self, ev: dict[str, Any], xy: np.ndarray) -> None:
        t = float(ev["t"])
        # forget old collision areas and the last actor id (CARLA CollisionTest semantics)
        self._coll_locations = [p for p in self._coll_locations if np.linalg.norm(xy - p) <= COLLISION_AREA_M]
        if self._last_id is not None and t - self._last_id_time > COLLISION_ID_TIME_S:
            self._last_id = None
        if self._coll_locations or self._last_id == ev["actor_id"]:
            return
        kind = int(ev["kind"])
        name = ("collision_pedestrian" if kind == scene.BOX_PEDESTRIAN else
                "collision_vehicle" if kind == scene.BOX_VEHICLE else "collision_static")
        self.infractions.append(Infraction(name, t, float(ev["x"]), float(ev["y"]), int(ev["actor_id"]),
                                           PENALTY[name], scene.BOX_NAMES[kind]))
        self._coll_locations.append(xy.copy())
        self._last_id = ev["actor_id"]
        self._last_id_time = t

    def add_event(self, ev: dict[str, Any], xy: np.ndarray) -> None:
        if ev["type"] == "collision":
            self._collision(ev, xy)
        elif ev["type"] == "stop_line":
            if ev["control"] == CONTROL_LIGHT and ev["state"] == scene.TL_RED:
                self.infractions.append(Infraction("red_light", float(ev["t"]), float(ev["x"]), float(ev["y"]), -1,
                                                   PENALTY["red_light"], f"stop line {ev['index']}"))
            elif ev["control"] == CONTROL_STOP and not ev["stopped"]:
                self.infractions.append(Infraction("stop_sign", float(ev["t"]), float(ev["x"]), float(ev["y"]), -1,
                                                   PENALTY["stop_sign"], f"stop line {ev['index']}"))

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
        s, d = self.route.project(xy, self.progress, back=5.0, ahead=30.0)
        if d <= RC_ADVANCE_DIST_M and s > self.progress:
            delta = s - self.progress
            if self.lanes.outside(xy, yaw):
                self.outside_m += delta
            self.progress = s
        self.dist_to_goal = float(np.linalg.norm(self.route.goal - xy))
        if route_completion(self.progress, self.route.length, self.dist_to_goal) >= 100.0:
            self.status = STATUS_COMPLETED
            return self.status
        # early termination
        d_any = d
        if d >= DEVIATION_M:      # the windowed distance is an upper bound; look wider only when it is large
            _, d_any = self.route.project(xy, self.progress, back=50.0, ahead=80.0)
        if d_any >= DEVIATION_M:
            self._terminate(STATUS_DEVIATION, t, xy, f"{d_any:.1f} m from the route")
        elif abs(speed) < BLOCKED_SPEED:
            if self.blocked_since is None:
                self.blocked_since = t
            elif t - self.blocked_since >= BLOCKED_TIME_S:
                self._terminate(STATUS_BLOCKED, t, xy, f"below {BLOCKED_SPEED} m/s for {BLOCKED_TIME_S:.0f} s")
        else:
            self.blocked_since = None
        if self.status == STATUS_RUNNING and t - self.t_start >= self.timeout_s:
            self._terminate(STATUS_TIMEOUT, t, xy, f"route timeout {self.timeout_s:.1f} s")
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
        return self.outside_m / max(self.route.length, 1e-9)

    def record(self) -> RouteRecord:
        rc = route_completion(self.progress, self.route.length, self.dist_to_goal)
        is_ = infraction_score(self.infractions, self.outside_fraction)
        infr = list(self.infractions)
        if self.outside_m > 0:
            infr.append(Infraction("outside_route_lanes", self.t_last, 0.0, 0.0, -1, 1.0 - self.outside_fraction,
                                   f"{100 * self.outside_fraction:.2f} % of the route"))
        return RouteRecord(self.route.route_id, self.town.name, self.route.length, rc, is_, rc * is_,
                           STATUS_RUNNING if self.status == STATUS_RUNNING else self.status,
                           self.t_last - (self.t_start or 0.0), self.outside_fraction, infr)
