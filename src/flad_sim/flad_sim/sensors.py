"""The sensor rig: 4 ray-cast RGB cameras, a spinning LiDAR, GNSS/speed/yaw rate, and the BEV label.

Everything reads only a `scene.SceneView`, so the sensors do not care how the world moves things.

Why it is fast enough (>= 50 full frames/s on one core) in plain numpy: the world is "2.5-D" -- flat
ground and upright oriented boxes -- and every camera/LiDAR is level (no pitch/roll). So all rays of one
image column (or one LiDAR azimuth) share a horizontal direction. The expensive box test is a 2-D slab test
per (column, box); per pixel only a 1-D interval test against the few boxes that column hits remains.
Per-camera ray geometry (column directions, slopes, ground distances) is pre-computed once.

Frames: ROS REP 103. Ego frame x forward, y left, z up, origin at the rear-axle centre on the ground.
A camera yaw of +60 deg looks to the LEFT (counter-clockwise), matching `schema.CAMERA_YAWS_DEG`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flad_sim import scene as S
from flad_sim.schema import (
    BEV_SIZE,
    BEV_X_RANGE_M,
    BEV_Y_RANGE_M,
    CAMERA_YAWS_DEG,
    DEFAULT_CAMERA_SIZES,
)

log = logging.getLogger(__name__)

F32 = np.float32
_INF = F32(np.inf)

#: RGB of each ground surface class (index = SURFACE_*)
SURFACE_RGB = np.array([
    (88, 122, 62),     # offroad: grass
    (168, 166, 160),   # sidewalk
    (78, 78, 82),      # road asphalt
    (235, 235, 235),   # lane marking (white)
    (228, 190, 40),    # centre line (yellow)
    (240, 240, 240),   # crosswalk stripes
    (245, 245, 245),   # stop line
], dtype=F32)

#: LiDAR reflectivity per surface class and per box kind (intensity before distance attenuation)
SURFACE_REFLECTIVITY = np.array([0.10, 0.25, 0.15, 0.70, 0.60, 0.70, 0.70], dtype=F32)
BOX_REFLECTIVITY = np.array([0.35, 0.55, 0.30, 0.45, 0.50, 0.60, 0.90], dtype=F32)
LIDAR_ATTENUATION_PER_M = 0.004   # CARLA's default atmosphere_attenuation_rate

#: direction the light comes from (world frame, unit); azimuth/elevation fixed: sun in the south-west
_SUN = np.array([-0.45, -0.55, 0.70], dtype=F32)
_SUN /= np.linalg.norm(_SUN)
AMBIENT = 0.55
DIFFUSE = 0.45


@dataclass
class CameraConfig:
    """One level pinhole camera on the ego; position in the ego frame (metres), yaw in degrees (+ = left)."""

    name: str
    width: int
    height: int
    fov_deg: float = 100.0
    x: float = 1.5
    y: float = 0.0
    z: float = 2.0
    yaw_deg: float = 0.0
    max_range_m: float = 120.0

    def validate(self) -> None:
        if self.width < 2 or self.height < 2:
            raise ValueError(f"camera {self.name}: size must be at least 2x2, got {self.width}x{self.height}")
        if not 10.0 <= self.fov_deg <= 170.0:
            raise ValueError(f"camera {self.name}: fov_deg must be in [10, 170], got {self.fov_deg}")
        if self.z <= 0:
            raise ValueError(f"camera {self.name}: z must be above the ground, got {self.z}")


@dataclass
class LidarConfig:
    """A spinning LiDAR: `channels` elevations evenly in [lower_fov_deg, upper_fov_deg] x `azimuth_steps`."""

    channels: int = 32
    azimuth_steps: int = 512
    upper_fov_deg: float = 10.0
    lower_fov_deg: float = -25.0
    range_m: float = 50.0
    x: float = 1.3
    y: float = 0.0
    z: float = 2.5
    noise_std_m: float = 0.0

    @property
    def rays(self) -> int:
        return self.channels * self.azimuth_steps

    def validate(self) -> None:
        if self.channels < 1 or self.azimuth_steps < 1:
            raise ValueError("lidar channels and azimuth_steps must be >= 1")
        if not self.lower_fov_deg < self.upper_fov_deg < 89.0 or self.lower_fov_deg <= -89.0:
            raise ValueError("lidar needs -89 < lower_fov_deg < upper_fov_deg < 89")
        if self.range_m <= 0:
            raise ValueError("lidar range_m must be > 0")


def default_cameras(sizes: dict[str, tuple[int, int]] | None = None, fov_deg: float = 100.0) -> list[CameraConfig]:
    """LMDrive's rig, scaled: front/left/right at the windscreen, rear at the back; sizes are (H, W)."""
    sizes = sizes or DEFAULT_CAMERA_SIZES
    cams = []
    for name, (h, w) in sizes.items():
        yaw = CAMERA_YAWS_DEG.get(name, 0.0)
        x = -0.5 if abs(yaw) > 90 else 1.5
        cams.append(CameraConfig(name=name, width=w, height=h, fov_deg=fov_deg, x=x, yaw_deg=yaw))
    return cams


@dataclass
class RigConfig:
    """The whole rig. `haze_density` adds a little aerial perspective on top of the weather's fog."""

    cameras: list[CameraConfig] = field(default_factory=default_cameras)
    lidar: LidarConfig = field(default_factory=LidarConfig)
    haze_density: float = 0.004
    max_candidates: int = 10   # boxes considered per column after the 2-D test (nearest first)
    seed: int = 0

    def validate(self) -> None:
        names = [c.name for c in self.cameras]
        if len(set(names)) != len(names):
            raise ValueError(f"camera names must be unique, got {names}")
        for cam in self.cameras:
            cam.validate()
        self.lidar.validate()
        if self.max_candidates < 1:
            raise ValueError("max_candidates must be >= 1")

    @property
    def camera_sizes(self) -> dict[str, tuple[int, int]]:
        """(H, W) by camera name, as `schema.sample_fields` wants them."""
        return {c.name: (c.height, c.width) for c in self.cameras}


# --------------------------------------------------------------------------------------------------
# geometry helpers


def _rot(yaw: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s], [s, c]], dtype=F32)


def _cull(boxes: S.Boxes, ox: float, oy: float, max_range: float) -> np.ndarray:
    """Indices of boxes whose footprint circle comes within `max_range` of (ox, oy)."""
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    d = np.hypot(boxes.center[:, 0] - ox, boxes.center[:, 1] - oy)
    r = 0.5 * np.hypot(boxes.size[:, 0], boxes.size[:, 1])
    return np.nonzero(d - r < max_range)[0]


@dataclass
class _Hits:
    """Per (column, candidate) results of the 2-D slab test; misses have t_en = inf, t_ex = -inf."""

    t_en: np.ndarray     # [W, M] horizontal distance where the ray enters the footprint
    t_ex: np.ndarray     # [W, M]
    box: np.ndarray      # [W, M] index into the culled box arrays (0 for misses)
    side_shade: np.ndarray  # [W, M] Lambert shade of the vertical face that was entered


def _slab_2d(ox: float, oy: float, hdir: np.ndarray, cx: np.ndarray, cy: np.ndarray, cyaw: np.ndarray,
             hl: np.ndarray, hw: np.ndarray, near: float, far: float, max_cand: int) -> _Hits:
    """Vectorised 2-D ray/oriented-rectangle slab test for W rays from one origin against N boxes."""
    W = hdir.shape[0]
    N = cx.shape[0]
    if N == 0:
        empty = np.zeros((W, 1), F32)
        return _Hits(empty + _INF, empty - _INF, np.zeros((W, 1), np.int64), empty)
    c, s = np.cos(cyaw).astype(F32), np.sin(cyaw).astype(F32)
    # ray origin in each box frame: [N]
    rx, ry = F32(ox) - cx, F32(oy) - cy
    oxb = c * rx + s * ry
    oyb = -s * rx + c * ry
    dx, dy = hdir[:, 0:1], hdir[:, 1:2]           # [W, 1]
    dxb = dx * c + dy * s                          # [W, N]
    dyb = -dx * s + dy * c
    with np.errstate(divide="ignore", invalid="ignore"):
        ix = F32(1.0) / dxb
        iy = F32(1.0) / dyb
        ax = (-hl - oxb) * ix
        bx = (hl - oxb) * ix
        ay = (-hw - oyb) * iy
        by = (hw - oyb) * iy
    tminx = np.minimum(ax, bx)
    tmaxx = np.maximum(ax, bx)
    tminy = np.minimum(ay, by)
    tmaxy = np.maximum(ay, by)
    t_en = np.maximum(tminx, tminy)
    t_ex = np.minimum(tmaxx, tmaxy)
    hit = (t_ex >= np.maximum(t_en, F32(near))) & (t_en < F32(far))
    t_en = np.where(hit, np.maximum(t_en, F32(near)), _INF)
    # face entered: x-face if tminx > tminy; outward normal opposes the ray direction in box frame
    xface = tminx > tminy
    nxb = np.where(xface, -np.sign(dxb), F32(0.0))
    nyb = np.where(xface, F32(0.0), -np.sign(dyb))
    nwx = nxb * c - nyb * s
    nwy = nxb * s + nyb * c
    shade = F32(AMBIENT) + F32(DIFFUSE) * np.maximum(nwx * _SUN[0] + nwy * _SUN[1], F32(0.0))
    counts = hit.sum(axis=1)
    M = int(min(max(int(counts.max()) if W else 1, 1), max_cand, N))
    idx = np.argpartition(t_en, M - 1, axis=1)[:, :M] if M < N else np.broadcast_to(np.arange(N), (W, N))
    rows = np.arange(W)[:, None]
    t_en_c = t_en[rows, idx]
    t_ex_c = np.where(np.isfinite(t_en_c), t_ex[rows, idx], -_INF)
    return _Hits(t_en_c.astype(F32), t_ex_c.astype(F32), idx, shade[rows, idx].astype(F32))


def _first_box_hit(h: _Hits, zb: np.ndarray, zt: np.ndarray, origin_z: float, inv_slope: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per ray (rows x columns): horizontal distance to the nearest box hit (inf if none), which
    candidate, and whether the hit is on a vertical face (else top/bottom face).

    `inv_slope` is [R, W] (1 / dz-per-horizontal-metre of each ray; the sign must be constant along a row);
    zb/zt are per culled box. Rows looking up and down are done separately so the height interval
    [dzb/slope, dzt/slope] needs no min/max (this loop is the renderer's hot spot)."""
    dzb = zb[h.box] - F32(origin_z)                   # [W, M]
    dzt = zt[h.box] - F32(origin_z)
    R, W = inv_slope.shape
    M = h.box.shape[1]
    depth = np.empty((R, W, M), F32)
    up = inv_slope[:, 0] > 0
    for rows, lo_dz, hi_dz in ((np.nonzero(up)[0], dzb, dzt), (np.nonzero(~up)[0], dzt, dzb)):
        if rows.size == 0:
            continue
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        inv = inv_slope[r0:r1, :, None]
        t_lo = depth[r0:r1]                           # computed in place: this is the hot loop
        np.multiply(lo_dz[None], inv, out=t_lo)
        np.maximum(t_lo, h.t_en[None], out=t_lo)
        t_hi = hi_dz[None] * inv
        np.minimum(t_hi, h.t_ex[None], out=t_hi)
        np.copyto(t_lo, _INF, where=~(t_lo <= t_hi))      # NaN (0 * inf on a level row) is a miss too
    k = depth.argmin(axis=2)                          # [R, W]
    d = depth.reshape(-1, M)[np.arange(R * W), k.ravel()].reshape(R, W)
    cols = np.arange(W)[None, :]
    side = d <= h.t_en[cols, k] * F32(1.0001) + F32(1e-4)
    return d, k, side


# --------------------------------------------------------------------------------------------------
# the rig


class _CamGeom:
    """Pre-computed ray geometry of one camera (depends only on its config)."""

    def __init__(self, cfg: CameraConfig) -> None:
        self.cfg = cfg
        W, H = cfg.width, cfg.height
        f = (W / 2.0) / math.tan(math.radians(cfg.fov_deg) / 2.0)
        a = (np.arange(W) + 0.5 - W / 2.0)            # pixels right of centre
        b = (np.arange(H) + 0.5 - H / 2.0)            # pixels below centre (never exactly 0)
        norm = np.sqrt(f * f + a * a)
        self.hdir_local = np.stack([f / norm, -a / norm], axis=1).astype(F32)   # [W, 2], camera frame
        self.slope = (-b[:, None] / norm[None, :]).astype(F32)                 # [H, W] dz per metre
        with np.errstate(divide="ignore"):       # a level row (odd heights) looks at the horizon: inf is right
            self.inv_slope = (F32(1.0) / self.slope).astype(F32)
        self.dist_scale = np.sqrt(1.0 + self.slope.astype(np.float64) ** 2).astype(F32)  # 3-D per horiz. m
        with np.errstate(divide="ignore"):
            tg = np.where(self.slope < 0, cfg.z / -self.slope, np.inf)
        self.t_ground = tg.astype(F32)
        # rows looking down (all of them see the ground unless a box is nearer): a contiguous block
        self.r0 = int(np.argmax(self.slope[:, 0] < 0)) if (self.slope[:, 0] < 0).any() else H
        self.tg_block = np.ascontiguousarray(self.t_ground[self.r0:])
        self.sky_frac = np.clip(self.slope / 0.8, 0.0, 1.0).astype(F32)       # 0 at horizon, 1 high up
        self.half_fov = math.radians(cfg.fov_deg) / 2.0
        # headlight cone (for dark weather): pixels looking ahead of the car, near the ground
        ego_az = np.arctan2(self.hdir_local[:, 1], self.hdir_local[:, 0]) + math.radians(cfg.yaw_deg)
        cone = np.clip(np.cos(ego_az), 0.0, 1.0) ** 6
        self.headlight = (0.9 * cone[None, :] * (self.slope < 0.05)).astype(F32) if cone.max() > 0.05 else None
        self.corner_half_fov = math.atan(math.tan(self.half_fov) * math.hypot(W, H) / W)


class SensorRig:
    """Renders all sensors of one ego from a SceneView; deterministic for a given (seed, scene)."""

    def __init__(self, config: RigConfig | None = None) -> None:
        self.config = config or RigConfig()
        self.config.validate()
        self._cams = {c.name: _CamGeom(c) for c in self.config.cameras}
        lc = self.config.lidar
        elev = np.radians(np.linspace(lc.upper_fov_deg, lc.lower_fov_deg, lc.channels))  # channel 0 = top
        az = np.arange(lc.azimuth_steps) * (2 * np.pi / lc.azimuth_steps)               # 0 = forward, CCW
        self._l_hdir = np.stack([np.cos(az), np.sin(az)], axis=1).astype(F32)           # [A, 2] ego frame
        slope = np.tan(elev).astype(F32)
        slope = np.where(np.abs(slope) < 1e-6, F32(1e-6), slope).astype(F32)
        self._l_slope = np.broadcast_to(slope[:, None], (lc.channels, lc.azimuth_steps)).astype(F32)
        self._l_inv = (F32(1.0) / self._l_slope).astype(F32)
        self._l_scale = np.sqrt(1.0 + self._l_slope.astype(np.float64) ** 2).astype(F32)
        self._l_tmax = (lc.range_m / self._l_scale).astype(F32)                        # horiz. range per ray
        with np.errstate(divide="ignore"):
            self._l_tg = np.where(self._l_slope < 0, lc.z / -self._l_slope, np.inf).astype(F32)
        self._sky_cache: dict[tuple, np.ndarray] = {}

    @property
    def camera_sizes(self) -> dict[str, tuple[int, int]]:
        return self.config.camera_sizes

    @property
    def lidar_rays(self) -> int:
        return self.config.lidar.rays

    # ---- cameras ----------------------------------------------------------------------------------

    def _sky(self, g: _CamGeom, weather: S.Weather) -> np.ndarray:
        key = (g.cfg.name, weather.sky_rgb, weather.fog_rgb, weather.brightness, weather.fog_density)
        img = self._sky_cache.get(key)
        if img is None:
            horizon = np.array(weather.fog_rgb, F32) * 0.6 + np.array(weather.sky_rgb, F32) * 0.4
            zenith = np.array(weather.sky_rgb, F32)
            fog = min(1.0, weather.fog_density * 40.0)
            zenith = zenith * (1 - fog) + np.array(weather.fog_rgb, F32) * fog
            t = g.sky_frac[:, :, None]
            img = (horizon * (1 - t) + zenith * t) * F32(weather.brightness)
            img = np.ascontiguousarray(img, dtype=F32)
            if len(self._sky_cache) > 64:
                self._sky_cache.clear()
            self._sky_cache[key] = img
        return img

    def render_camera(self, name: str, sv: S.SceneView, boxes_idx: np.ndarray | None = None) -> np.ndarray:
        """One RGB image, uint8 [H, W, 3]."""
        g = self._cams[name]
        cfg = g.cfg
        ego = sv.ego
        R = _rot(ego.yaw)
        cam_xy = np.array([ego.x, ego.y], F32) + R @ np.array([cfg.x, cfg.y], F32)
        cam_yaw = ego.yaw + math.radians(cfg.yaw_deg)
        hdir = g.hdir_local @ _rot(cam_yaw).T                                  # [W, 2] world
        w = sv.weather
        img = self._sky(g, w).copy()                                           # [H, W, 3] float32
        depth = np.full((cfg.height, cfg.width), _INF, F32)                   # horizontal metres
        emissive: np.ndarray | None = None

        # ground: floor casting into the GroundMap
        if g.r0 < cfg.height:
            tg = g.tg_block
            px = cam_xy[0] + tg * hdir[None, :, 0]
            py = cam_xy[1] + tg * hdir[None, :, 1]
            cls = _lookup(sv.ground, px, py)
            # subtle per-cell texture so that distance and motion are visible on uniform surfaces
            tex = _cell_noise(px, py, 0.5) * F32(0.10) + F32(0.95)
            img[g.r0:] = SURFACE_RGB[cls] * tex[:, :, None]
            depth[g.r0:] = tg

        # boxes: 2-D slab test per column, then 1-D height test per pixel
        b = sv.boxes
        idx = boxes_idx if boxes_idx is not None else _cull(b, float(cam_xy[0]), float(cam_xy[1]), cfg.max_range_m)
        if idx.size:
            idx = self._frustum(b, idx, cam_xy, cam_yaw, g)
        if idx.size:
            cen, size, yaw = b.center[idx], b.size[idx], b.yaw[idx]
            h = _slab_2d(float(cam_xy[0]), float(cam_xy[1]), hdir, cen[:, 0], cen[:, 1], yaw,
                         size[:, 0] * F32(0.5), size[:, 1] * F32(0.5), 0.05, cfg.max_range_m,
                         self.config.max_candidates)
            zb = cen[:, 2]
            zt = cen[:, 2] + size[:, 2]
            d, k, side = _first_box_hit(h, zb, zt, cfg.z, g.inv_slope)
            vis = d < depth
            if vis.any():
                r, c = np.nonzero(vis)
                kk = k[r, c]
                bi = h.box[c, kk]                       # culled box index per visible pixel
                dv = d[r, c]
                sd = side[r, c]
                shade = np.where(sd, h.side_shade[c, kk], F32(AMBIENT + DIFFUSE * _SUN[2]))
                base = b.color[idx[bi]].astype(F32)
                hz = F32(cfg.z) + g.slope[r, c] * dv - zb[bi]      # height of the hit above box bottom
                rel = hz / np.maximum(size[bi, 2], F32(1e-3))
                hx = cam_xy[0] + dv * hdir[c, 0]
                hy = cam_xy[1] + dv * hdir[c, 1]
                kinds = b.kind[idx[bi]]
                shade = shade * _box_pattern(kinds, rel, hz, hx, hy, sd, yaw[bi], cen[bi, :2])
                lamp = kinds == S.BOX_TRAFFIC_LIGHT
                if lamp.any():      # lamps glow: full colour regardless of shading and daylight
                    shade = np.where(lamp, F32(1.0), shade)
                    emissive = np.zeros(depth.shape, bool)
                    emissive[r[lamp], c[lamp]] = True
                img[r, c] = base * shade[:, None]
                depth[r, c] = dv

        # weather: brightness (+ the ego's headlights when dark), fog/haze by 3-D distance, sensor noise
        dist = depth * g.dist_scale
        finite = np.isfinite(dist)
        if w.brightness < 1.0:
            light = np.full(depth.shape, F32(w.brightness), F32)
            if w.brightness < 0.6 and g.headlight is not None:
                light += F32(1.0 - w.brightness) * g.headlight * np.exp(-np.where(finite, dist, 1e3) / F32(18.0))
            if emissive is not None:
                light[emissive] = 1.0
            img *= np.where(finite, light, F32(1.0))[:, :, None]
        dens = F32(w.fog_density + self.config.haze_density)
        fogf = np.where(finite, F32(1.0) - np.exp(-dens * np.where(finite, dist, 0)), F32(0.0))
        fog_col = np.array(w.fog_rgb, F32) * F32(min(1.0, w.brightness * 1.1))
        img += (fog_col - img) * fogf[:, :, None]
        if w.noise_std > 0:
            rng = self._rng(sv, name)
            img += rng.standard_normal(img.shape, dtype=F32) * F32(w.noise_std)
        np.clip(img, 0, 255, out=img)
        return img.astype(np.uint8)

    def _frustum(self, b: S.Boxes, idx: np.ndarray, cam_xy: np.ndarray, cam_yaw: float, g: _CamGeom
                 ) -> np.ndarray:
        """Keep boxes whose bounding circle overlaps the camera's horizontal field of view."""
        dx = b.center[idx, 0] - cam_xy[0]
        dy = b.center[idx, 1] - cam_xy[1]
        dist = np.hypot(dx, dy)
        r = 0.5 * np.hypot(b.size[idx, 0], b.size[idx, 1])
        ang = np.abs((np.arctan2(dy, dx) - cam_yaw + np.pi) % (2 * np.pi) - np.pi)
        with np.errstate(invalid="ignore"):
            margin = np.arcsin(np.clip(r / np.maximum(dist, 1e-6), 0.0, 1.0))
        keep = (dist <= r) | (ang <= g.corner_half_fov + margin)
        return idx[keep]

    def _rng(self, sv: S.SceneView, stream: str) -> np.random.Generator:
        """Noise stream fixed by (rig seed, ego, time, sensor): same scene -> same noise."""
        tag = sum(ord(ch) * (i + 1) for i, ch in enumerate(stream))
        return np.random.default_rng([self.config.seed, int(sv.ego_actor_id) & 0xFFFFFFFF,
                                      round(sv.time_s * 1000) & 0xFFFFFFFF, tag])

    def render_cameras(self, sv: S.SceneView) -> dict[str, np.ndarray]:
        """All cameras, sharing one distance cull of the scene's boxes."""
        ego = sv.ego
        rng = max(c.max_range_m for c in self.config.cameras) + 3.0
        idx = _cull(sv.boxes, ego.x, ego.y, rng)
        return {name: self.render_camera(name, sv, idx) for name in self._cams}

    # ---- LiDAR ------------------------------------------------------------------------------------

    def lidar(self, sv: S.SceneView) -> np.ndarray:
        """Point cloud float32 [channels * azimuth_steps, 4]: x, y, z, intensity in the ego frame.

        Row order: channel-major (channel 0 = highest elevation), azimuth 0 = straight ahead, CCW.
        A ray with no return within range is (0, 0, 0, -1)."""
        lc = self.config.lidar
        ego = sv.ego
        R = _rot(ego.yaw)
        o = np.array([ego.x, ego.y], F32) + R @ np.array([lc.x, lc.y], F32)
        hdir = self._l_hdir @ R.T
        t = np.where(self._l_tg <= self._l_tmax, self._l_tg, _INF)          # ground hits [C, A]
        inten = np.zeros(t.shape, F32)
        ground = np.isfinite(t)
        # boxes
        idx = _cull(sv.boxes, float(o[0]), float(o[1]), lc.range_m + 1.0)
        box_hit = None
        if idx.size:
            b = sv.boxes
            cen, size = b.center[idx], b.size[idx]
            h = _slab_2d(float(o[0]), float(o[1]), hdir, cen[:, 0], cen[:, 1], b.yaw[idx],
                         size[:, 0] * F32(0.5), size[:, 1] * F32(0.5), 0.05, lc.range_m,
                         self.config.max_candidates)
            d, k, _ = _first_box_hit(h, cen[:, 2], cen[:, 2] + size[:, 2], lc.z, self._l_inv)
            box_hit = (d < t) & (d <= self._l_tmax)
            if box_hit.any():
                r, c = np.nonzero(box_hit)
                t[r, c] = d[r, c]
                inten[r, c] = BOX_REFLECTIVITY[np.minimum(b.kind[idx[h.box[c, k[r, c]]]], 6)]
                ground &= ~box_hit
        if ground.any():
            r, c = np.nonzero(ground)
            gx = o[0] + t[r, c] * hdir[c, 0]
            gy = o[1] + t[r, c] * hdir[c, 1]
            inten[r, c] = SURFACE_REFLECTIVITY[np.minimum(_lookup(sv.ground, gx, gy), 6)]
        valid = np.isfinite(t)
        if lc.noise_std_m > 0:
            t = t + self._rng(sv, "lidar").standard_normal(t.shape, dtype=F32) * F32(lc.noise_std_m) / self._l_scale
        tv = np.where(valid, t, F32(0.0))
        out = np.empty((lc.channels, lc.azimuth_steps, 4), F32)
        out[..., 0] = np.where(valid, F32(lc.x) + tv * self._l_hdir[None, :, 0], F32(0.0))
        out[..., 1] = np.where(valid, F32(lc.y) + tv * self._l_hdir[None, :, 1], F32(0.0))
        out[..., 2] = np.where(valid, F32(lc.z) + tv * self._l_slope, F32(0.0))
        att = np.exp(F32(-LIDAR_ATTENUATION_PER_M) * tv * self._l_scale)
        out[..., 3] = np.where(valid, inten * att, F32(-1.0))
        return out.reshape(-1, 4)

    # ---- everything -------------------------------------------------------------------------------

    def observe(self, sv: S.SceneView, ego_state: Any = None) -> dict[str, Any]:
        """All sensor outputs of one frame: the cameras by name, `lidar`, `bev`, and (with an ego state)
        `gnss`, `speed`, `yaw_rate`."""
        out: dict[str, Any] = dict(self.render_cameras(sv))
        out["lidar"] = self.lidar(sv)
        out["bev"] = bev_occupancy(sv)
        if ego_state is not None:
            out.update(ego_measurements(ego_state, sv.ego))
        return out


# --------------------------------------------------------------------------------------------------
# helpers shared by cameras and LiDAR


def _lookup(ground: S.GroundMap, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """GroundMap.lookup without the boolean-mask copies (hot path): clip, then blank the outside."""
    res = F32(1.0 / ground.resolution_m)
    col = np.floor((x - F32(ground.origin_xy[0])) * res).astype(np.int32)
    row = np.floor((y - F32(ground.origin_xy[1])) * res).astype(np.int32)
    h, w = ground.classes.shape
    outside = (row < 0) | (row >= h) | (col < 0) | (col >= w)
    np.clip(col, 0, w - 1, out=col)
    np.clip(row, 0, h - 1, out=row)
    cls = ground.classes[row, col]
    if outside.any():
        cls = np.where(outside, np.uint8(S.SURFACE_OFFROAD), cls)
    return cls


def _cell_noise(x: np.ndarray, y: np.ndarray, cell: float) -> np.ndarray:
    """Deterministic value in [0, 1) per `cell`-sized square of the world (a cheap hash)."""
    ix = np.floor(x * F32(1.0 / cell)).astype(np.int32)
    iy = np.floor(y * F32(1.0 / cell)).astype(np.int32)
    hsh = (ix * np.int32(73856093)) ^ (iy * np.int32(19349663))
    return ((hsh >> 7) & 255).astype(F32) * F32(1.0 / 256.0)


def _box_pattern(kind: np.ndarray, rel: np.ndarray, hz: np.ndarray, hx: np.ndarray, hy: np.ndarray,
                 side: np.ndarray, yaw: np.ndarray, cen: np.ndarray) -> np.ndarray:
    """Brightness multiplier that makes box kinds recognisable: windows on buildings, tyres and glass on
    vehicles, a head and legs on pedestrians, a white rim on stop signs."""
    m = np.ones(kind.shape, F32)
    veh = (kind == S.BOX_VEHICLE) | (kind == S.BOX_STATIC)
    if veh.any():
        m = np.where(veh & (rel < 0.22), F32(0.25), m)                    # tyres / underbody
        m = np.where(veh & side & (rel > 0.62) & (rel < 0.93), F32(0.35), m)   # windows
    ped = kind == S.BOX_PEDESTRIAN
    if ped.any():
        m = np.where(ped & (rel < 0.45), F32(0.45), m)                    # trousers
        m = np.where(ped & (rel > 0.86), F32(1.6), m)                     # head
    bld = (kind == S.BOX_BUILDING) & side
    if bld.any():
        # coordinate along the face: project the hit point on both box axes, the face's tangent varies
        c, s = np.cos(yaw), np.sin(yaw)
        ux = (hx - cen[:, 0]) * c + (hy - cen[:, 1]) * s
        uy = -(hx - cen[:, 0]) * s + (hy - cen[:, 1]) * c
        u = ux + uy
        floor_ok = (np.mod(hz, F32(3.2)) > F32(1.0)) & (np.mod(hz, F32(3.2)) < F32(2.4)) & (hz > F32(2.5))
        col_ok = np.mod(u, F32(3.0)) < F32(1.8)
        m = np.where(bld & floor_ok & col_ok, F32(0.55), m)
    stop = kind == S.BOX_STOP_SIGN
    if stop.any():
        m = np.where(stop & ((rel < 0.12) | (rel > 0.88)), F32(2.5), m)
    pole = kind == S.BOX_POLE
    if pole.any():
        m = np.where(pole, F32(0.9), m)
    return m


def bev_occupancy(sv: S.SceneView) -> np.ndarray:
    """uint8 [50, 50] ego-frame occupancy label (1 = occupied) by vehicles, pedestrians and static
    obstacles. Row 0 is the far end (x = +40 m), column 0 the left edge (y = +25 m), 1 m cells.

    A cell is occupied if its centre lies in a box or a box's centre lies in it (so that pedestrians,
    narrower than a cell, are never lost)."""
    out = np.zeros((BEV_SIZE, BEV_SIZE), np.uint8)
    b = sv.boxes
    if len(b) == 0:
        return out
    sel = (b.kind == S.BOX_VEHICLE) | (b.kind == S.BOX_PEDESTRIAN) | (b.kind == S.BOX_STATIC)
    if sv.ego_actor_id >= 0:
        sel &= b.actor_id != sv.ego_actor_id
    idx = np.nonzero(sel)[0]
    if idx.size == 0:
        return out
    ego = sv.ego
    c, s = math.cos(ego.yaw), math.sin(ego.yaw)
    wx = b.center[idx, 0] - ego.x
    wy = b.center[idx, 1] - ego.y
    ex = c * wx + s * wy                       # box centres in the ego frame
    ey = -s * wx + c * wy
    r = 0.5 * np.hypot(b.size[idx, 0], b.size[idx, 1])
    x0, x1 = BEV_X_RANGE_M
    y0, y1 = BEV_Y_RANGE_M
    near = (ex + r >= x0) & (ex - r <= x1) & (ey + r >= y0) & (ey - r <= y1)
    if not near.any():
        return out
    idx, ex, ey = idx[near], ex[near], ey[near]
    byaw = b.yaw[idx] - F32(ego.yaw)
    hl = b.size[idx, 0] * 0.5
    hw = b.size[idx, 1] * 0.5
    cell = (x1 - x0) / BEV_SIZE
    xs = x1 - (np.arange(BEV_SIZE) + 0.5) * cell          # row centres, far first
    ys = y1 - (np.arange(BEV_SIZE) + 0.5) * ((y1 - y0) / BEV_SIZE)  # column centres, left first
    gx = xs[:, None, None] - ex[None, None, :]             # [50, 1, N]
    gy = ys[None, :, None] - ey[None, None, :]             # [1, 50, N]
    cb, sb = np.cos(byaw), np.sin(byaw)
    u = gx * cb + gy * sb
    v = -gx * sb + gy * cb
    inside = ((np.abs(u) <= hl) & (np.abs(v) <= hw)).any(axis=2)
    out[inside] = 1
    row = np.floor((x1 - ex) / cell).astype(np.int64)
    col = np.floor((y1 - ey) / ((y1 - y0) / BEV_SIZE)).astype(np.int64)
    ok = (row >= 0) & (row < BEV_SIZE) & (col >= 0) & (col < BEV_SIZE)
    out[row[ok], col[ok]] = 1
    return out


# --------------------------------------------------------------------------------------------------
# GNSS / speedometer / IMU from the world's ego state

#: CARLA's default geo-reference (Town maps use lat/lon origin 0, 0)
GEO_ORIGIN = (0.0, 0.0, 0.0)
EARTH_RADIUS_M = 6378137.0


def gnss_from_xy(x: float, y: float, z: float = 0.0, origin: tuple[float, float, float] = GEO_ORIGIN
                 ) -> np.ndarray:
    """(lat, lon, alt) of a world point: a local tangent-plane (equirectangular) approximation around
    `origin`, the same small-area model CARLA's GNSS sensor uses. x east, y north."""
    lat0, lon0, alt0 = origin
    lat = lat0 + math.degrees(y / EARTH_RADIUS_M)
    lon = lon0 + math.degrees(x / (EARTH_RADIUS_M * math.cos(math.radians(lat0))))
    return np.array([lat, lon, alt0 + z], dtype=np.float64)


def _get(obj: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        if isinstance(obj, dict) and n in obj:
            return obj[n]
        if hasattr(obj, n):
            return getattr(obj, n)
    return default


def ego_measurements(ego_state: Any, pose: S.Pose | None = None) -> dict[str, Any]:
    """`gnss` (float32 [3]), `speed` (m/s) and `yaw_rate` (rad/s) from the world's ego state (an object
    or mapping with speed / yaw_rate and x, y [, z] attributes; position falls back to `pose`)."""
    x = _get(ego_state, "x", default=None)
    y = _get(ego_state, "y", default=None)
    if x is None or y is None:
        p = _get(ego_state, "pose", default=pose)
        x, y = (p.x, p.y) if p is not None else (0.0, 0.0)
    z = _get(ego_state, "z", default=0.0) or 0.0
    speed = _get(ego_state, "speed", "speed_mps", "v", default=0.0)
    yaw_rate = _get(ego_state, "yaw_rate", "omega", default=0.0)
    return {"gnss": gnss_from_xy(float(x), float(y), float(z)).astype(np.float32),
            "speed": np.float32(speed), "yaw_rate": np.float32(yaw_rate)}


def world_observer(rig: SensorRig | None = None) -> Callable[[Any, int], dict[str, Any]]:
    """An `observe(world, ego_id)` for `flad_sim.agent.RouteRunner`: the full rig on the ego's SceneView plus
    GNSS/speed/yaw rate from its ego state, so learned agents drive on sensors."""
    rig = rig or SensorRig()

    def observe(world: Any, ego_id: int) -> dict[str, Any]:
        return rig.observe(world.scene_view(ego_id), world.ego_state(ego_id))

    return observe
