"""Per-frame labels for an ego on a route (everything in schema.sample_fields except sensors and BEV).

Waypoints are the ego's *actual* future trajectory: `WaypointLabeler` records the rear-axle pose every
tick and fills a frame's 5 waypoints (0.5 s apart, ego frame of that frame) retroactively, 2.5 s later.
Frames in the last 2.5 s of a run have no future: `flush()` drops them by default, or pads with the last
recorded pose (`pad=True`, right for a run that ended stopped at its goal).
"""

from __future__ import annotations

import math
import zlib
from collections import deque
from typing import Any

import numpy as np

from flad_sim import scene
from flad_sim.instructions import (
    CMD_CHANGE_LEFT,
    CMD_CHANGE_RIGHT,
    CMD_FOLLOW,
    NOTICE_NONE,
    NOTICE_PEDESTRIAN,
    NOTICE_RED_LIGHT,
    NOTICE_STOP_SIGN,
    NOTICE_VEHICLE_STOPPED,
    NOTICE_YELLOW_LIGHT,
    instruction_text,
    notice_text,
)
from flad_sim.route import Route
from flad_sim.schema import N_WAYPOINTS, WAYPOINT_DT_S
from flad_sim.towns import CONTROL_STOP

TARGET_MIN_DIST_M = 7.5      # LMDrive/TransFuser route planner: next target once closer than this
TURN_ANNOUNCE_M = 40.0       # turns/straight-through are announced this far ahead
CHANGE_ANNOUNCE_M = 25.0
NOTICE_RANGE_M = 30.0


def to_ego_frame(points: np.ndarray, pose: scene.Pose | tuple[float, float, float]) -> np.ndarray:
    """World xy [N,2] -> ego frame (x forward, y left) of a pose."""
    x, y, yaw = (pose.x, pose.y, pose.yaw) if isinstance(pose, scene.Pose) else pose
    c, s = math.cos(yaw), math.sin(yaw)
    d = np.asarray(points, float) - np.array([x, y])
    return np.stack([d[..., 0] * c + d[..., 1] * s, -d[..., 0] * s + d[..., 1] * c], -1)


class LabelMaker:
    """Current-frame labels (all but waypoints) for one ego on one route."""

    def __init__(self, world: Any, ego_id: int, route: Route) -> None:
        self.world = world
        self.ego_id = ego_id
        self.route = route
        self.sparse = route.sparse_points()
        self._s = 0.0

    def progress(self) -> float:
        e = self.world.egos[self.ego_id]
        s, _ = self.route.project(np.array([e.x, e.y]), self._s, back=5.0, ahead=30.0)
        self._s = max(self._s, s) if abs(s - self._s) < 30 else s
        return self._s

    def _variant(self, key: float) -> int:
        return zlib.crc32(f"{self.route.route_id}/{key:.1f}".encode()) % 3

    def command(self, s: float) -> tuple[int, str]:
        """(command id, instruction text) at route arc length s."""
        r = self.route
        for m in r.maneuvers:
            if m.s1 < s:
                continue
            announce = CHANGE_ANNOUNCE_M if m.command in (CMD_CHANGE_LEFT, CMD_CHANGE_RIGHT) else TURN_ANNOUNCE_M
            if m.s0 <= s:
                return m.command, instruction_text(m.command, None, self._variant(m.s0))
            if m.s0 - s <= announce:
                return m.command, instruction_text(m.command, m.s0 - s, self._variant(m.s0))
            return CMD_FOLLOW, instruction_text(CMD_FOLLOW, m.s0 - s, self._variant(m.s0))
        rest = r.length - s
        return CMD_FOLLOW, instruction_text(CMD_FOLLOW, rest if rest > 5 else None, self._variant(r.length))

    def notice(self, s: float) -> int:
        w = self.world
        tl = w.traffic_light_state_for(self.ego_id, NOTICE_RANGE_M)
        if tl == scene.TL_RED:
            return NOTICE_RED_LIGHT
        if tl == scene.TL_YELLOW:
            return NOTICE_YELLOW_LIGHT
        if w.stop_line_ahead(self.ego_id, NOTICE_RANGE_M, control=CONTROL_STOP) >= 0:
            return NOTICE_STOP_SIGN
        path = self.route.point_at(np.arange(s, min(s + NOTICE_RANGE_M, self.route.length), 2.0))
        if len(path):
            ped = w.pedestrians()
            on = ped["xy"][ped["on_road"]]
            if len(on) and np.min(np.linalg.norm(on[:, None] - path[None], axis=2)) < 4.0:
                return NOTICE_PEDESTRIAN
            veh = w.vehicles(exclude=self.ego_id)
            slow = veh["xy"][np.abs(veh["speed"]) < 0.5]
            if len(slow) and np.min(np.linalg.norm(slow[:, None] - path[None], axis=2)) < 1.8:
                return NOTICE_VEHICLE_STOPPED
        return NOTICE_NONE

    def target_point(self, s: float) -> np.ndarray:
        """Next sparse route point more than 7.5 m ahead, ego frame (the goal once none is left)."""
        ahead = self.sparse[self.sparse > s + TARGET_MIN_DIST_M]
        ts = ahead[0] if len(ahead) else self.route.length
        e = self.world.egos[self.ego_id]
        return to_ego_frame(self.route.point_at(ts)[None], (e.x, e.y, e.yaw))[0].astype(np.float32)

    def current(self, s: float | None = None) -> dict[str, Any]:
        """Labels of the current frame (no waypoints: those need the future, see WaypointLabeler)."""
        if s is None:
            s = self.progress()
        st = self.world.ego_state(self.ego_id)
        cmd, text = self.command(s)
        return {
            "tl_state": np.int64(self.world.traffic_light_state_for(self.ego_id)),
            "speed": np.float32(st.speed),
            "target_point": self.target_point(s),
            "command": np.int64(cmd),
            "gnss": np.array([st.lat, st.lon, st.alt], np.float32),
            "yaw_rate": np.float32(st.yaw_rate),
            "town": np.int64(self.world.town.index),
            "instruction": text,
            "notice": notice_text(self.notice(s)),
            "route_s": float(s),
        }


class WaypointLabeler:
    """Retroactive waypoint labels from the recorded trajectory (see module docstring)."""

    def __init__(self, dt: float = 0.05, n: int = N_WAYPOINTS, spacing_s: float = WAYPOINT_DT_S) -> None:
        self.stride = int(round(spacing_s / dt))
        self.n = n
        self.horizon = self.stride * n
        self._poses: deque[tuple[float, float, float]] = deque()
        self._items: deque[Any] = deque()

    def push(self, pose: tuple[float, float, float], item: Any = None) -> list[tuple[Any, np.ndarray]]:
        """Record this tick's pose (x, y, yaw of the rear axle) and its frame; returns frames now complete."""
        self._poses.append(tuple(float(v) for v in pose))
        self._items.append(item)
        out = []
        while len(self._poses) > self.horizon:
            out.append((self._items[0], self._waypoints(self.horizon)))
            self._poses.popleft()
            self._items.popleft()
        return out

    def _waypoints(self, available: int) -> np.ndarray:
        p0 = self._poses[0]
        idx = [min((i + 1) * self.stride, available) for i in range(self.n)]
        pts = np.array([self._poses[k][:2] for k in idx])
        return to_ego_frame(pts, p0).astype(np.float32)

    def flush(self, pad: bool = False) -> list[tuple[Any, np.ndarray]]:
        """Frames without a full future: dropped (default) or padded with the last pose."""
        out = []
        while self._poses:
            if pad:
                out.append((self._items[0], self._waypoints(len(self._poses) - 1)))
            self._poses.popleft()
            self._items.popleft()
        return out


def future_waypoints(poses: np.ndarray, i: int, dt: float = 0.05, n: int = N_WAYPOINTS,
                     spacing_s: float = WAYPOINT_DT_S) -> np.ndarray:
    """Waypoints of frame i from a whole recorded trajectory poses[T, 3] (clamped at the end)."""
    stride = int(round(spacing_s / dt))
    idx = np.minimum(i + stride * np.arange(1, n + 1), len(poses) - 1)
    return to_ego_frame(poses[idx, :2], tuple(poses[i])).astype(np.float32)
