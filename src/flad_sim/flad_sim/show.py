"""`flad sim show`: PNGs of one frame so that a person can see what the sensors see.

Writes the 4 cameras (one contact sheet and one PNG each), a LiDAR bird's-eye view, the BEV label, and
the town map with the route and the actors. Works on a real world (`flad_sim.world.World`) or, with no
world, on `flad_sim.crossroads.synthetic_scene()`, a hand-built crossroads used by the sensor tests too.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from flad_sim import scene as S
from flad_sim.crossroads import synthetic_scene
from flad_sim.sensors import SURFACE_RGB, RigConfig, SensorRig

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# drawing


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def camera_sheet(images: dict[str, np.ndarray]) -> np.ndarray:
    """One uint8 image: left | front | right on top (side views scaled to the front's height), rear below."""
    front = images.get("rgb_front")
    if front is None:
        return np.concatenate(list(images.values()), axis=1)
    H = front.shape[0]

    def fit(img: np.ndarray) -> np.ndarray:
        k = max(1, round(H / img.shape[0]))
        return np.repeat(np.repeat(img, k, axis=0), k, axis=1)[:H]

    top = [fit(images[n]) for n in ("rgb_left",) if n in images] + [front] + \
          [fit(images[n]) for n in ("rgb_right",) if n in images]
    row = np.concatenate(top, axis=1)
    if "rgb_rear" in images:
        rear = fit(images["rgb_rear"])
        pad = np.zeros((rear.shape[0], row.shape[1], 3), np.uint8)
        off = (row.shape[1] - rear.shape[1]) // 2
        pad[:, off:off + rear.shape[1]] = rear
        row = np.concatenate([row, pad], axis=0)
    return row


def write_frame(out_dir: Path, sv: S.SceneView, rig: SensorRig, prefix: str = "frame",
                route_xy: np.ndarray | None = None, title: str = "", upscale: int = 3) -> list[Path]:
    """Render one frame and write its PNGs; returns the paths."""
    plt = _plt()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    obs = rig.observe(sv)
    paths = []
    for name in rig.camera_sizes:
        p = out_dir / f"{prefix}_{name}.png"
        img = obs[name]
        plt.imsave(p, np.repeat(np.repeat(img, upscale, 0), upscale, 1))
        paths.append(p)
    sheet = camera_sheet({n: obs[n] for n in rig.camera_sizes})
    p = out_dir / f"{prefix}_cameras.png"
    plt.imsave(p, np.repeat(np.repeat(sheet, upscale, 0), upscale, 1))
    paths.append(p)
    paths.append(_lidar_png(out_dir / f"{prefix}_lidar_bev.png", obs["lidar"], obs["bev"], title))
    paths.append(_map_png(out_dir / f"{prefix}_map.png", sv, route_xy, title))
    return paths


def _lidar_png(path: Path, pts: np.ndarray, bev: np.ndarray, title: str) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.5))
    ok = pts[:, 3] >= 0
    p = pts[ok]
    p = p[np.argsort(p[:, 2])]          # high points on top, so walls and cars stand out
    ax = axes[0]
    # plot with x forward = up, y left = left (so the picture matches a driver's view from above)
    sc = ax.scatter(-p[:, 1], p[:, 0], c=p[:, 2], s=0.6, cmap="viridis", vmin=-0.5, vmax=4.0)
    ax.plot([0], [0], marker="^", color="red", markersize=8)
    ax.set_xlim(-50, 50)
    ax.set_ylim(-50, 50)
    ax.set_aspect("equal")
    ax.set_title(f"LiDAR (ego frame, {ok.sum()}/{len(pts)} returns; colour = z m)")
    ax.set_xlabel("-y (right) m")
    ax.set_ylabel("x (forward) m")
    fig.colorbar(sc, ax=ax, fraction=0.046)
    ax = axes[1]
    ax.imshow(bev, cmap="gray_r", extent=(-25, 25, -10, 40), vmin=0, vmax=1)
    ax.plot([0], [0], marker="^", color="red", markersize=8)
    ax.set_title("BEV occupancy label (50 x 50, 1 m)")
    ax.set_xlabel("-y (right) m")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _map_png(path: Path, sv: S.SceneView, route_xy: np.ndarray | None, title: str, radius: float = 90.0) -> Path:
    plt = _plt()
    g = sv.ground
    h, w = g.classes.shape
    rgb = SURFACE_RGB[np.minimum(g.classes, len(SURFACE_RGB) - 1)].astype(np.uint8)
    extent = (g.origin_xy[0], g.origin_xy[0] + w * g.resolution_m, g.origin_xy[1], g.origin_xy[1] + h * g.resolution_m)
    fig, ax = plt.subplots(figsize=(7.5, 7.5))
    ax.imshow(rgb, origin="lower", extent=extent, interpolation="nearest")
    b = sv.boxes
    from matplotlib.patches import Polygon

    for i in range(len(b)):
        cx, cy, _ = b.center[i]
        if abs(cx - sv.ego.x) > radius * 1.5 or abs(cy - sv.ego.y) > radius * 1.5:
            continue
        ln, wd, _ = b.size[i]
        c, s = math.cos(b.yaw[i]), math.sin(b.yaw[i])
        corners = np.array([[ln, wd], [ln, -wd], [-ln, -wd], [-ln, wd]]) / 2
        pts = corners @ np.array([[c, s], [-s, c]]) + [cx, cy]
        ax.add_patch(Polygon(pts, closed=True, facecolor=np.asarray(b.color[i]) / 255.0, edgecolor="black",
                             linewidth=0.3))
    if route_xy is not None and len(route_xy):
        ax.plot(route_xy[:, 0], route_xy[:, 1], color="magenta", linewidth=1.5, alpha=0.7, label="route")
        ax.plot(route_xy[-1:, 0], route_xy[-1:, 1], marker="*", color="magenta", markersize=14, label="goal")
    e = sv.ego
    ax.add_patch(Polygon(np.array([[5.0, 0], [-3.0, 2.5], [-3.0, -2.5]]) @
                         np.array([[math.cos(e.yaw), math.sin(e.yaw)], [-math.sin(e.yaw), math.cos(e.yaw)]])
                         + [e.x, e.y], closed=True, facecolor="red", edgecolor="white", linewidth=1.0, zorder=5,
                         label="ego"))
    ax.legend(loc="upper right")
    ax.set_xlim(e.x - radius, e.x + radius)
    ax.set_ylim(e.y - radius, e.y + radius)
    ax.set_title(title or "map")
    ax.set_xlabel("x (east) m")
    ax.set_ylabel("y (north) m")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def show(out_dir: Path, town: str | None = None, seed: int = 0, frames: int = 1, warmup_steps: int = 40,
         rig_config: RigConfig | None = None, **_: Any) -> list[Path]:
    """Write PNGs of `frames` frames; from the embedded world when it is installed and `town` is given
    (or 'synthetic' for the hand-built crossroads)."""
    rig = SensorRig(rig_config)
    paths: list[Path] = []
    if town in (None, "synthetic"):
        sv = synthetic_scene(seed)
        return write_frame(out_dir, sv, rig, prefix="synthetic", title="synthetic crossroads")
    from flad_sim import dataset  # the world-driving glue lives with data collection

    drive = dataset.ExpertDrive(town, seed)
    drive.advance(warmup_steps)
    for f in range(frames):
        sv = drive.scene_view()
        paths += write_frame(out_dir, sv, rig, prefix=f"{town}_{seed}_{f:03d}", route_xy=drive.route_xy(),
                             title=f"{town} seed {seed} t={sv.time_s:.1f}s")
        drive.advance(max(1, warmup_steps // 2))
    return paths
