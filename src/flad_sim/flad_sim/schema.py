"""What one dataset sample holds: the contract between the world's data collection and the encoder.

Numeric fields are fixed-shape arrays so shards are memory-mappable; text fields are strings. Shapes
with sensor sizes come from the world's sensor config (defaults below); a shard's manifest records
the actual shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: default sensor rig (LMDrive's, scaled): front 128x128, left/right/rear 64x64, LiDAR 32 x 512 rays
DEFAULT_CAMERA_SIZES = {"rgb_front": (128, 128), "rgb_left": (64, 64), "rgb_right": (64, 64), "rgb_rear": (64, 64)}
CAMERA_YAWS_DEG = {"rgb_front": 0.0, "rgb_left": 60.0, "rgb_right": -60.0, "rgb_rear": 180.0}
DEFAULT_LIDAR_RAYS = 32 * 512
N_WAYPOINTS = 5
WAYPOINT_DT_S = 0.5
BEV_SIZE = 50                   # BEV occupancy label: 50 x 50 cells of 1 m
BEV_X_RANGE_M = (-10.0, 40.0)   # ego-frame x (forward) covered by BEV rows, row 0 at the far end
BEV_Y_RANGE_M = (-25.0, 25.0)   # ego-frame y (left) covered by BEV columns, column 0 at the left edge


@dataclass(frozen=True)
class FieldSpec:
    dtype: str
    shape: tuple[int, ...]   # per sample
    doc: str


def sample_fields(camera_sizes: dict[str, tuple[int, int]] | None = None,
                  lidar_rays: int = DEFAULT_LIDAR_RAYS) -> dict[str, FieldSpec]:
    """Numeric fields of one sample, by name."""
    cams = camera_sizes or DEFAULT_CAMERA_SIZES
    fields = {name: FieldSpec("uint8", (h, w, 3), f"{name} RGB image, HWC") for name, (h, w) in cams.items()}
    fields.update({
        "lidar": FieldSpec("float32", (lidar_rays, 4),
                           "x, y, z, intensity in the ego frame; a ray with no return is all zeros with "
                           "intensity -1"),
        "waypoints": FieldSpec("float32", (N_WAYPOINTS, 2), "expert's future positions, 0.5 s apart, ego frame"),
        "tl_state": FieldSpec("int64", (), "traffic-light state governing the ego (scene.TL_*)"),
        "bev": FieldSpec("uint8", (BEV_SIZE, BEV_SIZE), "occupancy by vehicles/pedestrians/obstacles, ego frame"),
        "speed": FieldSpec("float32", (), "ego speed, m/s"),
        "target_point": FieldSpec("float32", (2,), "next route target point, ego frame"),
        "command": FieldSpec("int64", (), "navigation command id (flad_sim.instructions)"),
        "gnss": FieldSpec("float32", (3,), "latitude, longitude, altitude"),
        "yaw_rate": FieldSpec("float32", (), "rad/s"),
        "town": FieldSpec("int64", (), "town index"),
    })
    return fields


#: text fields of one sample
TEXT_FIELDS = ("instruction", "notice")


def empty_sample(camera_sizes=None, lidar_rays: int = DEFAULT_LIDAR_RAYS) -> dict[str, np.ndarray | str]:
    """A zero-filled sample with the right shapes (for tests and shape checks)."""
    out: dict[str, np.ndarray | str] = {
        k: np.zeros(s.shape, dtype=s.dtype) for k, s in sample_fields(camera_sizes, lidar_rays).items()}
    out.update({k: "" for k in TEXT_FIELDS})
    return out
