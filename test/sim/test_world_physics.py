"""Kinematic bicycle sanity: acceleration, turning radius, braking, steer sign, reverse, bad inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flad_sim.physics import DT, Control, VehicleParams, bicycle_step, obb_overlap
from flad_sim.world import World


def drive(controls: list[Control], v0: float = 0.0, yaw0: float = 0.0, p: VehicleParams | None = None):
    p = p or VehicleParams()
    x = y = 0.0
    yaw, v = yaw0, v0
    out = []
    for c in controls:
        c = c.clipped()
        x, y, yaw, v, yr, _ = (float(a) for a in bicycle_step(
            np.array(x), np.array(y), np.array(yaw), np.array(v), np.array(c.throttle), np.array(c.steer),
            np.array(c.brake), np.array(c.hand_brake), np.array(c.reverse), p, DT))
        out.append((x, y, yaw, v, yr))
    return np.array(out)


def test_straight_line_acceleration_matches_model() -> None:
    p = VehicleParams()
    tr = drive([Control(throttle=1.0)] * 40)          # 2 s
    # dv/dt = a_max (1 - v/top) - rolling - drag v^2: integrate the same ODE finely
    v = 0.0
    for _ in range(4000):
        v += (p.max_accel * (1 - v / p.top_speed) - p.rolling - p.drag * v * v) * 0.0005
    assert tr[-1, 3] == pytest.approx(v, rel=0.02)
    assert 6.5 < tr[-1, 3] < 8.0
    assert np.allclose(tr[:, 1], 0.0) and np.all(np.diff(tr[:, 0]) > 0)
    assert np.allclose(tr[:, 2], 0.0)


@pytest.mark.parametrize("steer", [0.05, 0.1, 0.2])
def test_turning_radius_from_steer(steer: float) -> None:
    p = VehicleParams()
    tr = drive([Control(steer=steer)] * 200, v0=5.0, p=p)
    expected = p.wheelbase / math.tan(steer * math.radians(p.max_steer_deg))
    v, yr = tr[-1, 3], tr[-1, 4]
    assert v / abs(yr) == pytest.approx(expected, rel=5e-3)   # yaw rate uses the mid-step speed
    # CARLA convention: positive steer turns right (clockwise, yaw decreasing)
    assert yr < 0 and tr[-1, 1] < 0
    # the path is a circle of that radius about the centre (0, -R) (rear-axle reference)
    pts = tr[:60, :2]
    r_fit = np.linalg.norm(pts - np.array([0.0, -expected]), axis=1)
    assert np.allclose(r_fit, expected, rtol=0.02)


def test_braking_stops_the_car_and_stays_stopped() -> None:
    p = VehicleParams()
    tr = drive([Control(brake=1.0)] * 60, v0=15.0)
    stop_idx = int(np.argmax(tr[:, 3] == 0.0))
    assert tr[stop_idx, 3] == 0.0 and np.all(tr[stop_idx:, 3] == 0.0)
    dist = tr[stop_idx, 0]
    ideal = 15.0 ** 2 / (2 * p.max_brake)
    assert ideal * 0.85 < dist < ideal * 1.1
    # braking never pushes the car backwards
    assert np.all(np.diff(tr[:, 0]) >= -1e-12)
    # hand brake alone also stops
    assert drive([Control(hand_brake=True)] * 100, v0=8.0)[-1, 3] == 0.0


def test_reverse_and_bad_inputs() -> None:
    tr = drive([Control(throttle=0.5, reverse=True)] * 60)
    assert tr[-1, 3] < 0 and tr[-1, 0] < 0
    assert tr[-1, 3] >= -VehicleParams().max_reverse_speed
    c = Control(throttle=float("nan"), steer=5.0, brake=-1.0).clipped()
    assert (c.throttle, c.steer, c.brake) == (0.0, 1.0, 0.0)


def test_obb_overlap() -> None:
    c = np.zeros(2)
    half = np.array([2.0, 1.0])
    C = np.array([[3.9, 0.0], [4.1, 0.0], [0.0, 1.9], [3.0, 3.0], [2.0, 2.0]])
    yaws = np.array([0.0, 0.0, 0.0, math.pi / 4, math.pi / 4])
    H = np.tile([2.0, 1.0], (5, 1))
    np.testing.assert_array_equal(obb_overlap(c, 0.0, half, C, yaws, H), [True, False, True, False, True])


def test_world_ego_follows_controls_and_walls_stop_it() -> None:
    w = World("Town01", seed=0, n_vehicles=0, n_pedestrians=0)
    lk = w.town.links[0]
    p = w.town.lane_point(lk.id, 0, 5.0)
    d = w.town.lane_point(lk.id, 0, 6.0) - p
    ego = w.spawn_ego((p[0], p[1], math.atan2(d[1], d[0])))
    for _ in range(40):
        w.step({ego: Control(throttle=1.0)})
    st = w.ego_state(ego)
    assert 6.5 < st.speed < 8.0 and st.yaw_rate == 0.0
    # a barrier across the lane: the car stops dead at it and reports a static collision
    c = w.egos[ego].center() + np.array([math.cos(st.yaw), math.sin(st.yaw)]) * 12.0
    w.add_static_obstacle(c[0], c[1], st.yaw)
    hits = []
    for _ in range(60):
        w.step({ego: Control(throttle=1.0)})
        hits += w.events(ego)
    assert w.ego_state(ego).speed == 0.0
    assert hits and all(h["type"] == "collision" and h["kind"] == 3 for h in hits)
