"""The same world/agent interface over a real CARLA server (optional extra: `pip install flad[carla]`,
i.e. `carla==0.9.16`).

What works offline (and is unit-tested without a server):
- frame conversions: CARLA is LEFT-handed (x forward/east, y right/south, z up, yaw clockwise in degrees);
  we are ROS REP 103 right-handed (y left, yaw counter-clockwise in radians). So y -> -y and yaw -> -yaw.
- the sensor rig as CARLA blueprint attributes (4 RGB cameras + ray-cast LiDAR + GNSS + IMU), matching
  `flad_sim.sensors.RigConfig` (sizes, FOV, mount points, LiDAR channels/range/rotation);
- converting CARLA images (BGRA bytes) to our RGB arrays and CARLA LiDAR point clouds to our fixed-size
  (channels x azimuth) x (x, y, z, intensity) layout in the ego frame, no-return rays = (0, 0, 0, -1);
- route extraction on a `carla.Map`, which accepts an OpenDRIVE string without a server:
  `route_on_map(carla.Map(name, xodr), start, goal)` searches the lane graph (A* over waypoints).

What needs a running CARLA server (NOT tested here; we never fake one): `CarlaWorld` connects, runs in
synchronous mode at 20 Hz, spawns the ego with the rig, and steps it with our `Control`; `drive_route`
runs an `Agent` on a route. Start a server (e.g. `docker compose -f docker/compose.yaml up carla`, or
`./CarlaUE4.sh -RenderOffScreen`) and pass its host/port.
"""

from __future__ import annotations

import heapq
import logging
import math
import queue
from dataclasses import dataclass
from typing import Any

import numpy as np

from flad_sim import scene as S
from flad_sim.sensors import LidarConfig, RigConfig, bev_occupancy, gnss_from_xy

log = logging.getLogger(__name__)

#: our ego origin is the rear axle; CARLA's vehicle origin is the bounding-box centre, about this far ahead
REAR_AXLE_TO_CENTER_M = 1.4
DT = 0.05


def carla_module():
    """Import `carla` lazily with a clear message when the optional extra is missing."""
    try:
        import carla
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("the CARLA adapter needs the optional extra: pip install 'carla==0.9.16' "
                          "(or `pip install flad[carla]`)") from exc
    return carla


# ---------------------------------------------------------------------------------------------- frames


def carla_to_ros_xyz(x: float | np.ndarray, y: float | np.ndarray, z: float | np.ndarray = 0.0):
    """CARLA (left-handed) position -> ROS (right-handed): y flips."""
    return x, -y, z


def ros_to_carla_xyz(x, y, z=0.0):
    """ROS position -> CARLA: y flips (the same map both ways)."""
    return x, -y, z


def carla_yaw_to_ros(yaw_deg: float) -> float:
    """CARLA yaw (degrees, clockwise from +x seen from above) -> ROS yaw (radians, counter-clockwise), wrapped."""
    return math.remainder(-math.radians(yaw_deg), 2 * math.pi)


def ros_yaw_to_carla(yaw_rad: float) -> float:
    return -math.degrees(yaw_rad)


def carla_transform_to_pose(t: Any) -> S.Pose:
    """carla.Transform (or anything with .location.x/y/z and .rotation.yaw) -> our Pose (ROS frame)."""
    return S.Pose(float(t.location.x), -float(t.location.y), carla_yaw_to_ros(float(t.rotation.yaw)),
                  float(t.location.z))


def pose_to_carla_transform(p: S.Pose, z: float | None = None) -> Any:
    carla = carla_module()
    return carla.Transform(carla.Location(x=float(p.x), y=-float(p.y), z=float(p.z if z is None else z)),
                           carla.Rotation(yaw=ros_yaw_to_carla(p.yaw)))


# ---------------------------------------------------------------------------------------------- rig


@dataclass
class SensorSpec:
    """One CARLA sensor to spawn: blueprint id, attributes (strings, as CARLA wants them), mount point in the
    CARLA vehicle frame (x forward, y RIGHT, z up, yaw clockwise in degrees) and our name for it."""

    name: str
    blueprint: str
    attributes: dict[str, str]
    x: float
    y: float
    z: float
    yaw: float = 0.0
    pitch: float = 0.0


def rig_sensor_specs(rig: RigConfig | None = None, rear_axle_to_center: float = REAR_AXLE_TO_CENTER_M,
                     tick_s: float = DT) -> list[SensorSpec]:
    """Our rig as CARLA sensors. Mount points move from our ego frame (rear axle, y left) to CARLA's
    vehicle frame (bbox centre, y right); yaw flips sign (our left camera +60 deg is CARLA's -60 deg).
    The LiDAR spins once per tick, so one measurement is one full sweep, like ours."""
    rig = rig or RigConfig()
    specs = []
    for c in rig.cameras:
        specs.append(SensorSpec(c.name, "sensor.camera.rgb", {
            "image_size_x": str(c.width), "image_size_y": str(c.height), "fov": f"{c.fov_deg:g}",
            "sensor_tick": f"{tick_s:g}"}, c.x - rear_axle_to_center, -c.y, c.z,
            ros_yaw_to_carla(math.radians(c.yaw_deg))))
    lc = rig.lidar
    rot_hz = 1.0 / tick_s
    specs.append(SensorSpec("lidar", "sensor.lidar.ray_cast", {
        "channels": str(lc.channels), "range": f"{lc.range_m:g}",
        "points_per_second": str(int(round(lc.channels * lc.azimuth_steps * rot_hz))),
        "rotation_frequency": f"{rot_hz:g}", "upper_fov": f"{lc.upper_fov_deg:g}", "lower_fov": f"{lc.lower_fov_deg:g}",
        "horizontal_fov": "360", "dropoff_general_rate": "0.0", "dropoff_intensity_limit": "1.0",
        "dropoff_zero_intensity": "0.0", "noise_stddev": f"{lc.noise_std_m:g}", "sensor_tick": f"{tick_s:g}"},
        lc.x - rear_axle_to_center, -lc.y, lc.z, 0.0))
    specs.append(SensorSpec("gnss", "sensor.other.gnss", {"sensor_tick": f"{tick_s:g}"}, 0.0, 0.0, 0.0))
    specs.append(SensorSpec("imu", "sensor.other.imu", {"sensor_tick": f"{tick_s:g}"}, 0.0, 0.0, 0.0))
    return specs


# ---------------------------------------------------------------------------------------------- data


def bgra_to_rgb(raw: bytes | bytearray | memoryview | np.ndarray, height: int, width: int) -> np.ndarray:
    """CARLA camera bytes (BGRA, row-major) -> uint8 [H, W, 3] RGB (a copy)."""
    a = np.frombuffer(raw, dtype=np.uint8) if not isinstance(raw, np.ndarray) else raw.reshape(-1)
    if a.size != height * width * 4:
        raise ValueError(f"expected {height}x{width}x4 = {height * width * 4} bytes, got {a.size}")
    return a.reshape(height, width, 4)[:, :, 2::-1].copy()


def rgb_to_bgra(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] RGB -> [H, W, 4] BGRA with alpha 255 (what the bridge publishes as bgra8)."""
    h, w, _ = rgb.shape
    out = np.empty((h, w, 4), np.uint8)
    out[..., :3] = rgb[..., ::-1]
    out[..., 3] = 255
    return out


def carla_image_to_rgb(image: Any) -> np.ndarray:
    """carla.Image -> uint8 [H, W, 3] RGB."""
    return bgra_to_rgb(image.raw_data, int(image.height), int(image.width))


def carla_lidar_to_points(raw: bytes | np.ndarray, lidar: LidarConfig | None = None,
                          rear_axle_to_center: float = REAR_AXLE_TO_CENTER_M) -> np.ndarray:
    """CARLA ray-cast LiDAR data (float32 x, y, z, intensity per point, sensor frame, left-handed) -> our
    fixed layout float32 [channels * azimuth_steps, 4] in the ego frame (ROS): each point is binned to its
    (channel, azimuth) ray by elevation and azimuth; the nearest point wins a ray; rays with no point are
    (0, 0, 0, -1). Row order as `SensorRig.lidar`: channel 0 = highest elevation, azimuth 0 = ahead, CCW."""
    lc = lidar or LidarConfig()
    pts = np.frombuffer(raw, dtype=np.float32) if not isinstance(raw, np.ndarray) else raw.astype(np.float32)
    pts = pts.reshape(-1, 4)
    x, y, z, inten = pts[:, 0], -pts[:, 1], pts[:, 2], pts[:, 3]          # y flips: CARLA -> ROS
    horiz = np.hypot(x, y)
    elev = np.degrees(np.arctan2(z, horiz))
    az = np.mod(np.arctan2(y, x), 2 * np.pi)
    C, A = lc.channels, lc.azimuth_steps
    step = (lc.upper_fov_deg - lc.lower_fov_deg) / max(C - 1, 1)
    ch = np.rint((lc.upper_fov_deg - elev) / step).astype(np.int64) if C > 1 else np.zeros(len(x), np.int64)
    ai = np.rint(az / (2 * np.pi / A)).astype(np.int64) % A
    ok = (ch >= 0) & (ch < C) & np.isfinite(horiz)
    out = np.zeros((C * A, 4), np.float32)
    out[:, 3] = -1.0
    if ok.any():
        ray = ch[ok] * A + ai[ok]
        r = np.sqrt(horiz[ok] ** 2 + z[ok] ** 2)
        order = np.lexsort((-r, ray))             # per ray, nearest last -> it wins the assignment
        ray, sel = ray[order], np.flatnonzero(ok)[order]
        out[ray, 0] = x[sel] + np.float32(lc.x)   # sensor frame -> ego frame (mount point)
        out[ray, 1] = y[sel] + np.float32(lc.y)
        out[ray, 2] = z[sel] + np.float32(lc.z)
        out[ray, 3] = inten[sel]
    return out


def carla_lidar_measurement_to_points(m: Any, lidar: LidarConfig | None = None) -> np.ndarray:
    return carla_lidar_to_points(bytes(m.raw_data), lidar)


# ---------------------------------------------------------------------------------------------- routes


@dataclass
class CarlaRoute:
    """A dense route on a CARLA map, in OUR (ROS) frame, plus the CARLA waypoints it came from."""

    points: np.ndarray        # [N, 2] x, y (ROS)
    heading: np.ndarray       # [N] yaw (ROS, rad)
    s: np.ndarray             # [N] arc length
    road_lane: list[tuple[int, int]]

    @property
    def length(self) -> float:
        return float(self.s[-1]) if len(self.s) else 0.0

    def start_pose(self) -> S.Pose:
        return S.Pose(float(self.points[0, 0]), float(self.points[0, 1]), float(self.heading[0]))


def route_on_map(cmap: Any, start_xy_ros: tuple[float, float], goal_xy_ros: tuple[float, float], step: float = 2.0,
                 max_expansions: int = 20000) -> CarlaRoute:
    """A* over the lane graph of a `carla.Map` (waypoints every `step` m, successors via `Waypoint.next`, lane
    changes not taken) from the lane nearest `start` to within `step` of `goal` (both ROS xy). Works
    offline: `carla.Map(name, opendrive_xml)` needs no server."""
    carla = carla_module()
    sx, sy, _ = ros_to_carla_xyz(*start_xy_ros)
    gx, gy, _ = ros_to_carla_xyz(*goal_xy_ros)
    w0 = cmap.get_waypoint(carla.Location(x=float(sx), y=float(sy), z=0.0), project_to_road=True)
    if w0 is None:
        raise ValueError(f"no drivable lane near start {start_xy_ros}")
    goal = np.array([gx, gy])

    def xy(w) -> np.ndarray:
        loc = w.transform.location
        return np.array([loc.x, loc.y])

    def key(w) -> tuple:
        return (w.road_id, w.section_id, w.lane_id, round(w.s / (step / 2)))

    start_key = key(w0)
    frontier = [(float(np.linalg.norm(xy(w0) - goal)), 0, 0.0, start_key)]
    nodes = {start_key: w0}
    parent: dict[tuple, tuple | None] = {start_key: None}
    best = {start_key: 0.0}
    counter = 0
    found = None
    while frontier and counter < max_expansions:
        _, _, g, k = heapq.heappop(frontier)
        w = nodes[k]
        if np.linalg.norm(xy(w) - goal) <= step:
            found = k
            break
        for nxt in w.next(step):
            nk = key(nxt)
            ng = g + float(np.linalg.norm(xy(nxt) - xy(w)))
            if ng < best.get(nk, math.inf):
                best[nk] = ng
                nodes[nk] = nxt
                parent[nk] = k
                counter += 1
                heapq.heappush(frontier, (ng + float(np.linalg.norm(xy(nxt) - goal)), counter, ng, nk))
    if found is None:
        raise ValueError(f"no route from {start_xy_ros} to {goal_xy_ros} on map {cmap.name!r}")
    chain = []
    k: tuple | None = found
    while k is not None:
        chain.append(nodes[k])
        k = parent[k]
    chain.reverse()
    pts = np.array([[w.transform.location.x, -w.transform.location.y] for w in chain], np.float64)
    hd = np.array([carla_yaw_to_ros(w.transform.rotation.yaw) for w in chain])
    s = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))])
    return CarlaRoute(pts, hd, s, [(w.road_id, w.lane_id) for w in chain])


# ---------------------------------------------------------------------------------------------- live


class CarlaWorld:
    """One ego with our sensor rig in a CARLA server, stepped synchronously at 20 Hz. NEEDS A SERVER.

    `observe()` returns the same keys as `SensorRig.observe` + `gnss`/`speed`/`yaw_rate`, in our formats
    (RGB uint8, LiDAR fixed layout, ROS frame). BEV occupancy is computed from CARLA's actor list."""

    def __init__(self, host: str = "localhost", port: int = 2000, town: str | None = None,
                 rig: RigConfig | None = None, timeout_s: float = 20.0, seed: int = 0) -> None:
        carla = carla_module()
        self.carla = carla
        self.client = carla.Client(host, port)
        self.client.set_timeout(timeout_s)
        self.world = self.client.load_world(town) if town else self.client.get_world()
        self.map = self.world.get_map()
        self.rig = rig or RigConfig()
        self._orig_settings = self.world.get_settings()
        settings = self.world.get_settings()
        settings.synchronous_mode = True
        settings.fixed_delta_seconds = DT
        self.world.apply_settings(settings)
        self.seed = seed
        self.ego = None
        self.sensors: list[Any] = []
        self._queues: dict[str, queue.Queue] = {}
        self.frame = None

    def spawn_ego(self, start: Any = None, blueprint: str = "vehicle.lincoln.mkz_2020", role: str = "hero") -> int:
        bp = self.world.get_blueprint_library().find(blueprint)
        bp.set_attribute("role_name", role)
        if start is None:
            tf = self.map.get_spawn_points()[self.seed % max(len(self.map.get_spawn_points()), 1)]
        elif hasattr(start, "start_pose"):
            tf = pose_to_carla_transform(start.start_pose(), z=0.5)
        else:
            tf = pose_to_carla_transform(start, z=0.5)
        self.ego = self.world.spawn_actor(bp, tf)
        lib = self.world.get_blueprint_library()
        for spec in rig_sensor_specs(self.rig):
            sbp = lib.find(spec.blueprint)
            for k, v in spec.attributes.items():
                if sbp.has_attribute(k):
                    sbp.set_attribute(k, v)
            mount = self.carla.Transform(self.carla.Location(x=spec.x, y=spec.y, z=spec.z),
                                         self.carla.Rotation(yaw=spec.yaw, pitch=spec.pitch))
            sensor = self.world.spawn_actor(sbp, mount, attach_to=self.ego)
            q: queue.Queue = queue.Queue()
            sensor.listen(q.put)
            self._queues[spec.name] = q
            self.sensors.append(sensor)
        self.world.tick()
        return int(self.ego.id)

    def step(self, control: Any) -> None:
        """Apply our Control (CARLA semantics already: positive steer turns right) and tick once."""
        c = control.clipped() if hasattr(control, "clipped") else control
        self.ego.apply_control(self.carla.VehicleControl(throttle=float(c.throttle), steer=float(c.steer),
                                                         brake=float(c.brake), hand_brake=bool(c.hand_brake),
                                                         reverse=bool(c.reverse)))
        self.frame = self.world.tick()

    def _latest(self, name: str, timeout: float = 5.0) -> Any:
        q = self._queues[name]
        while True:
            data = q.get(timeout=timeout)
            if self.frame is None or data.frame >= self.frame:
                return data

    def ego_pose(self) -> S.Pose:
        """Rear-axle pose in the ROS frame."""
        p = carla_transform_to_pose(self.ego.get_transform())
        return S.Pose(p.x - REAR_AXLE_TO_CENTER_M * math.cos(p.yaw), p.y - REAR_AXLE_TO_CENTER_M * math.sin(p.yaw),
                      p.yaw, p.z)

    def observe(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for c in self.rig.cameras:
            out[c.name] = carla_image_to_rgb(self._latest(c.name))
        out["lidar"] = carla_lidar_measurement_to_points(self._latest("lidar"), self.rig.lidar)
        v = self.ego.get_velocity()
        fwd = self.ego.get_transform().get_forward_vector()
        out["speed"] = np.float32(v.x * fwd.x + v.y * fwd.y + v.z * fwd.z)
        out["yaw_rate"] = np.float32(-math.radians(self.ego.get_angular_velocity().z))   # deg/s clockwise -> rad/s CCW
        g = self._latest("gnss")
        out["gnss"] = np.array([g.latitude, g.longitude, g.altitude], np.float32)
        out["bev"] = bev_occupancy(self.scene_boxes())
        return out

    def scene_boxes(self) -> S.SceneView:
        """Vehicles and walkers as a box-only SceneView (for the BEV label)."""
        actors = [a for a in self.world.get_actors() if a.type_id.startswith(("vehicle.", "walker."))
                  and a.id != self.ego.id]
        n = len(actors)
        center = np.zeros((n, 3), np.float32)
        size = np.zeros((n, 3), np.float32)
        yaw = np.zeros(n, np.float32)
        kind = np.zeros(n, np.uint8)
        for i, a in enumerate(actors):
            p = carla_transform_to_pose(a.get_transform())
            bb = a.bounding_box
            center[i] = (p.x, p.y, 0.0)
            size[i] = (2 * bb.extent.x, 2 * bb.extent.y, 2 * bb.extent.z)
            yaw[i] = p.yaw
            kind[i] = S.BOX_PEDESTRIAN if a.type_id.startswith("walker.") else S.BOX_VEHICLE
        boxes = S.Boxes(center, size, yaw, kind, np.zeros((n, 3), np.uint8),
                        np.array([a.id for a in actors], np.int32))
        ground = S.GroundMap(np.zeros((1, 1), np.uint8), (0.0, 0.0), 1.0)
        return S.SceneView(ground, boxes, S.Weather(), self.ego_pose(), int(self.ego.id))

    def gnss_of(self, pose: S.Pose) -> np.ndarray:
        """Our GNSS model for a pose (CARLA's own sensor is used in `observe`)."""
        return gnss_from_xy(pose.x, pose.y, pose.z)

    def close(self) -> None:
        for s in self.sensors:
            s.stop()
            s.destroy()
        if self.ego is not None:
            self.ego.destroy()
        self.world.apply_settings(self._orig_settings)


def drive_route(cw: CarlaWorld, route: CarlaRoute, agent: Any, max_s: float | None = None,
                goal_tol_m: float = 2.0) -> dict[str, Any]:
    """Run an Agent (reset/run_step) on a route in CARLA until the goal or the leaderboard timeout
    (0.8 s/m + 5 s). NEEDS A SERVER. Returns route completion figures (not the official scorer)."""
    from flad_sim.agent import RouteInfo

    agent.reset(RouteInfo(route, cw.map.name, int(cw.ego.id) if cw.ego is not None else cw.spawn_ego(route)))
    limit = max_s if max_s is not None else 0.8 * route.length + 5.0
    t = 0.0
    best_s = 0.0
    while t < limit:
        obs = cw.observe()
        obs["ego"] = cw.ego_pose()
        cw.step(agent.run_step(obs))
        t += DT
        p = cw.ego_pose()
        d = np.linalg.norm(route.points - np.array([p.x, p.y]), axis=1)
        best_s = max(best_s, float(route.s[int(np.argmin(d))]))
        if np.linalg.norm(route.points[-1] - np.array([p.x, p.y])) < goal_tol_m:
            break
    return {"route_completion": 100.0 * best_s / max(route.length, 1e-9), "time_s": t}
