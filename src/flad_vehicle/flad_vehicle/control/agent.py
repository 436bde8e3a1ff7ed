"""Closed-loop driving agents for the embedded world: sensors → encoder → waypoints → LMDrive PID → control.

`WaypointAgent` renders the sensor rig, runs the vision encoder and asks a waypoint source (the edge's
waypoint service, a local AD-LLM/ADM, or the encoder's own waypoint head) for 5 waypoints every
`plan_every` ticks; between plans the last trajectory is carried forward by odometry (re-sampled at the
elapsed time and moved into the current ego frame), and `LMDriveController` gets them every tick (LMDrive's
run_step: full brake for the first 20 ticks, the PID on every other tick with the last command repeated in
between, steer × 0.8; `PIDConfig` switches each off). Non-privileged: it uses
the sensors, the ego's odometry/speed and the route's navigation labels (target point, instruction,
notice), never the world. `ConstantWaypointAgent` is the blind baseline (one fixed trajectory).

Creeping (after TransFuser's stuck detector): imitation-learned planners stop at stop signs and queues but
cannot tell how long they have waited, so they may never restart. After `stuck_after_s` at standstill, if
the LiDAR sees nothing in a box in front of the car, the agent follows the route's target point at
`creep_speed` for `creep_s` (re-armed after only `rearm_s` while it keeps stalling within 10 s of the last
creep, so a planner stuck on a stale "stop" can still get through). It is a controller rule, identical for
every learned agent (`stuck_after_s=0` disables it).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from flad_core.device import to_device
from flad_sim.physics import Control
from flad_vehicle.control.pid import LMDriveController, PIDConfig

log = logging.getLogger(__name__)

#: (features [T, D], instruction, notice, target point [2] in the ego frame) → waypoints [5, 2] in the ego frame
WaypointSource = Callable[[torch.Tensor, str, str, np.ndarray], np.ndarray]

WAYPOINT_DT_S = 0.5


def lazy_sensor_observer(rig: Any = None) -> Callable[[Any, int], dict[str, Any]]:
    """An `observe` for RouteRunner that renders only when the agent asks (`obs["sensors"]()`), so an agent
    that plans at a lower rate than the world ticks does not pay for frames it ignores."""
    from flad_sim.sensors import SensorRig

    rig = rig or SensorRig()

    def observe(world: Any, ego_id: int) -> dict[str, Any]:
        return {"sensors": lambda: rig.observe(world.scene_view(ego_id), world.ego_state(ego_id))}

    return observe


def resample(waypoints: np.ndarray, elapsed_s: float, dt: float = WAYPOINT_DT_S) -> np.ndarray:
    """Waypoints planned `elapsed_s` ago (plan-time ego frame, t = dt·k) re-sampled at elapsed + dt·k,
    linearly inter-/extrapolated along the trajectory that starts at the plan-time origin."""
    wp = np.asarray(waypoints, np.float64).reshape(-1, 2)
    pts = np.vstack([[0.0, 0.0], wp])
    ts = np.arange(len(pts)) * dt
    want = elapsed_s + np.arange(1, len(wp) + 1) * dt
    out = np.empty_like(wp)
    for i, t in enumerate(want):
        k = int(min(max(np.searchsorted(ts, t) - 1, 0), len(pts) - 2))
        f = (t - ts[k]) / dt
        out[i] = pts[k] + f * (pts[k + 1] - pts[k])
    return out


def to_frame(points: np.ndarray, from_pose: tuple[float, float, float], to_pose: tuple[float, float, float]
             ) -> np.ndarray:
    """Ego-frame points of pose `from_pose` → ego frame of `to_pose` (poses: x, y, yaw in the world)."""
    x0, y0, a0 = from_pose
    x1, y1, a1 = to_pose
    c0, s0 = math.cos(a0), math.sin(a0)
    wx = x0 + c0 * points[:, 0] - s0 * points[:, 1]
    wy = y0 + s0 * points[:, 0] + c0 * points[:, 1]
    dx, dy = wx - x1, wy - y1
    c1, s1 = math.cos(a1), math.sin(a1)
    return np.stack([c1 * dx + s1 * dy, -s1 * dx + c1 * dy], axis=1)


class WaypointAgent:
    """Encoder + waypoint source + PID (see the module docstring). `source=None`: the encoder's own head."""

    def __init__(self, encoder: Any, source: WaypointSource | None = None, pid: PIDConfig | None = None,
                 plan_every: int = 10, name: str = "agent", stuck_after_s: float = 10.0, creep_s: float = 2.0,
                 creep_speed: float = 2.0, rearm_s: float = 1.0) -> None:
        self.encoder = encoder.eval()
        self.creep = CreepRule(stuck_after_s, creep_s, creep_speed, rearm_s)
        self.source = source
        self.pid = LMDriveController(pid)
        self.plan_every = max(1, plan_every)
        self.name = name
        self.plan_times: list[float] = []

    def reset(self, route_info: Any) -> None:
        self.pid.reset()
        self.tick = 0
        self.plan: np.ndarray | None = None
        self.plan_pose = (0.0, 0.0, 0.0)
        self.plan_t = 0.0
        self.creep.reset()
        self.front_clear = True

    @torch.no_grad()
    def _replan(self, obs: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        sensors = obs["sensors"]() if callable(obs.get("sensors")) else obs
        labels = obs.get("labels", {})
        batch: dict[str, torch.Tensor] = {}
        for name in self.encoder.sensor_inputs:
            batch[name] = torch.from_numpy(np.ascontiguousarray(sensors[name]))[None]
        ego = obs["ego"]
        batch["speed"] = torch.tensor([float(ego.speed)], dtype=torch.float32)
        tp = labels.get("target_point", np.array([10.0, 0.0], np.float32))
        batch["target_point"] = torch.from_numpy(np.asarray(tp, np.float32).reshape(1, 2))
        self.front_clear = front_box_clear(sensors.get("lidar"))
        out = self.encoder(to_device(batch, self.encoder.device))
        # the waypoint source and the PID read host tensors whatever device the encoder runs on
        out = {k: out[k].float().cpu() for k in ("features", "pred.waypoints")}
        if self.source is None:
            wp = out["pred.waypoints"][0].numpy()
        else:
            wp = np.asarray(self.source(out["features"][0], str(labels.get("instruction", "follow the lane")),
                                        str(labels.get("notice", "")), np.asarray(tp, np.float32).reshape(2)),
                            np.float64).reshape(-1, 2)
        self.plan = wp
        self.plan_pose = (float(ego.x), float(ego.y), float(ego.yaw))
        self.plan_t = float(obs["time_s"])
        self.plan_times.append(time.perf_counter() - t0)

    def current_waypoints(self, obs: dict[str, Any]) -> np.ndarray:
        """The last plan, re-sampled at the elapsed time and expressed in the current ego frame."""
        assert self.plan is not None
        ego = obs["ego"]
        wp = resample(self.plan, float(obs["time_s"]) - self.plan_t)
        return to_frame(wp, self.plan_pose, (float(ego.x), float(ego.y), float(ego.yaw)))

    def run_step(self, obs: dict[str, Any]) -> Control:
        if self.plan is None or self.tick % self.plan_every == 0:
            self._replan(obs)
        self.tick += 1
        t, speed = float(obs["time_s"]), float(obs["ego"].speed)
        wp = self.creep.apply(t, speed, self.front_clear, obs.get("labels", {}).get("target_point"),
                              self.current_waypoints(obs))
        return self.pid.step(wp, speed)

    @property
    def creeps(self) -> int:
        return self.creep.creeps


class CreepRule:
    """The stuck detector of the module docstring, shared by `WaypointAgent` and the controller node's loop."""

    def __init__(self, stuck_after_s: float = 10.0, creep_s: float = 2.0, creep_speed: float = 2.0,
                 rearm_s: float = 1.0) -> None:
        self.stuck_after_s = stuck_after_s
        self.creep_s = creep_s
        self.creep_speed = creep_speed
        self.rearm_s = rearm_s
        self.creeps = 0
        self.reset()

    def reset(self) -> None:
        self.stopped_since: float | None = None
        self.creep_until = -100.0

    def apply(self, t: float, speed: float, front_clear: bool, target_point: Any, wp: np.ndarray) -> np.ndarray:
        """The waypoints to follow at time `t`: `wp`, or a creep towards `target_point` while creeping."""
        if self.stuck_after_s <= 0:
            return wp
        if abs(speed) >= 0.1:
            self.stopped_since = None
        elif self.stopped_since is None:
            self.stopped_since = t
        wait = self.rearm_s if t - self.creep_until < 10.0 else self.stuck_after_s
        if self.stopped_since is not None and t - self.stopped_since >= wait and front_clear and t >= self.creep_until:
            self.creep_until = t + self.creep_s
            self.stopped_since = None
            self.creeps += 1
        if t < self.creep_until:
            if not front_clear:
                self.creep_until = t
            else:
                return creep_waypoints(target_point, self.creep_speed)
        return wp


def front_box_clear(lidar: np.ndarray | None, x: tuple[float, float] = (1.5, 9.0), half_width: float = 1.0,
                    z: tuple[float, float] = (0.3, 2.0)) -> bool:
    """No LiDAR return in a box in front of the ego (ego frame; no-return rays have intensity −1)."""
    if lidar is None:
        return True
    p = np.asarray(lidar)
    hit = ((p[:, 3] >= 0) & (p[:, 0] > x[0]) & (p[:, 0] < x[1]) & (np.abs(p[:, 1]) < half_width)
           & (p[:, 2] > z[0]) & (p[:, 2] < z[1]))
    return not bool(hit.any())


def creep_waypoints(target_point: Any, speed: float) -> np.ndarray:
    """Five waypoints towards the route's target point at `speed` (straight ahead without one)."""
    d = np.array([1.0, 0.0]) if target_point is None else np.asarray(target_point, np.float64).reshape(2)
    n = float(np.linalg.norm(d))
    d = d / n if n > 1e-3 else np.array([1.0, 0.0])
    return np.outer(np.arange(1, 6) * WAYPOINT_DT_S * speed, d)


class ConstantWaypointAgent:
    """Blind baseline: the same waypoints (e.g. the training-set mean) every tick, through the same controller."""

    def __init__(self, waypoints: np.ndarray, pid: PIDConfig | None = None) -> None:
        self.waypoints = np.asarray(waypoints, np.float64).reshape(-1, 2)
        self.pid = LMDriveController(pid)

    def reset(self, route_info: Any) -> None:
        self.pid.reset()

    def run_step(self, obs: dict[str, Any]) -> Control:
        return self.pid.step(self.waypoints, float(obs["ego"].speed))


def route_spec(town: str, seed: int, n: int, min_length: float = 80.0, max_length: float = 130.0) -> list[Any]:
    """Seeded evaluation routes in a town (the leaderboard runs each in a fresh world)."""
    from flad_sim.route import seeded_routes
    from flad_sim.world import World

    return seeded_routes(World(town, seed=seed).town, seed, n, min_length=min_length, max_length=max_length)


def run_agent_on_routes(make_agent: Callable[[Any], Any], routes: list[tuple[str, int, Any]], sensors: bool = True,
                        privileged: bool = False) -> list[dict[str, Any]]:
    """Runs `make_agent(world)` on each (town, world_seed, route); returns RouteRecord dicts + wall time."""
    from flad_sim.agent import RouteRunner
    from flad_sim.world import World

    out = []
    for town, seed, route in routes:
        w = World(town, seed=seed)
        agent = make_agent(w)
        t0 = time.perf_counter()
        rec = RouteRunner(w, route, agent, observe=lazy_sensor_observer() if sensors else None,
                          privileged=privileged).run()
        d = rec.to_dict()
        d["wall_s"] = round(time.perf_counter() - t0, 2)
        d["town"] = town
        out.append(d)
    return out
