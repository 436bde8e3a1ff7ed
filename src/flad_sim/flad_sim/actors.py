"""Background actors: NPC vehicles that follow lanes (IDM car following, lights, stop signs) and pedestrians.

Both are updated vectorised over all actors per tick; only rare events (an NPC leaving its lane element,
a pedestrian reaching a corner) go through a Python loop over the few actors concerned. NPC vehicles
are path-bound (position = lane element + arc length), so they never leave their lanes.
"""

from __future__ import annotations

import logging
import math
from typing import ClassVar

import numpy as np

from flad_sim import scene
from flad_sim.towns import CONTROL_STOP, ELEM_LANE, SIDEWALK_WIDTH_M, Town

log = logging.getLogger(__name__)

LOOKAHEAD = np.arange(2.0, 34.0, 2.0)      # m, NPC look-ahead sample offsets
IDM_A = 2.0
IDM_B = 3.0
IDM_S0 = 2.5
IDM_T = 1.2
VEH_HIT_R = 1.7                            # a vehicle centre this close to a look-ahead point is "in my path"
PED_HIT_R = 1.6

WALK, WAIT, CROSS = 0, 1, 2
PED_SIZE = (0.5, 0.5, 1.75)


def idm_acceleration(v: np.ndarray, v0: np.ndarray, gap_lead: np.ndarray, v_lead: np.ndarray,
                     gap_stop: np.ndarray) -> np.ndarray:
    """IDM acceleration behind a leader (gap, speed; inf: none) and before a stop point (inf: none)."""
    sqrt_ab = math.sqrt(IDM_A * IDM_B)
    free = 1.0 - (v / np.maximum(v0, 0.1)) ** 4

    def interact(gap: np.ndarray, dv: np.ndarray) -> np.ndarray:
        s_star = IDM_S0 + np.maximum(0.0, v * IDM_T + v * dv / (2 * sqrt_ab))
        return np.where(np.isfinite(gap), (s_star / np.maximum(gap, 0.05)) ** 2, 0.0)

    acc_lead = IDM_A * (free - interact(gap_lead, v - v_lead))
    stop_gap_adj = np.where(np.isfinite(gap_stop), gap_stop + IDM_S0 - 0.5, np.inf)
    acc_stop = IDM_A * (free - interact(stop_gap_adj, v))
    return np.minimum(np.maximum(np.minimum(acc_lead, acc_stop), -9.0), IDM_A)


class NpcVehicles:
    """Lane-bound NPC traffic. Arrays are indexed by NPC slot."""

    def __init__(self, town: Town, n: int, rng: np.random.Generator, speed_limit: float) -> None:
        self.town = town
        self.rng = rng
        self.n = n
        lanes = np.flatnonzero(town.elem_kind == ELEM_LANE)
        self.elem = np.zeros(n, np.int64)
        self.s = np.zeros(n)
        self.v = np.zeros(n)
        self.length = rng.uniform(4.0, 5.4, n)
        self.width = rng.uniform(1.75, 2.1, n)
        self.height = rng.uniform(1.4, 2.0, n)
        self.color = rng.integers(20, 235, (n, 3)).astype(np.uint8)
        self.v0 = speed_limit * rng.uniform(0.8, 1.05, n)
        self.chain = np.zeros((n, 3), np.int64)
        self.stopped = np.zeros(n, bool)       # has come to a stop at the current lane's stop sign
        self.stop_time = np.full(n, np.inf)
        self.cleared = np.zeros(n, bool)       # may go through the stop-sign junction
        # spawn spread out: sample lane positions, reject those within 10 m of an earlier one
        placed: list[np.ndarray] = []
        i = 0
        tries = 0
        while i < n and tries < 50 * n + 100:
            tries += 1
            e = int(rng.choice(lanes))
            s = float(rng.uniform(3.0, max(town.elem_len[e] - 8.0, 3.5)))
            xy, _ = town.locate(np.array([e]), np.array([s]))
            if placed and np.min(np.linalg.norm(np.array(placed) - xy[0], axis=1)) < 10.0:
                continue
            placed.append(xy[0])
            self.elem[i], self.s[i] = e, s
            self.v[i] = float(rng.uniform(0.0, 0.8)) * self.v0[i]
            i += 1
        if i < n:
            log.warning("placed only %d of %d NPC vehicles in %s", i, n, town.name)
            self._truncate(i)
        for k in range(self.n):
            self._fill_chain(k)
        self.xy, self.yaw = town.locate(self.elem, self.s)
        self.active = np.ones(self.n, bool)
        self._rows = np.arange(self.n)[:, None]

    def _truncate(self, m: int) -> None:
        for name in ("elem", "s", "v", "length", "width", "height", "color", "v0", "chain", "stopped", "stop_time",
                     "cleared"):
            setattr(self, name, getattr(self, name)[:m])
        self.n = m

    def _pick(self, e: int) -> int:
        succ = self.town.elem_succ[e]
        return int(succ[int(self.rng.integers(len(succ)))])

    def _fill_chain(self, k: int) -> None:
        c0 = self._pick(int(self.elem[k]))
        c1 = self._pick(c0)
        self.chain[k] = (c0, c1, self._pick(c1))

    def relocate(self, k: int, avoid_xy: np.ndarray, min_dist: float = 40.0) -> None:
        """Move NPC k to a random lane position at least min_dist from avoid_xy (used when spawning egos)."""
        lanes = np.flatnonzero(self.town.elem_kind == ELEM_LANE)
        for _ in range(200):
            e = int(self.rng.choice(lanes))
            s = float(self.rng.uniform(3.0, max(self.town.elem_len[e] - 8.0, 3.5)))
            xy, _ = self.town.locate(np.array([e]), np.array([s]))
            others = np.delete(self.xy, k, axis=0)
            if np.linalg.norm(xy[0] - avoid_xy) < min_dist:
                continue
            if len(others) and np.min(np.linalg.norm(others - xy[0], axis=1)) < 10.0:
                continue
            break
        self.elem[k], self.s[k], self.v[k] = e, s, 0.0
        self.stopped[k], self.cleared[k], self.stop_time[k] = False, False, np.inf
        self._fill_chain(k)
        self.xy[k], self.yaw[k] = xy[0], self.town.locate(np.array([e]), np.array([s]))[1][0]

    def step(self, dt: float, time_s: float, sig: np.ndarray, obst_xy: np.ndarray, obst_half: np.ndarray,
             obst_v: np.ndarray, obst_yaw: np.ndarray, n_self_first: int, egos_waiting: list[tuple[int, float]],
             busy_nodes: np.ndarray) -> None:
        """Advance all NPCs one tick.

        obst_*: every obstacle (NPC vehicles first, in slot order, then egos, then pedestrians) with its
        half length along its heading (for gaps), speed and yaw. egos_waiting: (node, stop time) of egos
        stopped at a stop sign, so NPCs respect first-come-first-served with them. busy_nodes: per node,
        whether any vehicle is inside its box.
        """
        n = self.n
        if n == 0:
            return
        town = self.town
        # ---- look-ahead points along each NPC's chain of elements
        e0 = self.elem
        rem0 = town.elem_len[e0] - self.s
        c_len = town.elem_len[self.chain]
        bounds = np.stack([rem0, rem0 + c_len[:, 0], rem0 + c_len[:, 0] + c_len[:, 1]], 1)  # [n,3]
        off = LOOKAHEAD[None, :]
        which = (off >= bounds[:, 0:1]).astype(np.int64) + (off >= bounds[:, 1:2]) + (off >= bounds[:, 2:3])
        elems_all = np.concatenate([e0[:, None], self.chain], 1)
        rows = self._rows[:n]
        el = elems_all[rows, which]
        base = np.concatenate([-self.s[:, None], bounds], 1)         # distance at which each element starts
        s_in = off - base[rows, which]
        pts, _ = town.locate(el.ravel(), s_in.ravel())
        pts = pts.reshape(n, len(LOOKAHEAD), 2)
        self.lookahead_pts = pts
        # ---- nearest obstacle in path: only obstacle/NPC pairs within look-ahead range are examined
        m_total = len(obst_xy)
        half_i = self.length / 2
        gap_lead = np.full(n, np.inf)
        v_lead = np.zeros(n)
        if m_total:
            dxy = self.xy[:, None, :] - obst_xy[None, :, :]
            d2 = dxy[..., 0] ** 2 + dxy[..., 1] ** 2
            d2[np.arange(n), np.arange(n)] = np.inf
            pi, pm = np.nonzero(d2 < (LOOKAHEAD[-1] + 3.0) ** 2)
            if len(pi):
                radius = np.where(obst_half[pm] < 0.5, PED_HIT_R, VEH_HIT_R)
                rel = pts[pi] - obst_xy[pm][:, None, :]                        # [P,K,2]
                hit = rel[..., 0] ** 2 + rel[..., 1] ** 2 < (radius ** 2)[:, None]
                anyhit = hit.any(1)
                k = np.argmax(hit, 1)
                gp = np.where(anyhit, LOOKAHEAD[k] - half_i[pi] - obst_half[pm], np.inf)
                order = np.lexsort((gp, pi))
                first = order[np.unique(pi[order], return_index=True)[1]]
                gi = pi[first]
                gap_lead[gi] = gp[first]
                lm = pm[first]
                v_lead[gi] = np.maximum(obst_v[lm] * np.cos(obst_yaw[lm] - self.yaw[gi]), 0.0)
                v_lead[~np.isfinite(gap_lead)] = 0.0
        # ---- stop points: the first lane element in the chain that ends at a controlled node
        lane_mask = town.elem_kind[elems_all] == ELEM_LANE                          # [n,4]
        dist_end = np.concatenate([bounds, (bounds[:, 2] + c_len[:, 2])[:, None]], 1)   # to each elem's end
        first_lane = np.argmax(lane_mask, 1)
        stop_e = elems_all[np.arange(n), first_lane]
        stop_d = dist_end[np.arange(n), first_lane] - half_i - 0.3
        s_sig = town.elem_signal[stop_e]
        state = np.where(s_sig >= 0, sig[np.maximum(s_sig, 0)], scene.TL_NONE)
        can_stop = stop_d > self.v ** 2 / (2 * IDM_B) + 0.5
        must_stop = (state == scene.TL_RED) | ((state == scene.TL_YELLOW) & can_stop)
        # stop signs: stop, then go when first in line and the junction is clear
        is_sign = town.elem_stop_sign[stop_e]
        current = first_lane == 0
        near = current & is_sign & (stop_d < 3.0) & (self.v < 0.3)
        newly = near & ~self.stopped
        self.stopped |= near
        self.stop_time[newly] = time_s
        waiting = is_sign & current & self.stopped & ~self.cleared
        if waiting.any():
            nodes = town.elem_node[stop_e]
            first = np.full(len(town.node_xy), np.inf)
            np.minimum.at(first, nodes[waiting], self.stop_time[waiting])
            for node, t_stop in egos_waiting:
                first[node] = min(first[node], t_stop)
            others_cleared = np.zeros(len(town.node_xy), bool)
            cl = is_sign & current & self.cleared
            others_cleared[nodes[cl]] = True
            go = waiting & (self.stop_time <= first[nodes]) & ~busy_nodes[nodes] & ~others_cleared[nodes]
            # one per node per tick
            _, first_idx = np.unique(np.where(go, nodes, -1), return_index=True)
            go_one = np.zeros(n, bool)
            go_one[first_idx] = True
            self.cleared |= go & go_one
        must_stop |= is_sign & ~(current & self.cleared)
        gap_stop = np.where(must_stop, np.maximum(stop_d, 0.05), np.inf)
        # ---- IDM
        v = self.v
        cap = np.minimum(town.elem_speed_cap[e0], np.where(rem0 < 20.0, town.elem_speed_cap[self.chain[:, 0]], 99.0))
        v0 = np.minimum(self.v0, cap)
        acc = idm_acceleration(v, v0, gap_lead, v_lead, gap_stop)
        self.debug = {"gap_lead": gap_lead, "gap_stop": gap_stop, "acc": acc, "v0": v0}
        self.v = np.maximum(v + acc * dt, 0.0)
        self.s = self.s + self.v * dt
        # ---- element transitions (rare)
        over = np.flatnonzero(self.s > town.elem_len[self.elem])
        for k in over:
            while self.s[k] > town.elem_len[self.elem[k]]:
                self.s[k] -= town.elem_len[self.elem[k]]
                self.elem[k] = self.chain[k, 0]
                self.chain[k, :2] = self.chain[k, 1:]
                self.chain[k, 2] = self._pick(int(self.chain[k, 1]))
                if town.elem_kind[self.elem[k]] == ELEM_LANE:
                    self.stopped[k] = False
                    self.cleared[k] = False
                    self.stop_time[k] = np.inf
        self.xy, self.yaw = town.locate(self.elem, self.s)

    @property
    def node_claims(self) -> np.ndarray:
        """Nodes where an NPC has been cleared through a stop-sign junction but is still on its approach."""
        cl = self.cleared & (self.town.elem_kind[self.elem] == ELEM_LANE)
        return np.unique(self.town.elem_node[self.elem[cl]])


class Pedestrians:
    """People walking block sidewalk loops, crossing at crosswalks and sometimes mid-block."""

    def __init__(self, town: Town, n: int, rng: np.random.Generator, p_cross: float = 0.5,
                 p_jaywalk: float = 0.08) -> None:
        self.town = town
        self.rng = rng
        self.n = n
        self.p_cross = p_cross
        self.p_jaywalk = p_jaywalk
        nb = len(town.block_corners)
        self.block = rng.integers(0, nb, n)
        self.corner = rng.integers(0, 4, n)                 # the corner walked towards
        self.dirn = np.where(rng.random(n) < 0.5, 1, -1)    # +1 counter-clockwise
        self.speed = rng.uniform(1.0, 1.6, n)
        self.mode = np.full(n, WALK, np.int64)
        self.color = rng.integers(30, 230, (n, 3)).astype(np.uint8)
        start_corner = (self.corner - self.dirn) % 4
        t = rng.random(n)[:, None]
        a = town.block_corners[self.block, start_corner]
        b = town.block_corners[self.block, self.corner]
        self.xy = a * (1 - t) + b * t
        self.target = b.copy()
        self.pending: dict[int, tuple[np.ndarray, int, int, float]] = {}   # ped -> (target, block, corner, clear m)
        self.yaw = np.arctan2(b[:, 1] - a[:, 1], b[:, 0] - a[:, 0])
        self.v = self.speed.copy()
        self.jay_from: dict[int, tuple[int, int]] = {}

    def _neighbour_block(self, b: int, di: int, dj: int) -> int:
        i, j = self.town.block_ij[b]
        nx1, ny1 = self.town.cfg.nx - 1, self.town.cfg.ny - 1
        i2, j2 = i + di, j + dj
        if 0 <= i2 < nx1 and 0 <= j2 < ny1:
            return int(j2 * nx1 + i2)
        return -1

    # crossing options per corner: (di, dj, corner reached on the neighbour block)
    _CROSS: ClassVar[dict[int, tuple[tuple[int, int, int], ...]]] = {
        0: ((-1, 0, 1), (0, -1, 3)), 1: ((1, 0, 0), (0, -1, 2)), 2: ((1, 0, 3), (0, 1, 1)),
              3: ((-1, 0, 2), (0, 1, 0))}
    # edge from corner c to c+1 faces: (di, dj)
    _EDGE_FACE: ClassVar[dict[int, tuple[int, int]]] = {0: (0, -1), 1: (1, 0), 2: (0, 1), 3: (-1, 0)}

    def _arrive(self, k: int) -> None:
        town, rng = self.town, self.rng
        if self.mode[k] == CROSS:
            self.mode[k] = WALK
            corner_xy = town.block_corners[int(self.block[k]), int(self.corner[k])]
            if np.linalg.norm(corner_xy - self.xy[k]) > 0.05:      # after a mid-block crossing
                self.target[k] = corner_xy
                self.v[k] = self.speed[k]
                return
        elif self.mode[k] == WALK and k in self.jay_from:
            # reached the mid-block point: jaywalk across
            b, face = self.jay_from.pop(k)
            nb = self._neighbour_block(b, *self._EDGE_FACE[face])
            if nb >= 0:
                corners = town.block_corners[nb]
                tgt = self.xy[k].copy()
                if self._EDGE_FACE[face][0] == 0:
                    tgt[1] = corners[0, 1] if self._EDGE_FACE[face][1] > 0 else corners[2, 1]
                else:
                    tgt[0] = corners[0, 0] if self._EDGE_FACE[face][0] > 0 else corners[1, 0]
                facing = {(0, -1): (2, 3), (1, 0): (3, 0), (0, 1): (0, 1), (-1, 0): (1, 2)}[self._EDGE_FACE[face]]
                self.pending[k] = (tgt, nb, int(facing[int(rng.integers(2))]), 25.0)
                self.mode[k] = WAIT
                self.v[k] = 0.0
                return
            # nothing across (town edge): carry on to the corner this edge leads to
            self.target[k] = town.block_corners[b, int(self.corner[k])]
            self.v[k] = self.speed[k]
            return
        else:
            c = int(self.corner[k])
            b = int(self.block[k])
            if rng.random() < self.p_cross:
                options = [(o, self._neighbour_block(b, o[0], o[1])) for o in self._CROSS[c]]
                options = [(o, nb) for o, nb in options if nb >= 0]
                if options:
                    (_, _, c2), nb = options[int(rng.integers(len(options)))]
                    self.pending[k] = (town.block_corners[nb, c2].copy(), nb, c2, 12.0)
                    self.mode[k] = WAIT
                    self.v[k] = 0.0
                    return
        # walk on to the next corner of the current block (maybe via a mid-block jaywalk point)
        nxt = (int(self.corner[k]) + int(self.dirn[k])) % 4
        edge_from = int(self.corner[k]) if self.dirn[k] > 0 else nxt
        self.corner[k] = nxt
        b = int(self.block[k])
        self.target[k] = town.block_corners[b, nxt]
        if rng.random() < self.p_jaywalk:
            a = self.xy[k]
            t = float(rng.uniform(0.3, 0.7))
            self.target[k] = a * (1 - t) + town.block_corners[b, nxt] * t
            self.jay_from[k] = (b, edge_from)
        self.v[k] = self.speed[k]

    def step(self, dt: float, veh_xy: np.ndarray, veh_yaw: np.ndarray, veh_half: np.ndarray,
             veh_blocks: np.ndarray | None = None) -> None:
        """Advance pedestrians; veh_* are all vehicles (NPCs and egos): centres, yaws, half (length, width).

        veh_blocks marks the vehicles a crossing pedestrian waits for (default all). The world passes egos and
        moving NPCs: a pedestrian walks on past an NPC that has stopped for it, which would otherwise deadlock."""
        if self.n == 0:
            return
        # waiting pedestrians start crossing when no vehicle is near the crossing
        if self.pending and len(veh_xy):
            keys = list(self.pending)
            a = self.xy[keys]                                                   # [P,2]
            ab = np.array([self.pending[k][0] for k in keys]) - a
            clear = np.array([self.pending[k][3] for k in keys])
            rel = veh_xy[None, :, :] - a[:, None, :]                            # [P,V,2]
            t = (rel[..., 0] * ab[:, None, 0] + rel[..., 1] * ab[:, None, 1]) / np.maximum(
                (ab * ab).sum(1), 1e-9)[:, None]
            t = np.minimum(np.maximum(t, 0.0), 1.0)
            dx = rel[..., 0] - t * ab[:, None, 0]
            dy = rel[..., 1] - t * ab[:, None, 1]
            dmin = np.sqrt((dx * dx + dy * dy).min(1))
            for i in np.flatnonzero(dmin > clear):
                k = keys[i]
                tgt, nb, c2, _ = self.pending.pop(k)
                self.target[k], self.block[k], self.corner[k], self.mode[k] = tgt, nb, c2, CROSS
                self.v[k] = self.speed[k]
        elif self.pending:
            for k in list(self.pending):
                tgt, nb, c2, _ = self.pending.pop(k)
                self.target[k], self.block[k], self.corner[k], self.mode[k] = tgt, nb, c2, CROSS
                self.v[k] = self.speed[k]
        delta = self.target - self.xy
        dist = np.linalg.norm(delta, axis=1)
        moving = self.mode != WAIT
        unit = delta / np.maximum(dist, 1e-9)[:, None]
        self.yaw = np.where(moving & (dist > 1e-6), np.arctan2(unit[:, 1], unit[:, 0]), self.yaw)
        v = np.where(moving, self.speed, 0.0)
        # crossing pedestrians do not walk into a vehicle: stop when the point 1.2 m ahead is inside one
        crossing = np.flatnonzero(self.mode == CROSS)
        if len(crossing) and len(veh_xy):
            ahead = self.xy[crossing] + unit[crossing] * 1.2
            rel = ahead[:, None, :] - veh_xy[None, :, :]
            c, s = np.cos(veh_yaw), np.sin(veh_yaw)
            lx = rel[..., 0] * c + rel[..., 1] * s
            ly = -rel[..., 0] * s + rel[..., 1] * c
            inside = (np.abs(lx) < veh_half[:, 0] + 0.6) & (np.abs(ly) < veh_half[:, 1] + 0.6)
            if veh_blocks is not None:
                inside &= veh_blocks[None, :]
            v[crossing[inside.any(1)]] = 0.0
        self.v = v
        step = np.minimum(v * dt, dist)
        self.xy = self.xy + unit * step[:, None]
        arrived = np.flatnonzero(moving & (dist - step < 1e-3))
        for k in arrived:
            self._arrive(int(k))

    @property
    def on_road(self) -> np.ndarray:
        """Pedestrians currently crossing a road."""
        return self.mode == CROSS


def sidewalk_ok(town: Town, xy: np.ndarray) -> np.ndarray:
    """Debug helper: is each point on a sidewalk or crosswalk."""
    cls = town.ground.lookup(xy[:, 0], xy[:, 1])
    return (cls == scene.SURFACE_SIDEWALK) | (cls == scene.SURFACE_CROSSWALK)


__all__ = ["CONTROL_STOP", "PED_SIZE", "SIDEWALK_WIDTH_M", "NpcVehicles", "Pedestrians"]
