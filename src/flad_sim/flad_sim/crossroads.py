"""`synthetic_scene()`: a hand-built crossroads, a `SceneView` with no world behind it.

Shown by `flad sim show` with no town, observed by the sensor tests, and the source of `flad sim collect
--source synthetic` (flad_sim.dataset); its own module so that `show` (which drives the world through
`dataset`) and `dataset` do not import each other.
"""

from __future__ import annotations

import math

import numpy as np

from flad_sim import scene as S

_CAR_COLOURS = [(200, 30, 30), (30, 60, 170), (230, 230, 230), (30, 30, 30), (200, 180, 40), (120, 120, 130)]


def synthetic_scene(seed: int = 0, weather: S.Weather | None = None, light: int = S.TL_RED) -> S.SceneView:
    """A 4-way crossroads (2 lanes each way, 0.25 m raster), buildings on the blocks, cars, pedestrians,
    traffic lights and a stop sign. The ego stands in the right-hand lane 25 m south of the junction,
    facing north. Deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    res = 0.25
    half = 100.0
    n = int(2 * half / res)
    xs = -half + (np.arange(n) + 0.5) * res
    X, Y = np.meshgrid(xs, xs)            # [row=y, col=x]
    lane = 3.5
    road_half = 2 * lane
    cls = np.full((n, n), S.SURFACE_OFFROAD, np.uint8)
    ns = np.abs(X) < road_half            # north-south road
    ew = np.abs(Y) < road_half            # east-west road
    side_ns = (np.abs(X) >= road_half) & (np.abs(X) < road_half + 3.0)
    side_ew = (np.abs(Y) >= road_half) & (np.abs(Y) < road_half + 3.0)
    cls[side_ns | side_ew] = S.SURFACE_SIDEWALK
    cls[ns | ew] = S.SURFACE_ROAD
    box = (np.abs(X) < road_half) & (np.abs(Y) < road_half)
    dash = np.mod(np.where(ns, Y, X), 6.0) < 3.0
    outside_junction = ~box & ~((np.abs(X) < road_half + 4) & (np.abs(Y) < road_half + 4))
    cls[ns & outside_junction & (np.abs(X) < 0.15)] = S.SURFACE_CENTER_LINE
    cls[ew & outside_junction & (np.abs(Y) < 0.15)] = S.SURFACE_CENTER_LINE
    cls[ns & outside_junction & (np.abs(np.abs(X) - lane) < 0.13) & dash] = S.SURFACE_LANE_MARKING
    cls[ew & outside_junction & (np.abs(np.abs(Y) - lane) < 0.13) & dash] = S.SURFACE_LANE_MARKING
    # crosswalks just outside the junction, stop lines before them
    for axis_val, other in ((Y, X), (X, Y)):
        cw = (np.abs(np.abs(axis_val) - (road_half + 2.0)) < 1.5) & (np.abs(other) < road_half)
        cls[cw & (np.mod(other, 1.2) < 0.6)] = S.SURFACE_CROSSWALK
    cls[(np.abs(Y + road_half + 4.0) < 0.25) & (X > 0) & (road_half > X)] = S.SURFACE_STOP_LINE
    cls[(np.abs(Y - road_half - 4.0) < 0.25) & (X < 0) & (-road_half < X)] = S.SURFACE_STOP_LINE
    ground = S.GroundMap(cls, (-half, -half), res)

    parts = []

    def add(cx, cy, length, w, h, yaw, kind, colour, actor=-1, z=0.0):
        parts.append(S.Boxes(np.array([[cx, cy, z]], np.float32), np.array([[length, w, h]], np.float32),
                             np.array([yaw], np.float32), np.array([kind], np.uint8),
                             np.array([colour], np.uint8), np.array([actor], np.int32)))

    # buildings: rows along each block edge
    for sx in (-1, 1):
        for sy in (-1, 1):
            pos = road_half + 3.0 + 2.0
            while pos < half - 10:
                length = float(rng.uniform(10, 22))
                depth = float(rng.uniform(10, 18))
                height = float(rng.uniform(8, 30))
                shade = int(rng.integers(120, 200))
                colour = (shade, int(shade * rng.uniform(0.8, 1.0)), int(shade * rng.uniform(0.7, 0.95)))
                add(sx * (road_half + 5.0 + depth / 2), sy * (pos + length / 2), depth, length, height, 0.0,
                    S.BOX_BUILDING, colour)
                pos += length + float(rng.uniform(1, 4))
    # vehicles: one ahead of the ego in its lane, oncoming traffic, crossing traffic, a parked car
    actor = 1
    for cx, cy, yaw in ((5.25, -8.0, math.pi / 2), (1.75, -40.0, math.pi / 2), (-1.75, 15.0, -math.pi / 2),
                        (-5.25, 30.0, -math.pi / 2), (12.0, 1.75, math.pi), (-20.0, -5.25, 0.0)):
        add(cx, cy, 4.6, 1.9, 1.5, yaw, S.BOX_VEHICLE, _CAR_COLOURS[actor % len(_CAR_COLOURS)], actor)
        actor += 1
    add(8.5, -45.0, 4.4, 1.8, 1.5, math.pi / 2, S.BOX_STATIC, (90, 90, 100))            # parked
    # pedestrians on the crosswalk ahead and the sidewalk
    for cx, cy in ((2.0, road_half + 2.0), (-3.0, road_half + 2.5), (9.0, -20.0), (-9.5, -12.0)):
        add(cx, cy, 0.5, 0.5, 1.75, 0.0, S.BOX_PEDESTRIAN, (60, 80, 160), actor)
        actor += 1
    # traffic lights at the 4 corners: pole + head in the state colour; stop sign on one corner
    tl_rgb = {S.TL_RED: (255, 30, 20), S.TL_YELLOW: (255, 200, 0), S.TL_GREEN: (30, 230, 60), S.TL_NONE: (40, 40, 40)}
    for sx, sy in ((1, -1), (-1, 1), (1, 1), (-1, -1)):
        px, py = sx * (road_half + 1.0), sy * (road_half + 1.0)
        add(px, py, 0.25, 0.25, 5.0, 0.0, S.BOX_POLE, (70, 70, 70))
        add(px, py, 0.5, 0.5, 1.2, 0.0, S.BOX_TRAFFIC_LIGHT, tl_rgb[light], z=5.0)
    add(road_half + 1.0, -30.0, 0.1, 0.1, 2.0, 0.0, S.BOX_POLE, (150, 150, 150))
    add(road_half + 1.0, -30.0, 0.1, 0.8, 0.8, 0.0, S.BOX_STOP_SIGN, (200, 20, 20), z=2.0)
    boxes = S.Boxes.concat(parts)
    ego = S.Pose(x=5.25, y=-25.0, yaw=math.pi / 2)
    return S.SceneView(ground=ground, boxes=boxes, weather=weather or S.Weather(), ego=ego, ego_actor_id=0,
                       time_s=0.0)
