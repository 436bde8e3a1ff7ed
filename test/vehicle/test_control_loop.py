"""The controller loop over a real ZeroMQ bus on loopback: Path + odometry in, the PID's control out.

The expected controls are computed by hand from LMDrive's PID (docs/architecture.md, "Evaluation definitions")
for a fresh controller, so a change in frames, signs or the carry-forward shows up as a wrong number, not just a
different one. These rigs turn LMDrive's 20-tick start-up brake off (`pid.startup_brake_ticks=0`) so that the
first ticks reach the PID; its steer × 0.8 and every-other-tick hold stay on (test_lmdrive_control.py checks the
loop against LMDrive tick by tick with every default).
"""

from __future__ import annotations

import math
import threading
import time
from types import SimpleNamespace as Ns

import numpy as np
import pytest

from flad_core.bus import BusConfig, BusHub, ZmqBus
from flad_core.config import ConfigError, from_dict
from flad_sim import bridge as B
from flad_vehicle.control.loop import ControllerConfig, ControllerLoop, waypoint_topic
from flad_vehicle.control.pid import LMDriveController, PIDConfig, WaypointPID

WP = np.array([[2.0, 1.0], [4.0, 2.0], [6.0, 3.0], [8.0, 4.0], [10.0, 5.0]])


def _odometry(t: float, x: float = 0.0, y: float = 0.0, yaw: float = 0.0, speed: float = 0.0):
    state = Ns(x=x, y=y, z=0.0, yaw=yaw, speed=speed, yaw_rate=0.0, time_s=t)
    return B.odometry_msg(state, "hero")


class _Rig:
    """A hub, the controller on its own bus, and a 'world' bus that publishes and collects controls."""

    def __init__(self, port_base: int, **cfg: object) -> None:
        bus_cfg = BusConfig(hub_pub=f"tcp://127.0.0.1:{port_base}", hub_sub=f"tcp://127.0.0.1:{port_base + 1}")
        self.hub = BusHub(bus_cfg)
        self.world = ZmqBus("world", bus_cfg)
        self.car = ZmqBus("car", bus_cfg)
        self.cfg = from_dict(ControllerConfig, dict(cfg))
        self.ctl = ControllerLoop(self.car, self.cfg)
        self.ctl.start()
        self.controls: list = []
        self.got = threading.Condition()
        self.world.subscribe("/carla/hero/vehicle_control_cmd", "carla_msgs/msg/CarlaEgoVehicleControl", self._on)
        self._connect()

    def _connect(self, timeout: float = 20.0) -> None:
        """Publish a frame at t = -1 until its control comes back: every socket is connected after that (ZeroMQ
        drops what is sent before). Without a plan the controller brakes without stepping its PID; a
        sync-planning controller holds the tick, so it gets a plan for t = -1 too."""
        end = time.monotonic() + timeout
        while not self.controls:
            if self.cfg.sync_plan_period_s > 0:
                self.world.publish(self.ctl.waypoint_topic, B.path_msg(WP, -1.0, "hero/base_link"))
            self.world.publish("/carla/hero/odometry", _odometry(-1.0))
            self.wait(1, 0.3)
            assert time.monotonic() < end, "the controller never answered"
        self.controls.clear()
        self.ctl.safety_brakes = 0

    def _on(self, msg: object) -> None:
        with self.got:
            if B.stamp_key(msg.header) >= 0 or not self.controls:
                self.controls.append(msg)
            self.got.notify_all()

    def wait(self, n: int, timeout: float = 10.0) -> list:
        end = time.monotonic() + timeout
        with self.got:
            while len(self.controls) < n and time.monotonic() < end:
                self.got.wait(0.1)
        return list(self.controls)

    def close(self) -> None:
        self.ctl.close()
        for b in (self.world, self.car, self.hub):
            b.close()


@pytest.fixture
def rig(port_base: int):
    made: list[_Rig] = []

    def make(**cfg: object) -> _Rig:
        made.append(_Rig(port_base + 2 * len(made), **cfg))
        return made[-1]

    yield make
    for r in made:
        r.close()


def _hand_pid(wp: np.ndarray, speed: float) -> tuple[float, float, float]:
    """LMDrive's first PID step by hand: frame (x right, y forward) = (-y, x); windows of 40 zeros."""
    p0, p1 = np.array([-wp[0, 1], wp[0, 0]]), np.array([-wp[1, 1], wp[1, 0]])
    aim = (p0 + p1) / 2
    angle = math.degrees(math.pi / 2 - math.atan2(aim[1], aim[0])) / 90
    steer = float(np.clip(1.25 * angle + 0.75 * angle / 40 + 0.3 * angle, -1, 1))
    desired = float(np.linalg.norm(p0 - p1)) / 0.5
    brake = desired < 0.1 or speed / desired > 1.1
    delta = float(np.clip(desired - speed, 0.0, 0.35))
    throttle = 0.0 if brake else float(np.clip(5.0 * delta + 0.5 * delta / 40 + 1.0 * delta, 0.0, 0.75))
    return throttle, steer, 1.0 if brake else 0.0


def test_path_and_odometry_give_the_pids_control(rig) -> None:
    r = rig(waypoint_source="edge", pid={"startup_brake_ticks": 0})
    r.world.publish("/flad/v0/waypoints", B.path_msg(WP, 3.0, "v0/base_link"))
    time.sleep(0.2)
    r.world.publish("/carla/hero/odometry", _odometry(3.0, x=5.0, y=-2.0, yaw=0.3, speed=2.0))
    (c,) = r.wait(1)
    throttle, steer, brake = _hand_pid(WP, 2.0)
    assert steer == pytest.approx(-0.46305, abs=1e-4)            # waypoints to the left: steer left (CARLA: -)
    # the second tick (after the discovery frame): LMDrive computes it (`step % 2 != 0 and step > 4` holds only
    # from tick 5 on) and scales the steer by 0.8
    assert (c.throttle, c.steer, c.brake) == pytest.approx((throttle, 0.8 * steer, brake), abs=1e-6)
    e = WaypointPID().step(WP, 2.0)
    assert (c.throttle, c.steer, c.brake) == pytest.approx((e.throttle, 0.8 * e.steer, e.brake), abs=1e-6)
    assert B.stamp_key(c.header) == B.time_key(3.0)             # stamped with the odometry's stamp exactly


def test_plan_is_carried_forward_into_the_current_ego_frame(rig) -> None:
    """0.5 s after planning, 1 m further along x and 0.5 m left of the plan: the plan re-sampled 0.5 s later and
    seen from the new pose is what steers (right, back onto the planned line)."""
    r = rig(pid={"startup_brake_ticks": 0})
    straight = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0], [5.0, 0.0]])
    r.world.publish("/carla/hero/odometry", _odometry(0.0, speed=2.0))
    r.world.publish("/flad/v0/waypoints", B.path_msg(straight, 0.0, "v0/base_link"))
    r.wait(1)
    r.world.publish("/carla/hero/odometry", _odometry(0.5, x=1.0, y=0.5, speed=2.0))
    c = r.wait(2)[-1]
    ref = LMDriveController(PIDConfig(startup_brake_ticks=0))
    ref.step(None, 0.0)                           # the discovery frame (no plan: brake)
    ref.step(straight, 2.0)                       # the first tick (already published)
    want = ref.step(np.array([[1.0, -0.5], [2.0, -0.5], [3.0, -0.5], [4.0, -0.5], [5.0, -0.5]]), 2.0)
    assert want.steer > 0.1
    assert (c.throttle, c.steer, c.brake) == pytest.approx((want.throttle, want.steer, want.brake), abs=1e-6)


def test_stale_or_missing_waypoints_brake(rig) -> None:
    r = rig(max_waypoint_age_s=0.5, pid={"startup_brake_ticks": 0})
    r.world.publish("/carla/hero/odometry", _odometry(0.0, speed=3.0))     # no plan yet
    r.world.publish("/flad/v0/waypoints", B.path_msg(WP, 1.0, "v0/base_link"))
    time.sleep(0.2)
    r.world.publish("/carla/hero/odometry", _odometry(1.2, speed=3.0))     # plan 0.2 s old: drive
    r.world.publish("/carla/hero/odometry", _odometry(1.6, speed=3.0))     # plan 0.6 s old: brake
    c0, c1, c2 = r.wait(3)
    assert (c0.throttle, c0.brake) == (0.0, 1.0)
    assert c1.brake == 0.0 and c1.throttle > 0
    assert (c2.throttle, c2.steer, c2.brake) == (0.0, 0.0, 1.0)
    assert r.ctl.safety_brakes == 2


def test_sync_planning_holds_the_tick_until_its_waypoints_arrive(rig) -> None:
    r = rig(waypoint_source="expert", sync_plan_period_s=0.05)
    assert r.ctl.waypoint_topic == waypoint_topic("expert", "v0", "hero") == "/carla/hero/expert_waypoints"
    r.world.publish("/carla/hero/odometry", _odometry(0.0, speed=1.0))
    time.sleep(0.5)
    assert r.controls == []                                                # held: no plan for t = 0 yet
    r.world.publish("/carla/hero/expert_waypoints", B.path_msg(WP, 0.0, "hero/base_link"))
    assert len(r.wait(1)) == 1
    r.world.publish("/carla/hero/odometry", _odometry(0.0, speed=1.0))     # the same frame re-published
    assert len(r.wait(2)) == 2
    assert r.ctl.controls == 2                                             # answered again, PID not stepped twice
    assert (r.controls[0].throttle, r.controls[0].steer) == (r.controls[1].throttle, r.controls[1].steer)


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="max_waypoint_age_s"):
        from_dict(ControllerConfig, {"max_waypoint_age_s": 0.0})
    with pytest.raises(ConfigError, match="waypoint_source"):
        from_dict(ControllerConfig, {"waypoint_source": "oracle"})
    assert from_dict(ControllerConfig, {"pid": {"turn_kp": 2.0}}).pid.turn_kp == 2.0


def test_creep_rule_restarts_a_car_stuck_on_a_stop_plan_and_respects_the_lidar(rig) -> None:
    """The node applies WaypointAgent's creep rule: standstill for stuck_after_s with a clear box ahead ->
    follow the navigation target point at creep_speed; an obstacle in the box ends the creep."""
    r = rig(waypoint_source="edge", stuck_after_s=1.0, creep_s=2.0, creep_speed=2.0, pid={"startup_brake_ticks": 0})
    stop = np.zeros((5, 2))                          # a planner that wants to stand still (e.g. a stale "stop")
    clear = np.array([[30.0, 0.0, 1.0, 0.5], [-5.0, 0.0, 1.0, 0.5]], np.float32)   # nothing in the box ahead
    blocked = np.array([[4.0, 0.2, 1.0, 0.5]], np.float32)                           # something 4 m ahead
    labels = {"target_point": [10.0, 0.0], "command": 3, "instruction": "follow the lane", "notice": ""}

    def tick(t: float, points: np.ndarray) -> object:
        n = len(r.controls)
        r.world.publish("/carla/hero/lidar", B.pointcloud_msg(points, t, "hero/lidar"))
        r.world.publish("/carla/hero/navigation", B.navigation_msg(labels, t, "hero", 100.0))
        r.world.publish("/flad/v0/waypoints", B.path_msg(stop, t, "v0/base_link"))
        time.sleep(0.05)
        r.world.publish("/carla/hero/odometry", _odometry(t))
        return r.wait(n + 1)[-1]

    early = [tick(t, clear) for t in (0.0, 0.5)]
    assert all(c.brake == 1.0 and c.throttle == 0.0 for c in early)        # the plan says stop: it stops
    creeping = tick(1.0, clear)                                            # 1 s at standstill: creep
    assert creeping.brake == 0.0 and creeping.throttle > 0.0
    assert r.ctl.creep.creeps == 1
    assert tick(1.5, blocked).brake == 1.0                                 # obstacle ahead: the creep ends


def test_creep_rule_off_means_no_lidar_subscription(rig) -> None:
    r = rig(waypoint_source="edge", stuck_after_s=0.0)
    r.world.publish("/flad/v0/waypoints", B.path_msg(np.zeros((5, 2)), 0.0, "v0/base_link"))
    time.sleep(0.1)
    for t in (0.0, 5.0, 11.0, 15.0):
        r.world.publish("/flad/v0/waypoints", B.path_msg(np.zeros((5, 2)), t, "v0/base_link"))
        time.sleep(0.05)
        r.world.publish("/carla/hero/odometry", _odometry(t))
    cs = r.wait(4)
    assert len(cs) == 4 and all(c.brake == 1.0 for c in cs) and r.ctl.creep.creeps == 0
