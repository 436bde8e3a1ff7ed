"""LMDrive's waypoint → control PID (the reference controller of docs/architecture.md, "Evaluation definitions").

`WaypointPID` ports LMDrive's `control_pid` / `PIDController` (leaderboard/team_code/lmdriver_agent.py,
pid_controller.py; itself TransFuser's): a windowed PID (integral = mean of the last n errors, window
pre-filled with zeros; derivative = last difference) for steering towards the midpoint of the first two
waypoints and for the speed implied by their spacing (waypoints are 0.5 s apart, so desired speed =
2 · |w1 − w0|); below 0.01 m/s the steering PID is fed angle 0 ("when we don't move we don't want the angle
error to accumulate in the integral"). Frames: waypoints are in the ego frame of this project (x forward,
y left); LMDrive's (x right, y forward) is obtained as (−y, x) before the same arithmetic. Steer follows
CARLA (+ = right).

`LMDriveController` adds what LMDrive's `run_step` does around `control_pid`, one call per world tick
(20 Hz): full brake for the first 20 ticks (the PID is not stepped), then the PID only on even ticks with
the odd ticks repeating the last command (`self.step % 2 != 0 and self.step > 4: return self.prev_control`),
and steer × 0.8. Each rule is a `PIDConfig` switch. LMDrive's `if brake < 0.05: brake = 0.0` /
`if brake > 0.1: throttle = 0.0` are no-ops on its boolean brake and `control_pid` already zeroes the
throttle when braking, so they need no code. Our deviation: missing, non-finite or fewer than two waypoints
give full brake and zero throttle at once (LMDrive asserts 5 waypoints and would fail).
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from flad_core.config import ConfigError
from flad_sim.physics import Control


@dataclass
class PIDConfig:
    """LMDrive's gains (lmdriver_config.py) and the rules of its agent's run_step (module docstring)."""

    turn_kp: float = field(default=1.25, metadata={"help": "steering PID proportional gain"})
    turn_ki: float = field(default=0.75, metadata={"help": "steering PID integral gain"})
    turn_kd: float = field(default=0.3, metadata={"help": "steering PID derivative gain"})
    turn_n: int = field(default=40, metadata={"help": "steering PID window (ticks)"})
    speed_kp: float = field(default=5.0, metadata={"help": "speed PID proportional gain"})
    speed_ki: float = field(default=0.5, metadata={"help": "speed PID integral gain"})
    speed_kd: float = field(default=1.0, metadata={"help": "speed PID derivative gain"})
    speed_n: int = field(default=40, metadata={"help": "speed PID window (ticks)"})
    max_throttle: float = field(default=0.75, metadata={"help": "throttle ceiling"})
    brake_speed: float = field(default=0.1, metadata={"help": "brake when the desired speed is below this (m/s)"})
    brake_ratio: float = field(default=1.1, metadata={"help": "brake when speed / desired speed exceeds this"})
    clip_delta: float = field(default=0.35, metadata={"help": "max speed error fed to the speed PID (m/s)"})
    waypoint_dt_s: float = field(default=0.5, metadata={"help": "time between waypoints (s)"})
    standstill_angle_zero: bool = field(default=True, metadata={
        "help": "feed the steering PID angle 0 below standstill_speed, so its integral does not build up while "
                "stopped (LMDrive)"})
    standstill_speed: float = field(default=0.01, metadata={"help": "standstill below this speed (m/s)"})
    steer_scale: float = field(default=0.8, metadata={"help": "steer multiplier after the PID's clip (LMDrive: 0.8)"})
    control_every: int = field(default=2, metadata={
        "help": "run the PID every n-th tick and repeat the last command in between (LMDrive: 2; 1: every tick)"})
    startup_brake_ticks: int = field(default=20, metadata={
        "help": "full brake, PID not stepped, for the first n ticks (LMDrive: 20; 0: off)"})

    def validate(self) -> None:
        if self.control_every < 1:
            raise ConfigError("control_every", f"must be >= 1, got {self.control_every}")
        if self.startup_brake_ticks < 0:
            raise ConfigError("startup_brake_ticks", f"must be >= 0, got {self.startup_brake_ticks}")


class PIDController:
    """Windowed PID: integral = mean of the last n errors (initially zeros), derivative = last difference."""

    def __init__(self, kp: float = 1.0, ki: float = 0.0, kd: float = 0.0, n: int = 20) -> None:
        self.kp, self.ki, self.kd = kp, ki, kd
        self.window: deque[float] = deque([0.0] * n, maxlen=n)

    def step(self, error: float) -> float:
        self.window.append(float(error))
        if len(self.window) >= 2:
            integral = float(np.mean(self.window))
            derivative = self.window[-1] - self.window[-2]
        else:
            integral = derivative = 0.0
        return self.kp * error + self.ki * integral + self.kd * derivative

    def reset(self) -> None:
        n = self.window.maxlen or 0
        self.window = deque([0.0] * n, maxlen=n)


@dataclass
class ControlDebug:
    """What the controller computed (for logs and tests)."""

    aim: tuple[float, float]
    angle: float
    desired_speed: float
    delta: float
    brake: bool


class WaypointPID:
    """Waypoints (ego frame, metres) + speed → Control, exactly as LMDrive's `control_pid` does."""

    def __init__(self, cfg: PIDConfig | None = None) -> None:
        self.cfg = cfg or PIDConfig()
        c = self.cfg
        self.turn = PIDController(c.turn_kp, c.turn_ki, c.turn_kd, c.turn_n)
        self.speed = PIDController(c.speed_kp, c.speed_ki, c.speed_kd, c.speed_n)
        self.last: ControlDebug | None = None

    def reset(self) -> None:
        self.turn.reset()
        self.speed.reset()

    def step(self, waypoints: np.ndarray | Sequence[Sequence[float]], speed: float) -> Control:
        c = self.cfg
        wp = np.asarray(waypoints, np.float64).reshape(-1, 2)
        if len(wp) < 2 or not np.isfinite(wp).all():
            self.last = None
            return Control(throttle=0.0, steer=0.0, brake=1.0)
        lm = np.stack([-wp[:, 1], wp[:, 0]], axis=1)        # LMDrive frame: x right, y forward
        aim = (lm[1] + lm[0]) / 2.0
        angle = math.degrees(math.pi / 2 - math.atan2(aim[1], aim[0])) / 90.0
        if c.standstill_angle_zero and speed < c.standstill_speed:
            angle = 0.0
        steer = float(np.clip(self.turn.step(angle), -1.0, 1.0))
        desired = float(np.linalg.norm(lm[0] - lm[1])) / c.waypoint_dt_s
        brake = desired < c.brake_speed or (speed / desired) > c.brake_ratio
        delta = float(np.clip(desired - speed, 0.0, c.clip_delta))
        throttle = float(np.clip(self.speed.step(delta), 0.0, c.max_throttle))
        if brake:
            throttle = 0.0
        self.last = ControlDebug((float(aim[0]), float(aim[1])), angle, desired, delta, bool(brake))
        return Control(throttle=throttle, steer=steer, brake=1.0 if brake else 0.0)


def brake_control() -> Control:
    """Full brake, zero throttle, straight wheels."""
    return Control(throttle=0.0, steer=0.0, brake=1.0)


class LMDriveController:
    """LMDrive's run_step around `WaypointPID` (module docstring): `step` once per world tick."""

    def __init__(self, cfg: PIDConfig | None = None) -> None:
        self.cfg = cfg or PIDConfig()
        self.pid = WaypointPID(self.cfg)
        self.reset()

    def reset(self) -> None:
        self.pid.reset()
        self.pid.last = None
        self.tick = -1                      # LMDrive: self.step = -1 in setup, += 1 first thing in run_step
        self.prev: Control | None = None    # LMDrive: self.prev_control
        self.held = False                   # whether the last step repeated the previous command

    @property
    def last(self) -> ControlDebug | None:
        """What the PID computed on its last step (None after a brake without a PID step)."""
        return self.pid.last

    def step(self, waypoints: np.ndarray | Sequence[Sequence[float]] | None, speed: float) -> Control:
        """The control for this tick; `waypoints=None` (no plan) brakes like invalid waypoints."""
        c = self.cfg
        self.tick += 1
        self.held = False
        if self.tick < c.startup_brake_ticks:           # LMDrive: if self.step < 20: brake = 1
            self.pid.last = None
            return brake_control()
        wp = None if waypoints is None else np.asarray(waypoints, np.float64).reshape(-1, 2)
        if wp is None or len(wp) < 2 or not np.isfinite(wp).all():
            self.pid.last = None                        # our deviation: brake at once (LMDrive would fail)
            self.prev = brake_control()
            return brake_control()
        # LMDrive: if self.step % 2 != 0 and self.step > 4: return self.prev_control
        if self.prev is not None and self.tick % c.control_every != 0 and self.tick > 4:
            self.held = True
            return dataclasses.replace(self.prev)
        out = self.pid.step(wp, speed)
        out = Control(throttle=out.throttle, steer=out.steer * c.steer_scale, brake=out.brake)   # steer * 0.8
        self.prev = out
        return dataclasses.replace(out)


def to_ros_control(control: Control, stamp_s: float | None = None) -> object:
    """Control → carla_msgs/CarlaEgoVehicleControl (throttle [0,1], steer [-1,1], brake [0,1])."""
    from flad_core import codec

    return codec.new("carla_msgs/msg/CarlaEgoVehicleControl", header=codec.header(stamp_s),
                     throttle=float(np.clip(control.throttle, 0.0, 1.0)), steer=float(np.clip(control.steer, -1, 1)),
                     brake=float(np.clip(control.brake, 0.0, 1.0)), hand_brake=False, reverse=False, gear=1,
                     manual_gear_shift=False)
