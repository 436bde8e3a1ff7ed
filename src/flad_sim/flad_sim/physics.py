"""Vehicle dynamics and box geometry: a kinematic bicycle model at 20 Hz and oriented-box overlap tests.

Control semantics follow CARLA's `VehicleControl` so an agent cannot tell the embedded world from CARLA:
throttle and brake in [0, 1], steer in [-1, 1] with **positive steer turning right** (clockwise, i.e.
yaw decreasing in our counter-clockwise REP 103 frame). The front-wheel angle is `steer * max_steer_deg`
(70 deg, CARLA's default for its cars), so the tightest turn radius is wheelbase / tan(70 deg) ~ 1.06 m.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DT = 0.05  # s, 20 Hz


@dataclass
class Control:
    """CARLA-like vehicle control."""

    throttle: float = 0.0
    steer: float = 0.0
    brake: float = 0.0
    hand_brake: bool = False
    reverse: bool = False

    def clipped(self) -> Control:
        """Out-of-range or non-finite inputs are clipped (NaN -> 0) so a bad agent cannot break physics."""
        def c(v: float, lo: float, hi: float) -> float:
            v = float(v)
            return 0.0 if not math.isfinite(v) else min(max(v, lo), hi)
        return Control(c(self.throttle, 0, 1), c(self.steer, -1, 1), c(self.brake, 0, 1), bool(self.hand_brake),
                       bool(self.reverse))


@dataclass
class VehicleParams:
    """A mid-size car (CARLA's Lincoln MKZ-ish)."""

    wheelbase: float = 2.9
    max_steer_deg: float = 70.0
    length: float = 4.8
    width: float = 2.0
    height: float = 1.5
    rear_overhang: float = 0.95     # rear bumper to rear axle
    max_accel: float = 4.0          # m/s^2 at standstill with full throttle
    top_speed: float = 35.0         # m/s; available acceleration falls linearly to 0 at top speed
    max_brake: float = 8.0          # m/s^2 at brake = 1
    hand_brake_decel: float = 5.0
    max_reverse_speed: float = 5.0
    rolling: float = 0.15           # m/s^2 rolling resistance
    drag: float = 4e-4              # 1/m, aerodynamic drag (a = drag * v^2)

    @property
    def center_offset(self) -> float:
        """Rear axle -> box centre distance along the heading."""
        return self.length / 2 - self.rear_overhang


def bicycle_step(x: np.ndarray, y: np.ndarray, yaw: np.ndarray, v: np.ndarray, throttle: np.ndarray,
                 steer: np.ndarray, brake: np.ndarray, hand_brake: np.ndarray, reverse: np.ndarray,
                 p: VehicleParams, dt: float = DT) -> tuple[np.ndarray, ...]:
    """One step of the kinematic bicycle model about the rear axle (vectorised over vehicles).

    Returns (x, y, yaw, v, yaw_rate, accel). `v` is signed (negative when reversing); brakes never
    push the speed through zero.
    """
    direction = np.where(reverse, -1.0, 1.0)
    drive = throttle * p.max_accel * np.maximum(1.0 - np.abs(v) / p.top_speed, 0.0) * direction
    retard = brake * p.max_brake + np.where(hand_brake, p.hand_brake_decel, 0.0) + p.rolling + p.drag * v * v
    v_drive = v + drive * dt
    # resistive forces oppose motion and cannot reverse it
    stop_dv = retard * dt
    v_new = np.where(np.abs(v_drive) <= stop_dv, 0.0, v_drive - np.sign(v_drive) * stop_dv)
    v_new = np.minimum(np.maximum(v_new, -p.max_reverse_speed), p.top_speed)
    delta = -steer * math.radians(p.max_steer_deg)    # CARLA: positive steer = right = clockwise
    v_mid = 0.5 * (v + v_new)
    yaw_rate = v_mid / p.wheelbase * np.tan(delta)
    yaw_mid = yaw + 0.5 * yaw_rate * dt
    x_new = x + v_mid * np.cos(yaw_mid) * dt
    y_new = y + v_mid * np.sin(yaw_mid) * dt
    yaw_new = np.mod(yaw + yaw_rate * dt + np.pi, 2 * np.pi) - np.pi
    return x_new, y_new, yaw_new, v_new, yaw_rate, (v_new - v) / dt


def obb_overlap(c: np.ndarray, yaw: float, half: np.ndarray, C: np.ndarray, YAW: np.ndarray,
                HALF: np.ndarray) -> np.ndarray:
    """Do 2-D oriented boxes overlap? One box (centre c, yaw, half-extents) against M boxes; separating axes."""
    if len(C) == 0:
        return np.zeros(0, bool)
    d = C - c
    u1 = np.array([math.cos(yaw), math.sin(yaw)])
    v1 = np.array([-u1[1], u1[0]])
    U2 = np.stack([np.cos(YAW), np.sin(YAW)], 1)
    V2 = np.stack([-U2[:, 1], U2[:, 0]], 1)
    ok = np.ones(len(C), bool)
    for ax in (u1, v1):
        r1 = abs(half[0] * (u1 @ ax)) + abs(half[1] * (v1 @ ax))
        r2 = np.abs(HALF[:, 0] * (U2 @ ax)) + np.abs(HALF[:, 1] * (V2 @ ax))
        ok &= np.abs(d @ ax) <= r1 + r2
    for AX in (U2, V2):
        r1 = np.abs(half[0] * (AX @ u1)) + np.abs(half[1] * (AX @ v1))
        r2 = np.abs(HALF[:, 0] * np.sum(U2 * AX, 1)) + np.abs(HALF[:, 1] * np.sum(V2 * AX, 1))
        ok &= np.abs(np.sum(d * AX, 1)) <= r1 + r2
    return ok


def wrap_angle(a: np.ndarray | float) -> np.ndarray | float:
    return (np.asarray(a) + np.pi) % (2 * np.pi) - np.pi
