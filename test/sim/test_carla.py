"""CARLA adapter, offline: frame conversions, blueprint attributes of the rig, image and LiDAR conversions
(checked against our own LiDAR), and route extraction on a `carla.Map` built from an OpenDRIVE string
(no server). The live path needs a CARLA server and is not tested here."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flad_sim import carla_adapter as ca
from flad_sim import scene as S
from flad_sim.crossroads import synthetic_scene
from flad_sim.sensors import LidarConfig, RigConfig, SensorRig

XODR = """<?xml version="1.0" standalone="yes"?>
<OpenDRIVE>
  <header revMajor="1" revMinor="4" name="flad_test" version="1.00" north="0" south="0" east="0" west="0"/>
  <road name="r0" length="100.0" id="0" junction="-1">
    <link/>
    <planView>
      <geometry s="0.0" x="0.0" y="0.0" hdg="0.0" length="60.0"><line/></geometry>
      <geometry s="60.0" x="60.0" y="0.0" hdg="0.0" length="40.0"><arc curvature="0.02"/></geometry>
    </planView>
    <elevationProfile/>
    <lateralProfile/>
    <lanes>
      <laneSection s="0.0">
        <left>
          <lane id="2" type="driving" level="false"><link/><width sOffset="0.0" a="3.5" b="0" c="0" d="0"/></lane>
          <lane id="1" type="driving" level="false"><link/><width sOffset="0.0" a="3.5" b="0" c="0" d="0"/></lane>
        </left>
        <center><lane id="0" type="none" level="false"><link/></lane></center>
        <right>
          <lane id="-1" type="driving" level="false"><link/><width sOffset="0.0" a="3.5" b="0" c="0" d="0"/></lane>
          <lane id="-2" type="driving" level="false"><link/><width sOffset="0.0" a="3.5" b="0" c="0" d="0"/></lane>
        </right>
      </laneSection>
    </lanes>
  </road>
</OpenDRIVE>
"""


def test_frame_conversions():
    assert ca.carla_yaw_to_ros(90.0) == pytest.approx(-math.pi / 2)       # CARLA +90 = towards CARLA +y = south
    assert ca.carla_yaw_to_ros(-60.0) == pytest.approx(math.radians(60))  # CARLA -60 = our left camera
    for yaw in (-3.0, -0.5, 0.0, 1.0, 3.0):
        assert ca.carla_yaw_to_ros(ca.ros_yaw_to_carla(yaw)) == pytest.approx(yaw)
    assert ca.carla_to_ros_xyz(1.0, 2.0, 3.0) == (1.0, -2.0, 3.0)
    np.testing.assert_array_equal(ca.carla_to_ros_xyz(0, np.array([1.0, -2.0]))[1], [-1.0, 2.0])

    from types import SimpleNamespace as Ns

    t = Ns(location=Ns(x=10.0, y=5.0, z=0.3), rotation=Ns(yaw=30.0))      # duck-typed carla.Transform
    p = ca.carla_transform_to_pose(t)
    assert (p.x, p.y, p.z) == (10.0, -5.0, 0.3) and p.yaw == pytest.approx(math.radians(-30))


def test_rig_blueprint_attributes_match_our_rig():
    specs = {s.name: s for s in ca.rig_sensor_specs(RigConfig())}
    assert set(specs) == {"rgb_front", "rgb_left", "rgb_right", "rgb_rear", "lidar", "gnss", "imu"}
    f, left, right, rear = (specs[n] for n in ("rgb_front", "rgb_left", "rgb_right", "rgb_rear"))
    assert f.attributes["image_size_x"] == "128" and left.attributes["image_size_y"] == "64"
    assert f.blueprint == "sensor.camera.rgb" and f.attributes["fov"] == "100"
    assert left.yaw == pytest.approx(-60.0) and right.yaw == pytest.approx(60.0)      # CARLA: left is negative
    assert abs(rear.yaw) == pytest.approx(180.0)
    lid = specs["lidar"]
    assert lid.blueprint == "sensor.lidar.ray_cast"
    assert lid.attributes["channels"] == "32" and lid.attributes["range"] == "50"
    assert int(lid.attributes["points_per_second"]) == 32 * 512 * 20 and lid.attributes["rotation_frequency"] == "20"
    assert lid.attributes["upper_fov"] == "10" and lid.attributes["lower_fov"] == "-25"
    assert f.x == pytest.approx(1.5 - ca.REAR_AXLE_TO_CENTER_M)


def test_image_conversions():
    rgb = np.random.default_rng(0).integers(0, 255, (4, 6, 3), dtype=np.uint8)
    bgra = ca.rgb_to_bgra(rgb)
    assert bgra[0, 0, 0] == rgb[0, 0, 2] and bgra[0, 0, 2] == rgb[0, 0, 0] and bgra[0, 0, 3] == 255
    np.testing.assert_array_equal(ca.bgra_to_rgb(bgra.tobytes(), 4, 6), rgb)

    class Img:
        height, width, raw_data = 4, 6, bgra.tobytes()

    np.testing.assert_array_equal(ca.carla_image_to_rgb(Img), rgb)
    with pytest.raises(ValueError):
        ca.bgra_to_rgb(b"\0" * 10, 4, 6)


def test_lidar_conversion_reproduces_our_lidar():
    """Our LiDAR's points, expressed as CARLA would deliver them (sensor frame, y right, only returns),
    convert back to exactly our fixed layout."""
    lc = LidarConfig(channels=16, azimuth_steps=256)
    ours = SensorRig(RigConfig(lidar=lc)).lidar(synthetic_scene(0))
    hit = ours[:, 3] >= 0
    carla_pts = ours[hit].copy()
    carla_pts[:, 0] -= lc.x
    carla_pts[:, 1] = -(carla_pts[:, 1] - lc.y)
    carla_pts[:, 2] -= lc.z
    rng = np.random.default_rng(1)
    carla_pts = carla_pts[rng.permutation(len(carla_pts))]              # CARLA's order is its own
    back = ca.carla_lidar_to_points(carla_pts.astype(np.float32).tobytes(), lc)
    assert back.shape == ours.shape
    np.testing.assert_array_equal(back[:, 3] >= 0, hit)
    np.testing.assert_allclose(back[hit], ours[hit], atol=1e-4)
    assert np.all(back[~hit] == np.array([0, 0, 0, -1], np.float32))


def test_lidar_conversion_keeps_the_nearest_point_per_ray():
    lc = LidarConfig(channels=2, azimuth_steps=4, upper_fov_deg=0.0, lower_fov_deg=-10.0)
    pts = np.array([[10.0, 0.0, 0.0, 0.5], [5.0, 0.0, 0.0, 0.7], [0.0, -3.0, 0.0, 0.2]], np.float32)
    out = ca.carla_lidar_to_points(pts, lc).reshape(2, 4, 4)
    assert out[0, 0, 0] == pytest.approx(5.0 + lc.x) and out[0, 0, 3] == pytest.approx(0.7)
    # CARLA y = -3 is to the LEFT, i.e. ROS +y, azimuth +90 deg (index 1)
    assert out[0, 1, 1] == pytest.approx(3.0 + lc.y) and out[0, 1, 3] == pytest.approx(0.2)
    assert out[1, :, 3].tolist() == [-1, -1, -1, -1]


@pytest.fixture(scope="module")
def cmap():
    carla = pytest.importorskip("carla")
    return carla.Map("flad_test", XODR)


def test_opendrive_map_offline(cmap):
    wps = cmap.generate_waypoints(5.0)
    assert len(wps) > 40
    lanes = {w.lane_id for w in wps}
    assert lanes == {-2, -1, 1, 2}


def test_route_on_map_straight_right_lane(cmap):
    r = ca.route_on_map(cmap, (2.0, -1.75), (50.0, -1.75))
    # right-hand traffic driving east: the right lane is south of the centre line, ROS y = -1.75
    np.testing.assert_allclose(r.points[:, 1], -1.75, atol=0.05)
    np.testing.assert_allclose(r.heading, 0.0, atol=1e-3)
    assert r.length == pytest.approx(48.0, abs=2.5)
    assert np.all(np.diff(r.points[:, 0]) > 0)
    assert {lane for _, lane in r.road_lane} == {-1}
    p = r.start_pose()
    assert isinstance(p, S.Pose) and p.x == pytest.approx(2.0, abs=1.0)


def test_route_on_map_follows_the_arc(cmap):
    # OpenDRIVE coordinates are right-handed like ROS (CARLA flips them): the arc (curvature +0.02) bends the
    # road left/north; lane -1 lies 1.75 m to the right of the reference line: ref - 1.75 * left normal
    ang = 0.02 * 40.0
    goal = (60.0 + (1 / 0.02) * math.sin(ang) + 1.75 * math.sin(ang),
            (1 / 0.02) * (1 - math.cos(ang)) - 1.75 * math.cos(ang))
    r = ca.route_on_map(cmap, (5.0, -1.75), goal, step=1.0)
    assert np.linalg.norm(r.points[-1] - np.array(goal)) < 1.5
    assert r.heading[-1] == pytest.approx(ang, abs=0.05)       # turned left by 0.8 rad
    assert r.points[-1, 1] > 5.0                               # north, i.e. ROS +y


def test_route_against_traffic_is_refused(cmap):
    with pytest.raises(ValueError, match="no route"):
        ca.route_on_map(cmap, (50.0, 1.75), (90.0, 1.75), max_expansions=2000)    # lane 1 drives west


def test_live_world_needs_a_server():
    """No server here: connecting fails with CARLA's own error (we never fake one)."""
    pytest.importorskip("carla")
    with pytest.raises(RuntimeError):
        ca.CarlaWorld("127.0.0.1", 1, timeout_s=0.5)
