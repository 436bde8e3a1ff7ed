"""Procedurally generated, seeded towns: the road network, its ground raster and its static scenery.

A town is an irregular Manhattan grid: node (i, j) is an intersection at (xs[i], ys[j]); horizontal roads
run along every row, vertical roads along every column. Every road has 2-3 lanes per direction
(right-hand traffic), sidewalks with crosswalks at every intersection, a stop line before each
crosswalk, and intersections controlled by traffic lights (split phasing: one approach green at a time,
so signalised movements never conflict) or all-way stop signs. The layout depends only on the town, not
on the world's seed (like a CARLA map); the world's seed decides traffic.

Lane graph vocabulary:
- *link*: one direction of one road between two adjacent nodes (A* runs over links).
- *element*: a drivable polyline: a lane of a link (straight) or a connector through an intersection.
  All element polylines are concatenated in global arrays so vehicles can be looked up vectorised.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from flad_sim import scene

log = logging.getLogger(__name__)

LANE_WIDTH_M = 3.5
SIDEWALK_WIDTH_M = 3.0
STOP_LINE_GAP_M = 1.0        # lane end sits this far beyond the crosswalk's outer edge
RESOLUTION_M = 0.25
#: unit heading per direction index: 0 east, 1 north, 2 west, 3 south
DIRS = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])

#: paints one surface class over the axis-aligned rectangle [xa, xb] x [ya, yb] (world metres) of a ground raster
_Rect = Callable[[float, float, float, float, int], None]

CONTROL_NONE = 0
CONTROL_LIGHT = 1
CONTROL_STOP = 2

ELEM_LANE = 0
ELEM_CONNECTOR = 1

TURN_STRAIGHT = 0
TURN_LEFT = 1
TURN_RIGHT = 2
TURN_BEND = 3               # the only way through a corner node (a road bend, not a junction choice)

TL_COLORS = {scene.TL_RED: (255, 30, 30), scene.TL_YELLOW: (255, 200, 0), scene.TL_GREEN: (30, 255, 60)}


@dataclass
class TownConfig:
    """What makes one town differ from another (layout, traffic, people, look)."""

    name: str
    index: int
    nx: int                                  # grid nodes along x
    ny: int                                  # grid nodes along y
    block_m: tuple[float, float]             # min/max distance between adjacent nodes
    lanes: tuple[int, ...] = (2,)            # lane counts per direction to draw per road from
    p_light: float = 0.5                     # fraction of junctions (degree >= 3) with lights, rest stop signs
    n_vehicles: int = 20                     # default NPC vehicles
    n_pedestrians: int = 20                  # default pedestrians
    speed_limit: float = 9.0                 # m/s
    building_h: tuple[float, float] = (6.0, 15.0)
    p_park: float = 0.15                     # fraction of blocks without buildings
    n_static_per_block: tuple[int, int] = (0, 3)
    green_s: float = 7.0
    yellow_s: float = 2.0
    all_red_s: float = 1.0
    layout_seed: int = 0
    weather: scene.Weather = field(default_factory=scene.Weather)

    def validate(self) -> None:
        if self.nx < 2 or self.ny < 2:
            raise ValueError("a town needs at least 2 x 2 nodes")
        if min(self.lanes) < 2:
            raise ValueError("towns have at least 2 lanes per direction")
        if self.block_m[0] < 40.0:
            raise ValueError("blocks shorter than 40 m leave no room for lanes between intersections")


TOWNS: dict[str, TownConfig] = {c.name: c for c in (
    TownConfig("Town01", 0, 4, 4, (70.0, 110.0), (2,), p_light=0.35, n_vehicles=18, n_pedestrians=20,
               speed_limit=9.0, building_h=(5.0, 10.0), p_park=0.2, layout_seed=101,
               weather=scene.Weather("clear_noon")),
    TownConfig("Town02", 1, 5, 5, (50.0, 80.0), (2, 3), p_light=0.9, n_vehicles=40, n_pedestrians=60,
               speed_limit=8.0, building_h=(18.0, 55.0), p_park=0.05, n_static_per_block=(1, 4), layout_seed=202,
               weather=scene.Weather("cloudy_noon", fog_density=0.002, brightness=0.85, noise_std=2.0,
                                     sky_rgb=(170, 180, 190))),
    TownConfig("Town03", 2, 5, 4, (60.0, 120.0), (2, 3), p_light=0.6, n_vehicles=30, n_pedestrians=30,
               speed_limit=10.0, building_h=(8.0, 25.0), layout_seed=303,
               weather=scene.Weather("wet_sunset", fog_density=0.006, brightness=0.7, noise_std=3.0,
                                     sky_rgb=(235, 150, 100), fog_rgb=(200, 160, 140))),
    TownConfig("Town04", 3, 4, 5, (80.0, 140.0), (3,), p_light=0.75, n_vehicles=35, n_pedestrians=10,
               speed_limit=11.0, building_h=(6.0, 20.0), p_park=0.3, layout_seed=404,
               weather=scene.Weather("clear_night", fog_density=0.004, brightness=0.35, noise_std=6.0,
                                     sky_rgb=(15, 20, 45), fog_rgb=(40, 40, 55))),
    TownConfig("Town05", 4, 6, 4, (45.0, 70.0), (2,), p_light=0.2, n_vehicles=15, n_pedestrians=40,
               speed_limit=8.0, building_h=(4.0, 9.0), p_park=0.25, n_static_per_block=(1, 3), layout_seed=505,
               weather=scene.Weather("foggy_morning", fog_density=0.025, brightness=0.8, noise_std=2.0,
                                     sky_rgb=(200, 200, 205), fog_rgb=(205, 205, 210))),
    TownConfig("Town06", 5, 6, 6, (55.0, 95.0), (2, 2, 3), p_light=0.5, n_vehicles=45, n_pedestrians=35,
               speed_limit=9.5, building_h=(8.0, 30.0), layout_seed=606,
               weather=scene.Weather("hard_rain_noon", fog_density=0.012, brightness=0.6, noise_std=10.0,
                                     sky_rgb=(110, 115, 125), fog_rgb=(140, 145, 150))),
)}
TOWN_NAMES: tuple[str, ...] = tuple(TOWNS)


def town_config(town: str | int) -> TownConfig:
    """Look a town up by name ('Town03') or index (2)."""
    if isinstance(town, (int, np.integer)):
        for cfg in TOWNS.values():
            if cfg.index == int(town):
                return cfg
        raise KeyError(f"no town with index {town}; towns: {list(TOWNS)}")
    if town not in TOWNS:
        raise KeyError(f"unknown town {town!r}; towns: {list(TOWNS)}")
    return TOWNS[town]


@dataclass
class Link:
    """One direction of one road between adjacent nodes."""

    id: int
    from_node: int
    to_node: int
    dir: int                  # DIRS index of travel
    n_lanes: int
    lanes: list[int]          # element ids, index 0 = innermost (next to the centre line)
    length: float             # lane length (stop line to stop line)
    out: list[tuple[int, int]] = field(default_factory=list)   # (next link id, TURN_*)


@dataclass
class StopLine:
    """Where an approach (link end) meets a controlled intersection."""

    link: int
    node: int
    control: int              # CONTROL_LIGHT / CONTROL_STOP
    signal: int               # index into signal states, -1 for stop signs
    p0: np.ndarray            # segment across the link's lanes, world xy
    p1: np.ndarray
    heading: np.ndarray       # unit travel direction


class Town:
    """A built town. Construct with `build_town(name_or_index)` (cached)."""

    def __init__(self, cfg: TownConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.name = cfg.name
        self.index = cfg.index
        self.weather = cfg.weather
        rng = np.random.default_rng(cfg.layout_seed)
        self.xs = np.concatenate([[0.0], np.cumsum(rng.uniform(*cfg.block_m, cfg.nx - 1))])
        self.ys = np.concatenate([[0.0], np.cumsum(rng.uniform(*cfg.block_m, cfg.ny - 1))])
        self.lanes_row = rng.choice(cfg.lanes, cfg.ny)      # lanes per direction of horizontal roads
        self.lanes_col = rng.choice(cfg.lanes, cfg.nx)      # ... of vertical roads
        self.hw_row = self.lanes_row * LANE_WIDTH_M          # road half widths
        self.hw_col = self.lanes_col * LANE_WIDTH_M
        self._build_nodes(rng)
        self._build_links()
        self._build_elements()
        self._build_signals(rng)
        self.ground = self._paint_ground()
        self._build_scenery(rng)
        self._build_sidewalk_graph()
        log.debug("built %s: %d nodes, %d links, %d elements, %d static boxes", self.name, len(self.node_xy),
                  len(self.links), self.n_elements, len(self.static_boxes))

    # ----------------------------------------------------------------------------------------- nodes
    def node_id(self, i: int, j: int) -> int:
        return j * self.cfg.nx + i

    def _build_nodes(self, rng: np.random.Generator) -> None:
        nx, ny = self.cfg.nx, self.cfg.ny
        ii, jj = np.meshgrid(np.arange(nx), np.arange(ny))
        self.node_ij = np.stack([ii.ravel(), jj.ravel()], 1)
        self.node_xy = np.stack([self.xs[self.node_ij[:, 0]], self.ys[self.node_ij[:, 1]]], 1)
        # box half extents: along x set by the vertical road's width, along y by the horizontal road's
        self.node_half = np.stack([self.hw_col[self.node_ij[:, 0]], self.hw_row[self.node_ij[:, 1]]], 1)
        i, j = self.node_ij[:, 0], self.node_ij[:, 1]
        self.node_deg = (i > 0).astype(int) + (i < nx - 1) + (j > 0) + (j < ny - 1)
        junction = self.node_deg >= 3
        self.node_control = np.where(junction, np.where(rng.random(len(i)) < self.cfg.p_light, CONTROL_LIGHT,
                                                        CONTROL_STOP), CONTROL_NONE)

    def neighbour(self, node: int, d: int) -> int:
        i, j = self.node_ij[node]
        i2, j2 = i + int(DIRS[d, 0]), j + int(DIRS[d, 1])
        if 0 <= i2 < self.cfg.nx and 0 <= j2 < self.cfg.ny:
            return self.node_id(i2, j2)
        return -1

    def half_along(self, node: int, d: int) -> float:
        """Half extent of a node's box along direction d."""
        return float(self.node_half[node, d % 2])

    def stop_dist(self, node: int, d: int) -> float:
        """Distance from a node centre to where lanes along direction d end/start."""
        return self.half_along(node, d) + SIDEWALK_WIDTH_M + STOP_LINE_GAP_M

    # ----------------------------------------------------------------------------------------- links
    def _build_links(self) -> None:
        self.links: list[Link] = []
        self.link_of: dict[tuple[int, int], int] = {}     # (from node, dir) -> link id
        for n in range(len(self.node_xy)):
            for d in range(4):
                m = self.neighbour(n, d)
                if m < 0:
                    continue
                lanes = int(self.lanes_row[self.node_ij[n, 1]] if d % 2 == 0 else self.lanes_col[self.node_ij[n, 0]])
                dist = float(np.abs(self.node_xy[m] - self.node_xy[n]).sum())
                length = dist - self.stop_dist(n, d) - self.stop_dist(m, (d + 2) % 4)
                self.link_of[(n, d)] = len(self.links)
                self.links.append(Link(len(self.links), n, m, d, lanes, [], length))
        for lk in self.links:
            m = lk.to_node
            options = [(d, self.link_of[(m, d)]) for d in range(4) if (m, d) in self.link_of and d != (lk.dir + 2) % 4]
            for d, nxt in options:
                if len(options) == 1:
                    turn = TURN_BEND
                elif d == lk.dir:
                    turn = TURN_STRAIGHT
                elif d == (lk.dir + 1) % 4:
                    turn = TURN_LEFT
                else:
                    turn = TURN_RIGHT
                lk.out.append((nxt, turn))

    def lane_point(self, link: int, lane: int, s: float | np.ndarray) -> np.ndarray:
        """World xy of arc length s along lane `lane` (0 = innermost) of `link` (straight lanes)."""
        lk = self.links[link]
        u = DIRS[lk.dir]
        rn = np.array([u[1], -u[0]])
        start = self.node_xy[lk.from_node] + u * self.stop_dist(lk.from_node, lk.dir) + rn * (lane + 0.5) * LANE_WIDTH_M
        return start + np.multiply.outer(np.asarray(s, float), u)

    # -------------------------------------------------------------------------------------- elements
    def _build_elements(self) -> None:
        polys: list[np.ndarray] = []
        kind, link_id, lane_idx, node_id, turn = [], [], [], [], []
        for lk in self.links:
            for k in range(lk.n_lanes):
                lk.lanes.append(len(polys))
                polys.append(np.stack([self.lane_point(lk.id, k, 0.0), self.lane_point(lk.id, k, lk.length)]))
                kind.append(ELEM_LANE)
                link_id.append(lk.id)
                lane_idx.append(k)
                node_id.append(lk.to_node)
                turn.append(-1)
        succ: list[list[int]] = [[] for _ in polys]
        # connectors: (from element) -> connector -> (to element)
        self.connector_of: dict[tuple[int, int], int] = {}
        conn_to: list[int] = []
        conn_from: list[int] = []
        for lk in self.links:
            for nxt, t, ki, ko in self._connector_plan(lk):
                lo = self.links[nxt]
                e_in, e_out = lk.lanes[ki], lo.lanes[ko]
                p0, p2 = polys[e_in][-1], polys[e_out][0]
                cid = len(polys)
                polys.append(_connector_poly(p0, DIRS[lk.dir], p2, DIRS[lo.dir]))
                kind.append(ELEM_CONNECTOR)
                link_id.append(-1)
                lane_idx.append(-1)
                node_id.append(lk.to_node)
                turn.append(t)
                succ.append([e_out])
                succ[e_in].append(cid)
                self.connector_of[(e_in, e_out)] = cid
                conn_from.append(e_in)
                conn_to.append(e_out)
        self.n_elements = len(polys)
        self.elem_kind = np.array(kind, np.int8)
        self.elem_link = np.array(link_id, np.int32)
        self.elem_lane = np.array(lane_idx, np.int32)
        self.elem_node = np.array(node_id, np.int32)        # node a lane ends at / a connector crosses
        self.elem_turn = np.array(turn, np.int8)
        self.elem_succ = succ
        self.elem_pred: list[list[int]] = [[] for _ in polys]
        for e, ss in enumerate(succ):
            for s2 in ss:
                self.elem_pred[s2].append(e)
        # global concatenated polylines with a 1 m gap in global arc length between elements
        counts = np.array([len(p) for p in polys])
        self.elem_i0 = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.elem_n = counts.astype(np.int64)
        pts = np.concatenate(polys)
        seg = np.zeros(len(pts))
        lengths = np.zeros(len(polys))
        local_s = []
        for e, p in enumerate(polys):
            ds = np.linalg.norm(np.diff(p, axis=0), axis=1)
            cs = np.concatenate([[0.0], np.cumsum(ds)])
            local_s.append(cs)
            lengths[e] = cs[-1]
        self.elem_len = lengths
        self.elem_gs0 = np.concatenate([[0.0], np.cumsum(lengths + 1.0)[:-1]])
        seg = np.concatenate([self.elem_gs0[e] + local_s[e] for e in range(len(polys))])
        self.path_xy = pts
        self.path_gs = seg
        d = np.diff(pts, axis=0)
        hd = np.arctan2(d[:, 1], d[:, 0])
        self.path_heading = np.concatenate([hd, hd[-1:]])
        # per-element speed cap from curvature (lateral acceleration <= 2.5 m/s^2)
        cap = np.full(len(polys), 99.0)
        for e in np.flatnonzero(self.elem_kind == ELEM_CONNECTOR):
            p = polys[e]
            h0 = math.atan2(*(p[1] - p[0])[::-1])
            h1 = math.atan2(*(p[-1] - p[-2])[::-1])
            dh = abs((h1 - h0 + math.pi) % (2 * math.pi) - math.pi)
            if dh > 0.1:
                radius = lengths[e] / dh
                cap[e] = math.sqrt(2.5 * radius)
        self.elem_speed_cap = cap

    def _connector_plan(self, lk: Link) -> list[tuple[int, int, int, int]]:
        """The connectors leaving link `lk` at its junction: (next link, turn, in lane, out lane) each."""
        plan: list[tuple[int, int, int, int]] = []
        for nxt, t in lk.out:
            lo = self.links[nxt]
            if t in (TURN_STRAIGHT, TURN_BEND):
                plan += [(nxt, t, k, min(k, lo.n_lanes - 1)) for k in range(lk.n_lanes)]
            elif t == TURN_LEFT:
                plan.append((nxt, t, 0, 0))
            else:
                plan.append((nxt, t, lk.n_lanes - 1, lo.n_lanes - 1))
        served = {p[2] for p in plan}
        turns = {t: nxt for nxt, t in lk.out}
        for k in range(lk.n_lanes):          # middle lanes at a T-junction without a straight option
            if k in served:
                continue
            if TURN_LEFT in turns and k < lk.n_lanes / 2:
                lo = self.links[turns[TURN_LEFT]]
                plan.append((lo.id, TURN_LEFT, k, min(k, lo.n_lanes - 1)))
            else:
                t = TURN_RIGHT if TURN_RIGHT in turns else TURN_LEFT
                lo = self.links[turns[t]]
                plan.append((lo.id, t, k, max(lo.n_lanes - lk.n_lanes + k, 0) if t == TURN_RIGHT
                             else min(k, lo.n_lanes - 1)))
        return plan

    def elem_points(self, e: int) -> np.ndarray:
        return self.path_xy[self.elem_i0[e]:self.elem_i0[e] + self.elem_n[e]]

    def locate(self, elem: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World xy [N,2] and heading [N] at arc length s along elements (vectorised)."""
        elem = np.asarray(elem)
        g = self.elem_gs0[elem] + np.minimum(np.maximum(s, 0.0), self.elem_len[elem])
        idx = np.searchsorted(self.path_gs, g, side="right") - 1
        i0 = self.elem_i0[elem]
        idx = np.minimum(np.maximum(idx, i0), i0 + self.elem_n[elem] - 2)
        g0 = self.path_gs[idx]
        t = ((g - g0) / np.maximum(self.path_gs[idx + 1] - g0, 1e-9))[..., None]
        xy = self.path_xy[idx] * (1.0 - t) + self.path_xy[idx + 1] * t
        return xy, self.path_heading[idx]

    # --------------------------------------------------------------------------------------- signals
    def _build_signals(self, rng: np.random.Generator) -> None:
        """One signal per (light node, approach); split phasing in approach order E, N, W, S."""
        self.stop_lines: list[StopLine] = []
        sig_node, sig_slot, sig_nslots = [], [], []
        self.node_offset = rng.uniform(0.0, 100.0, len(self.node_xy))
        self.link_stop: dict[int, int] = {}       # link id -> stop line index
        for n in np.flatnonzero(self.node_control != CONTROL_NONE):
            incoming = [self.link_of[(self.neighbour(n, (d + 2) % 4), d)] for d in range(4)
                        if self.neighbour(n, (d + 2) % 4) >= 0]
            for slot, lid in enumerate(incoming):
                lk = self.links[lid]
                sig = -1
                if self.node_control[n] == CONTROL_LIGHT:
                    sig = len(sig_node)
                    sig_node.append(n)
                    sig_slot.append(slot)
                    sig_nslots.append(len(incoming))
                u = DIRS[lk.dir]
                rn = np.array([u[1], -u[0]])
                end = self.node_xy[n] - u * (self.stop_dist(n, lk.dir) - STOP_LINE_GAP_M * 0.5)
                p0 = end + rn * 0.0
                p1 = end + rn * lk.n_lanes * LANE_WIDTH_M
                self.link_stop[lid] = len(self.stop_lines)
                self.stop_lines.append(StopLine(lid, int(n), int(self.node_control[n]), sig, p0, p1, u.copy()))
        self.sig_node = np.array(sig_node, np.int64)
        self.sig_slot = np.array(sig_slot, np.float64)
        self.sig_nslots = np.array(sig_nslots, np.float64)
        self.n_signals = len(sig_node)
        # element -> signal id / stop flag (lanes ending at a controlled node)
        self.elem_signal = np.full(self.n_elements, -1, np.int64)
        self.elem_stop_sign = np.zeros(self.n_elements, bool)
        for sl in self.stop_lines:
            for e in self.links[sl.link].lanes:
                if sl.control == CONTROL_LIGHT:
                    self.elem_signal[e] = sl.signal
                else:
                    self.elem_stop_sign[e] = True
        self.stop_p0 = np.array([s.p0 for s in self.stop_lines]).reshape(-1, 2)
        self.stop_p1 = np.array([s.p1 for s in self.stop_lines]).reshape(-1, 2)
        self.stop_heading = np.array([s.heading for s in self.stop_lines]).reshape(-1, 2)
        self.stop_control = np.array([s.control for s in self.stop_lines], np.int64)
        self.stop_signal = np.array([s.signal for s in self.stop_lines], np.int64)

    def signal_states(self, time_s: float) -> np.ndarray:
        """scene.TL_* per signal at a time (vectorised, pure function of time)."""
        c = self.cfg
        slot_len = c.green_s + c.yellow_s + c.all_red_s
        cycle = self.sig_nslots * slot_len
        local = np.mod(time_s + self.node_offset[self.sig_node] - self.sig_slot * slot_len, cycle)
        return np.where(local < c.green_s, scene.TL_GREEN,
                        np.where(local < c.green_s + c.yellow_s, scene.TL_YELLOW, scene.TL_RED)).astype(np.int64)

    # ---------------------------------------------------------------------------------------- ground
    @property
    def bounds(self) -> tuple[float, float, float, float]:
        m = 30.0 + max(self.hw_col.max(), self.hw_row.max())
        return (self.xs[0] - m, self.ys[0] - m, self.xs[-1] + m, self.ys[-1] + m)

    def _paint_ground(self) -> scene.GroundMap:
        x0, y0, x1, y1 = self.bounds
        r = RESOLUTION_M
        w, h = int(math.ceil((x1 - x0) / r)), int(math.ceil((y1 - y0) / r))
        g = np.full((h, w), scene.SURFACE_OFFROAD, np.uint8)

        def rect(xa: float, xb: float, ya: float, yb: float, c: int) -> None:
            ca, cb = int(round((min(xa, xb) - x0) / r)), int(round((max(xa, xb) - x0) / r))
            ra, rb = int(round((min(ya, yb) - y0) / r)), int(round((max(ya, yb) - y0) / r))
            g[max(ra, 0):max(rb, 0), max(ca, 0):max(cb, 0)] = c

        self._paint_roads(rect)
        self._paint_markings(g)
        self._paint_stop_lines(rect)
        self._paint_crosswalks(rect)
        return scene.GroundMap(g, (float(x0), float(y0)), r)

    def _paint_roads(self, rect: _Rect) -> None:
        """Every road's sidewalk band, then its asphalt."""
        sw = SIDEWALK_WIDTH_M
        xa, xb, ya, yb = self.xs[0], self.xs[-1], self.ys[0], self.ys[-1]
        for j, y in enumerate(self.ys):      # horizontal roads: sidewalk band then asphalt
            hw = self.hw_row[j]
            rect(xa - self.hw_col[0] - sw, xb + self.hw_col[-1] + sw, y - hw - sw, y + hw + sw, scene.SURFACE_SIDEWALK)
        for i, x in enumerate(self.xs):
            hw = self.hw_col[i]
            rect(x - hw - sw, x + hw + sw, ya - self.hw_row[0] - sw, yb + self.hw_row[-1] + sw, scene.SURFACE_SIDEWALK)
        for j, y in enumerate(self.ys):
            rect(xa - self.hw_col[0], xb + self.hw_col[-1], y - self.hw_row[j], y + self.hw_row[j], scene.SURFACE_ROAD)
        for i, x in enumerate(self.xs):
            rect(x - self.hw_col[i], x + self.hw_col[i], ya - self.hw_row[0], yb + self.hw_row[-1], scene.SURFACE_ROAD)

    def _paint_markings(self, g: np.ndarray) -> None:
        """Centre and lane lines along each link (only between its lane ends)."""
        for lk in self.links:
            if lk.dir >= 2:
                continue    # paint each road once, from its east/north-bound link
            u = DIRS[lk.dir]
            rn = np.array([u[1], -u[0]])
            a = self.node_xy[lk.from_node] + u * self.stop_dist(lk.from_node, lk.dir)
            length = lk.length
            # centre line (yellow), 0.5 m wide
            self._paint_strip(g, a, u, rn, 0.0, 0.0, length, 0.5, scene.SURFACE_CENTER_LINE, dash=None)
            for k in range(1, lk.n_lanes):
                for side in (1.0, -1.0):
                    self._paint_strip(g, a, u, rn, side * k * LANE_WIDTH_M, 0.0, length, 0.25,
                                      scene.SURFACE_LANE_MARKING, dash=(3.0, 6.0))

    def _paint_stop_lines(self, rect: _Rect) -> None:
        for sl in self.stop_lines:
            mid = (sl.p0 + sl.p1) / 2
            lo, hi = np.minimum(sl.p0, sl.p1), np.maximum(sl.p0, sl.p1)
            if sl.heading[0] != 0:
                rect(mid[0] - 0.25, mid[0] + 0.25, lo[1], hi[1], scene.SURFACE_STOP_LINE)
            else:
                rect(lo[0], hi[0], mid[1] - 0.25, mid[1] + 0.25, scene.SURFACE_STOP_LINE)

    def _paint_crosswalks(self, rect: _Rect) -> None:
        """Zebra stripes across every road that leaves a junction, on the sidewalk band's line."""
        sw = SIDEWALK_WIDTH_M
        for n in range(len(self.node_xy)):
            cx, cy = self.node_xy[n]
            hx, hy = self.node_half[n]
            for d in range(4):
                if self.neighbour(n, d) < 0:
                    continue
                if d % 2 == 0:       # crossing the east/west road: band in x, stripes along x, alternating in y
                    xs0 = cx + (hx if d == 0 else -hx - sw)
                    for yy in np.arange(cy - hy + 0.25, cy + hy - 0.25, 1.0):
                        rect(xs0 + 0.2, xs0 + sw - 0.2, yy, yy + 0.5, scene.SURFACE_CROSSWALK)
                else:
                    ys0 = cy + (hy if d == 1 else -hy - sw)
                    for xx in np.arange(cx - hx + 0.25, cx + hx - 0.25, 1.0):
                        rect(xx, xx + 0.5, ys0 + 0.2, ys0 + sw - 0.2, scene.SURFACE_CROSSWALK)

    def _paint_strip(self, g: np.ndarray, a: np.ndarray, u: np.ndarray, rn: np.ndarray, offset: float,
                     s0: float, s1: float, width: float, cls: int, dash: tuple[float, float] | None) -> None:
        x0, y0, _, _ = self.bounds
        r = RESOLUTION_M
        segs = [(s0, s1)] if dash is None else [(s, min(s + dash[0], s1)) for s in np.arange(s0, s1, dash[1])]
        for sa, sb in segs:
            p = a + u * sa + rn * offset
            q = a + u * sb + rn * offset
            lo = np.minimum(p, q) - np.abs(rn) * width / 2
            hi = np.maximum(p, q) + np.abs(rn) * width / 2
            ca, cb = int(round((lo[0] - x0) / r)), max(int(round((hi[0] - x0) / r)), int(round((lo[0] - x0) / r)) + 1)
            ra, rb = int(round((lo[1] - y0) / r)), max(int(round((hi[1] - y0) / r)), int(round((lo[1] - y0) / r)) + 1)
            g[ra:rb, ca:cb] = cls

    # --------------------------------------------------------------------------------------- scenery
    def _build_scenery(self, rng: np.random.Generator) -> None:
        """Buildings and parked cars/barriers in the blocks; poles, light heads and stop signs at junctions."""
        cfg = self.cfg
        sw = SIDEWALK_WIDTH_M
        c, s, yaw, kind, col = [], [], [], [], []

        def add(x: float, y: float, z: float, length: float, width: float, height: float, yw: float, k: int,
                rgb: tuple[int, int, int]) -> None:
            c.append((x, y, z))
            s.append((length, width, height))
            yaw.append(yw)
            kind.append(k)
            col.append(rgb)

        palette = [(170, 160, 150), (140, 110, 90), (200, 190, 170), (120, 125, 135), (180, 150, 120),
                   (100, 100, 110), (210, 205, 200), (150, 90, 80)]
        car_palette = [(200, 30, 30), (30, 60, 160), (220, 220, 220), (30, 30, 30), (120, 120, 130), (20, 120, 60)]
        self.lots: list[tuple[float, float, float, float]] = []
        for i in range(cfg.nx - 1):
            for j in range(cfg.ny - 1):
                lx0 = self.xs[i] + self.hw_col[i] + sw
                lx1 = self.xs[i + 1] - self.hw_col[i + 1] - sw
                ly0 = self.ys[j] + self.hw_row[j] + sw
                ly1 = self.ys[j + 1] - self.hw_row[j + 1] - sw
                self.lots.append((lx0, ly0, lx1, ly1))
                # a 3 m verge inside the lot holds parked cars and barriers, then buildings
                bx0, bx1, by0, by1 = lx0 + 3.0, lx1 - 3.0, ly0 + 3.0, ly1 - 3.0
                if rng.random() >= cfg.p_park:
                    for rx0, ry0, rx1, ry1 in _split_rect(rng, bx0, by0, bx1, by1, 12.0, 40.0):
                        if rx1 - rx0 < 5.0 or ry1 - ry0 < 5.0:
                            continue
                        add((rx0 + rx1) / 2, (ry0 + ry1) / 2, 0.0, rx1 - rx0, ry1 - ry0,
                            float(rng.uniform(*cfg.building_h)), 0.0, scene.BOX_BUILDING,
                            palette[int(rng.integers(len(palette)))])
                for _ in range(int(rng.integers(cfg.n_static_per_block[0], cfg.n_static_per_block[1] + 1))):
                    side = int(rng.integers(4))
                    if side in (0, 2):      # along a horizontal edge of the lot
                        x = float(rng.uniform(lx0 + 4, lx1 - 4))
                        y = ly0 + 1.5 if side == 0 else ly1 - 1.5
                        yw = 0.0
                    else:
                        y = float(rng.uniform(ly0 + 4, ly1 - 4))
                        x = lx0 + 1.5 if side == 1 else lx1 - 1.5
                        yw = math.pi / 2
                    if rng.random() < 0.6:
                        add(x, y, 0.0, 4.4, 1.9, 1.5, yw, scene.BOX_STATIC, car_palette[int(rng.integers(6))])
                    else:
                        add(x, y, 0.0, 2.5, 0.4, 1.0, yw, scene.BOX_STATIC, (240, 120, 20))
        # junction furniture
        self.light_head_signal: list[int] = []
        light_rows: list[int] = []
        for sl in self.stop_lines:
            u = sl.heading
            rn = np.array([u[1], -u[0]])
            n = sl.node
            ha = self.half_along(n, int(np.argmax(DIRS @ u)))
            hc = self.half_along(n, int(np.argmax(DIRS @ u)) + 1)
            node = self.node_xy[n]
            hd = math.atan2(u[1], u[0])
            if sl.control == CONTROL_LIGHT:
                pole = node + u * (ha + sw * 0.85) + rn * (hc + sw * 0.85)
                add(pole[0], pole[1], 0.0, 0.3, 0.3, 6.0, 0.0, scene.BOX_POLE, (80, 80, 80))
                head = node + u * (ha + sw * 0.85) + rn * (hc * 0.5)
                arm = (pole + head) / 2
                add(arm[0], arm[1], 5.8, 0.2, float(np.linalg.norm(pole - head)), 0.2, hd, scene.BOX_POLE, (80, 80, 80))
                light_rows.append(len(c))
                self.light_head_signal.append(sl.signal)
                add(head[0], head[1], 4.6, 0.5, 0.5, 1.2, hd + math.pi, scene.BOX_TRAFFIC_LIGHT,
                    TL_COLORS[scene.TL_RED])
            else:
                pole = node - u * (ha + sw + STOP_LINE_GAP_M + 0.5) + rn * (hc + sw * 0.7)
                add(pole[0], pole[1], 0.0, 0.12, 0.12, 2.0, 0.0, scene.BOX_POLE, (150, 150, 150))
                add(pole[0], pole[1], 1.9, 0.08, 0.8, 0.8, hd + math.pi, scene.BOX_STOP_SIGN, (200, 20, 20))
        boxes = scene.Boxes(np.array(c, np.float32).reshape(-1, 3), np.array(s, np.float32).reshape(-1, 3),
                            np.array(yaw, np.float32), np.array(kind, np.uint8),
                            np.array(col, np.uint8).reshape(-1, 3), np.full(len(c), -1, np.int32))
        self.static_boxes = boxes
        self.light_rows = np.array(light_rows, np.int64)
        self.light_head_signal_arr = np.array(self.light_head_signal, np.int64)
        # obstacles the ego can collide with (everything except light heads/arms up in the air)
        solid = np.ones(len(boxes), bool)
        solid[boxes.center[:, 2] > 2.5] = False
        self.solid_idx = np.flatnonzero(solid)

    def boxes_at(self, time_s: float) -> scene.Boxes:
        """Static boxes with light heads coloured by their state at `time_s`."""
        b = self.static_boxes
        if len(self.light_rows) == 0:
            return b
        states = self.signal_states(time_s)[self.light_head_signal_arr]
        color = b.color.copy()
        lut = np.array([(0, 0, 0), TL_COLORS[1], TL_COLORS[2], TL_COLORS[3]], np.uint8)
        color[self.light_rows] = lut[states]
        return scene.Boxes(b.center, b.size, b.yaw, b.kind, color, b.actor_id)

    # ------------------------------------------------------------------------------------ pedestrians
    def _build_sidewalk_graph(self) -> None:
        """Corners of each block's sidewalk loop; pedestrians walk loops and cross at crosswalks."""
        sw = SIDEWALK_WIDTH_M
        corners = []
        for j in range(self.cfg.ny - 1):
            for i in range(self.cfg.nx - 1):
                x0 = self.xs[i] + self.hw_col[i] + sw / 2
                x1 = self.xs[i + 1] - self.hw_col[i + 1] - sw / 2
                y0 = self.ys[j] + self.hw_row[j] + sw / 2
                y1 = self.ys[j + 1] - self.hw_row[j + 1] - sw / 2
                corners.append([(x0, y0), (x1, y0), (x1, y1), (x0, y1)])   # counter-clockwise
        self.block_corners = np.array(corners, np.float64)          # [n_blocks, 4, 2]
        self.block_ij = np.array([(i, j) for j in range(self.cfg.ny - 1) for i in range(self.cfg.nx - 1)])

    # ------------------------------------------------------------------------------------------ misc
    def nearest_lane(self, xy: np.ndarray, heading: float | None = None) -> tuple[int, float, float]:
        """(lane element, arc length s, lateral distance) of the lane nearest to a point (and heading)."""
        best = (-1, 0.0, 1e9)
        for lk in self.links:
            u = DIRS[lk.dir]
            if heading is not None and math.cos(heading - math.atan2(u[1], u[0])) < 0.5:
                continue
            for k, e in enumerate(lk.lanes):
                a = self.lane_point(lk.id, k, 0.0)
                rel = np.asarray(xy, float) - a
                s = float(np.clip(rel @ u, 0.0, lk.length))
                d = float(np.linalg.norm(rel - u * s))
                if d < best[2]:
                    best = (e, s, d)
        return best

    def is_junction_area(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """True where a point lies inside an intersection box (between the stop lines)."""
        x, y = np.asarray(x, float), np.asarray(y, float)
        i = np.clip(np.searchsorted(self.xs, x), 1, len(self.xs) - 1)
        i = np.where(np.abs(x - self.xs[i - 1]) < np.abs(x - self.xs[i]), i - 1, i)
        j = np.clip(np.searchsorted(self.ys, y), 1, len(self.ys) - 1)
        j = np.where(np.abs(y - self.ys[j - 1]) < np.abs(y - self.ys[j]), j - 1, j)
        ext = SIDEWALK_WIDTH_M + STOP_LINE_GAP_M
        return (np.abs(x - self.xs[i]) <= self.hw_col[i] + ext) & (np.abs(y - self.ys[j]) <= self.hw_row[j] + ext)


def _connector_poly(p0: np.ndarray, d0: np.ndarray, p2: np.ndarray, d2: np.ndarray, step: float = 0.5) -> np.ndarray:
    """Quadratic Bezier from p0 (heading d0) to p2 (heading d2); a straight line when they are parallel."""
    cross = d0[0] * d2[1] - d0[1] * d2[0]
    if abs(cross) < 1e-6:
        n = max(int(np.linalg.norm(p2 - p0) / step), 1) + 1
        t = np.linspace(0.0, 1.0, n)[:, None]
        return p0 * (1 - t) + p2 * t
    # intersection of p0 + a*d0 and p2 - b*d2
    a = ((p2 - p0)[0] * d2[1] - (p2 - p0)[1] * d2[0]) / cross
    ctrl = p0 + a * d0
    approx = np.linalg.norm(ctrl - p0) + np.linalg.norm(p2 - ctrl)
    n = max(int(approx / step), 2) + 1
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * ctrl + t ** 2 * p2


def _split_rect(rng: np.random.Generator, x0: float, y0: float, x1: float, y1: float, lo: float,
                hi: float) -> list[tuple[float, float, float, float]]:
    """Recursively split a lot into building footprints of side lo..hi with 2-4 m gaps."""
    w, h = x1 - x0, y1 - y0
    if w <= 0 or h <= 0:
        return []
    if w <= hi and h <= hi:
        return [(x0, y0, x1, y1)]
    gap = float(rng.uniform(2.0, 4.0))
    if w >= h:
        cut = float(rng.uniform(x0 + lo, max(x1 - lo, x0 + lo)))
        return _split_rect(rng, x0, y0, cut - gap / 2, y1, lo, hi) + _split_rect(rng, cut + gap / 2, y0, x1, y1, lo, hi)
    cut = float(rng.uniform(y0 + lo, max(y1 - lo, y0 + lo)))
    return _split_rect(rng, x0, y0, x1, cut - gap / 2, lo, hi) + _split_rect(rng, x0, cut + gap / 2, x1, y1, lo, hi)


@functools.lru_cache(maxsize=8)
def _build_cached(name: str) -> Town:
    return Town(TOWNS[name])


def build_town(town: str | int) -> Town:
    """The (cached, immutable by convention) Town for a name or index."""
    return _build_cached(town_config(town).name)
