"""LMDrive PID (docs/architecture.md, "Evaluation definitions"): outputs checked against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flad_core import codec
from flad_vehicle.control.pid import PIDConfig, PIDController, WaypointPID, to_ros_control


def test_gains_are_lmdrives() -> None:
    c = PIDConfig()
    assert (c.turn_kp, c.turn_ki, c.turn_kd, c.turn_n) == (1.25, 0.75, 0.3, 40)
    assert (c.speed_kp, c.speed_ki, c.speed_kd, c.speed_n) == (5.0, 0.5, 1.0, 40)
    assert (c.max_throttle, c.brake_speed, c.brake_ratio, c.clip_delta) == (0.75, 0.1, 1.1, 0.35)


def test_windowed_pid_by_hand() -> None:
    pid = PIDController(2.0, 1.0, 0.5, n=4)          # window starts [0, 0, 0, 0]
    assert pid.step(1.0) == pytest.approx(2.0 * 1.0 + 1.0 * (1.0 / 4) + 0.5 * 1.0)        # 2.75
    assert pid.step(3.0) == pytest.approx(2.0 * 3.0 + 1.0 * (4.0 / 4) + 0.5 * 2.0)        # 8.0
    for _ in range(3):
        pid.step(3.0)                                  # window now [3, 3, 3, 3]
    assert pid.step(-1.0) == pytest.approx(2.0 * -1.0 + 1.0 * (8.0 / 4) + 0.5 * -4.0)   # -2.0


def test_straight_ahead_throttle_by_hand() -> None:
    ctl = WaypointPID()
    wp = [[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0], [5.0, 0.0]]
    c = ctl.step(wp, speed=1.9)
    # aim straight ahead -> angle 0 -> steer 0; desired = 1 m / 0.5 s = 2 m/s; delta = 0.1
    assert c.steer == 0.0 and c.brake == 0.0
    assert c.throttle == pytest.approx(5.0 * 0.1 + 0.5 * (0.1 / 40) + 1.0 * 0.1)          # 0.60125
    c = ctl.step(wp, speed=1.9)
    assert c.throttle == pytest.approx(5.0 * 0.1 + 0.5 * (0.2 / 40) + 1.0 * 0.0)          # 0.5025
    c = WaypointPID().step(wp, speed=0.0)                                                   # delta clipped to 0.35
    assert c.throttle == pytest.approx(0.75)                                                # 2.104 clipped to 0.75


def test_left_curve_steer_and_overspeed_brake_by_hand() -> None:
    ctl = WaypointPID()
    c = ctl.step([[2.0, 1.0], [4.0, 2.0], [6.0, 3.0], [8.0, 4.0], [10.0, 5.0]], speed=5.0)
    # aim = midpoint (3, 1.5): 26.565 deg to the left -> angle = -26.565 / 90
    angle = -math.degrees(math.atan2(1.5, 3.0)) / 90.0
    assert ctl.last is not None and ctl.last.angle == pytest.approx(angle)
    assert c.steer == pytest.approx((1.25 + 0.75 / 40 + 0.3) * angle)                      # -0.46304
    assert c.steer < 0                                                                      # CARLA: negative = left
    # desired speed = sqrt(5) / 0.5 = 4.472 m/s; 5.0 / 4.472 = 1.118 > 1.1 -> brake, no throttle
    assert ctl.last.desired_speed == pytest.approx(math.sqrt(5) / 0.5)
    assert c.brake == 1.0 and c.throttle == 0.0


def test_right_turn_steers_right_and_stop_brakes() -> None:
    c = WaypointPID().step([[1.0, -1.0], [2.0, -2.0]], speed=1.0)
    assert c.steer > 0
    stop = WaypointPID().step(np.full((5, 2), 0.01), speed=0.0)      # desired speed < 0.1 m/s
    assert stop.brake == 1.0 and stop.throttle == 0.0
    bad = WaypointPID().step([[np.nan, 0.0], [1.0, 0.0]], speed=3.0)
    assert bad.brake == 1.0 and bad.throttle == 0.0


def test_ros_control_message() -> None:
    c = WaypointPID().step([[1.0, 0.0], [2.0, 0.0]], speed=1.9)
    msg = to_ros_control(c, stamp_s=12.5)
    back = codec.decode(codec.encode(msg), "carla_msgs/msg/CarlaEgoVehicleControl")
    assert back.throttle == pytest.approx(c.throttle, abs=1e-6) and back.brake == 0.0 and back.steer == 0.0
    assert back.header.stamp.sec == 12 and not back.reverse
