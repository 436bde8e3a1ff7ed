"""Schema-shaped synthetic batches whose labels are learnable from the sensors.

Used by tests and by `flad vehicle train --synthetic` when no embedded-world shards exist: the traffic
light is a coloured lamp in the front image (absent for `none`), occupancy boxes appear as LiDAR returns,
and the expert's waypoints follow the target point at the current speed (stopping for red/yellow).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from flad_sim import scene
from flad_sim.schema import BEV_SIZE, BEV_X_RANGE_M, BEV_Y_RANGE_M, N_WAYPOINTS, WAYPOINT_DT_S, empty_sample

LAMP_RGB = {scene.TL_RED: (230, 30, 30), scene.TL_YELLOW: (235, 200, 30), scene.TL_GREEN: (30, 210, 70)}
TL_PROBS = (0.4, 0.2, 0.1, 0.3)


def synthetic_sample(rng: np.random.Generator, camera_sizes=None, lidar_rays: int | None = None) -> dict:
    """One sample (numpy, schema shapes) drawn from `rng`."""
    s = empty_sample(camera_sizes) if lidar_rays is None else empty_sample(camera_sizes, lidar_rays)
    tl = int(rng.choice(4, p=TL_PROBS))
    for name in [k for k in s if k.startswith("rgb_")]:
        h, w, _ = s[name].shape
        img = np.empty((h, w, 3), np.float32)
        img[: h // 2] = (135, 190, 235)                         # sky
        img[h // 2:] = (90, 90, 90)                             # road
        img += rng.normal(0, 12, size=img.shape)
        s[name] = np.clip(img, 0, 255).astype(np.uint8)
    if tl != scene.TL_NONE:
        img = s["rgb_front"]
        h, w, _ = img.shape
        k = max(3, h // 16)
        r0 = int(rng.integers(2, h // 2 - k))
        c0 = int(rng.integers(w // 4, 3 * w // 4 - k))
        img[r0 - 2: r0 + k + 2, c0 - 2: c0 + k + 2] = (20, 20, 20)
        img[r0: r0 + k, c0: c0 + k] = LAMP_RGB[tl]
    # occupancy boxes and LiDAR returns
    bev = np.zeros((BEV_SIZE, BEV_SIZE), np.uint8)
    n_rays = s["lidar"].shape[0]
    lidar = np.zeros((n_rays, 4), np.float32)
    lidar[:, 3] = -1.0
    res = (BEV_X_RANGE_M[1] - BEV_X_RANGE_M[0]) / BEV_SIZE
    used = 0
    for _ in range(int(rng.integers(0, 5))):
        r, c = int(rng.integers(0, BEV_SIZE - 4)), int(rng.integers(0, BEV_SIZE - 2))
        bev[r: r + 4, c: c + 2] = 1
        m = min(400, n_rays - used)
        xs = BEV_X_RANGE_M[1] - (r + rng.uniform(0, 4, m)) * res
        ys = BEV_Y_RANGE_M[1] - (c + rng.uniform(0, 2, m)) * res
        lidar[used: used + m] = np.stack([xs, ys, rng.uniform(0.2, 1.5, m), rng.uniform(0.3, 1.0, m)], 1)
        used += m
    m = min(n_rays // 4, n_rays - used)                          # ground returns
    lidar[used: used + m] = np.stack([rng.uniform(-10, 40, m), rng.uniform(-25, 25, m),
                                      rng.normal(0, 0.03, m), rng.uniform(0, 0.2, m)], 1)
    s["bev"] = bev
    s["lidar"] = lidar
    speed = float(rng.uniform(0, 10))
    tp = np.array([rng.uniform(5, 30), rng.uniform(-10, 10)], np.float32)
    direction = tp / np.linalg.norm(tp)
    v = speed * (0.2 if tl in (scene.TL_RED, scene.TL_YELLOW) else 1.0)
    steps = np.arange(1, N_WAYPOINTS + 1, dtype=np.float32) * WAYPOINT_DT_S * v
    s["waypoints"] = (steps[:, None] * direction[None, :]).astype(np.float32)
    s["tl_state"] = np.int64(tl)
    s["speed"] = np.float32(speed)
    s["target_point"] = tp
    return s


def synthetic_batches(n_batches: int, batch_size: int, seed: int = 0, camera_sizes=None,
                      lidar_rays: int | None = None) -> Iterator[dict]:
    """`n_batches` batches in the `iter_batches` format (numpy arrays stacked on axis 0, text as lists)."""
    rng = np.random.default_rng(seed)
    for _ in range(n_batches):
        samples = [synthetic_sample(rng, camera_sizes, lidar_rays) for _ in range(batch_size)]
        yield stack_samples(samples)


def stack_samples(samples: list[dict]) -> dict:
    out: dict = {}
    for k in samples[0]:
        vals = [s[k] for s in samples]
        out[k] = np.stack(vals) if isinstance(vals[0], np.ndarray | np.generic) else list(vals)
    return out
