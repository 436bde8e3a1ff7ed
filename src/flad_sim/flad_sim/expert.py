"""The privileged expert driver (the data-collection autopilot, like CARLA's/LMDrive's).

It reads the world directly: pure pursuit on the route polyline for steering; an IDM-style longitudinal
controller whose constraints are the curvature-limited speed, red/yellow lights and stop signs on the
route, vehicles and pedestrians in its corridor, lane changes gated on a free target lane, and the goal.
Acceleration is turned into throttle/brake through the (known) vehicle model, so it tracks precisely.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from flad_sim import scene
from flad_sim.agent import RouteInfo
from flad_sim.instructions import CMD_CHANGE_LEFT, CMD_CHANGE_RIGHT
from flad_sim.physics import Control, VehicleParams
from flad_sim.route import Route
from flad_sim.towns import CONTROL_LIGHT, CONTROL_STOP, DIRS, ELEM_LANE
from flad_sim.world import World

log = logging.getLogger(__name__)

A_MAX = 2.5          # comfortable acceleration
B_COMF = 3.0         # comfortable deceleration
S0 = 3.0             # standstill gap to vehicles/pedestrians (front bumper)
T_HEAD = 1.3
LAT_ACC = 2.0        # curvature speed limit
STOP_MARGIN = 1.0    # front bumper stops this far before a stop line


class ExpertAgent:
    """Rule-based privileged driver; an `Agent` (reset/run_step) that needs the World handle."""

    def __init__(self, world: World, ego_id: int | None = None, target_speed: float | None = None) -> None:
        self.world = world
        self.ego_id = ego_id
        self.target_speed = target_speed
        self.route: Route | None = None

    def reset(self, route_info: RouteInfo) -> None:
        self.ego_id = route_info.ego_id
        self.route = route_info.route
        r = self.route
        self.params: VehicleParams = self.world.egos[self.ego_id].params
        self.v_limit = self.target_speed or 0.9 * self.world.town.cfg.speed_limit
        # curvature speed caps along the route (heading change over +-2 m)
        hd = np.unwrap(r.heading)
        ds = 2.0
        s = r.s
        h_plus = np.interp(s + ds, s, hd)
        h_minus = np.interp(s - ds, s, hd)
        kappa = np.abs(h_plus - h_minus) / (2 * ds)
        self.cap = np.sqrt(LAT_ACC / np.maximum(kappa, 1e-4))
        self.s = 0.0
        self.done_stops: set[int] = set()
        self.stopped_since: float | None = None
        self.committed: set[int] = set()
        self.passed: set[int] = set()

    # ------------------------------------------------------------------------------------------
    def run_step(self, observation: dict[str, Any] | None = None) -> Control:
        w, r, p = self.world, self.route, self.params
        assert r is not None and self.ego_id is not None, "call reset() first"
        ego = w.egos[self.ego_id]
        v = ego.v
        rear = np.array([ego.x, ego.y])
        s, _ = r.project(rear, self.s, back=5.0, ahead=25.0)
        self.s = s
        front_off = p.length - p.rear_overhang        # rear axle -> front bumper
        s_front = s + front_off

        # ---------- steering: pure pursuit from the rear axle
        ld = float(np.clip(3.0 + 0.5 * abs(v), 4.5, 12.0))
        tgt = r.point_at(s + ld)
        dx, dy = tgt - rear
        alpha = math.atan2(dy, dx) - ego.yaw
        alpha = (alpha + math.pi) % (2 * math.pi) - math.pi
        delta = math.atan2(2.0 * p.wheelbase * math.sin(alpha), ld)
        steer = float(np.clip(-delta / math.radians(p.max_steer_deg), -1.0, 1.0))

        # ---------- longitudinal constraints: (gap from front bumper, speed of what is there)
        gaps: list[tuple[float, float, float]] = []     # (gap, obstacle speed, standstill distance)
        # speed: limit and curvature within braking range
        look = np.arange(s, min(s + 40.0, r.length), 1.0)
        v_free = self.v_limit
        if len(look):
            caps = np.interp(look, r.s, self.cap)
            reach = np.sqrt(caps ** 2 + 2 * B_COMF * np.maximum(look - s - 2.0, 0.0))
            v_free = min(v_free, float(reach.min()))
        # goal
        gaps.append((r.length - s_front + 3.5, 0.0, 0.0))   # box centre ends past the goal: RC 100
        # lights and stop signs on the route
        for ev in w.events(self.ego_id):      # stop lines the box centre has crossed (what the scorer checks)
            if ev["type"] == "stop_line":
                self.passed.add(int(ev["index"]))
        for s_line, k in r.stops:
            d = s_line - STOP_MARGIN - s_front
            if k in self.passed or d > 60.0:
                continue
            sl = w.town.stop_lines[k]
            if sl.control == CONTROL_LIGHT:
                # not yet across: a red light holds us even when the bumper is past the line already; on
                # yellow we go only when we cannot stop comfortably and will be across well before red
                state = int(w.signal_states[sl.signal])
                to_cross = s_line - (s + p.center_offset)
                hurry = d <= v * v / (2 * 4.0) and to_cross < max(v, 0.1) * 1.5
                if state == scene.TL_RED or (state == scene.TL_YELLOW and not hurry):
                    gaps.append((max(d, 0.05), 0.0, 0.0))
                break
            if d < -0.5:
                continue
            if sl.control == CONTROL_STOP and k not in self.done_stops:
                if self._stop_sign_go(k, d, v):
                    self.done_stops.add(k)
                else:
                    gaps.append((d, 0.0, 0.0))
                break
        # vehicles and pedestrians in the corridor ahead
        gaps.extend(self._corridor(s, s_front, v))
        # lane changes: wait before the change while the target lane is occupied nearby
        for i, m in enumerate(r.maneuvers):
            if m.command not in (CMD_CHANGE_LEFT, CMD_CHANGE_RIGHT) or i in self.committed:
                continue
            if s >= m.s0 - 1.0:
                self.committed.add(i)
                continue
            if m.s0 - s_front < 15.0 and not self._lane_free(m, s):
                gaps.append((m.s0 - s_front + 2.0, 0.0, 0.0))
            break

        acc = self._idm(v, v_free, gaps)
        return self._to_control(acc, v, steer)

    # ------------------------------------------------------------------------------------------
    def _idm(self, v: float, v0: float, gaps: list[tuple[float, float, float]]) -> float:
        free = 1.0 - (max(v, 0.0) / max(v0, 0.1)) ** 4
        inter = 0.0
        for gap, vo, s0 in gaps:
            s_star = S0 + max(0.0, v * T_HEAD + v * (v - vo) / (2 * math.sqrt(A_MAX * B_COMF)))
            # a stop point (s0 = 0) is aimed at 0.5 m short of it, so standing at it still holds the brake
            gap_eff = gap + (S0 - 0.5) if s0 == 0.0 else gap
            inter = max(inter, (s_star / max(gap_eff, 0.05)) ** 2)
        return float(np.clip(A_MAX * (free - inter), -8.0, A_MAX))

    def _to_control(self, acc: float, v: float, steer: float) -> Control:
        p = self.params
        resist = p.rolling + p.drag * v * v
        if acc < 0.0 and v < 0.3:
            return Control(throttle=0.0, steer=steer, brake=1.0)
        if acc + resist > 0.0:
            avail = p.max_accel * max(1.0 - abs(v) / p.top_speed, 0.05)
            return Control(throttle=float(np.clip((acc + resist) / avail, 0.0, 1.0)), steer=steer, brake=0.0)
        return Control(throttle=0.0, steer=steer, brake=float(np.clip(-(acc + resist) / p.max_brake, 0.0, 1.0)))

    def _corridor(self, s: float, s_front: float, v: float) -> list[tuple[float, float, float]]:
        """Nearest vehicle and pedestrian on the route ahead (centre within a radius of a route point)."""
        w, r = self.world, self.route
        horizon = max(25.0, v * v / (2 * B_COMF) + 20.0)
        ss = np.arange(s_front - 1.0, min(s_front + horizon, r.length + 3.0), 1.0)
        if len(ss) == 0:
            return []
        path = r.point_at(ss)
        out = []
        veh = w.vehicles(exclude=self.ego_id)
        if len(veh["xy"]):
            near = np.linalg.norm(veh["xy"] - path[0], axis=1) < horizon + 10.0
            if near.any():
                xy, half_l = veh["xy"][near], veh["size"][near, 0] / 2
                d = np.linalg.norm(xy[:, None, :] - path[None], axis=2)     # [M, K]
                hit = d < 2.0
                hits = np.flatnonzero(hit.any(1))
                if len(hits):
                    k = np.argmax(hit[hits], 1)
                    g = ss[k] - s_front - half_l[hits]
                    j = int(np.argmin(g))
                    vo = veh["speed"][near][hits[j]] * math.cos(veh["yaw"][near][hits[j]] - self.world.egos[
                        self.ego_id].yaw)
                    out.append((float(g[j]), max(float(vo), 0.0), S0))
        ped = w.pedestrians()
        if len(ped["xy"]):
            xy = ped["xy"]
            near = np.linalg.norm(xy - path[0], axis=1) < horizon + 10.0
            if near.any():
                pxy = xy[near]
                # where a moving pedestrian will be in ~1.5 s too
                vel = np.stack([np.cos(ped["yaw"][near]), np.sin(ped["yaw"][near])], 1) * ped["speed"][near, None]
                cand = np.concatenate([pxy, pxy + vel * 0.75, pxy + vel * 1.5])
                d = np.linalg.norm(cand[:, None, :] - path[None], axis=2)
                hit = d < 2.2
                rows = np.flatnonzero(hit.any(1))
                if len(rows):
                    k = np.argmax(hit[rows], 1)
                    g = float(np.min(ss[k] - s_front - 0.5))
                    out.append((g, 0.0, S0))
        return out

    def _stop_sign_go(self, k: int, d: float, v: float) -> bool:
        """Stopped at the line (speed < 0.1 m/s in the stop zone) for 1 s and the junction is ours?"""
        w = self.world
        ego = w.egos[self.ego_id]
        if not (k in ego.stopped_at and abs(v) < 0.1 and d < 4.0):
            self.stopped_since = None
            return False
        if self.stopped_since is None:
            self.stopped_since = w.time_s
        if w.time_s - self.stopped_since < 1.0:
            return False
        node = w.town.stop_lines[k].node
        veh = w.vehicles(exclude=self.ego_id)
        if w.busy_nodes(veh["xy"])[node]:
            return False
        if node in set(w.npcs.node_claims.tolist()):
            return False
        npcs = w.npcs
        if npcs.n:
            e = npcs.elem
            waiting = (npcs.stopped & ~npcs.cleared & (w.town.elem_kind[e] == ELEM_LANE)
                       & (w.town.elem_node[e] == node) & w.town.elem_stop_sign[e])
            my_t = ego.stop_wait[1] if ego.stop_wait is not None else w.time_s
            if np.any(waiting & (npcs.stop_time < my_t)):
                return False
        my_t = ego.stop_wait[1] if ego.stop_wait is not None else w.time_s
        for other in w.egos.values():          # other egos waiting at the same junction since earlier
            if other is not ego and other.stop_wait is not None and other.stop_wait[0] == node \
                    and other.stop_wait[1] < my_t:
                return False
        return True

    def _lane_free(self, m: Any, s: float) -> bool:
        """No vehicle in the target lane (or about to enter it) from 25 m behind to 20 m ahead of the ego."""
        w, r = self.world, self.route
        t = w.town
        e_t = int(r.elem[min(int(np.searchsorted(r.s, m.s1)), len(r.s) - 1)])
        lk = t.links[int(t.elem_link[e_t])]
        a = t.lane_point(lk.id, int(t.elem_lane[e_t]), 0.0)
        u = DIRS[lk.dir]
        veh = w.vehicles(exclude=self.ego_id)
        if len(veh["xy"]) == 0:
            return True
        rel = veh["xy"] - a
        lat = np.abs(rel[:, 0] * u[1] - rel[:, 1] * u[0])
        ego = w.egos[self.ego_id]
        along = (veh["xy"] - ego.center()) @ u
        aligned = np.cos(veh["yaw"] - math.atan2(u[1], u[0])) > 0.7
        return not np.any((lat < 2.2) & (along > -25.0) & (along < 20.0) & aligned)


__all__ = ["ExpertAgent"]
