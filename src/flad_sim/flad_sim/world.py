"""The embedded driving world: a town, NPC traffic, pedestrians and ego vehicles stepped at 20 Hz.

Everything is seeded: the same (town, seed, spawns, controls) gives bit-identical states. The world
also detects what the leaderboard scores (collisions, stop-line crossings at lights and stop signs)
and reports them per ego as *events* of the last tick; `flad_sim.metrics` turns events into infractions.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flad_sim import scene
from flad_sim.actors import PED_SIZE, NpcVehicles, Pedestrians
from flad_sim.physics import DT, Control, VehicleParams, bicycle_step, obb_overlap, wrap_angle
from flad_sim.towns import CONTROL_LIGHT, CONTROL_STOP, SIDEWALK_WIDTH_M, Town, build_town, town_config

log = logging.getLogger(__name__)

#: geo reference for GNSS (CARLA's towns use lat/lon 0, 0 at the map origin)
GEO_ORIGIN = (0.0, 0.0, 0.0)
EARTH_RADIUS_M = 6378137.0
EGO_COLOR = (20, 90, 200)
NPC_ID0 = 1
PED_ID0 = 5000
SCRIPTED_ID0 = 7000
EGO_ID0 = 9000
STOP_ZONE_M = (-1.0, 12.0)      # ego centre this far before a stop line counts as "at" it


@dataclass
class EgoState:
    """What an ego's own sensors (odometry, speedometer, IMU, GNSS) would report."""

    actor_id: int
    time_s: float
    x: float
    y: float
    z: float
    yaw: float
    speed: float          # signed, m/s (negative when reversing)
    yaw_rate: float       # rad/s
    accel: float          # m/s^2 along the heading
    steer_angle: float    # front-wheel angle, rad (CCW positive)
    lat: float
    lon: float
    alt: float

    @property
    def pose(self) -> scene.Pose:
        return scene.Pose(self.x, self.y, self.yaw, self.z)


@dataclass
class _Ego:
    actor_id: int
    params: VehicleParams
    x: float
    y: float
    yaw: float
    v: float = 0.0
    yaw_rate: float = 0.0
    accel: float = 0.0
    steer_angle: float = 0.0
    events: list[dict[str, Any]] = field(default_factory=list)
    stopped_at: set[int] = field(default_factory=set)          # stop-sign lines it has stopped at
    stop_wait: tuple[int, float] | None = None                  # (node, time) waiting at a stop sign
    route: Any = None

    def center(self) -> np.ndarray:
        off = self.params.center_offset
        return np.array([self.x + off * math.cos(self.yaw), self.y + off * math.sin(self.yaw)])


def gnss_from_xy(x: float, y: float, z: float = 0.0) -> tuple[float, float, float]:
    """World metres -> (lat, lon, alt) degrees about GEO_ORIGIN (equirectangular, fine at town scale)."""
    lat0, lon0, alt0 = GEO_ORIGIN
    lat = lat0 + math.degrees(y / EARTH_RADIUS_M)
    lon = lon0 + math.degrees(x / (EARTH_RADIUS_M * math.cos(math.radians(lat0))))
    return lat, lon, alt0 + z


@dataclass
class WorldConfig:
    """A world as configured from YAML/JSON (load with flad_core.config.from_dict(WorldConfig, data))."""

    town: str = "Town01"
    seed: int = 0
    n_vehicles: int | None = None       # None: the town's default density
    n_pedestrians: int | None = None
    trace_every: int = 0                # record vehicle positions every N ticks (0: off)

    def validate(self) -> None:
        try:
            town_config(self.town)
        except KeyError as exc:
            raise ValueError(str(exc).strip("'\"")) from exc
        for name in ("n_vehicles", "n_pedestrians"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        if self.trace_every < 0:
            raise ValueError("trace_every must be >= 0")


class World:
    """A seeded town with traffic. `step()` advances 0.05 s."""

    @classmethod
    def from_config(cls, cfg: WorldConfig) -> World:
        return cls(cfg.town, seed=cfg.seed, n_vehicles=cfg.n_vehicles, n_pedestrians=cfg.n_pedestrians,
                   trace_every=cfg.trace_every)

    def __init__(self, town: str | int | Town, seed: int = 0, n_vehicles: int | None = None,
                 n_pedestrians: int | None = None, trace_every: int = 0, dt: float = DT) -> None:
        self.town = town if isinstance(town, Town) else build_town(town)
        self.seed = int(seed)
        self.dt = dt
        self.rng = np.random.default_rng([self.seed, self.town.index])
        cfg = self.town.cfg
        nv = cfg.n_vehicles if n_vehicles is None else int(n_vehicles)
        npd = cfg.n_pedestrians if n_pedestrians is None else int(n_pedestrians)
        self.npcs = NpcVehicles(self.town, nv, np.random.default_rng([self.seed, self.town.index, 1]),
                                cfg.speed_limit)
        self.peds = Pedestrians(self.town, npd, np.random.default_rng([self.seed, self.town.index, 2]))
        self.egos: dict[int, _Ego] = {}
        self.tick = 0
        self.time_s = 0.0
        self.trace_every = int(trace_every)
        self._trace: list[np.ndarray] = []
        # scripted actors (tests, scenarios): stationary vehicles and pedestrians
        self._sv_xy = np.zeros((0, 2))
        self._sv_yaw = np.zeros(0)
        self._sv_size = np.zeros((0, 3))
        self._sv_id = np.zeros(0, np.int64)
        self._sp_xy = np.zeros((0, 2))
        self._sp_id = np.zeros(0, np.int64)
        sb = self.town.static_boxes
        idx = self.town.solid_idx
        self._st_xy = sb.center[idx, :2].astype(np.float64)
        self._st_half = sb.size[idx, :2].astype(np.float64) / 2
        self._st_yaw = sb.yaw[idx].astype(np.float64)
        self._st_kind = sb.kind[idx]
        self._st_r = np.linalg.norm(self._st_half, axis=1)
        self._st_id = (-1 - idx).astype(np.int64)          # scenery collisions report -1 - static box index
        self._extra_static: list[tuple[float, float, float, tuple[float, float, float]]] = []
        self._stop_mid = (self.town.stop_p0 + self.town.stop_p1) / 2 if len(self.town.stop_lines) else np.zeros((0, 2))
        self._stop_span = self.town.stop_p1 - self.town.stop_p0
        self._stop_span2 = np.maximum((self._stop_span ** 2).sum(1), 1e-9)
        self._sig = self.town.signal_states(0.0)
        self._dyn_cache: tuple[int, scene.Boxes] | None = None
        self._veh_cache: tuple[int, dict[str, np.ndarray]] | None = None
        self._static_cache: tuple[int, scene.Boxes] | None = None
        if self.trace_every:
            self._record_trace()

    # --------------------------------------------------------------------------------- spawning
    def spawn_ego(self, start: Any, params: VehicleParams | None = None) -> int:
        """Place an ego at a route's start (anything with `.start_pose()`), a scene.Pose or (x, y, yaw).

        NPCs within 25 m are moved elsewhere so the ego starts in free space. Returns the ego's actor id.
        """
        route = None
        if hasattr(start, "start_pose"):
            route = start
            pose = start.start_pose()
            x, y, yaw = pose.x, pose.y, pose.yaw
        elif isinstance(start, scene.Pose):
            x, y, yaw = start.x, start.y, start.yaw
        else:
            x, y, yaw = (float(v) for v in start)
        ego_id = EGO_ID0 + len(self.egos)
        ego = _Ego(ego_id, params or VehicleParams(), float(x), float(y), float(yaw), route=route)
        self.egos[ego_id] = ego
        c = ego.center()
        for k in range(self.npcs.n):
            if np.linalg.norm(self.npcs.xy[k] - c) < 25.0:
                self.npcs.relocate(k, c)
        if len(self.peds.xy):
            # keep the spawn point clear of pedestrians standing on the road
            near = np.linalg.norm(self.peds.xy - c, axis=1) < 6.0
            for k in np.flatnonzero(near & self.peds.on_road):
                self.peds.mode[k] = 0
                self.peds.xy[k] = self.peds.target[k]
        self._dyn_cache = None
        self._veh_cache = None
        return ego_id

    def add_vehicle(self, x: float, y: float, yaw: float, size: tuple[float, float, float] = (4.6, 1.9, 1.5)) -> int:
        """A stationary (stalled/parked-in-lane) vehicle, for scripted scenarios; returns its actor id."""
        aid = SCRIPTED_ID0 + len(self._sv_id) + len(self._sp_id)
        self._sv_xy = np.vstack([self._sv_xy, [x, y]])
        self._sv_yaw = np.append(self._sv_yaw, yaw)
        self._sv_size = np.vstack([self._sv_size, size])
        self._sv_id = np.append(self._sv_id, aid)
        self._dyn_cache = None
        self._veh_cache = None
        return aid

    def add_static_obstacle(self, x: float, y: float, yaw: float = 0.0,
                            size: tuple[float, float, float] = (0.6, 3.0, 1.0)) -> int:
        """A static obstacle (road-works barrier) anywhere, e.g. in a lane; returns its box index (< 0 id)."""
        k = len(self._extra_static)
        self._extra_static.append((x, y, yaw, size))
        self._st_xy = np.vstack([self._st_xy, [x, y]])
        self._st_half = np.vstack([self._st_half, [size[0] / 2, size[1] / 2]])
        self._st_yaw = np.append(self._st_yaw, yaw)
        self._st_kind = np.append(self._st_kind, scene.BOX_STATIC).astype(np.uint8)
        self._st_r = np.linalg.norm(self._st_half, axis=1)
        self._st_id = np.append(self._st_id, -100000 - k)
        self._static_cache = None
        return int(self._st_id[-1])

    def add_pedestrian(self, x: float, y: float) -> int:
        """A stationary pedestrian, for scripted scenarios; returns its actor id."""
        aid = SCRIPTED_ID0 + len(self._sv_id) + len(self._sp_id)
        self._sp_xy = np.vstack([self._sp_xy, [x, y]])
        self._sp_id = np.append(self._sp_id, aid)
        self._dyn_cache = None
        return aid

    # -------------------------------------------------------------------------------- snapshots
    def vehicles(self, exclude: int | None = None) -> dict[str, np.ndarray]:
        """All vehicles now: actor_id, xy (box centre), yaw, speed, size [N,3] (NPCs, scripted, egos)."""
        if self._veh_cache is None or self._veh_cache[0] != self.tick:
            self._veh_cache = (self.tick, self._compute_vehicles())
        veh = self._veh_cache[1]
        if exclude is None:
            return veh
        keep = veh["actor_id"] != exclude
        return {k: v[keep] for k, v in veh.items()}

    def _compute_vehicles(self) -> dict[str, np.ndarray]:
        ego_ids = list(self.egos)
        egos = [self.egos[e] for e in ego_ids]
        n = self.npcs
        ids = np.concatenate([np.arange(NPC_ID0, NPC_ID0 + n.n), self._sv_id, np.array(ego_ids, np.int64)])
        xy = np.concatenate([n.xy, self._sv_xy, np.array([e.center() for e in egos]).reshape(-1, 2)])
        yaw = np.concatenate([n.yaw, self._sv_yaw, np.array([e.yaw for e in egos])])
        v = np.concatenate([n.v, np.zeros(len(self._sv_id)), np.array([e.v for e in egos])])
        size = np.concatenate([np.stack([n.length, n.width, n.height], 1).reshape(-1, 3), self._sv_size,
                               np.array([(e.params.length, e.params.width, e.params.height) for e in egos]
                                        ).reshape(-1, 3)])
        return {"actor_id": ids.astype(np.int64), "xy": xy, "yaw": yaw, "speed": v, "size": size}

    def pedestrians(self) -> dict[str, np.ndarray]:
        """All pedestrians now: actor_id, xy, yaw, speed, on_road."""
        p = self.peds
        ids = np.concatenate([np.arange(PED_ID0, PED_ID0 + p.n), self._sp_id]).astype(np.int64)
        return {"actor_id": ids, "xy": np.concatenate([p.xy, self._sp_xy]),
                "yaw": np.concatenate([p.yaw, np.zeros(len(self._sp_id))]),
                "speed": np.concatenate([p.v, np.zeros(len(self._sp_id))]),
                "on_road": np.concatenate([p.on_road, np.ones(len(self._sp_id), bool)])}

    @property
    def signal_states(self) -> np.ndarray:
        """Current scene.TL_* per signal (see Town.stop_lines[i].signal)."""
        return self._sig

    # ------------------------------------------------------------------------------------- step
    def step(self, controls: dict[int, Control] | None = None) -> None:
        """Advance the world by dt; egos without a control get full brake."""
        controls = controls or {}
        unknown = set(controls) - set(self.egos)
        if unknown:
            raise KeyError(f"controls for unknown ego ids {sorted(unknown)}; egos are {sorted(self.egos)}")
        town = self.town
        dt = self.dt
        veh = self.vehicles()
        ped = self.pedestrians()
        n_npc = self.npcs.n
        obst_xy = np.concatenate([veh["xy"], ped["xy"]])
        obst_half = np.concatenate([veh["size"][:, 0] / 2, np.full(len(ped["xy"]), 0.25)])
        obst_v = np.concatenate([veh["speed"], ped["speed"]])
        obst_yaw = np.concatenate([veh["yaw"], ped["yaw"]])
        busy = self.busy_nodes(veh["xy"])
        waiting = [e.stop_wait for e in self.egos.values() if e.stop_wait is not None]
        self.npcs.step(dt, self.time_s, self._sig, obst_xy, obst_half, obst_v, obst_yaw, n_npc, waiting, busy)
        mid = self._compute_vehicles()      # NPCs moved, egos not yet
        for ego_id, ego in self.egos.items():
            self._step_ego(ego, (controls.get(ego_id) or Control(brake=1.0)).clipped(), mid, ped)
        blocks = (mid["actor_id"] >= EGO_ID0) | (np.abs(mid["speed"]) > 0.3)
        self.peds.step(dt, mid["xy"], mid["yaw"], mid["size"][:, :2] / 2, blocks)
        self.tick += 1
        self.time_s = self.tick * dt
        self._sig = town.signal_states(self.time_s)
        self._dyn_cache = None
        self._veh_cache = None
        if self.trace_every and self.tick % self.trace_every == 0:
            self._record_trace()

    def busy_nodes(self, xy: np.ndarray, margin: float = SIDEWALK_WIDTH_M + 2.0) -> np.ndarray:
        """Per node: is any of the given vehicle centres inside its junction box (+ margin: crosswalks and
        the first metres past the stop lines, so a vehicle that has just left its stop line counts)?"""
        town = self.town
        busy = np.zeros(len(town.node_xy), bool)
        if len(xy) == 0:
            return busy
        i = np.minimum(np.maximum(np.searchsorted(town.xs, xy[:, 0]), 1), len(town.xs) - 1)
        i = np.where(np.abs(xy[:, 0] - town.xs[i - 1]) < np.abs(xy[:, 0] - town.xs[i]), i - 1, i)
        j = np.minimum(np.maximum(np.searchsorted(town.ys, xy[:, 1]), 1), len(town.ys) - 1)
        j = np.where(np.abs(xy[:, 1] - town.ys[j - 1]) < np.abs(xy[:, 1] - town.ys[j]), j - 1, j)
        inside = ((np.abs(xy[:, 0] - town.xs[i]) <= town.hw_col[i] + margin)
                  & (np.abs(xy[:, 1] - town.ys[j]) <= town.hw_row[j] + margin))
        busy[(j * town.cfg.nx + i)[inside]] = True
        return busy

    def _step_ego(self, ego: _Ego, c: Control, veh_all: dict[str, np.ndarray], ped: dict[str, np.ndarray]) -> None:
        p = ego.params
        ego.events = []
        x0, y0, yaw0, c0 = ego.x, ego.y, ego.yaw, ego.center()
        out = bicycle_step(np.array(ego.x), np.array(ego.y), np.array(ego.yaw), np.array(ego.v),
                           np.array(c.throttle), np.array(c.steer), np.array(c.brake), np.array(c.hand_brake),
                           np.array(c.reverse), p, self.dt)
        ego.x, ego.y, ego.yaw, ego.v, ego.yaw_rate, ego.accel = (float(v) for v in out)
        ego.steer_angle = c.steer * -math.radians(p.max_steer_deg)
        c1 = ego.center()
        half = np.array([p.length / 2, p.width / 2])
        r = float(np.linalg.norm(half))
        if self._ego_collisions(ego, c1, half, r, veh_all, ped):
            # buildings, poles and obstacles do not yield: undo the move and stop
            ego.x, ego.y, ego.yaw, ego.v, ego.yaw_rate = x0, y0, yaw0, 0.0, 0.0
            c1 = ego.center()
        if len(self.town.stop_lines):
            self._ego_stop_lines(ego, c0, c1)

    def _ego_collisions(self, ego: _Ego, c1: np.ndarray, half: np.ndarray, r: float, veh_all: dict[str, np.ndarray],
                        ped: dict[str, np.ndarray]) -> bool:
        """Collision events of the ego's box at `c1` with static boxes, other vehicles and pedestrians (in that
        order); True if it hit something static (which blocks the move)."""
        blocked = False
        dst = self._st_xy - c1
        near = np.flatnonzero(np.sqrt(dst[:, 0] ** 2 + dst[:, 1] ** 2) < self._st_r + r)
        if len(near):
            hit = near[obb_overlap(c1, ego.yaw, half, self._st_xy[near], self._st_yaw[near], self._st_half[near])]
            for k in hit:
                ego.events.append({"type": "collision", "actor_id": int(self._st_id[k]),
                                   "kind": int(self._st_kind[k]), "x": float(c1[0]), "y": float(c1[1]),
                                   "t": self.time_s + self.dt})
            blocked = len(hit) > 0
        keep = veh_all["actor_id"] != ego.actor_id
        veh = {k: v[keep] for k, v in veh_all.items()}
        reach = np.linalg.norm(veh["size"][:, :2], axis=1) / 2 + r
        near = np.flatnonzero(np.linalg.norm(veh["xy"] - c1, axis=1) < reach)
        if len(near):
            hit = near[obb_overlap(c1, ego.yaw, half, veh["xy"][near], veh["yaw"][near], veh["size"][near, :2] / 2)]
            for k in hit:
                ego.events.append({"type": "collision", "actor_id": int(veh["actor_id"][k]), "kind": scene.BOX_VEHICLE,
                                   "x": float(c1[0]), "y": float(c1[1]), "t": self.time_s + self.dt})
        near = np.flatnonzero(np.linalg.norm(ped["xy"] - c1, axis=1) < r + 0.4)
        if len(near):
            hit = near[obb_overlap(c1, ego.yaw, half, ped["xy"][near], ped["yaw"][near],
                                   np.tile([PED_SIZE[0] / 2, PED_SIZE[1] / 2], (len(near), 1)))]
            for k in hit:
                ego.events.append({"type": "collision", "actor_id": int(ped["actor_id"][k]),
                                   "kind": scene.BOX_PEDESTRIAN, "x": float(c1[0]), "y": float(c1[1]),
                                   "t": self.time_s + self.dt})
        return blocked

    def _ego_stop_lines(self, ego: _Ego, c0: np.ndarray, c1: np.ndarray) -> None:
        """Stop-line events for the ego's move c0 -> c1 this tick; a stop sign's line counts as stopped at once
        the ego stands still in its zone."""
        town = self.town
        move = c1 - c0
        dm = self._stop_mid - c1
        cand = np.flatnonzero(dm[:, 0] ** 2 + dm[:, 1] ** 2 < 15.0 ** 2)
        if move @ move > 0 and len(cand):
            p0, p1 = town.stop_p0[cand], town.stop_p1[cand]
            crossed = _segments_intersect(c0, c1, p0, p1) & (town.stop_heading[cand] @ move > 0)
            for k in cand[crossed]:
                ctrl = int(town.stop_control[k])
                state = int(self._sig[town.stop_signal[k]]) if ctrl == CONTROL_LIGHT else scene.TL_NONE
                ego.events.append({"type": "stop_line", "index": int(k), "control": ctrl, "state": state,
                                   "stopped": int(k) in ego.stopped_at, "node": int(town.stop_lines[k].node),
                                   "x": float(c1[0]), "y": float(c1[1]), "t": self.time_s + self.dt})
                ego.stopped_at.discard(int(k))
                if ego.stop_wait is not None and ego.stop_wait[0] == town.stop_lines[k].node:
                    ego.stop_wait = None
        if abs(ego.v) < 0.1:
            for k in self._stop_lines_near(c1, ego.yaw, control=CONTROL_STOP):
                if k not in ego.stopped_at:
                    ego.stopped_at.add(k)
                    if ego.stop_wait is None:
                        ego.stop_wait = (int(town.stop_lines[k].node), self.time_s + self.dt)

    def _stop_lines_near(self, c: np.ndarray, yaw: float, control: int | None = None,
                         zone: tuple[float, float] = STOP_ZONE_M) -> list[int]:
        """Stop lines whose approach zone contains point c, for a vehicle heading `yaw`."""
        town = self.town
        if len(town.stop_lines) == 0:
            return []
        mid, hd, p0 = self._stop_mid, town.stop_heading, town.stop_p0
        along = (mid[:, 0] - c[0]) * hd[:, 0] + (mid[:, 1] - c[1]) * hd[:, 1]    # distance to the line ahead
        span = self._stop_span
        t = ((c[0] - p0[:, 0]) * span[:, 0] + (c[1] - p0[:, 1]) * span[:, 1]) / self._stop_span2
        heading_ok = hd[:, 0] * math.cos(yaw) + hd[:, 1] * math.sin(yaw) > 0.7
        ok = (along >= zone[0]) & (along <= zone[1]) & (t > -0.1) & (t < 1.1) & heading_ok
        if control is not None:
            ok &= town.stop_control == control
        return [int(k) for k in np.flatnonzero(ok)]

    # ------------------------------------------------------------------------------------ views
    def _dynamic_boxes(self) -> scene.Boxes:
        if self._dyn_cache is not None and self._dyn_cache[0] == self.tick:
            return self._dyn_cache[1]
        veh = self.vehicles()
        ped = self.pedestrians()
        nv, npd = len(veh["actor_id"]), len(ped["actor_id"])
        colors = np.concatenate([self.npcs.color, np.tile(np.array([[90, 90, 90]], np.uint8), (len(self._sv_id), 1)),
                                 np.tile(np.array([EGO_COLOR], np.uint8), (len(self.egos), 1)),
                                 self.peds.color, np.tile(np.array([[200, 60, 160]], np.uint8), (len(self._sp_id), 1))])
        center = np.concatenate([np.column_stack([veh["xy"], np.zeros(nv)]),
                                 np.column_stack([ped["xy"], np.zeros(npd)])])
        size = np.concatenate([veh["size"], np.tile(np.array([PED_SIZE]), (npd, 1))])
        boxes = scene.Boxes(center.astype(np.float32), size.astype(np.float32),
                            np.concatenate([veh["yaw"], ped["yaw"]]).astype(np.float32),
                            np.concatenate([np.full(nv, scene.BOX_VEHICLE), np.full(npd, scene.BOX_PEDESTRIAN)]
                                           ).astype(np.uint8),
                            colors.astype(np.uint8),
                            np.concatenate([veh["actor_id"], ped["actor_id"]]).astype(np.int32))
        self._dyn_cache = (self.tick, boxes)
        return boxes

    def static_boxes(self) -> scene.Boxes:
        """Scenery with traffic-light heads coloured by the current state (cached per tick)."""
        if self._static_cache is None or self._static_cache[0] != self.tick:
            boxes = self.town.boxes_at(self.time_s)
            if self._extra_static:
                ex = self._extra_static
                boxes = scene.Boxes.concat([boxes, scene.Boxes(
                    np.array([(x, y, 0.0) for x, y, _, _ in ex], np.float32),
                    np.array([sz for _, _, _, sz in ex], np.float32), np.array([yw for _, _, yw, _ in ex], np.float32),
                    np.full(len(ex), scene.BOX_STATIC, np.uint8), np.tile(np.array([[250, 120, 0]], np.uint8),
                                                                          (len(ex), 1)),
                    np.full(len(ex), -1, np.int32))])
            self._static_cache = (self.tick, boxes)
        return self._static_cache[1]

    def scene_view(self, ego_id: int) -> scene.SceneView:
        """Everything the ego's sensors may see now; the ego's own box is excluded."""
        ego = self.egos[ego_id]
        dyn = self._dynamic_boxes()
        keep = dyn.actor_id != ego_id
        mine = scene.Boxes(dyn.center[keep], dyn.size[keep], dyn.yaw[keep], dyn.kind[keep], dyn.color[keep],
                           dyn.actor_id[keep])
        return scene.SceneView(ground=self.town.ground, boxes=scene.Boxes.concat([self.static_boxes(), mine]),
                               weather=self.town.weather, ego=scene.Pose(ego.x, ego.y, ego.yaw, 0.0),
                               ego_actor_id=ego_id, time_s=self.time_s,
                               extras={"town": self.town.name, "town_index": self.town.index,
                                       "tl_state": self.traffic_light_state_for(ego_id)})

    def ego_state(self, ego_id: int) -> EgoState:
        e = self.egos[ego_id]
        lat, lon, alt = gnss_from_xy(e.x, e.y, 0.0)
        return EgoState(ego_id, self.time_s, e.x, e.y, 0.0, e.yaw, e.v, e.yaw_rate, e.accel, e.steer_angle,
                        lat, lon, alt)

    def events(self, ego_id: int) -> list[dict[str, Any]]:
        """Collisions and stop-line crossings of the ego during the last tick."""
        return list(self.egos[ego_id].events)

    def stop_line_ahead(self, ego_id: int, lookahead: float = 35.0, control: int | None = None) -> int:
        """Index of the nearest stop line governing the ego's lane within `lookahead` m ahead, else -1."""
        e = self.egos[ego_id]
        c = e.center()
        cand = self._stop_lines_near(c, e.yaw, control=control, zone=(0.0, lookahead))
        if not cand:
            return -1
        town = self.town
        mid = (town.stop_p0[cand] + town.stop_p1[cand]) / 2
        along = np.sum((mid - c) * town.stop_heading[cand], 1)
        return int(cand[int(np.argmin(along))])

    def traffic_light_state_for(self, ego_id: int, lookahead: float = 35.0) -> int:
        """scene.TL_* of the light governing the ego's lane within `lookahead` m, else TL_NONE."""
        k = self.stop_line_ahead(ego_id, lookahead, control=CONTROL_LIGHT)
        return scene.TL_NONE if k < 0 else int(self._sig[self.town.stop_signal[k]])

    # ------------------------------------------------------------------------------------ trace
    def _record_trace(self) -> None:
        veh = self.vehicles()
        n = len(veh["actor_id"])
        self._trace.append(np.column_stack([np.full(n, self.time_s), veh["actor_id"].astype(np.float64), veh["xy"]]))

    def trace(self) -> np.ndarray:
        """Recorded vehicle positions as float64 rows (time_s, actor_id, x, y); needs trace_every > 0."""
        if not self._trace:
            return np.zeros((0, 4))
        return np.concatenate(self._trace)


def trace_tracks(trace: np.ndarray) -> dict[int, np.ndarray]:
    """Split World.trace() rows into per-actor tracks: actor_id -> float64 [T, 3] (time_s, x, y)."""
    out: dict[int, np.ndarray] = {}
    if len(trace) == 0:
        return out
    ids = trace[:, 1].astype(np.int64)
    order = np.lexsort((trace[:, 0], ids))
    ids_sorted = ids[order]
    starts = np.flatnonzero(np.concatenate([[True], np.diff(ids_sorted) != 0]))
    for a, b in zip(starts, np.append(starts[1:], len(order)), strict=True):
        out[int(ids_sorted[a])] = trace[order[a:b]][:, [0, 2, 3]]
    return out


def _segments_intersect(a: np.ndarray, b: np.ndarray, P0: np.ndarray, P1: np.ndarray) -> np.ndarray:
    """Does segment a-b cross each segment P0[i]-P1[i]? (vectorised, proper or touching)"""
    def orient(p: np.ndarray, q: np.ndarray, r: np.ndarray) -> np.ndarray:
        return (q[..., 0] - p[..., 0]) * (r[..., 1] - p[..., 1]) - (q[..., 1] - p[..., 1]) * (r[..., 0] - p[..., 0])
    o1 = orient(a, b, P0)
    o2 = orient(a, b, P1)
    o3 = orient(P0, P1, a)
    o4 = orient(P0, P1, b)
    return (o1 * o2 <= 0) & ((o3 * o4 < 0) | ((o4 == 0) & (o3 != 0)))


__all__ = ["DT", "GEO_ORIGIN", "Control", "EgoState", "World", "WorldConfig", "gnss_from_xy", "trace_tracks",
           "wrap_angle"]
