"""A cheap, physics-only moving fleet: 50 to 1,000+ vehicles driving all the time, each in its own town.

Why: a federated-learning experiment needs a large fleet whose vehicles keep driving (the vehicle's town decides
its training data, so the data is non-IID by town) and whose positions serve the edge servers as *mobility
traces*. The full `World` (sensors, pedestrians, egos, 20 Hz) costs far too much for that, so this module keeps
only what moves a vehicle: lane-bound motion along a town's lane graph (random turns at junctions), IDM car
following, traffic lights and all-way stop signs, the same driving rules as `flad_sim.actors.NpcVehicles`.

How it stays cheap:

- every town's lane graph is merged into one set of arrays, so one vectorised step moves all vehicles of all
  towns at once (no per-town or per-vehicle Python loop; element transitions are vectorised too);
- the leader of a vehicle is found along its lane path (sort by lane element and arc length), O(n log n)
  instead of all-pairs distances;
- route choices come from a counter-based hash per vehicle (splitmix64 of a per-vehicle key and a draw count),
  so the random state is two small integer arrays, trivially saved and restored;
- the default step is 0.5 s: stable because the IDM update is capped so a vehicle never moves past its leader
  (keeping 1 m) nor past a stop line it must stop at; coarser steps are split into sub-steps of at most 0.5 s.

The towns are tiled side by side on one global map (`tile_towns`), so positions of vehicles in different towns
share one coordinate frame and edge servers can cover regions of it. Positions are recorded every
`trace_every_s` into float32 ring buffers that keep the last `keep_trace_s` (bounded memory).

Density: a town holds at most one vehicle per `lane_m_per_vehicle` (default `LANE_M_PER_VEHICLE`) metres of
lane per *traffic layer*. More vehicles than that go into extra layers: copies of the same town that share its
map and signals but whose vehicles do not see each other. This keeps a big fleet in a small town moving
(mobility traces) instead of gridlocking it; vehicles of different layers may overlap on the map, which a
physics-only fleet accepts. Should a layer still gridlock, a vehicle that has stood `PATIENCE_S` for anything
but a light drives on through the vehicles and stop sign holding it (counted in `FleetMotion.ghosts`).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from flad_sim import scene
from flad_sim.actors import IDM_B, idm_acceleration
from flad_sim.towns import ELEM_CONNECTOR, ELEM_LANE, TOWN_NAMES, TOWNS, Town, build_town

log = logging.getLogger(__name__)

#: longest physics sub-step; a larger dt is split into equal sub-steps no longer than this
MAX_SUBSTEP_S = 0.5
#: one vehicle per this many metres of lane per traffic layer (more vehicles open another layer of the town)
LANE_M_PER_VEHICLE = 100.0
#: spawn slots along each lane: first at 3 m, then every SLOT_M (plus up to SLOT_JITTER_M of jitter)
SLOT_M = 10.0
SLOT_JITTER_M = 3.0
#: bumper-to-bumper distance a vehicle never closes below within one step
MIN_GAP_M = 1.0
#: a vehicle standing this long for anything but a traffic light (gridlock at a full junction) stops seeing other
#: vehicles and stop signs until it reaches its next lane, so the fleet never stays gridlocked
PATIENCE_S = 60.0
STATE_VERSION = 1

_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_MIX1 = _U64(0xBF58476D1CE4E5B9)
_MIX2 = _U64(0x94D049BB133111EB)


@dataclass(frozen=True)
class TownTile:
    """A town's bounding box (its `Town.bounds`, moved) on the global map, metres."""

    name: str
    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    def contains(self, x: float, y: float) -> bool:
        return self.x0 <= x <= self.x1 and self.y0 <= y <= self.y1


def _check_town(name: object, what: str = "town") -> str:
    if not isinstance(name, str) or name not in TOWNS:
        raise ValueError(f"unknown {what} {name!r}; towns: {list(TOWN_NAMES)}")
    return name


def tile_towns(towns: list[str], gap_m: float = 0.0) -> list[TownTile]:
    """Place each town's map side by side on one global map (a near-square grid of tiles, deterministic),
    so positions of vehicles in different towns share one coordinate frame (edges cover regions of it).

    Town k sits in row k // cols, column k % cols (cols = ceil(sqrt(n))); a column is as wide as its widest
    town, a row as tall as its tallest, and `gap_m` separates neighbouring columns and rows. Each tile is the
    town's own bounding box, so tiles never overlap (they touch when gap_m is 0).
    """
    if not isinstance(gap_m, (int, float)) or not math.isfinite(gap_m) or gap_m < 0:
        raise ValueError(f"gap_m must be a finite number >= 0, got {gap_m!r}")
    names = [_check_town(t) for t in towns]
    dup = sorted({t for t in names if names.count(t) > 1})
    if dup:
        raise ValueError(f"towns listed twice: {dup}")
    n = len(names)
    if n == 0:
        return []
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    size = []
    for name in names:
        bx0, by0, bx1, by1 = build_town(name).bounds
        size.append((float(bx1 - bx0), float(by1 - by0)))
    col_w = [max(size[k][0] for k in range(c, n, cols)) for c in range(cols)]
    row_h = [max(size[k][1] for k in range(r * cols, min(n, (r + 1) * cols))) for r in range(rows)]
    col_x = [sum(col_w[:c]) + c * gap_m for c in range(cols)]
    row_y = [sum(row_h[:r]) + r * gap_m for r in range(rows)]
    tiles = []
    for k, name in enumerate(names):
        x0, y0 = col_x[k % cols], row_y[k // cols]
        tiles.append(TownTile(name, x0, y0, x0 + size[k][0], y0 + size[k][1]))
    return tiles


class _Graph:
    """The lane graphs of several towns merged into one set of arrays, in global map coordinates.

    Element, node and signal ids are global (town offsets added); `locate` works like `Town.locate`.
    """

    def __init__(self, towns: list[Town], tiles: list[TownTile]) -> None:
        kind, length, signal, sign, node, from_node, cap, turn, town_of = ([] for _ in range(9))
        i0, npts, gs0, xy, gs, heading = ([] for _ in range(6))
        succ: list[list[int]] = []
        e_off = p_off = n_off = s_off = 0
        gs_off = 0.0
        self.town_elem0: list[int] = []
        self.town_node0: list[int] = []
        for ti, (town, tile) in enumerate(zip(towns, tiles, strict=True)):
            shift = np.array([tile.x0 - town.bounds[0], tile.y0 - town.bounds[1]])
            self.town_elem0.append(e_off)
            self.town_node0.append(n_off)
            kind.append(town.elem_kind)
            length.append(town.elem_len)
            signal.append(np.where(town.elem_signal >= 0, town.elem_signal + s_off, -1))
            sign.append(town.elem_stop_sign)
            node.append(town.elem_node.astype(np.int64) + n_off)
            lane_from = np.array([town.links[lk].from_node if lk >= 0 else -1 for lk in town.elem_link], np.int64)
            from_node.append(np.where(town.elem_kind == ELEM_LANE, lane_from, town.elem_node) + n_off)
            cap.append(town.elem_speed_cap)
            turn.append(town.elem_turn)
            town_of.append(np.full(town.n_elements, ti, np.int64))
            i0.append(town.elem_i0 + p_off)
            npts.append(town.elem_n)
            gs0.append(town.elem_gs0 + gs_off)
            xy.append(town.path_xy + shift)
            gs.append(town.path_gs + gs_off)
            heading.append(town.path_heading)
            for ss in town.elem_succ:
                if not ss:
                    raise ValueError(f"{town.name}: lane element without a successor")
                succ.append([int(x) + e_off for x in ss])
            e_off += town.n_elements
            p_off += len(town.path_xy)
            n_off += len(town.node_xy)
            s_off += town.n_signals
            gs_off = float(town.path_gs[-1]) + gs_off + 1.0
        self.n_elements = e_off
        self.n_nodes = n_off
        self.n_signals = s_off
        self.elem_kind = np.concatenate(kind)
        self.elem_len = np.concatenate(length)
        self.elem_signal = np.concatenate(signal)
        self.elem_stop_sign = np.concatenate(sign)
        self.elem_node = np.concatenate(node)
        self.elem_from_node = np.concatenate(from_node)
        self.elem_speed_cap = np.concatenate(cap)
        self.elem_turn = np.concatenate(turn)
        self.elem_town = np.concatenate(town_of)
        self.elem_i0 = np.concatenate(i0)
        self.elem_n = np.concatenate(npts)
        self.elem_gs0 = np.concatenate(gs0)
        self.path_xy = np.concatenate(xy)
        self.path_gs = np.concatenate(gs)
        self.path_heading = np.concatenate(heading)
        width = max(len(ss) for ss in succ)
        self.succ_n = np.array([len(ss) for ss in succ], np.int64)
        self.succ = np.array([ss + [ss[0]] * (width - len(ss)) for ss in succ], np.int64)

    def locate(self, elem: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global xy [N,2] and heading [N] at arc length s along elements (same as `Town.locate`)."""
        g = self.elem_gs0[elem] + np.minimum(np.maximum(s, 0.0), self.elem_len[elem])
        i0 = self.elem_i0[elem]
        n_pts = self.elem_n[elem]
        idx = i0.copy()
        curved = np.flatnonzero(n_pts > 2)          # straight lanes have 2 points: no search needed
        found = np.searchsorted(self.path_gs, g[curved], side="right") - 1
        idx[curved] = np.minimum(np.maximum(found, i0[curved]), i0[curved] + n_pts[curved] - 2)
        g0 = self.path_gs[idx]
        t = ((g - g0) / np.maximum(self.path_gs[idx + 1] - g0, 1e-9))[..., None]
        xy = self.path_xy[idx] * (1.0 - t) + self.path_xy[idx + 1] * t
        return xy, self.path_heading[idx]

    def arrays(self) -> list[np.ndarray]:
        return [v for v in vars(self).values() if isinstance(v, np.ndarray)]


def _key64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _splitmix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> _U64(30))) * _MIX1
    z = (z ^ (z >> _U64(27))) * _MIX2
    return z ^ (z >> _U64(31))


def _number(name: str, value: object, *, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or (v <= 0 if positive else v < 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return v


def _finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


_STATE_ARRAYS = ("elem", "s", "v", "chain", "draws", "stopped", "cleared", "stop_time", "wait", "ghost")


class FleetMotion:
    """Fleet vehicles (plus optional background traffic) driving lane-bound in their towns, physics only.

    `vehicle_towns` maps each fleet vehicle id to its town name. Every town with a fleet vehicle is simulated
    (with `background_per_town` extra vehicles); positions are on the global map of `tiles`.
    """

    def __init__(self, vehicle_towns: dict[str, str], seed: int = 0, dt: float = 0.5, background_per_town: int = 0,
                 trace_every_s: float = 1.0, keep_trace_s: float = 3600.0, *,
                 lane_m_per_vehicle: float = LANE_M_PER_VEHICLE) -> None:
        self._config = self._validate(vehicle_towns, seed, dt, background_per_town, trace_every_s, keep_trace_s,
                                      lane_m_per_vehicle)
        self.lane_m_per_vehicle = float(lane_m_per_vehicle)
        self.seed = int(seed)
        self.dt = float(dt)
        self.background_per_town = int(background_per_town)
        self.trace_every_s = float(trace_every_s)
        self.keep_trace_s = float(keep_trace_s)
        self._n_sub = max(1, math.ceil(self.dt / MAX_SUBSTEP_S - 1e-9))
        self._h = self.dt / self._n_sub
        self.ids: list[str] = sorted(vehicle_towns)
        self._index = {vid: k for k, vid in enumerate(self.ids)}
        self._vehicle_town = {vid: vehicle_towns[vid] for vid in self.ids}
        used = set(self._vehicle_town.values())
        self.town_names: list[str] = [t for t in TOWN_NAMES if t in used]
        self._towns = [build_town(t) for t in self.town_names]
        self.tiles: list[TownTile] = tile_towns(self.town_names)
        self._g = _Graph(self._towns, self.tiles)
        self._spawn()
        # clock, stats, traces
        self._step_i = 0
        self.time_s = 0.0
        self.red_exits = 0          # lane exits into a junction on red (0 by construction; kept as a check)
        self.transitions = 0        # element changes, all vehicles
        self.ghosts = 0             # times the deadlock breaker let a vehicle through (see PATIENCE_S)
        self._trace_cap = int(math.floor(self.keep_trace_s / self.trace_every_s + 1e-9)) + 1
        self._tr_t = np.zeros(0)
        self._tr_xy = np.zeros((0, self.n_fleet, 2), np.float32)
        self._tr_start = 0
        self._tr_len = 0
        self._next_trace_k = 0
        self._xy_step = -1
        xy = self._fleet_xy()
        self._record_traces(0.0, xy, xy)
        log.info("fleet of %d vehicles (+%d background) in %s, layers %s, dt %.3g s (%d sub-steps)", self.n_fleet,
                 self._n - self.n_fleet, self.town_names, self.town_layers, self.dt, self._n_sub)

    # ------------------------------------------------------------------------------------------- setup
    @staticmethod
    def _validate(vehicle_towns: dict[str, str], seed: int, dt: float, background_per_town: int,
                  trace_every_s: float, keep_trace_s: float, lane_m_per_vehicle: float) -> dict[str, Any]:
        if not isinstance(vehicle_towns, dict) or not vehicle_towns:
            raise ValueError("vehicle_towns must be a non-empty dict of vehicle id -> town name")
        for vid, town in vehicle_towns.items():
            if not isinstance(vid, str) or not vid:
                raise ValueError(f"vehicle ids must be non-empty str, got {vid!r}")
            _check_town(town, f"town for vehicle {vid!r}:")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        return {"vehicle_towns": dict(sorted(vehicle_towns.items())), "seed": int(seed), "dt": _number("dt", dt),
                "background_per_town": _count("background_per_town", background_per_town),
                "trace_every_s": _number("trace_every_s", trace_every_s),
                "keep_trace_s": _number("keep_trace_s", keep_trace_s),
                "lane_m_per_vehicle": _number("lane_m_per_vehicle", lane_m_per_vehicle)}

    def _spawn(self) -> None:
        """Vehicles (fleet in id order, then background per town) spread over lane slots, layer by layer."""
        g = self._g
        self.n_fleet = len(self.ids)
        members: list[list[int]] = [[] for _ in self.town_names]
        tindex = {t: k for k, t in enumerate(self.town_names)}
        for k, vid in enumerate(self.ids):
            members[tindex[self._vehicle_town[vid]]].append(k)
        keys = [_key64(f"{self.seed}\0fleet\0{vid}") for vid in self.ids]
        self.bg_ids: list[str] = []
        for ti, town in enumerate(self.town_names):
            for b in range(self.background_per_town):
                members[ti].append(self.n_fleet + len(self.bg_ids))
                self.bg_ids.append(f"bg:{town}:{b}")
                keys.append(_key64(f"{self.seed}\0bg\0{town}\0{b}"))
        n = self._n = len(keys)
        self._key = np.array(keys, np.uint64)
        self._draws = np.zeros(n, np.uint64)
        self._town = np.zeros(n, np.int64)
        self._layer = np.zeros(n, np.int64)
        self._elem = np.zeros(n, np.int64)
        self._s = np.zeros(n)
        self._v = np.zeros(n)
        self._v0 = np.zeros(n)
        self._half = np.zeros(n)
        self.town_layers: dict[str, int] = {}
        for ti, (name, town) in enumerate(zip(self.town_names, self._towns, strict=True)):
            idx = np.array(members[ti], np.int64)
            lanes = np.flatnonzero(town.elem_kind == ELEM_LANE)
            cap = max(1, int(town.elem_len[lanes].sum() / self.lane_m_per_vehicle))
            n_layers = max(1, math.ceil(len(idx) / cap))
            self.town_layers[name] = n_layers
            slot_e, slot_s = [], []
            for e in lanes:
                s = np.arange(3.0, max(float(town.elem_len[e]) - 8.0, 3.5), SLOT_M)
                slot_e.append(np.full(len(s), e))
                slot_s.append(s)
            se, ss = np.concatenate(slot_e), np.concatenate(slot_s)
            rng = np.random.default_rng([self.seed, town.index, 0xF1EE7])
            layer = np.arange(len(idx)) % n_layers
            for li in range(n_layers):
                mine = idx[layer == li]
                pick = rng.choice(len(se), size=len(mine), replace=False)
                self._elem[mine] = se[pick] + g.town_elem0[ti]
                self._s[mine] = ss[pick] + rng.uniform(0.0, SLOT_JITTER_M, len(mine))
            self._town[idx] = ti
            self._layer[idx] = layer
            self._v0[idx] = town.cfg.speed_limit * rng.uniform(0.8, 1.05, len(idx))
            self._half[idx] = rng.uniform(4.0, 5.4, len(idx)) / 2
            self._v[idx] = rng.uniform(0.0, 0.8, len(idx)) * self._v0[idx]
        max_layers = max(self.town_layers.values())
        self._ekey = self._layer * g.n_elements           # per vehicle: element id -> its layer's lane key
        self._nkey = self._layer * g.n_nodes              # ... node id -> its layer's junction key
        self._n_node_keys = max_layers * g.n_nodes
        self._chain = np.zeros((n, 3), np.int64)
        everyone = np.arange(n)
        self._chain[:, 0] = self._pick(everyone, self._elem)
        self._chain[:, 1] = self._pick(everyone, self._chain[:, 0])
        self._chain[:, 2] = self._pick(everyone, self._chain[:, 1])
        self._stopped = np.zeros(n, bool)
        self._cleared = np.zeros(n, bool)
        self._stop_time = np.full(n, np.inf)
        self._wait = np.zeros(n)                    # seconds standing still, not held by a light
        self._ghost = np.zeros(n, bool)             # deadlock breaker active until the next lane element

    def _pick(self, k: np.ndarray, elem: np.ndarray) -> np.ndarray:
        """A random successor of `elem` for vehicles k (one draw each from their own counter-based stream)."""
        z = _splitmix(self._key[k] + (self._draws[k] + _U64(1)) * _GOLDEN)
        self._draws[k] += _U64(1)
        u = (z >> _U64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)
        n_succ = self._g.succ_n[elem]
        j = np.minimum((u * n_succ).astype(np.int64), n_succ - 1)
        return self._g.succ[elem, j]

    # -------------------------------------------------------------------------------------------- step
    def _signals(self, time_s: float) -> np.ndarray:
        """scene.TL_* per global signal, plus a trailing TL_NONE that element signal -1 indexes."""
        parts = [t.signal_states(time_s) for t in self._towns if t.n_signals]
        return np.concatenate([*parts, np.array([scene.TL_NONE], np.int64)])

    def _leaders(self, d_start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Bumper gap to and speed of the nearest vehicle ahead along each vehicle's path (same layer)."""
        n, s, v, half = self._n, self._s, self._v, self._half
        key = self._ekey + self._elem
        order = np.lexsort((s, key))
        skey = key[order]
        gap = np.full(n, np.inf)
        v_lead = np.zeros(n)
        same = np.flatnonzero(skey[1:] == skey[:-1])
        fi, li = order[same], order[same + 1]
        gap[fi] = s[li] - s[fi] - half[fi] - half[li]
        v_lead[fi] = v[li]
        for j in range(3):
            todo = np.flatnonzero(np.isinf(gap))
            if len(todo) == 0:
                break
            ck = self._ekey[todo] + self._chain[todo, j]
            pos = np.minimum(np.searchsorted(skey, ck), n - 1)
            hit = (skey[pos] == ck) & (order[pos] != todo)
            i, lead = todo[hit], order[pos[hit]]
            gap[i] = d_start[i, j] + s[lead] - half[i] - half[lead]
            v_lead[i] = v[lead]
        return gap, v_lead

    def _busy_nodes(self, rem0: np.ndarray) -> np.ndarray:
        """Per junction key: is a vehicle centre inside the junction (on a connector, or within 1 m of it)."""
        g, e = self._g, self._elem
        conn = g.elem_kind[e] == ELEM_CONNECTOR
        node = np.where(conn | (rem0 < 1.0), g.elem_node[e], np.where(self._s < 1.0, g.elem_from_node[e], -1))
        busy = np.zeros(self._n_node_keys, bool)
        inside = node >= 0
        busy[(self._nkey + node)[inside]] = True
        return busy

    def _stop_signs(self, time_s: float, stop_e: np.ndarray, stop_d: np.ndarray, current: np.ndarray,
                    is_sign: np.ndarray, rem0: np.ndarray, room: np.ndarray) -> None:
        """All-way stop: stop at the line, then go first come first served when the junction is clear and there
        is room behind it."""
        near = current & is_sign & (stop_d < 3.0) & (self._v < 0.3)
        newly = near & ~self._stopped
        self._stopped |= near
        self._stop_time[newly] = time_s
        waiting = is_sign & current & self._stopped & ~self._cleared
        if not waiting.any():
            return
        nodes = self._nkey + self._g.elem_node[stop_e]
        first = np.full(self._n_node_keys, np.inf)
        np.minimum.at(first, nodes[waiting], self._stop_time[waiting])
        claimed = np.zeros(self._n_node_keys, bool)
        claimed[nodes[is_sign & current & self._cleared]] = True
        go = np.flatnonzero(waiting & room & (self._stop_time <= first[nodes]) & ~self._busy_nodes(rem0)[nodes]
                            & ~claimed[nodes])
        if len(go):
            _, one = np.unique(nodes[go], return_index=True)     # one vehicle per junction per step
            self._cleared[go[one]] = True

    def _step(self, h: float, time_s: float) -> None:
        g = self._g
        n = self._n
        e0, v, half, chain = self._elem, self._v, self._half, self._chain
        rem0 = g.elem_len[e0] - self._s
        c_len = g.elem_len[chain]
        d_start = np.empty((n, 4))                 # distance to the start of chain[j] / the end of path element j
        d_start[:, 0] = rem0
        d_start[:, 1] = rem0 + c_len[:, 0]
        d_start[:, 2] = d_start[:, 1] + c_len[:, 1]
        d_start[:, 3] = d_start[:, 2] + c_len[:, 2]
        gap_lead, v_lead = self._leaders(d_start)
        # ---- the stop point: the end of the first lane element on the path
        elems = np.column_stack([e0, chain])
        first_lane = np.argmax(g.elem_kind[elems] == ELEM_LANE, 1)
        rows = np.arange(n)
        stop_e = elems[rows, first_lane]
        stop_d = d_start[rows, first_lane] - half - 0.3
        sig = self._signals(time_s)
        state = sig[g.elem_signal[stop_e]]
        can_stop = stop_d > v ** 2 / (2 * IDM_B) + 0.5
        must_stop = (state == scene.TL_RED) | ((state == scene.TL_YELLOW) & can_stop)
        is_sign = g.elem_stop_sign[stop_e]
        current = first_lane == 0
        # don't block the box: wait at a controlled junction's line while the traffic beyond it stands too close
        ghost = self._ghost
        no_room = (current & ((g.elem_signal[e0] >= 0) | is_sign) & (v_lead < 1.0)
                   & (gap_lead < d_start[:, 1] + 2 * half + MIN_GAP_M) & ~ghost)
        self._stop_signs(time_s, stop_e, stop_d, current, is_sign, rem0, ~no_room)
        light_hold = must_stop.copy()
        must_stop |= no_room | (is_sign & ~(current & self._cleared) & ~ghost)
        gap_lead = np.where(ghost, np.inf, gap_lead)
        gap_stop = np.where(must_stop, np.maximum(stop_d, 0.05), np.inf)
        # ---- IDM, as NpcVehicles
        cap = np.minimum(g.elem_speed_cap[e0], np.where(rem0 < 20.0, g.elem_speed_cap[chain[:, 0]], 99.0))
        v0 = np.minimum(self._v0, cap)
        acc = idm_acceleration(v, v0, gap_lead, v_lead, gap_stop)
        v_new = np.maximum(v + acc * h, 0.0)
        ds = 0.5 * (v + v_new) * h
        # ---- stability at coarse steps: never move past the leader (keeping MIN_GAP_M) or a stop point
        limit = np.where(np.isfinite(gap_lead), np.maximum(gap_lead - MIN_GAP_M, 0.0), np.inf)
        limit = np.minimum(limit, np.where(must_stop, np.maximum(stop_d, 0.0), np.inf))
        capped = ds > limit
        ds = np.where(capped, limit, ds)
        self._v = np.where(capped, np.minimum(v_new, limit / h), v_new)
        self._s = self._s + ds
        # deadlock breaker: standing still too long, not for a light -> ignore other vehicles and stop signs
        self._wait = np.where((self._v < 0.1) & ~light_hold, self._wait + h, 0.0)
        bored = (self._wait > PATIENCE_S) & ~ghost
        if bored.any():
            self.ghosts += int(np.count_nonzero(bored))
            self._ghost |= bored
        self._transitions(sig)

    def _transitions(self, sig: np.ndarray) -> None:
        """Move vehicles that ran off their element's end onto the next element (vectorised, usually 1 pass)."""
        g = self._g
        over = np.flatnonzero(self._s > g.elem_len[self._elem])
        while len(over):
            old = self._elem[over]
            self.transitions += len(over)
            self.red_exits += int(np.count_nonzero((g.elem_kind[old] == ELEM_LANE)
                                                   & (sig[g.elem_signal[old]] == scene.TL_RED)))
            self._s[over] -= g.elem_len[old]
            self._elem[over] = self._chain[over, 0]
            self._chain[over, 0] = self._chain[over, 1]
            self._chain[over, 1] = self._chain[over, 2]
            self._chain[over, 2] = self._pick(over, self._chain[over, 1])
            lane = over[g.elem_kind[self._elem[over]] == ELEM_LANE]
            self._stopped[lane] = False
            self._cleared[lane] = False
            self._stop_time[lane] = np.inf
            self._ghost[lane] = False
            self._wait[lane] = 0.0
            over = over[self._s[over] > g.elem_len[self._elem[over]]]

    # ----------------------------------------------------------------------------------------- public
    def advance(self, until_s: float) -> None:
        """Step every town to `until_s`, recording each fleet vehicle's (t, x, y) every `trace_every_s`.

        Physics runs on a fixed grid of sub-steps from t = 0, so advancing in any increments gives the same
        result; `time_s` becomes `until_s` and positions are those of the last grid step at or before it."""
        until = _finite("until_s", until_s)
        if until < self.time_s - 1e-9:
            raise ValueError(f"until_s {until} is in the past (time_s is {self.time_s})")
        h = self._h
        target = int(math.floor(until / h + 1e-9))
        every = self.trace_every_s
        while self._step_i < target:
            t0, t1 = self._step_i * h, (self._step_i + 1) * h
            tau = self._next_trace_k * every
            due = tau <= t1 + 1e-9 * max(1.0, t1)
            xy0 = self._fleet_xy() if due and tau < t1 - 1e-9 * max(1.0, t1) else None   # needed to interpolate
            self._step(h, t0)
            self._step_i += 1
            if due:
                xy1 = self._fleet_xy()
                self._record_traces(t1, xy1 if xy0 is None else xy0, xy1)
        self.time_s = max(self.time_s, until)

    def _fleet_xy(self) -> np.ndarray:
        """Fleet positions at the current physics step (cached per step)."""
        if self._xy_step != self._step_i:
            self._xy, _ = self._g.locate(self._elem[:self.n_fleet], self._s[:self.n_fleet])
            self._xy_step = self._step_i
        return self._xy

    def positions(self) -> dict[str, tuple[float, float]]:
        """Fleet vehicle id -> (x, y) on the global map, now."""
        xy = self._fleet_xy().tolist()
        return {vid: (p[0], p[1]) for vid, p in zip(self.ids, xy, strict=True)}

    def speeds(self) -> dict[str, float]:
        """Fleet vehicle id -> speed (m/s), now."""
        return dict(zip(self.ids, self._v[:self.n_fleet].tolist(), strict=True))

    def headings(self) -> dict[str, float]:
        """Fleet vehicle id -> heading (rad, CCW from +x), now."""
        _, yaw = self._g.locate(self._elem[:self.n_fleet], self._s[:self.n_fleet])
        return dict(zip(self.ids, yaw.tolist(), strict=True))

    def town_of(self, vid: str) -> str:
        if vid not in self._vehicle_town:
            raise ValueError(f"unknown vehicle id {vid!r}")
        return self._vehicle_town[vid]

    def tile_of(self, town: str) -> TownTile:
        for tile in self.tiles:
            if tile.name == town:
                return tile
        raise ValueError(f"town {town!r} is not simulated; towns: {self.town_names}")

    # ---------------------------------------------------------------------------------------- traces
    def _record_traces(self, t1: float, xy0: np.ndarray, xy1: np.ndarray) -> None:
        """Record the trace samples due in (t1 - h, t1], interpolated between the step's end points."""
        every = self.trace_every_s
        while self._next_trace_k * every <= t1 + 1e-9 * max(1.0, t1):
            tau = self._next_trace_k * every
            frac = min(max((tau - (t1 - self._h)) / self._h, 0.0), 1.0)
            self._push_trace(tau, xy1 - (1.0 - frac) * (xy1 - xy0))
            self._next_trace_k += 1

    def _push_trace(self, t: float, xy: np.ndarray) -> None:
        alloc = len(self._tr_t)
        if self._tr_len == alloc and alloc < self._trace_cap:      # grow (in time order) up to the cap
            new = min(self._trace_cap, max(64, 2 * alloc))
            order = (self._tr_start + np.arange(self._tr_len)) % max(alloc, 1)
            tr_t = np.zeros(new)
            tr_xy = np.zeros((new, self.n_fleet, 2), np.float32)
            tr_t[:self._tr_len] = self._tr_t[order]
            tr_xy[:self._tr_len] = self._tr_xy[order]
            self._tr_t, self._tr_xy, self._tr_start, alloc = tr_t, tr_xy, 0, new
        slot = (self._tr_start + self._tr_len) % alloc
        self._tr_t[slot] = t
        self._tr_xy[slot] = xy
        if self._tr_len < alloc:
            self._tr_len += 1
        else:
            self._tr_start = (self._tr_start + 1) % alloc

    def _columns(self, vehicles: Iterable[str] | None) -> np.ndarray:
        if vehicles is None:
            return np.arange(self.n_fleet)
        if isinstance(vehicles, str):
            raise ValueError("vehicles must be an iterable of vehicle ids, not one str")
        cols = set()
        for vid in vehicles:
            if vid not in self._index:
                raise ValueError(f"unknown vehicle id {vid!r}")
            cols.add(self._index[vid])
        return np.array(sorted(cols), np.int64)

    def trace_arrays(self, since_s: float | None = None, vehicles: Iterable[str] | None = None
                     ) -> tuple[list[str], np.ndarray, np.ndarray]:
        """The kept traces as arrays: (vehicle ids sorted, times float64 [T] ascending, xy float32 [T, V, 2])."""
        cols = self._columns(vehicles)
        order = (self._tr_start + np.arange(self._tr_len)) % max(len(self._tr_t), 1)
        times = self._tr_t[order]
        if since_s is not None:
            keep = times >= _finite("since_s", since_s)
            order, times = order[keep], times[keep]
        return [self.ids[c] for c in cols], times, self._tr_xy[order][:, cols]

    def traces(self, since_s: float | None = None, vehicles: Iterable[str] | None = None
               ) -> list[tuple[str, float, float, float]]:
        """Rows (vehicle_id, t, x, y) sorted by (t, id), global coordinates (stored as float32), for samples at
        t >= since_s; only the last keep_trace_s are kept."""
        ids, times, xy = self.trace_arrays(since_s, vehicles)
        if len(times) == 0 or not ids:
            return []
        n_t, n_v = xy.shape[:2]
        flat = xy.reshape(-1, 2).astype(np.float64)
        return list(zip(ids * n_t, np.repeat(times, n_v).tolist(), flat[:, 0].tolist(), flat[:, 1].tolist(),
                        strict=True))

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-for-bit: config, clock, vehicle state arrays, random-stream counters
        and the kept traces (copies; plain Python and numpy data, picklable)."""
        order = (self._tr_start + np.arange(self._tr_len)) % max(len(self._tr_t), 1)
        state: dict[str, Any] = {
            "version": STATE_VERSION, "config": {**self._config, "vehicle_towns": dict(self._config["vehicle_towns"])},
            "time_s": self.time_s, "step": self._step_i, "next_trace_k": self._next_trace_k,
            "red_exits": self.red_exits, "transitions": self.transitions, "ghosts": self.ghosts,
            "trace_t": self._tr_t[order].copy(), "trace_xy": self._tr_xy[order].copy()}
        for name in _STATE_ARRAYS:
            state[name] = getattr(self, "_" + name).copy()
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> FleetMotion:
        """A new FleetMotion built from the state's config and continuing from it."""
        if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
            raise ValueError("state must be a dict from FleetMotion.state_dict() (with 'config')")
        fleet = cls(**state["config"])
        fleet.load_state_dict(state)
        return fleet

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()` of a FleetMotion built with the same arguments."""
        if not isinstance(state, dict):
            raise ValueError(f"state must be a dict, got {type(state).__name__}")
        missing = [k for k in ("version", "config", "time_s", "step", "next_trace_k", "trace_t", "trace_xy",
                               *_STATE_ARRAYS) if k not in state]
        if missing:
            raise ValueError(f"state is missing {missing}")
        if state["version"] != STATE_VERSION:
            raise ValueError(f"state version {state['version']!r}, expected {STATE_VERSION}")
        config = state["config"]
        diff = sorted(k for k in self._config if not isinstance(config, dict) or config.get(k) != self._config[k])
        if diff:
            raise ValueError(f"state config differs in {diff}; build FleetMotion with the same arguments")
        arrays = {}
        for name in _STATE_ARRAYS:
            mine = getattr(self, "_" + name)
            arr = np.asarray(state[name])
            if arr.shape != mine.shape:
                raise ValueError(f"state[{name!r}] has shape {arr.shape}, expected {mine.shape}")
            arrays[name] = arr.astype(mine.dtype, copy=True)
        tr_t = np.asarray(state["trace_t"], np.float64)
        tr_xy = np.asarray(state["trace_xy"], np.float32)
        if tr_xy.shape != (len(tr_t), self.n_fleet, 2) or len(tr_t) > self._trace_cap:
            raise ValueError(f"state['trace_xy'] has shape {tr_xy.shape}, expected ({len(tr_t)}, {self.n_fleet}, 2)"
                             f" with at most {self._trace_cap} samples")
        for name, arr in arrays.items():
            setattr(self, "_" + name, arr)
        self._tr_t, self._tr_xy = tr_t.copy(), tr_xy.copy()
        self._tr_start, self._tr_len = 0, len(tr_t)
        self.time_s = float(state["time_s"])
        self._step_i = int(state["step"])
        self._next_trace_k = int(state["next_trace_k"])
        self.red_exits = int(state.get("red_exits", 0))
        self.transitions = int(state.get("transitions", 0))
        self.ghosts = int(state.get("ghosts", 0))
        self._xy_step = -1

    def memory_bytes(self) -> int:
        """Bytes of this fleet's own numpy arrays: vehicle state, merged lane graph and trace buffers."""
        own = sum(v.nbytes for v in vars(self).values() if isinstance(v, np.ndarray))
        return int(own + sum(a.nbytes for a in self._g.arrays()))


__all__ = ["LANE_M_PER_VEHICLE", "MAX_SUBSTEP_S", "PATIENCE_S", "FleetMotion", "TownTile", "tile_towns"]
