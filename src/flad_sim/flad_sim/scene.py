"""The contract between the embedded world and its sensors.

The world (towns, actors, physics) produces a `SceneView` each tick; the sensors (ray-cast cameras,
LiDAR, BEV labels) read only a `SceneView`. Neither side knows the other's internals, so either can be
rewritten, and the CARLA adapter never needs a SceneView at all.

Frames (ROS REP 103, right-handed): world x east, y north, z up, yaw counter-clockwise from +x,
metres and radians. Ego frame: x forward, y left, z up, origin at the ego's rear-axle centre on the
ground.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Ground surface classes in GroundMap.classes
SURFACE_OFFROAD = 0      # grass / terrain
SURFACE_SIDEWALK = 1
SURFACE_ROAD = 2
SURFACE_LANE_MARKING = 3  # lane dividers (white) between same-direction lanes
SURFACE_CENTER_LINE = 4   # yellow centre line between opposite directions
SURFACE_CROSSWALK = 5
SURFACE_STOP_LINE = 6
SURFACE_NAMES = ("offroad", "sidewalk", "road", "lane_marking", "center_line", "crosswalk", "stop_line")

# Box kinds in Boxes.kind
BOX_BUILDING = 0
BOX_VEHICLE = 1
BOX_PEDESTRIAN = 2
BOX_STATIC = 3           # parked car, barrier, bin: static obstacles
BOX_POLE = 4             # traffic-light / sign poles
BOX_TRAFFIC_LIGHT = 5    # the lamp head; its colour is the current state's colour
BOX_STOP_SIGN = 6
BOX_NAMES = ("building", "vehicle", "pedestrian", "static", "pole", "traffic_light", "stop_sign")

# Traffic-light states (also the dataset's `tl_state` label: the state that applies to the ego)
TL_NONE = 0   # no light governs the ego's lane within the look-ahead
TL_RED = 1
TL_YELLOW = 2
TL_GREEN = 3
TL_NAMES = ("none", "red", "yellow", "green")


@dataclass
class GroundMap:
    """Top-down raster of the town's surface: `classes[row, col]` covers world x in
    `[origin_x + col*res, origin_x + (col+1)*res)` and y in `[origin_y + row*res, ...)`."""

    classes: np.ndarray          # uint8 [H, W], SURFACE_*
    origin_xy: tuple[float, float]
    resolution_m: float

    def lookup(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Surface class at world points (vectorised); outside the map is SURFACE_OFFROAD."""
        col = np.floor((x - self.origin_xy[0]) / self.resolution_m).astype(np.int64)
        row = np.floor((y - self.origin_xy[1]) / self.resolution_m).astype(np.int64)
        h, w = self.classes.shape
        inside = (row >= 0) & (row < h) & (col >= 0) & (col < w)
        out = np.full(np.shape(x), SURFACE_OFFROAD, dtype=np.uint8)
        out[inside] = self.classes[row[inside], col[inside]]
        return out


@dataclass
class Boxes:
    """Oriented boxes in the world frame, as parallel arrays (vectorised ray casting)."""

    center: np.ndarray     # float32 [N, 3]: x, y of the box centre and z of its bottom face
    size: np.ndarray       # float32 [N, 3]: length (along yaw), width, height
    yaw: np.ndarray        # float32 [N]
    kind: np.ndarray       # uint8 [N], BOX_*
    color: np.ndarray      # uint8 [N, 3], RGB
    actor_id: np.ndarray   # int32 [N]; -1 for scenery

    def __len__(self) -> int:
        return int(self.yaw.shape[0])

    @staticmethod
    def empty() -> Boxes:
        return Boxes(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32), np.zeros(0, np.float32),
                     np.zeros(0, np.uint8), np.zeros((0, 3), np.uint8), np.zeros(0, np.int32))

    @staticmethod
    def concat(parts: list[Boxes]) -> Boxes:
        parts = [p for p in parts if len(p)]
        if not parts:
            return Boxes.empty()
        return Boxes(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                       ("center", "size", "yaw", "kind", "color", "actor_id")))


@dataclass
class Weather:
    """Per-town look: fog attenuates with distance, brightness scales colours, noise is sensor noise."""

    name: str = "clear_noon"
    fog_density: float = 0.0       # 1/m; pixel = mix(colour, fog_colour, 1 - exp(-density * distance))
    brightness: float = 1.0        # 0.3 = night-ish, 1.0 = noon
    noise_std: float = 0.0         # std of additive pixel noise, in [0, 255] units
    sky_rgb: tuple[int, int, int] = (135, 190, 235)
    fog_rgb: tuple[int, int, int] = (190, 190, 195)


@dataclass
class Pose:
    x: float
    y: float
    yaw: float
    z: float = 0.0


@dataclass
class SceneView:
    """Everything a sensor may see at one instant, around one ego vehicle."""

    ground: GroundMap
    boxes: Boxes               # static scenery + dynamic actors (ego excluded) + light heads in state colour
    weather: Weather
    ego: Pose
    ego_actor_id: int = -1
    time_s: float = 0.0
    extras: dict = field(default_factory=dict)
