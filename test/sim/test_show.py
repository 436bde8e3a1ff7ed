"""`flad sim show`: the PNGs are written and hold the rendered frame."""

from __future__ import annotations

import numpy as np
import pytest

from flad_sim.crossroads import synthetic_scene
from flad_sim.sensors import RigConfig, SensorRig, default_cameras
from flad_sim.show import camera_sheet, show, write_frame


def test_camera_sheet_layout():
    imgs = {"rgb_front": np.full((8, 8, 3), 1, np.uint8), "rgb_left": np.full((4, 4, 3), 2, np.uint8),
            "rgb_right": np.full((4, 4, 3), 3, np.uint8), "rgb_rear": np.full((4, 4, 3), 4, np.uint8)}
    sheet = camera_sheet(imgs)
    assert sheet.shape == (16, 24, 3)
    assert sheet[0, 0, 0] == 2 and sheet[0, 8, 0] == 1 and sheet[0, 16, 0] == 3 and sheet[8, 8, 0] == 4


def test_write_frame_pngs(tmp_path):
    import matplotlib.pyplot as plt

    rig = SensorRig(RigConfig(cameras=default_cameras({"rgb_front": (32, 32), "rgb_left": (16, 16),
                                                       "rgb_right": (16, 16), "rgb_rear": (16, 16)})))
    sv = synthetic_scene(0)
    paths = write_frame(tmp_path, sv, rig, prefix="t", upscale=2)
    names = sorted(p.name for p in paths)
    assert names == sorted(["t_rgb_front.png", "t_rgb_left.png", "t_rgb_right.png", "t_rgb_rear.png",
                            "t_cameras.png", "t_lidar_bev.png", "t_map.png"])
    front = plt.imread(tmp_path / "t_rgb_front.png")
    assert front.shape[:2] == (64, 64)
    expect = np.repeat(np.repeat(rig.render_camera("rgb_front", sv), 2, 0), 2, 1)
    np.testing.assert_allclose(front[..., :3] * 255, expect, atol=1)


def test_show_world_town(tmp_path):
    pytest.importorskip("flad_sim.world")
    paths = show(tmp_path, town="Town01", seed=0, frames=1, warmup_steps=5)
    assert len(paths) == 7 and all(p.stat().st_size > 1000 for p in paths)
