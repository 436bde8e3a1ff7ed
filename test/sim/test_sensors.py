"""Sensor geometry on hand-built scenes: where a box appears in each camera, where LiDAR hits it, the
ego-frame handedness, the BEV label, weather effects and determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flad_sim import scene as S
from flad_sim.crossroads import synthetic_scene
from flad_sim.schema import BEV_SIZE, sample_fields
from flad_sim.sensors import (
    CameraConfig,
    LidarConfig,
    RigConfig,
    SensorRig,
    bev_occupancy,
    default_cameras,
    ego_measurements,
    gnss_from_xy,
)

BOX_RGB = (200, 40, 40)


def flat_scene(boxes: list[tuple], ego: S.Pose | None = None, weather: S.Weather | None = None,
               surface: int = S.SURFACE_ROAD) -> S.SceneView:
    """Uniform ground, boxes given as (x, y, z, l, w, h, yaw, kind)."""
    ground = S.GroundMap(np.full((400, 400), surface, np.uint8), (-100.0, -100.0), 0.5)
    parts = [S.Boxes(np.array([[x, y, z]], np.float32), np.array([[ln, w, h]], np.float32),
                     np.array([yaw], np.float32), np.array([kind], np.uint8), np.array([BOX_RGB], np.uint8),
                     np.array([i + 1], np.int32))
             for i, (x, y, z, ln, w, h, yaw, kind) in enumerate(boxes)]
    return S.SceneView(ground, S.Boxes.concat(parts), weather or S.Weather(), ego or S.Pose(0.0, 0.0, 0.0),
                       ego_actor_id=0)


def rig(**kw) -> SensorRig:
    return SensorRig(RigConfig(haze_density=0.0, **kw))


def box_mask(img: np.ndarray) -> np.ndarray:
    """Pixels showing the red test box (shaded: red clearly dominant)."""
    r, g, b = (img[..., k].astype(int) for k in range(3))
    return (r > 60) & (r > 2 * g) & (r > 2 * b)


def test_default_rig_matches_schema():
    r = SensorRig()
    assert r.camera_sizes == {"rgb_front": (128, 128), "rgb_left": (64, 64), "rgb_right": (64, 64),
                              "rgb_rear": (64, 64)}
    assert r.lidar_rays == 32 * 512
    obs = r.observe(flat_scene([]))
    for name, spec in sample_fields(r.camera_sizes, r.lidar_rays).items():
        if name in obs:
            assert obs[name].shape == spec.shape and obs[name].dtype == np.dtype(spec.dtype), name


def test_box_straight_ahead_is_centred_with_the_right_size():
    d, w, h = 20.0, 2.0, 3.0
    sv = flat_scene([(d, 0.0, 0.0, 1.0, w, h, 0.0, S.BOX_BUILDING)])
    cam = CameraConfig("rgb_front", 128, 128, fov_deg=90.0, x=1.5, z=2.0)
    img = rig(cameras=[cam]).render_camera("rgb_front", sv)
    m = box_mask(img)
    cols = np.nonzero(m.any(axis=0))[0]
    rows = np.nonzero(m.any(axis=1))[0]
    f = 64 / math.tan(math.radians(45))
    near = d - 0.5 - cam.x                   # distance to the near face
    half_w_px = f * (w / 2) / near
    assert abs((cols[0] + cols[-1] + 1) / 2 - 64) <= 0.5          # centred
    assert abs((cols[-1] + 1 - cols[0]) - 2 * half_w_px) <= 2
    top_px = 64 - f * (h - cam.z) / near     # rows above the centre for the top edge
    bot_px = 64 + f * cam.z / near
    assert abs(rows[0] - top_px) <= 1.5 and abs(rows[-1] + 1 - bot_px) <= 1.5
    # nothing of the box behind the camera or in the rear view
    assert not box_mask(rig().render_camera("rgb_rear", sv)).any()


@pytest.mark.parametrize("name,y,visible_in", [("rgb_left", 20.0, "rgb_left"), ("rgb_right", -20.0, "rgb_right")])
def test_left_camera_looks_left(name, y, visible_in):
    """+60 deg yaw looks to the left (+y): a box at (10, +20) is in the left view and not in the right."""
    sv = flat_scene([(10.0, y, 0.0, 4.0, 4.0, 4.0, 0.0, S.BOX_BUILDING)])
    r = rig()
    seen = {n: box_mask(r.render_camera(n, sv)).sum() for n in ("rgb_left", "rgb_right", "rgb_front", "rgb_rear")}
    assert seen[visible_in] > 20
    other = "rgb_right" if visible_in == "rgb_left" else "rgb_left"
    assert seen[other] == 0


def test_box_right_of_centre_appears_right_in_the_image():
    sv = flat_scene([(20.0, -4.0, 0.0, 1.0, 1.0, 3.0, 0.0, S.BOX_BUILDING)])   # y < 0 is the right
    img = rig().render_camera("rgb_front", sv)
    cols = np.nonzero(box_mask(img).any(axis=0))[0]
    assert cols.min() > 64


def test_camera_follows_ego_pose():
    """Same relative layout, ego rotated and moved: same image."""
    sv0 = flat_scene([(20.0, 0.0, 0.0, 2.0, 2.0, 2.4, 0.0, S.BOX_BUILDING)])
    sv1 = flat_scene([(10.0, 25.0, 0.0, 2.0, 2.0, 2.4, math.pi / 2, S.BOX_BUILDING)],
                     ego=S.Pose(10.0, 5.0, math.pi / 2))
    r = rig()
    a = box_mask(r.render_camera("rgb_front", sv0))
    b = box_mask(r.render_camera("rgb_front", sv1))
    assert a.sum() > 20
    assert (a != b).sum() <= 4


def test_lidar_hits_box_at_range_and_is_right_handed():
    lc = LidarConfig(channels=16, azimuth_steps=360, range_m=50.0, x=1.0, z=2.0)
    sv = flat_scene([(20.0, 0.0, 0.0, 2.0, 4.0, 3.0, 0.0, S.BOX_VEHICLE),
                     (1.0, 15.0, 0.0, 2.0, 2.0, 3.0, 0.0, S.BOX_PEDESTRIAN)])
    pts = rig(lidar=lc).lidar(sv).reshape(16, 360, 4)
    # azimuth 0 = straight ahead: the channels that are not on the ground hit the near face x = 19
    fwd = pts[:, 0]
    on_box = fwd[:, 2] > 0.05
    assert on_box.sum() >= 3
    np.testing.assert_allclose(fwd[on_box, 0], 19.0, atol=1e-3)
    np.testing.assert_allclose(fwd[on_box, 1], 0.0, atol=1e-3)
    assert np.all(fwd[on_box, 2] <= 3.0 + 1e-3)
    # azimuth +90 deg (counter-clockwise) looks left: the box at y = +15 is hit at y = 14 (near face)
    left = pts[:, 90]
    hit = left[:, 2] > 0.05
    assert hit.sum() >= 2
    np.testing.assert_allclose(left[hit, 1], 14.0, atol=1e-3)
    # ground returns lie on z = 0 at the expected range for the lowest channel
    low = pts[-1, 180]                                          # straight back, lowest channel (-25 deg)
    assert low[3] >= 0 and abs(low[2]) < 1e-4
    np.testing.assert_allclose(math.hypot(low[0] - 1.0, low[1]), 2.0 / math.tan(math.radians(25)), rtol=1e-4)


def test_lidar_no_return_is_zero_with_intensity_minus_one():
    sv = flat_scene([])
    pts = rig(lidar=LidarConfig(channels=8, azimuth_steps=64)).lidar(sv).reshape(8, 64, 4)
    up = pts[0]                          # +10 deg: nothing up there
    assert np.all(up[:, :3] == 0) and np.all(up[:, 3] == -1)
    ok = pts[..., 3] >= 0
    assert np.all(pts[..., 3][ok] <= 1.0)
    assert pts.dtype == np.float32


def test_lidar_in_ego_frame_when_ego_is_rotated():
    ego = S.Pose(50.0, -30.0, math.radians(135))
    fwd = np.array([math.cos(ego.yaw), math.sin(ego.yaw)])
    c = np.array([ego.x, ego.y]) + 25.0 * fwd
    sv = flat_scene([(c[0], c[1], 0.0, 2.0, 6.0, 3.0, ego.yaw, S.BOX_BUILDING)], ego=ego)
    pts = rig(lidar=LidarConfig(channels=16, azimuth_steps=360)).lidar(sv).reshape(16, 360, 4)
    hit = pts[:, 0, 2] > 0.05
    np.testing.assert_allclose(pts[hit, 0, 0], 24.0, atol=1e-2)        # 25 - half length


def test_bev_occupancy_cells():
    sv = flat_scene([(20.0, 0.0, 0.0, 4.0, 2.0, 1.5, 0.0, S.BOX_VEHICLE),
                     (10.3, 10.3, 0.0, 0.4, 0.4, 1.7, 0.0, S.BOX_PEDESTRIAN),
                     (-5.0, -20.0, 0.0, 2.0, 2.0, 1.0, 0.0, S.BOX_STATIC),
                     (30.0, 0.0, 0.0, 10.0, 10.0, 10.0, 0.0, S.BOX_BUILDING)])   # buildings are not occupancy
    bev = bev_occupancy(sv)
    assert bev.shape == (BEV_SIZE, BEV_SIZE) and bev.dtype == np.uint8
    # vehicle: x 18..22 -> rows 18..21 (row = floor(40 - x)), y -1..1 -> columns 24..25
    assert bev[18:22, 24:26].all()
    assert bev[29, 25] == 0
    # pedestrian smaller than a cell is still marked: x 10.3 -> row 29, y 10.3 -> column 14
    assert bev[29, 14] == 1
    # static obstacle behind-right: x -5 -> row 45, y -20 -> column 45
    assert bev[45, 45] == 1
    assert bev.sum() < 20


def test_bev_excludes_the_ego_and_rotates_with_it():
    ego = S.Pose(0.0, 0.0, math.pi / 2)                  # facing north: a car at world (0, 20) is ahead
    sv = flat_scene([(0.0, 20.0, 0.0, 4.0, 2.0, 1.5, math.pi / 2, S.BOX_VEHICLE)], ego=ego)
    sv.ego_actor_id = 99
    assert bev_occupancy(sv)[18:22, 24:26].all()
    sv.ego_actor_id = 1                                   # the box is the ego itself
    assert bev_occupancy(sv).sum() == 0


def test_deterministic_including_noise():
    w = S.Weather("rain", fog_density=0.01, brightness=0.6, noise_std=8.0)
    r1, r2 = SensorRig(RigConfig(seed=3)), SensorRig(RigConfig(seed=3))
    a, b = r1.observe(synthetic_scene(1, w)), r2.observe(synthetic_scene(1, w))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    c = SensorRig(RigConfig(seed=4)).observe(synthetic_scene(1, w))
    assert not np.array_equal(a["rgb_front"], c["rgb_front"])      # the noise stream depends on the seed


def test_weather_fog_and_brightness():
    sv = flat_scene([(60.0, 0.0, 0.0, 1.0, 10.0, 10.0, 0.0, S.BOX_BUILDING)])
    clear = rig().render_camera("rgb_front", sv)
    sv.weather = S.Weather("fog", fog_density=0.05)
    foggy = rig().render_camera("rgb_front", sv)
    assert box_mask(clear).sum() > 20 and box_mask(foggy).sum() == 0        # 60 m of dense fog hides it
    sv.weather = S.Weather("night", brightness=0.3)
    dark = rig().render_camera("rgb_front", sv)
    assert dark.mean() < 0.6 * clear.mean()


def test_traffic_light_heads_glow_at_night():
    sv = flat_scene([(15.0, 0.0, 4.0, 0.5, 0.5, 1.0, 0.0, S.BOX_TRAFFIC_LIGHT)],
                    weather=S.Weather("night", brightness=0.2))
    img = rig().render_camera("rgb_front", sv)
    assert box_mask(img).sum() > 4 and img[box_mask(img)][:, 0].max() >= 190


def test_ground_markings_are_drawn():
    """A yellow centre line 1.75 m to the left of the ego shows up left of the image centre, yellow."""
    g = np.full((400, 400), S.SURFACE_ROAD, np.uint8)
    g[:, 400 // 2 + 3] = S.SURFACE_CENTER_LINE             # y in [1.5, 2.0): a line on the left
    sv = S.SceneView(S.GroundMap(g.T.copy(), (-100.0, -100.0), 0.5), S.Boxes.empty(), S.Weather(),
                     S.Pose(0.0, 0.0, 0.0))
    img = rig().render_camera("rgb_front", sv).astype(int)
    yellow = (img[..., 0] > 150) & (img[..., 1] > 120) & (img[..., 2] < 90)
    cols = np.nonzero(yellow.any(axis=0))[0]
    assert yellow.sum() > 30 and cols.max() < 64


def test_config_validation_and_custom_sizes():
    with pytest.raises(ValueError):
        RigConfig(cameras=[CameraConfig("a", 1, 1)]).validate()
    r = SensorRig(RigConfig(cameras=default_cameras({"rgb_front": (48, 96)}, fov_deg=60.0),
                            lidar=LidarConfig(channels=4, azimuth_steps=100)))
    obs = r.observe(synthetic_scene(0))
    assert obs["rgb_front"].shape == (48, 96, 3) and obs["lidar"].shape == (400, 4)


def test_gnss_and_measurements():
    lat, lon, alt = gnss_from_xy(1000.0, 2000.0, 3.0)
    assert lat == pytest.approx(math.degrees(2000.0 / 6378137.0)) and lon > 0 and alt == 3.0
    m = ego_measurements({"x": 1000.0, "y": 2000.0, "speed": 4.5, "yaw_rate": -0.1})
    assert m["gnss"].dtype == np.float32 and m["speed"] == np.float32(4.5) and m["yaw_rate"] == np.float32(-0.1)
    try:
        from flad_sim.world import gnss_from_xy as world_gnss
    except ImportError:
        return
    np.testing.assert_allclose(world_gnss(1000.0, 2000.0, 3.0), (lat, lon, alt))


def test_world_observer_plugs_into_the_route_runner():
    pytest.importorskip("flad_sim.world")
    from flad_sim.agent import RouteRunner
    from flad_sim.physics import Control
    from flad_sim.route import seeded_routes
    from flad_sim.sensors import world_observer
    from flad_sim.world import World

    seen = []

    class Creep:
        def reset(self, info):
            pass

        def run_step(self, obs):
            seen.append(obs)
            return Control(throttle=0.3)

    w = World("Town01", seed=0)
    small = RigConfig(cameras=default_cameras({"rgb_front": (16, 16)}), lidar=LidarConfig(channels=4,
                                                                                         azimuth_steps=16))
    RouteRunner(w, seeded_routes(w.town, 0, 1)[0], Creep(), observe=world_observer(SensorRig(small)),
                max_ticks=3).run()
    assert len(seen) == 3
    o = seen[-1]
    assert o["rgb_front"].shape == (16, 16, 3) and o["lidar"].shape == (64, 4) and o["bev"].shape == (50, 50)
    assert o["speed"] > 0 and o["gnss"].shape == (3,)
