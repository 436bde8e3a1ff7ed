"""The vehicle's control loop on the bus: waypoints (nav_msgs/Path) + odometry -> LMDrive's control -> control.

`ControllerLoop` is the logic of the `controller_node` (flad_vehicle/nodes/controller_node.py) and runs on any
`flad_core.bus.Bus`. Per odometry message (each world tick) it publishes one carla_msgs/CarlaEgoVehicleControl
on /carla/<role>/vehicle_control_cmd, stamped with the odometry's stamp (how a synchronous world knows the
control is for its current tick):

- the newest plan (waypoints stamped t_p, in the ego frame at t_p) is carried forward to the odometry time t
  as `WaypointAgent` does (re-sampled at t - t_p along the trajectory, moved into the current ego frame), so
  a plan made at 2 Hz steers a 20 Hz loop;
- control: `LMDriveController`, as `WaypointAgent` (LMDrive's run_step, one step per odometry frame: full brake
  for the first `pid.startup_brake_ticks` frames, the PID every `pid.control_every`-th frame with the last
  command repeated in between, steer × `pid.steer_scale`); a frame re-published with the same stamp gets the
  same command without a step;
- safety: no plan yet, or a plan older than `max_waypoint_age_s` (measured between message stamps, i.e.
  simulated time in the embedded world), gives full brake and zero throttle at once, with a warning (the frame
  still counts as a tick);
- synchronous planning (`sync_plan_period_s` > 0): when the newest plan is a whole planning period old, the
  odometry is held until the plan for it arrives (or `sync_wait_s` of wall time passed), so the controller
  acts on the frame's own waypoints, not the previous ones; 0 disables holding (CARLA asynchronous mode).

- creeping: the same stuck-detector rule as `WaypointAgent` (`CreepRule`: after `stuck_after_s` at standstill
  with no LiDAR return in the box ahead, follow the route's target point from /carla/<role>/navigation at
  `creep_speed` for `creep_s`), fed by /carla/<role>/lidar; `stuck_after_s` = 0 turns it (and both
  subscriptions) off, and the privileged `expert` source never creeps.

Speed is the odometry's forward twist (the same frame as the pose; /speedometer carries the same value).
Waypoint sources: `edge` (/flad/<vid>/waypoints from the edge waypoint node), `encoder_head` (the same
topic, published by the encoder node itself), `expert` (/carla/<role>/expert_waypoints from the world bridge,
privileged: plumbing checks only).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from flad_core.config import ConfigError
from flad_sim import bridge as B
from flad_sim.physics import Control
from flad_vehicle.control.agent import CreepRule, front_box_clear, resample, to_frame
from flad_vehicle.control.pid import LMDriveController, PIDConfig, to_ros_control

log = logging.getLogger(__name__)

WaypointSourceName = Literal["edge", "encoder_head", "expert"]


def waypoint_topic(source: str, vehicle_id: str, role: str) -> str:
    """Where a vehicle's waypoints come from (module docstring)."""
    return B.topic(role, "expert_waypoints") if source == "expert" else f"/flad/{vehicle_id}/waypoints"


@dataclass
class ControllerConfig:
    """Parameters of the controller node (one ROS parameter per field; PID gains as `pid.<name>`)."""

    vehicle_id: str = field(default="v0", metadata={"help": "vehicle id (the /flad/<vehicle_id>/... topics)"})
    role_name: str = field(default="hero", metadata={"help": "ego role name (the /carla/<role_name>/... topics)"})
    waypoint_source: WaypointSourceName = field(default="edge", metadata={
        "help": "edge | encoder_head: /flad/<vehicle_id>/waypoints; expert: /carla/<role_name>/expert_waypoints "
                "(privileged, plumbing checks)"})
    max_waypoint_age_s: float = field(default=1.0, metadata={
        "help": "brake (safety) when the newest waypoints are older than this (message stamps, seconds)"})
    sync_plan_period_s: float = field(default=0.0, metadata={
        "help": "synchronous planning: hold a tick's control until waypoints newer than this period arrive "
                "(0: never hold)"})
    sync_wait_s: float = field(default=10.0, metadata={
        "help": "synchronous planning: wall seconds to hold a tick for its waypoints before acting without them"})
    carry_forward: bool = field(default=True, metadata={
        "help": "move the plan into the current ego frame at the current time (off: use it as received)"})
    stuck_after_s: float = field(default=10.0, metadata={
        "help": "creep rule: seconds at standstill (with a clear LiDAR box ahead) before creeping towards the "
                "route's target point (0: off; no LiDAR or navigation subscription then)"})
    creep_s: float = field(default=2.0, metadata={"help": "creep rule: how long one creep lasts (s)"})
    creep_speed: float = field(default=2.0, metadata={"help": "creep rule: creeping speed (m/s)"})
    rearm_s: float = field(default=1.0, metadata={
        "help": "creep rule: standstill before creeping again within 10 s of the last creep (s)"})
    pid: PIDConfig = field(default_factory=PIDConfig)

    def validate(self) -> None:
        if not self.vehicle_id or not self.role_name:
            raise ConfigError("vehicle_id", "vehicle_id and role_name must not be empty")
        if not self.max_waypoint_age_s > 0:
            raise ConfigError("max_waypoint_age_s", f"must be > 0, got {self.max_waypoint_age_s}")
        if self.sync_plan_period_s < 0 or self.sync_wait_s < 0:
            raise ConfigError("sync_plan_period_s", "sync_plan_period_s and sync_wait_s must be >= 0")
        for name in ("stuck_after_s", "creep_s", "creep_speed", "rearm_s"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")


@dataclass
class _Plan:
    waypoints: np.ndarray
    t: float
    key: int


class ControllerLoop:
    """LMDrive's controller on the bus (module docstring)."""

    def __init__(self, bus: Any, cfg: ControllerConfig) -> None:
        self.bus = bus
        self.cfg = cfg
        self.pid = LMDriveController(cfg.pid)
        self.control_topic = B.topic(cfg.role_name, "vehicle_control_cmd")
        self.waypoint_topic = waypoint_topic(cfg.waypoint_source, cfg.vehicle_id, cfg.role_name)
        self._lock = threading.RLock()
        self._plan: _Plan | None = None
        self._poses: collections.OrderedDict[int, tuple[float, float, float]] = collections.OrderedDict()
        self._pending: list[tuple[Any, float]] = []        # held odometry (sync planning), with wall arrival time
        self._last_key = -(2 ** 62)
        self._last_msg: Any = None
        self.controls = 0
        self.safety_brakes = 0
        self.last: Control | None = None
        self.done = threading.Event()
        self.exit_code = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # the expert source is the privileged reference: it never needs (and never gets) the creep rule
        stuck = 0.0 if cfg.waypoint_source == "expert" else cfg.stuck_after_s
        self.creep = CreepRule(stuck, cfg.creep_s, cfg.creep_speed, cfg.rearm_s)
        self.front_clear = True
        self.target_point: np.ndarray | None = None
        bus.subscribe(self.waypoint_topic, "nav_msgs/msg/Path", self._on_path, finite=True)
        bus.subscribe(B.topic(cfg.role_name, "odometry"), "nav_msgs/msg/Odometry", self._on_odometry, finite=True)
        if stuck > 0:
            bus.subscribe(B.topic(cfg.role_name, "lidar"), "sensor_msgs/msg/PointCloud2", self._on_lidar)
            bus.subscribe(B.topic(cfg.role_name, "navigation"), "flad_msgs/msg/Navigation", self._on_navigation)

    # ------------------------------------------------------------------------------------------ inputs
    def _on_path(self, msg: Any) -> None:
        wp = B.waypoints_from_path(msg)
        if len(wp) < 2:
            log.warning("%s: ignored a path with %d poses (need >= 2)", self.waypoint_topic, len(wp))
            return
        key = B.stamp_key(msg.header)
        with self._lock:
            if self._plan is not None and key < self._plan.key:
                return                                   # late: a newer plan is in use
            self._plan = _Plan(wp, B.stamp_seconds(msg.header), key)
            self._release(force=False)

    def _on_lidar(self, msg: Any) -> None:
        try:
            clear = front_box_clear(B.points_from_msg(msg))
        except ValueError as exc:
            log.warning("%s: ignored a point cloud: %s", B.topic(self.cfg.role_name, "lidar"), exc)
            return
        with self._lock:
            self.front_clear = clear

    def _on_navigation(self, msg: Any) -> None:
        with self._lock:
            self.target_point = np.array([msg.target_point.x, msg.target_point.y], np.float64)

    def _on_odometry(self, msg: Any) -> None:
        key = B.stamp_key(msg.header)
        with self._lock:
            self._poses[key] = B.pose_from_odometry(msg)
            while len(self._poses) > 400:                  # 20 s of 20 Hz poses: enough for any plan in use
                self._poses.popitem(last=False)
            self._pending.append((msg, time.monotonic()))
            self._release(force=False)

    def _needs_plan(self, key: int) -> bool:
        """Sync planning: is the newest plan a whole period older than the frame at `key` (ns)?"""
        p = self.cfg.sync_plan_period_s
        return p > 0 and (self._plan is None or self._plan.key < key - round(p * 1e9) + 1000)

    def _release(self, force: bool) -> None:
        """Act on held odometry, oldest first, as long as its plan is there (or `force`: it waited too long)."""
        while self._pending:
            msg, arrived = self._pending[0]
            key = B.stamp_key(msg.header)
            late = time.monotonic() - arrived >= self.cfg.sync_wait_s
            if self._needs_plan(key) and not (force and late):
                return
            if self._needs_plan(key):
                log.warning("no waypoints for t=%.2f s within sync_wait_s=%.1f s; acting on the last ones", key * 1e-9,
                            self.cfg.sync_wait_s)
            self._pending.pop(0)
            self._act(msg)

    # ------------------------------------------------------------------------------------------ control
    def compute(self, t: float, pose: tuple[float, float, float], speed: float) -> Control:
        """The control for ego `pose` and `speed` at time `t` from the newest plan (brake without a fresh one)."""
        plan = self._plan
        if plan is None or t - plan.t > self.cfg.max_waypoint_age_s:
            self.safety_brakes += 1
            if plan is not None and self.safety_brakes % 20 == 1:
                log.warning("waypoints on %s are %.2f s old (max %.2f s): braking", self.waypoint_topic, t - plan.t,
                            self.cfg.max_waypoint_age_s)
            return self.pid.step(None, speed)
        wp = plan.waypoints
        if self.cfg.carry_forward:
            plan_pose = self._poses.get(plan.key)
            if plan_pose is None:           # no odometry at the plan's stamp: take the nearest earlier one
                earlier = [k for k in self._poses if k <= plan.key]
                plan_pose = self._poses[earlier[-1]] if earlier else pose
            wp = to_frame(resample(wp, max(t - plan.t, 0.0), self.cfg.pid.waypoint_dt_s), plan_pose, pose)
        wp = self.creep.apply(t, speed, self.front_clear, self.target_point, wp)
        return self.pid.step(wp, speed)

    def _act(self, msg: Any) -> None:
        key = B.stamp_key(msg.header)
        if key <= self._last_key:
            # the same frame again (the world re-publishes its first frame until it hears from us): answer with
            # the same control; stepping the PID twice for one frame would change its state
            if key == self._last_key and self._last_msg is not None:
                self.bus.publish(self.control_topic, self._last_msg)
            return
        self._last_key = key
        t = B.stamp_seconds(msg.header)
        control = self.compute(t, B.pose_from_odometry(msg), float(msg.twist.twist.linear.x))
        self.last = control
        self.controls += 1
        out = to_ros_control(control, t)
        out.header.stamp = msg.header.stamp          # exactly the tick's stamp (no float round trip)
        out.header.frame_id = self.cfg.role_name
        self._last_msg = out
        self.bus.publish(self.control_topic, out)

    # ------------------------------------------------------------------------------------------ component
    def start(self) -> None:
        """A watchdog thread that releases held ticks after `sync_wait_s` (only needed with sync planning)."""
        def loop() -> None:
            while not self._stop.wait(0.05):
                with self._lock:
                    self._release(force=True)

        if self.cfg.sync_plan_period_s > 0:
            self._thread = threading.Thread(target=loop, name="controller-watchdog", daemon=True)
            self._thread.start()
        log.info("controller: %s + %s -> %s", self.waypoint_topic, B.topic(self.cfg.role_name, "odometry"),
                 self.control_topic)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        self.done.set()
