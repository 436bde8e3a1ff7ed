"""The embedded world on carla-ros-bridge topics, over the Bus: the vehicle stack cannot tell it from CARLA.

Published per tick for one ego (role name `hero` by default), as carla-ros-bridge does:
  /carla/<role>/<camera>/image    sensor_msgs/Image, bgra8 (rgb_front, rgb_left, rgb_right, rgb_rear)
  /carla/<role>/lidar             sensor_msgs/PointCloud2, x, y, z, intensity float32, ROS frame, returns only
  /carla/<role>/gnss              sensor_msgs/NavSatFix
  /carla/<role>/odometry          nav_msgs/Odometry (map frame, ROS right-handed; twist in the ego frame)
  /carla/<role>/speedometer       std_msgs/Float32 (m/s)
Obeyed: /carla/<role>/vehicle_control_cmd (carla_msgs/CarlaEgoVehicleControl); the latest command holds until
a new one arrives (full brake before the first), like CARLA's vehicle.

The message builders/decoders are plain functions, so they are testable without sockets and usable by the
vehicle side to turn messages back into arrays.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

import numpy as np

from flad_core import codec
from flad_sim.sensors import RigConfig, SensorRig

log = logging.getLogger(__name__)

FLOAT32 = 7   # sensor_msgs/PointField.FLOAT32


def topic(role: str, name: str) -> str:
    """carla-ros-bridge topic names: cameras get `/image`, others are the sensor name itself."""
    if name.startswith("rgb_"):
        return f"/carla/{role}/{name}/image"
    return f"/carla/{role}/{name}"


def _stamp(t: float) -> Any:
    sec = int(math.floor(t))
    return codec.new("builtin_interfaces/msg/Time", sec=sec, nanosec=int(round((t - sec) * 1e9)) % 1_000_000_000)


def _header(t: float, frame_id: str) -> Any:
    return codec.new("std_msgs/msg/Header", stamp=_stamp(t), frame_id=frame_id)


def image_msg(rgb: np.ndarray, t: float, frame_id: str) -> Any:
    """uint8 [H, W, 3] RGB -> sensor_msgs/Image bgra8 (what carla-ros-bridge publishes)."""
    h, w, _ = rgb.shape
    bgra = np.empty((h, w, 4), np.uint8)
    bgra[..., :3] = rgb[..., ::-1]
    bgra[..., 3] = 255
    return codec.new("sensor_msgs/msg/Image", header=_header(t, frame_id), height=h, width=w, encoding="bgra8",
                     is_bigendian=0, step=w * 4, data=bgra.reshape(-1))


def image_from_msg(msg: Any) -> np.ndarray:
    """sensor_msgs/Image (bgra8 or rgb8) -> uint8 [H, W, 3] RGB; ValueError on anything inconsistent."""
    h, w = int(msg.height), int(msg.width)
    data = np.asarray(msg.data, np.uint8)
    if msg.encoding == "bgra8":
        if data.size != h * w * 4 or msg.step != w * 4:
            raise ValueError(f"bgra8 image {h}x{w}: {data.size} bytes, step {msg.step}")
        return data.reshape(h, w, 4)[:, :, 2::-1].copy()
    if msg.encoding == "rgb8":
        if data.size != h * w * 3:
            raise ValueError(f"rgb8 image {h}x{w}: {data.size} bytes")
        return data.reshape(h, w, 3).copy()
    raise ValueError(f"unsupported image encoding {msg.encoding!r}")


def pointcloud_msg(points: np.ndarray, t: float, frame_id: str) -> Any:
    """Our LiDAR [N, 4] (rays without a return, intensity < 0, are left out, as CARLA does) -> PointCloud2."""
    pts = np.ascontiguousarray(points[points[:, 3] >= 0], np.float32)
    fields = [codec.new("sensor_msgs/msg/PointField", name=n, offset=4 * i, datatype=FLOAT32, count=1)
              for i, n in enumerate(("x", "y", "z", "intensity"))]
    return codec.new("sensor_msgs/msg/PointCloud2", header=_header(t, frame_id), height=1, width=len(pts),
                     fields=fields, is_bigendian=False, point_step=16, row_step=16 * len(pts),
                     data=pts.view(np.uint8).reshape(-1), is_dense=True)


def points_from_msg(msg: Any) -> np.ndarray:
    """PointCloud2 with float32 x, y, z, intensity -> float32 [N, 4]."""
    offs = {f.name: int(f.offset) for f in msg.fields if int(f.datatype) == FLOAT32}
    if not {"x", "y", "z", "intensity"} <= set(offs):
        raise ValueError(f"point cloud needs float32 x, y, z, intensity; has {[f.name for f in msg.fields]}")
    n, step = int(msg.width) * int(msg.height), int(msg.point_step)
    data = np.asarray(msg.data, np.uint8)
    if data.size != n * step:
        raise ValueError(f"point cloud: {data.size} bytes for {n} points of {step} bytes")
    rec = data.reshape(n, step)
    return np.stack([rec[:, offs[k]:offs[k] + 4].copy().view(np.float32)[:, 0]
                     for k in ("x", "y", "z", "intensity")], axis=1)


def _quat_yaw(yaw: float) -> Any:
    return codec.new("geometry_msgs/msg/Quaternion", x=0.0, y=0.0, z=math.sin(yaw / 2), w=math.cos(yaw / 2))


def odometry_msg(state: Any, role: str) -> Any:
    """nav_msgs/Odometry of the ego (rear axle) in the map frame; twist in the ego frame."""
    pose = codec.new("geometry_msgs/msg/Pose",
                     position=codec.new("geometry_msgs/msg/Point", x=float(state.x), y=float(state.y),
                                        z=float(state.z)),
                     orientation=_quat_yaw(float(state.yaw)))
    twist = codec.new("geometry_msgs/msg/Twist",
                      linear=codec.new("geometry_msgs/msg/Vector3", x=float(state.speed), y=0.0, z=0.0),
                      angular=codec.new("geometry_msgs/msg/Vector3", x=0.0, y=0.0, z=float(state.yaw_rate)))
    return codec.new("nav_msgs/msg/Odometry", header=_header(float(state.time_s), "map"), child_frame_id=role,
                     pose=codec.new("geometry_msgs/msg/PoseWithCovariance", pose=pose),
                     twist=codec.new("geometry_msgs/msg/TwistWithCovariance", twist=twist))


def gnss_msg(state: Any, role: str) -> Any:
    return codec.new("sensor_msgs/msg/NavSatFix", header=_header(float(state.time_s), f"{role}/gnss"),
                     latitude=float(state.lat), longitude=float(state.lon), altitude=float(state.alt))


def control_from_msg(msg: Any) -> Any:
    """carla_msgs/CarlaEgoVehicleControl -> flad_sim.physics.Control (same semantics; clipped)."""
    from flad_sim.physics import Control

    return Control(float(msg.throttle), float(msg.steer), float(msg.brake), bool(msg.hand_brake),
                   bool(msg.reverse)).clipped()


def control_msg(throttle: float = 0.0, steer: float = 0.0, brake: float = 0.0, hand_brake: bool = False,
                reverse: bool = False) -> Any:
    """A carla_msgs/CarlaEgoVehicleControl (for agents driving through the bridge)."""
    return codec.new("carla_msgs/msg/CarlaEgoVehicleControl", throttle=float(throttle), steer=float(steer),
                     brake=float(brake), hand_brake=bool(hand_brake), reverse=bool(reverse))


class WorldBridge:
    """Drives one ego of an embedded `World` from bus commands and publishes its sensors each tick."""

    def __init__(self, bus: Any, world: Any, ego_id: int, rig: SensorRig | RigConfig | None = None,
                 role: str = "hero", sensors_every: int = 1) -> None:
        self.bus = bus
        self.world = world
        self.ego_id = ego_id
        self.rig = rig if isinstance(rig, SensorRig) else SensorRig(rig)
        self.role = role
        self.sensors_every = max(1, int(sensors_every))
        self._lock = threading.Lock()
        self._control = None
        self.commands = 0
        self.ticks = 0
        bus.subscribe(topic(role, "vehicle_control_cmd"), "carla_msgs/msg/CarlaEgoVehicleControl", self._on_control,
                      finite=True)

    def _on_control(self, msg: Any) -> None:
        c = control_from_msg(msg)
        with self._lock:
            self._control = c
            self.commands += 1

    @property
    def control(self) -> Any:
        with self._lock:
            return self._control

    def publish(self) -> None:
        """Publish the current frame's sensors and ego state."""
        w, ego, role = self.world, self.ego_id, self.role
        st = w.ego_state(ego)
        t = float(st.time_s)
        obs = self.rig.observe(w.scene_view(ego))
        for c in self.rig.config.cameras:
            self.bus.publish(topic(role, c.name), image_msg(obs[c.name], t, f"{role}/{c.name}"))
        self.bus.publish(topic(role, "lidar"), pointcloud_msg(obs["lidar"], t, f"{role}/lidar"))
        self.bus.publish(topic(role, "gnss"), gnss_msg(st, role))
        self.bus.publish(topic(role, "odometry"), odometry_msg(st, role))
        self.bus.publish(topic(role, "speedometer"), codec.new("std_msgs/msg/Float32", data=float(st.speed)))

    def tick(self) -> None:
        """Apply the latest command (full brake if none yet), step the world, publish (every `sensors_every`)."""
        from flad_sim.physics import Control

        self.world.step({self.ego_id: self.control or Control(brake=1.0)})
        self.ticks += 1
        if self.ticks % self.sensors_every == 0:
            self.publish()


# ------------------------------------------------------------------------------------------------------------
# Closed-loop messages: clock, route guidance, waypoints as nav_msgs/Path, scores and infractions.
# Plain functions (no sockets), shared by the synchronous world (flad_sim.closed_loop) and the vehicle nodes.


def stamp_seconds(header_or_stamp: Any) -> float:
    """A std_msgs/Header's (or builtin_interfaces/Time's) stamp in seconds."""
    st = getattr(header_or_stamp, "stamp", header_or_stamp)
    return float(st.sec) + float(st.nanosec) * 1e-9


def stamp_key(header_or_stamp: Any) -> int:
    """A stamp as integer nanoseconds: an exact key for matching the messages of one frame."""
    st = getattr(header_or_stamp, "stamp", header_or_stamp)
    return int(st.sec) * 1_000_000_000 + int(st.nanosec)


def time_key(t: float) -> int:
    """`stamp_key` of the stamp `_stamp(t)` builds (so a float time and a received header compare exactly)."""
    return stamp_key(_stamp(t))


def clock_msg(t: float) -> Any:
    """rosgraph_msgs/Clock: simulated time, published on /clock each tick in synchronous mode."""
    return codec.new("rosgraph_msgs/msg/Clock", clock=_stamp(t))


def path_msg(waypoints: np.ndarray, t: float, frame_id: str) -> Any:
    """Waypoints [N, 2] (ego frame: x forward, y left, metres, 0.5 s apart) -> nav_msgs/Path stamped `t`."""
    header = _header(t, frame_id)
    poses = [codec.new("geometry_msgs/msg/PoseStamped", header=header, pose=codec.new(
        "geometry_msgs/msg/Pose", position=codec.new("geometry_msgs/msg/Point", x=float(x), y=float(y), z=0.0),
        orientation=codec.new("geometry_msgs/msg/Quaternion", w=1.0)))
        for x, y in np.asarray(waypoints, np.float64).reshape(-1, 2)]
    return codec.new("nav_msgs/msg/Path", header=header, poses=poses)


def waypoints_from_path(msg: Any) -> np.ndarray:
    """nav_msgs/Path -> float64 [N, 2] (x, y of each pose)."""
    return np.array([[p.pose.position.x, p.pose.position.y] for p in msg.poses], np.float64).reshape(-1, 2)


def pose_from_odometry(msg: Any) -> tuple[float, float, float]:
    """(x, y, yaw) of a nav_msgs/Odometry (yaw from the quaternion, rotation about z only)."""
    p, q = msg.pose.pose.position, msg.pose.pose.orientation
    yaw = math.atan2(2.0 * (q.w * q.z + q.x * q.y), 1.0 - 2.0 * (q.y * q.y + q.z * q.z))
    return float(p.x), float(p.y), yaw


def navigation_msg(labels: dict[str, Any], t: float, role: str, route_length_m: float) -> Any:
    """flad_msgs/Navigation from `LabelMaker.current()` labels (target point, command, instruction, notice)."""
    tp = np.asarray(labels["target_point"], np.float64).reshape(2)
    return codec.new("flad_msgs/msg/Navigation", header=_header(t, f"{role}/base_link"),
                     target_point=codec.new("geometry_msgs/msg/Point", x=float(tp[0]), y=float(tp[1]), z=0.0),
                     command=int(labels["command"]), instruction=str(labels["instruction"]),
                     notice=str(labels["notice"]), route_progress_m=float(labels.get("route_s", 0.0)),
                     route_length_m=float(route_length_m))


def infraction_msg(inf: Any, role: str, t: float | None = None) -> Any:
    """flad_sim.metrics.Infraction -> flad_msgs/Infraction (stamped at the event time unless `t` is given)."""
    return codec.new("flad_msgs/msg/Infraction", header=_header(float(inf.time_s if t is None else t), "map"),
                     role_name=role, kind=inf.kind, time_s=float(inf.time_s), x=float(inf.x), y=float(inf.y),
                     actor_id=int(inf.actor_id), penalty=float(inf.penalty), info=str(inf.info))


def infraction_from_msg(msg: Any) -> dict[str, Any]:
    return {"kind": msg.kind, "time_s": float(msg.time_s), "x": float(msg.x), "y": float(msg.y),
            "actor_id": int(msg.actor_id), "penalty": float(msg.penalty), "info": msg.info}


def score_msg(record: Any, role: str, t: float, final: bool, status: str | None = None) -> Any:
    """flad_sim.metrics.RouteRecord -> flad_msgs/DrivingScore."""
    return codec.new("flad_msgs/msg/DrivingScore", header=_header(t, "map"), role_name=role,
                     route_id=record.route_id, town=record.town, status=status or record.status, final=bool(final),
                     route_completion=float(record.rc), infraction_score=float(record.is_),
                     driving_score=float(record.ds), route_length_m=float(record.route_length_m),
                     duration_s=float(record.duration_s), outside_lanes_fraction=float(record.outside_lanes_fraction),
                     infractions=[infraction_msg(i, role, t) for i in record.infractions])


def score_from_msg(msg: Any) -> dict[str, Any]:
    """flad_msgs/DrivingScore -> the RouteRecord-style dict (`rc`, `is`, `ds`, ...) the CLI prints."""
    return {"role": msg.role_name, "route_id": msg.route_id, "town": msg.town, "status": msg.status,
            "final": bool(msg.final), "rc": float(msg.route_completion), "is": float(msg.infraction_score),
            "ds": float(msg.driving_score), "route_length_m": float(msg.route_length_m),
            "duration_s": float(msg.duration_s), "outside_lanes_fraction": float(msg.outside_lanes_fraction),
            "infractions": [infraction_from_msg(i) for i in msg.infractions]}
