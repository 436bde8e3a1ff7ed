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
