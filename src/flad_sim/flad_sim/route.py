"""Routes: A* over the town's road graph, then a dense lane-level polyline and a list of maneuvers.

A* runs over *links* (one direction of a road between two intersections). Lanes are then chosen
forward along the route: keep the current lane when it can make the next movement, else change lanes
early on the link (smoothstep lateral transition of `LANE_CHANGE_M`). The dense polyline (1 m spacing on
lanes, 0.5 m in junctions) is what the expert follows and what route completion is measured on.
"""

from __future__ import annotations

import heapq
import logging
import math
from dataclasses import dataclass, field

import numpy as np

from flad_sim import scene
from flad_sim.instructions import (
    CMD_CHANGE_LEFT,
    CMD_CHANGE_RIGHT,
    CMD_FOLLOW,
    CMD_LEFT,
    CMD_RIGHT,
    CMD_STRAIGHT,
)
from flad_sim.towns import DIRS, LANE_WIDTH_M, TURN_BEND, TURN_LEFT, TURN_RIGHT, TURN_STRAIGHT, Town

log = logging.getLogger(__name__)

LANE_CHANGE_M = 20.0
MIN_SAMPLED_CHANGE_M = 14.0     # random routes avoid lane changes squeezed shorter than this
_TURN_CMD = {TURN_LEFT: CMD_LEFT, TURN_RIGHT: CMD_RIGHT, TURN_STRAIGHT: CMD_STRAIGHT, TURN_BEND: CMD_FOLLOW}


class NoRouteError(RuntimeError):
    """No drivable route between the two points."""


@dataclass
class Maneuver:
    """A high-level step of the route, from arc length `s0` to `s1` (route metres)."""

    command: int          # instructions.CMD_*
    s0: float
    s1: float
    node: int = -1        # junction node for turns / straight-through


@dataclass
class Route:
    """A dense polyline with per-point lane element ids, maneuvers and the stop lines crossed."""

    town: str
    points: np.ndarray                # [P, 2] world xy
    heading: np.ndarray               # [P]
    s: np.ndarray                     # [P] cumulative arc length
    elem: np.ndarray                  # [P] town element under each point
    maneuvers: list[Maneuver]
    stops: list[tuple[float, int]]    # (route s of the stop line, Town.stop_lines index)
    links: list[int] = field(default_factory=list)
    route_id: str = ""

    @property
    def length(self) -> float:
        return float(self.s[-1])

    @property
    def goal(self) -> np.ndarray:
        return self.points[-1]

    def start_pose(self) -> scene.Pose:
        return scene.Pose(float(self.points[0, 0]), float(self.points[0, 1]), float(self.heading[0]))

    def point_at(self, s: float | np.ndarray) -> np.ndarray:
        """Interpolated xy at route arc length(s)."""
        s = np.clip(s, 0.0, self.length)
        return np.stack([np.interp(s, self.s, self.points[:, 0]), np.interp(s, self.s, self.points[:, 1])], -1)

    def heading_at(self, s: float) -> float:
        i = int(np.clip(np.searchsorted(self.s, s), 0, len(self.s) - 1))
        return float(self.heading[i])

    def project(self, xy: np.ndarray, s_hint: float = 0.0, back: float = 10.0, ahead: float = 40.0
                ) -> tuple[float, float]:
        """(arc length, distance) of the route point nearest to xy within [s_hint - back, s_hint + ahead]."""
        i0 = int(np.searchsorted(self.s, s_hint - back))
        i1 = int(np.searchsorted(self.s, s_hint + ahead, side="right"))
        i1 = max(i1, i0 + 1)
        px, py = float(xy[0]), float(xy[1])
        seg = self.points[i0:i1]
        d2 = (seg[:, 0] - px) ** 2 + (seg[:, 1] - py) ** 2
        k = int(np.argmin(d2))
        # refine on the segments either side of the nearest vertex
        i = i0 + k
        best_s, best_d = float(self.s[i]), math.sqrt(float(d2[k]))
        for j in (i - 1, i):
            if 0 <= j < len(self.s) - 1:
                ax, ay = self.points[j]
                bx, by = self.points[j + 1]
                abx, aby = bx - ax, by - ay
                t = min(max(((px - ax) * abx + (py - ay) * aby) / max(abx * abx + aby * aby, 1e-12), 0.0), 1.0)
                d = math.hypot(px - (ax + t * abx), py - (ay + t * aby))
                if d < best_d:
                    best_s, best_d = float(self.s[j] + t * (self.s[j + 1] - self.s[j])), d
        return best_s, best_d

    def maneuver_at(self, s: float) -> Maneuver | None:
        """The maneuver whose span contains s, if any."""
        for m in self.maneuvers:
            if m.s0 <= s <= m.s1:
                return m
        return None

    def next_maneuver(self, s: float, commands: tuple[int, ...] | None = None) -> Maneuver | None:
        """The first maneuver ending after s (optionally of given commands)."""
        for m in self.maneuvers:
            if m.s1 >= s and (commands is None or m.command in commands):
                return m
        return None

    def sparse_points(self, spacing: float = 50.0) -> np.ndarray:
        """LMDrive-style sparse route: maneuver starts/ends plus a point every `spacing` m, as route s."""
        marks = {0.0, self.length}
        for m in self.maneuvers:
            marks.update((m.s0, m.s1))
        marks.update(np.arange(spacing, self.length, spacing).tolist())
        return np.array(sorted(marks))


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3 - 2 * t)


def plan_route(town: Town, start_xy: np.ndarray, goal_xy: np.ndarray, start_heading: float | None = None,
               route_id: str = "") -> Route:
    """A* from a start point (snapped to the nearest lane, matching the heading if given) to a goal point."""
    e0, s0, _ = town.nearest_lane(np.asarray(start_xy, float), start_heading)
    eg, sg, _ = town.nearest_lane(np.asarray(goal_xy, float))
    l0, lg = int(town.elem_link[e0]), int(town.elem_link[eg])
    k0 = int(town.elem_lane[e0])
    goal = np.asarray(goal_xy, float)
    if l0 == lg and sg > s0 + 10.0:
        links = [l0]
    elif l0 == lg:
        raise NoRouteError("goal lies behind the start on the same road; pick another goal")
    else:
        links = _astar(town, l0, s0, lg, goal)
    return build_route(town, links, k0, s0, sg, route_id)


def _astar(town: Town, l0: int, s0: float, lg: int, goal: np.ndarray) -> list[int]:
    def start_xy(lid: int) -> np.ndarray:
        return town.lane_point(lid, 0, 0.0)

    conn = 15.0
    g0 = town.links[l0].length - s0 + conn
    heap: list[tuple[float, float, int]] = []
    best: dict[int, float] = {}
    parent: dict[int, int] = {}
    for nxt, _ in town.links[l0].out:
        h = float(np.linalg.norm(start_xy(nxt) - goal))
        if g0 < best.get(nxt, math.inf):
            best[nxt] = g0
            parent[nxt] = l0
            heapq.heappush(heap, (g0 + h, g0, nxt))
    while heap:
        _, g, lid = heapq.heappop(heap)
        if g > best.get(lid, math.inf):
            continue
        if lid == lg:
            path = [lid]
            while path[-1] != l0:
                path.append(parent[path[-1]])
            return path[::-1]
        g2 = g + town.links[lid].length + conn
        for nxt, _ in town.links[lid].out:
            if nxt == l0:
                continue
            if g2 < best.get(nxt, math.inf):
                best[nxt] = g2
                parent[nxt] = lid
                heapq.heappush(heap, (g2 + float(np.linalg.norm(start_xy(nxt) - goal)), g2, nxt))
    raise NoRouteError(f"no route from link {l0} to link {lg} in {town.name}")


def build_route(town: Town, links: list[int], k0: int, s0: float, s_goal: float, route_id: str = "") -> Route:
    """Dense polyline for a link sequence, entering the first link on lane k0 at s0 and ending at s_goal."""
    pts: list[np.ndarray] = []
    elems: list[np.ndarray] = []
    maneuvers: list[Maneuver] = []
    stops: list[tuple[float, int]] = []
    s_acc = 0.0
    lane = k0
    for i, lid in enumerate(links):
        lk = town.links[lid]
        last = i == len(links) - 1
        s_a = s0 if i == 0 else 0.0
        s_b = s_goal if last else lk.length
        if last:
            exit_lane, conn = lane, -1
        else:
            nxt = links[i + 1]
            options = [(ki, ko) for ki in range(lk.n_lanes) for ko in range(town.links[nxt].n_lanes)
                       if (lk.lanes[ki], town.links[nxt].lanes[ko]) in town.connector_of]
            if not options:
                raise NoRouteError(f"links {lid} -> {nxt} are not connected")
            ki, ko = min(options, key=lambda o: (abs(o[0] - lane), abs(o[1] - o[0])))
            exit_lane, conn = ki, town.connector_of[(lk.lanes[ki], town.links[nxt].lanes[ko])]
        # lateral offset profile with lane changes done early on the link
        n_change = abs(exit_lane - lane)
        u = DIRS[lk.dir]
        rn = np.array([u[1], -u[0]])
        base = town.lane_point(lid, 0, 0.0) - rn * 0.5 * LANE_WIDTH_M     # road centre line at s=0
        ss = np.arange(s_a, s_b, 0.5 if exit_lane != lane else 1.0)
        if len(ss) == 0 or ss[-1] < s_b - 1e-6:
            ss = np.append(ss, s_b)
        off = np.full(len(ss), lane + 0.5)
        lane_of = np.full(len(ss), lane)
        if n_change:
            avail = (s_b - s_a) - 13.0
            tl = float(min(LANE_CHANGE_M, max(avail, 6.0) / n_change))
            step = -1 if exit_lane < lane else 1
            for c in range(n_change):
                c0 = s_a + 5.0 + c * tl
                frac = _smoothstep((ss - c0) / tl)
                off = off + step * frac
                lane_of = np.where(ss >= c0 + tl / 2, lane + step * (c + 1), lane_of)
                maneuvers.append(Maneuver(CMD_CHANGE_LEFT if step < 0 else CMD_CHANGE_RIGHT, s_acc + c0 - s_a,
                                          s_acc + c0 - s_a + tl))
        p = base[None, :] + np.outer(ss, u) + np.outer(off * LANE_WIDTH_M, rn)
        pts.append(p)
        elems.append(np.array([lk.lanes[int(k)] for k in lane_of]))
        s_lane_end = s_acc + (s_b - s_a)
        if not last and lid in town.link_stop:
            stops.append((s_lane_end + 0.5, town.link_stop[lid]))
        s_acc = s_lane_end
        if conn >= 0:
            cp = town.elem_points(conn)[1:]
            clen = float(town.elem_len[conn])
            cmd = _TURN_CMD[int(town.elem_turn[conn])]
            if cmd != CMD_FOLLOW:
                maneuvers.append(Maneuver(cmd, s_acc, s_acc + clen, int(town.elem_node[conn])))
            pts.append(cp)
            elems.append(np.full(len(cp), conn))
            s_acc += clen
            lane = int(town.elem_lane[town.elem_succ[conn][0]])
    points = np.concatenate(pts)
    elem = np.concatenate(elems)
    # drop duplicate consecutive points
    keep = np.concatenate([[True], np.linalg.norm(np.diff(points, axis=0), axis=1) > 1e-3])
    points, elem = points[keep], elem[keep]
    d = np.diff(points, axis=0)
    seg = np.linalg.norm(d, axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    hd = np.arctan2(d[:, 1], d[:, 0])
    heading = np.concatenate([hd, hd[-1:]])
    maneuvers.sort(key=lambda m: m.s0)
    route = Route(town.name, points, heading, s, elem, maneuvers, stops, list(links), route_id)
    # exact route arc length where the polyline crosses each stop line (lane changes lengthen the path)
    exact = []
    for s_guess, k in stops:
        sl = town.stop_lines[k]
        q = route.point_at(s_guess)
        ab = sl.p1 - sl.p0
        t = float(np.clip((q - sl.p0) @ ab / (ab @ ab), 0.0, 1.0))
        s_k, _ = route.project(sl.p0 + t * ab, s_guess, back=5.0, ahead=5.0)
        exact.append((s_k, k))
    route.stops = exact
    return route


def random_route(town: Town, rng: np.random.Generator, min_length: float = 150.0, max_length: float = 300.0,
                 route_id: str = "") -> Route:
    """A random drivable route of length in [min_length, max_length] (rejection sampling, seeded)."""
    lanes = [e for lk in town.links for e in lk.lanes]
    for _ in range(500):
        e0 = int(lanes[int(rng.integers(len(lanes)))])
        eg = int(lanes[int(rng.integers(len(lanes)))])
        l0 = town.links[int(town.elem_link[e0])]
        lg = town.links[int(town.elem_link[eg])]
        s0 = float(rng.uniform(2.0, max(l0.length * 0.4, 2.5)))
        sg = float(rng.uniform(lg.length * 0.3, lg.length * 0.8))
        start = town.lane_point(l0.id, int(town.elem_lane[e0]), s0)
        goal = town.lane_point(lg.id, int(town.elem_lane[eg]), sg)
        if np.linalg.norm(goal - start) > max_length:
            continue
        try:
            r = plan_route(town, start, goal, start_heading=math.atan2(DIRS[l0.dir][1], DIRS[l0.dir][0]),
                           route_id=route_id)
        except NoRouteError:
            continue
        short_change = any(m.s1 - m.s0 < MIN_SAMPLED_CHANGE_M for m in r.maneuvers
                           if m.command in (CMD_CHANGE_LEFT, CMD_CHANGE_RIGHT))
        if min_length <= r.length <= max_length and not short_change:
            return r
    raise NoRouteError(f"could not sample a {min_length}-{max_length} m route in {town.name}")


def seeded_routes(town: Town, seed: int, n: int, min_length: float = 150.0, max_length: float = 300.0) -> list[Route]:
    """n reproducible routes for a town (route ids '<town>/<seed>/<i>')."""
    rng = np.random.default_rng([seed, town.index, 77])
    return [random_route(town, rng, min_length, max_length, route_id=f"{town.name}/{seed}/{i}") for i in range(n)]
