"""The world on carla-ros-bridge topics: message builders round-trip through CDR, and over a real ZeroMQ
bus on loopback the vehicle side receives the sensors and its control command moves the ego."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace as Ns

import numpy as np
import pytest

from flad_core import codec
from flad_sim import bridge as B


def test_topic_names():
    assert B.topic("hero", "rgb_front") == "/carla/hero/rgb_front/image"
    assert B.topic("hero", "lidar") == "/carla/hero/lidar"
    assert B.topic("ego1", "vehicle_control_cmd") == "/carla/ego1/vehicle_control_cmd"


def test_image_round_trip_bgra8():
    rgb = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    m = codec.decode(codec.encode(B.image_msg(rgb, 12.25, "hero/rgb_front")), "sensor_msgs/msg/Image")
    assert m.encoding == "bgra8" and m.step == 28 and m.header.stamp.sec == 12
    assert m.data[0] == rgb[0, 0, 2] and m.data[3] == 255                      # B first, alpha last
    np.testing.assert_array_equal(B.image_from_msg(m), rgb)
    m.step = 5
    with pytest.raises(ValueError):
        B.image_from_msg(m)


def test_pointcloud_round_trip_drops_no_return_rays():
    pts = np.array([[1, 2, 3, 0.5], [0, 0, 0, -1], [4, -5, 0.1, 0.0]], np.float32)
    m = codec.decode(codec.encode(B.pointcloud_msg(pts, 0.0, "hero/lidar")), "sensor_msgs/msg/PointCloud2")
    assert [f.name for f in m.fields] == ["x", "y", "z", "intensity"] and m.point_step == 16
    np.testing.assert_array_equal(B.points_from_msg(m), pts[[0, 2]])


def test_odometry_and_control():
    st = Ns(x=1.0, y=2.0, z=0.0, yaw=np.pi / 2, speed=3.0, yaw_rate=0.1, time_s=2.0, lat=0.1, lon=0.2, alt=0.0)
    od = codec.decode(codec.encode(B.odometry_msg(st, "hero")), "nav_msgs/msg/Odometry")
    q = od.pose.pose.orientation
    assert 2 * np.arctan2(q.z, q.w) == pytest.approx(np.pi / 2) and od.twist.twist.linear.x == 3.0
    c = B.control_from_msg(codec.decode(codec.encode(B.control_msg(2.0, -0.25, 0.0)),
                                        "carla_msgs/msg/CarlaEgoVehicleControl"))
    assert c.throttle == 1.0 and c.steer == pytest.approx(-0.25)                # clipped to [0, 1]


def test_bridge_over_loopback_bus(port_base):
    pytest.importorskip("flad_sim.world")
    from flad_core.bus import BusConfig, BusHub, ZmqBus
    from flad_sim.sensors import LidarConfig, RigConfig, default_cameras
    from flad_sim.world import World

    cfg = BusConfig(hub_pub=f"tcp://127.0.0.1:{port_base}", hub_sub=f"tcp://127.0.0.1:{port_base + 1}")
    hub = BusHub(cfg)
    sim_bus, car_bus = ZmqBus("sim", cfg), ZmqBus("car", cfg)
    try:
        w = World("Town01", seed=0, n_vehicles=0, n_pedestrians=0)
        from flad_sim.route import seeded_routes

        ego = w.spawn_ego(seeded_routes(w.town, 0, 1)[0])
        rig = RigConfig(cameras=default_cameras({"rgb_front": (16, 16)}), lidar=LidarConfig(channels=4,
                                                                                           azimuth_steps=32))
        br = B.WorldBridge(sim_bus, w, ego, rig)
        got: dict[str, object] = {}
        ev = threading.Event()

        def keep(name):
            def cb(msg):
                got[name] = msg
                if {"image", "lidar", "odom", "speed"} <= set(got):
                    ev.set()
            return cb

        car_bus.subscribe(B.topic("hero", "rgb_front"), "sensor_msgs/msg/Image", keep("image"))
        car_bus.subscribe(B.topic("hero", "lidar"), "sensor_msgs/msg/PointCloud2", keep("lidar"))
        car_bus.subscribe(B.topic("hero", "odometry"), "nav_msgs/msg/Odometry", keep("odom"))
        car_bus.subscribe(B.topic("hero", "speedometer"), "std_msgs/msg/Float32", keep("speed"))
        x0 = w.egos[ego].x, w.egos[ego].y
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (ev.is_set() and br.commands):
            car_bus.publish(B.topic("hero", "vehicle_control_cmd"), B.control_msg(throttle=0.8))
            br.tick()
            time.sleep(0.02)
        assert ev.is_set(), f"vehicle side got only {sorted(got)}"
        assert br.commands > 0, "the bridge never received a control command"
        img = B.image_from_msg(got["image"])
        assert img.shape == (16, 16, 3)
        assert B.points_from_msg(got["lidar"]).shape[1] == 4
        for _ in range(20):
            br.tick()
        moved = np.hypot(w.egos[ego].x - x0[0], w.egos[ego].y - x0[1])
        assert moved > 0.5 and w.egos[ego].v > 0.5                                 # throttle obeyed
    finally:
        car_bus.close()
        sim_bus.close()
        hub.close()


def test_bridge_command_runs(port_base):
    pytest.importorskip("flad_sim.world")
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "flad_core.cli", "sim", "bridge", "--host-hub", "--ticks", "5",
                        "--speed", "0", "--hub-pub", f"tcp://127.0.0.1:{port_base}",
                        "--hub-sub", f"tcp://127.0.0.1:{port_base + 1}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["ticks"] == 5
