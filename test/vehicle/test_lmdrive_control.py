"""Control exactly as LMDrive does (docs/architecture.md, "Evaluation definitions", reference controller).

`_LMDriveReference` below is a transcription of opendilab/LMDrive's leaderboard/team_code: `PIDController`
(pid_controller.py), `LMDriveAgent.control_pid` and the control part of `LMDriveAgent.run_step`
(lmdriver_agent.py), with `carla.VehicleControl` replaced by a namespace and the model replaced by the recorded
waypoints. It works in LMDrive's frame: the model's raw waypoints have x right and y backward (control_pid flips
y to get forward); ours are x forward, y left, so raw = (-y, -x). `LMDriveController` (the default of
`WaypointAgent`, `ConstantWaypointAgent` and `ControllerLoop`) must give the same control on every tick.
"""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace as Ns
from typing import Any

import numpy as np
import pytest

from flad_core.config import ConfigError, from_dict
from flad_sim import bridge as B
from flad_vehicle.control.agent import ConstantWaypointAgent
from flad_vehicle.control.loop import ControllerConfig, ControllerLoop
from flad_vehicle.control.pid import LMDriveController, PIDConfig, WaypointPID


# ------------------------------------------------------------------------------------------------ LMDrive's code
class _LMPIDController:
    """pid_controller.py, verbatim."""

    def __init__(self, K_P=1.0, K_I=0.0, K_D=0.0, n=20):
        self._K_P = K_P
        self._K_I = K_I
        self._K_D = K_D
        self._window = deque([0 for _ in range(n)], maxlen=n)
        self._max = 0.0
        self._min = 0.0

    def step(self, error):
        self._window.append(error)
        self._max = max(self._max, abs(error))
        self._min = -abs(self._max)
        if len(self._window) >= 2:
            integral = np.mean(self._window)
            derivative = self._window[-1] - self._window[-2]
        else:
            integral = 0.0
            derivative = 0.0
        return self._K_P * error + self._K_I * integral + self._K_D * derivative


class _LMDriveReference:
    """lmdriver_agent.py's setup / run_step / control_pid, control arithmetic only. The knobs (LMDrive's
    literals 20, 2, 0.8 and `speed < 0.01`) are parameters only so the switches can be checked against it."""

    def __init__(self, startup: int = 20, every: int = 2, steer_scale: float = 0.8, standstill: bool = True):
        self.config = Ns(turn_KP=1.25, turn_KI=0.75, turn_KD=0.3, turn_n=40, speed_KP=5.0, speed_KI=0.5,
                         speed_KD=1.0, speed_n=40, max_throttle=0.75, brake_speed=0.1, brake_ratio=1.1,
                         clip_delta=0.35)                                   # lmdriver_config.py
        self.startup, self.every, self.steer_scale, self.standstill = startup, every, steer_scale, standstill
        self.step = -1
        self.turn_controller = _LMPIDController(K_P=self.config.turn_KP, K_I=self.config.turn_KI,
                                                K_D=self.config.turn_KD, n=self.config.turn_n)
        self.speed_controller = _LMPIDController(K_P=self.config.speed_KP, K_I=self.config.speed_KI,
                                                 K_D=self.config.speed_KD, n=self.config.speed_n)
        self.prev_control = None

    def run_step(self, raw_waypoints: np.ndarray, velocity: float) -> Any:
        self.step += 1
        if self.step < self.startup:
            control = Ns()
            control.steer = float(0)
            control.throttle = float(0)
            control.brake = float(1)
            return control
        if self.step % self.every != 0 and self.step > 4:
            return self.prev_control
        waypoints = np.array(raw_waypoints, np.float64).reshape(5, 2)       # the model's output, .view(5, 2)
        steer, throttle, brake = self.control_pid(waypoints, velocity)
        if brake < 0.05:
            brake = 0.0
        if brake > 0.1:
            throttle = 0.0
        control = Ns()
        control.steer = float(steer) * self.steer_scale
        control.throttle = float(throttle)
        control.brake = float(brake)
        if self.step % self.every != 0 and self.step > 4:
            control = self.prev_control
        else:
            self.prev_control = control
        return control

    def control_pid(self, waypoints, velocity):
        assert waypoints.shape[0] == 5
        # flip y is (forward is negative in our waypoints)
        waypoints[:, 1] *= -1
        speed = velocity
        desired_speed = np.linalg.norm(waypoints[0] - waypoints[1]) * 2.0
        brake = desired_speed < self.config.brake_speed or (speed / desired_speed) > self.config.brake_ratio
        aim = (waypoints[1] + waypoints[0]) / 2.0
        angle = np.degrees(np.pi / 2 - np.arctan2(aim[1], aim[0])) / 90
        if self.standstill and (speed < 0.01):
            angle = np.array(0.0)  # When we don't move we don't want the angle error to accumulate in the integral
        steer = self.turn_controller.step(angle)
        steer = np.clip(steer, -1.0, 1.0)
        delta = np.clip(desired_speed - speed, 0.0, self.config.clip_delta)
        throttle = self.speed_controller.step(delta)
        throttle = np.clip(throttle, 0.0, self.config.max_throttle)
        throttle = throttle if not brake else 0.0
        return steer, throttle, brake


def _to_lmdrive_raw(wp: np.ndarray) -> np.ndarray:
    """Our ego frame (x forward, y left) -> LMDrive's model output (x right, y backward): (-y, -x)."""
    return np.stack([-wp[:, 1], -wp[:, 0]], axis=1)


# ------------------------------------------------------------------------------------------------ the recording
def _recording(n: int = 100) -> list[tuple[np.ndarray, float]]:
    """(waypoints in our ego frame, speed) per tick: 40 ticks at standstill while the plan bends left (a
    non-zero angle error throughout), then starting, curving right and left, overspeed, creeping below
    0.01 m/s, a stop plan (desired speed below 0.1 m/s) and a hard turn (steer clipped, then scaled)."""
    rng = np.random.default_rng(7)
    out = []
    for k in range(n):
        heading = 0.35 * np.sin(k / 9.0) + (0.3 if k < 40 else 0.0)          # waypoint direction, left +
        if 88 <= k < 96:
            heading = -1.3                                                      # hard right: steer saturates
        spacing = 1.5 + 1.0 * np.sin(k / 13.0) + 0.05 * rng.standard_normal()   # metres per 0.5 s
        if 80 <= k < 86:
            spacing = 0.02                                                      # a "stop" plan
        curv = 0.08 * np.cos(k / 7.0)
        pts, p, h = [], np.zeros(2), heading
        for _ in range(5):
            p = p + spacing * np.array([np.cos(h), np.sin(h)])
            pts.append(p)
            h += curv
        if k < 40:
            speed = 0.0
        elif 60 <= k < 64:
            speed = 0.005                                                       # below LMDrive's 0.01 m/s
        else:
            speed = min(0.15 * (k - 40), 4.0) + 0.1 * rng.standard_normal()
        if 70 <= k < 74:
            speed = 2.5 * spacing * 2.0                                         # overspeed -> brake
        out.append((np.array(pts), float(speed)))
    return out


def _reference_controls(rec, **knobs: Any) -> list[tuple[float, float, float]]:
    ref = _LMDriveReference(**knobs)
    return [_tuple(ref.run_step(_to_lmdrive_raw(wp), np.float64(v))) for wp, v in rec]


def _tuple(c: Any) -> tuple[float, float, float]:
    return float(c.throttle), float(c.steer), float(c.brake)


def _assert_same(got: list, want: list) -> None:
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == pytest.approx(w, abs=1e-9, rel=0), f"tick {k}: {g} != {w}"


def test_recording_exercises_every_rule() -> None:
    rec = _recording()
    want = _reference_controls(rec)
    assert all(c == (0.0, 0.0, 1.0) for c in want[:20])                            # start-up brake
    assert all(want[k] == want[k - 1] for k in range(21, 100, 2))                   # odd ticks hold
    assert any(c[2] == 1.0 for c in want[20:]) and any(c[1] > 0.05 for c in want)  # brakes and steers right
    assert any(c[1] < -0.05 for c in want) and any(c[0] > 0 for c in want)        # steers left, throttles
    assert any(c[1] == pytest.approx(0.8, abs=1e-12) for c in want)                 # clip to 1, then x 0.8
    # at standstill (ticks 20..39) the turn PID sees angle 0 although the plan bends left: no steer at all
    assert all(c[1] == 0.0 for c in want[20:40])
    assert _reference_controls(rec, standstill=False)[20][1] < -0.05


def test_controller_matches_lmdrive_on_every_tick() -> None:
    rec = _recording()
    ctl = LMDriveController()
    _assert_same([_tuple(ctl.step(wp, v)) for wp, v in rec], _reference_controls(rec))
    ctl.reset()                                                                     # reset = a fresh agent
    _assert_same([_tuple(ctl.step(wp, v)) for wp, v in rec], _reference_controls(rec))


def test_constant_agent_matches_lmdrive() -> None:
    wp = np.array([[1.5, 0.3], [3.0, 0.7], [4.5, 1.2], [6.0, 1.8], [7.5, 2.5]])
    speeds = [0.0] * 30 + [0.2 * k for k in range(40)]
    agent = ConstantWaypointAgent(wp)
    agent.reset(None)
    got = [_tuple(agent.run_step({"ego": Ns(speed=v)})) for v in speeds]
    _assert_same(got, _reference_controls([(wp, v) for v in speeds]))


class _FakeBus:
    """Just enough of flad_core.bus.Bus to drive ControllerLoop by calling its callbacks."""

    def __init__(self) -> None:
        self.subs: dict[str, Any] = {}
        self.published: list[Any] = []

    def subscribe(self, topic: str, _type: str, cb: Any, finite: bool = False) -> None:
        self.subs[topic] = cb

    def publish(self, topic: str, msg: Any) -> None:
        self.published.append(msg)


def _run_loop(rec, **pid: Any) -> list[tuple[float, float, float]]:
    bus = _FakeBus()
    cfg = from_dict(ControllerConfig, {"carry_forward": False, "stuck_after_s": 0.0, "pid": pid})
    loop = ControllerLoop(bus, cfg)
    got = []
    for k, (wp, v) in enumerate(rec):
        t = 0.05 * k
        bus.subs["/flad/v0/waypoints"](B.path_msg(wp, t, "v0/base_link"))
        odo = B.odometry_msg(Ns(x=0.0, y=0.0, z=0.0, yaw=0.0, speed=v, yaw_rate=0.0, time_s=t), "hero")
        bus.subs["/carla/hero/odometry"](odo)
        bus.subs["/carla/hero/odometry"](odo)          # re-published frame: same command, no extra tick
        got.append(_tuple(loop.last))
    assert loop.controls == len(rec) and len(bus.published) == 2 * len(rec)
    return got


def test_controller_loop_matches_lmdrive_on_every_tick() -> None:
    rec = _recording()
    _assert_same(_run_loop(rec), _reference_controls(rec))


@pytest.mark.parametrize(("switch", "knob"), [
    ({"startup_brake_ticks": 0}, {"startup": 0}),
    ({"control_every": 1}, {"every": 1}),
    ({"steer_scale": 1.0}, {"steer_scale": 1.0}),
    ({"standstill_angle_zero": False}, {"standstill": False}),
    ({"startup_brake_ticks": 0, "control_every": 1, "steer_scale": 1.0, "standstill_angle_zero": False},
     {"startup": 0, "every": 1, "steer_scale": 1.0, "standstill": False}),
])
def test_each_switch_matches_lmdrive_without_that_rule(switch: dict, knob: dict) -> None:
    """Also from a moving start (ticks 40.. of the recording): without the start-up brake, LMDrive's `step > 4`
    makes ticks 1 and 3 compute."""
    for rec in (_recording(), _recording()[40:]):
        want = _reference_controls(rec, **knob)
        assert want != _reference_controls(rec)                                      # the rule matters here
        ctl = LMDriveController(PIDConfig(**switch))
        _assert_same([_tuple(ctl.step(wp, v)) for wp, v in rec], want)
        _assert_same(_run_loop(rec, **switch), want)


def test_switches_off_is_the_bare_control_pid() -> None:
    rec = _recording()
    off = PIDConfig(startup_brake_ticks=0, control_every=1, steer_scale=1.0, standstill_angle_zero=False)
    ctl, bare = LMDriveController(off), WaypointPID(PIDConfig(standstill_angle_zero=False))
    for wp, v in rec:
        assert _tuple(ctl.step(wp, v)) == _tuple(bare.step(wp, v))
        assert not ctl.held


def test_direct_effect_of_each_rule() -> None:
    wp = np.array([[2.0, 1.0], [4.0, 2.0], [6.0, 3.0], [8.0, 4.0], [10.0, 5.0]])     # bends left
    # start-up: 20 braking ticks, PID untouched
    ctl = LMDriveController()
    assert all(_tuple(ctl.step(wp, 2.0)) == (0.0, 0.0, 1.0) for _ in range(20)) and ctl.last is None
    first = ctl.step(wp, 2.0)
    assert first.brake == 0.0 and ctl.pid.turn.window.count(0.0) == 39             # the PID's first step
    # hold: the odd tick repeats the even tick's command without stepping the PID
    window = list(ctl.pid.turn.window)
    assert ctl.step(wp, 1.0) == first and ctl.held and list(ctl.pid.turn.window) == window
    # steer scale: 0.8 x the bare PID's clipped steer
    assert first.steer == pytest.approx(0.8 * WaypointPID().step(wp, 2.0).steer, abs=1e-12)
    # standstill: angle 0 below 0.01 m/s, so the integral does not build up
    pid = WaypointPID()
    assert pid.step(wp, 0.0).steer == 0.0 and pid.last is not None and pid.last.angle == 0.0
    assert WaypointPID().step(wp, 0.01).steer < 0


def test_invalid_or_missing_waypoints_brake_at_once() -> None:
    """Our deviation (LMDrive asserts 5 waypoints): brake at once, even on a tick that would hold."""
    wp = np.array([[2.0, 1.0], [4.0, 2.0], [6.0, 3.0], [8.0, 4.0], [10.0, 5.0]])
    ctl = LMDriveController(PIDConfig(startup_brake_ticks=0))
    for _ in range(6):
        ctl.step(wp, 2.0)                                                           # ticks 0..5; 5 held
    assert ctl.step(wp, 2.0).brake == 0.0                                          # tick 6 computes
    assert _tuple(ctl.step([[np.nan, 0.0], [1.0, 0.0]], 2.0)) == (0.0, 0.0, 1.0)   # tick 7 would hold
    assert _tuple(ctl.step([[1.0, 0.0]], 2.0)) == (0.0, 0.0, 1.0) and ctl.last is None   # tick 8
    assert _tuple(ctl.step(wp, 2.0)) == (0.0, 0.0, 1.0) and ctl.held              # tick 9 holds the brake
    assert ctl.step(wp, 2.0).brake == 0.0 and ctl.last is not None                 # tick 10 computes
    assert _tuple(ctl.step(None, 2.0)) == (0.0, 0.0, 1.0)                          # no plan (ControllerLoop)


def test_config_switches_are_validated() -> None:
    with pytest.raises(ConfigError, match="control_every"):
        from_dict(ControllerConfig, {"pid": {"control_every": 0}})
    with pytest.raises(ConfigError, match="startup_brake_ticks"):
        from_dict(PIDConfig, {"startup_brake_ticks": -1})
    c = PIDConfig()
    assert (c.standstill_angle_zero, c.standstill_speed, c.steer_scale, c.control_every, c.startup_brake_ticks) == (
        True, 0.01, 0.8, 2, 20)
