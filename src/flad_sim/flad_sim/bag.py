"""rosbag2 bags with MCAP storage, without ROS: an atomic recorder, a checked reader, and run recording.

Bags are written with `rosbags` (the same CDR bytes and message definitions rclpy and `ros2 bag` use), so
`ros2 bag info/play` and independent MCAP readers open them. Each topic is registered with the QoS profile
its stream is published with (sensor streams best-effort, everything else reliable, the final driving score
latched), because `ros2 bag play` re-offers the recorded profiles.

`BagRecorder` writes into a hidden temporary folder next to the target and renames it into place only when
the bag is closed cleanly, so a crash or an exception never leaves a half-written bag under the final name.
`read_bag` yields (topic, time, message) decoded with FLAD's codec and turns every storage or decoding fault
into a `BagError` that names the file and what is wrong.

`record_route` runs one agent on one seeded route of the embedded world and records what the synchronous
world bridge (`flad_sim.closed_loop`) and the vehicle nodes carry, with the same topic names and message
builders (`flad_sim.bridge`), plus the labels an open-loop evaluation needs. Per ego (role name R):

  /carla/R/rgb_*/image, /carla/R/lidar      sensor_msgs/Image (bgra8), PointCloud2   every sensor frame
  /carla/R/gnss, odometry, speedometer      NavSatFix, nav_msgs/Odometry, Float32   every tick (20 Hz)
  /carla/R/navigation                       flad_msgs/Navigation                    every sensor frame
  /carla/R/vehicle_control_cmd              carla_msgs/CarlaEgoVehicleControl       every tick
  /carla/R/infraction                       flad_msgs/Infraction                    when one happens
  /carla/R/driving_score                    flad_msgs/DrivingScore (final, RC/IS/DS) last message
  /flad/R/traffic_light                     flad_msgs/TrafficLightState             every sensor frame (label)
  /flad/R/expert_waypoints                  nav_msgs/Path (R/base_link)             sensor frames with a label
  /flad/R/features, /flad/R/waypoints       EncodedFeatures, nav_msgs/Path          when an encoder drives

The expert waypoints are the dataset's label: where the ego actually was 0.5 .. 2.5 s later (the privileged
expert's trajectory when it drives), so frames in the last 2.5 s of an unfinished run have none.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime
from rosbags.rosbag2 import Reader, StoragePlugin, Writer

from flad_core import codec
from flad_core.atomic import fsync_dir
from flad_core.config import ConfigError
from flad_core.interfaces import typestore
from flad_sim import bridge

log = logging.getLogger(__name__)

BAG_VERSION = 9                  # rosbag2 metadata version written by Jazzy
STORAGE = "mcap"

# rmw's "infinite" duration, as rosbag2 (Jazzy) writes it into metadata.yaml
_INFINITE = QosTime(9223372036, 854775807)
_ZERO = QosTime(0, 0)


def qos_profile(reliable: bool, depth: int, transient_local: bool = False) -> Qos:
    """A keep-last QoS profile in rosbags' form (what `offered_qos_profiles` in metadata.yaml holds)."""
    return Qos(QosHistory.KEEP_LAST, depth, QosReliability.RELIABLE if reliable else QosReliability.BEST_EFFORT,
               QosDurability.TRANSIENT_LOCAL if transient_local else QosDurability.VOLATILE, _INFINITE, _INFINITE,
               QosLiveliness.AUTOMATIC, _INFINITE, False)


#: rclpy's qos_profile_sensor_data (best effort, keep last 5): cameras, LiDAR, GNSS, odometry, speedometer
SENSOR_QOS = qos_profile(reliable=False, depth=5)
#: the ROS default profile (reliable, keep last 10): control, waypoints, features, labels, infractions
RELIABLE_QOS = qos_profile(reliable=True, depth=10)
#: latched (transient local, keep last 1): the final driving score, so a late subscriber still gets it
LATCHED_QOS = qos_profile(reliable=True, depth=1, transient_local=True)

SENSOR_TYPES = frozenset({"sensor_msgs/msg/Image", "sensor_msgs/msg/PointCloud2", "sensor_msgs/msg/NavSatFix",
                          "sensor_msgs/msg/Imu", "sensor_msgs/msg/CompressedImage"})


def default_qos(topic: str, msgtype: str) -> Qos:
    """Sensor streams (sensor message types and the bridge's per-tick ego topics) best-effort; the rest reliable."""
    msgtype = codec.normalize_type(msgtype)
    if msgtype == "flad_msgs/msg/DrivingScore":
        return LATCHED_QOS
    if msgtype in SENSOR_TYPES:
        return SENSOR_QOS
    if topic.startswith("/carla/") and not topic.endswith("/vehicle_control_cmd"):
        return SENSOR_QOS
    return RELIABLE_QOS


class BagError(RuntimeError):
    """A bag cannot be written or read; the text names the bag and what is wrong."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"bag {path}: {reason}")
        self.path = Path(path)
        self.reason = reason


# ------------------------------------------------------------------------------------------------ topics


def flad_topic(role: str, name: str) -> str:
    """FLAD's own per-vehicle topics: `/flad/<role>/<name>`."""
    return f"/flad/{role}/{name}"


def control_topic(role: str) -> str:
    return f"/carla/{role}/vehicle_control_cmd"


def bridge_topics(role: str = "hero", cameras: Iterable[str] = ("rgb_front", "rgb_left", "rgb_right", "rgb_rear")
                  ) -> dict[str, str]:
    """The world bridge's topics of one ego (carla-ros-bridge sensors, FLAD's navigation, infractions and driving
    score, as `flad_sim.bridge` / `flad_sim.closed_loop` publish them) and the control topic, with types."""
    out = {bridge.topic(role, c): "sensor_msgs/msg/Image" for c in cameras}
    out.update({bridge.topic(role, "lidar"): "sensor_msgs/msg/PointCloud2",
                bridge.topic(role, "gnss"): "sensor_msgs/msg/NavSatFix",
                bridge.topic(role, "odometry"): "nav_msgs/msg/Odometry",
                bridge.topic(role, "speedometer"): "std_msgs/msg/Float32",
                bridge.topic(role, "navigation"): "flad_msgs/msg/Navigation",
                bridge.topic(role, "infraction"): "flad_msgs/msg/Infraction",
                bridge.topic(role, "driving_score"): "flad_msgs/msg/DrivingScore",
                control_topic(role): "carla_msgs/msg/CarlaEgoVehicleControl"})
    return out


_TOPIC_RE = re.compile(r"/[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*")


def parse_topic_spec(spec: str) -> tuple[str, str]:
    """`/topic/name:pkg/msg/Type` (or `pkg/Type`) -> (topic, canonical type); ConfigError naming what is wrong."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ConfigError("topic", f"{spec!r}: expected TOPIC:TYPE, e.g. /carla/hero/odometry:nav_msgs/msg/Odometry")
    topic, typename = spec.split(":", 1)
    topic, typename = topic.strip(), typename.strip()
    if not _TOPIC_RE.fullmatch(topic):
        raise ConfigError("topic", f"{spec!r}: {topic!r} is not an absolute ROS topic name")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*/(msg/)?[A-Za-z_][A-Za-z0-9_]*", typename):
        raise ConfigError("topic", f"{spec!r}: {typename!r} is not a message type (pkg/msg/Name)")
    name = codec.normalize_type(typename)
    try:
        codec.message_class(name)
    except codec.CodecError as exc:
        raise ConfigError("topic", f"{spec!r}: {exc}") from exc
    return topic, name


# ------------------------------------------------------------------------------------------------ writing


def stamp_ns(t: float) -> int:
    """Simulated seconds -> bag timestamp (ns)."""
    return int(round(float(t) * 1e9))


class BagRecorder:
    """Writes one rosbag2 bag (MCAP storage) atomically; use as a context manager.

    Topics are registered on first write with their message type and `default_qos` (or explicitly with
    `add_topic`). An exception inside the `with` block aborts the bag and removes the temporary folder.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._tmpdir: Path | None = None
        self._writer: Writer | None = None
        self._conns: dict[str, Any] = {}
        self._types: dict[str, str] = {}
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self.last_ns = -1

    def open(self) -> BagRecorder:
        if self.path.exists():
            raise BagError(self.path, "exists already; a recorder never overwrites a bag")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmpdir = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".partial", dir=self.path.parent))
        try:
            self._writer = Writer(self._tmpdir / self.path.name, version=BAG_VERSION,
                                  storage_plugin=StoragePlugin.MCAP)
            self._writer.open()
        except Exception as exc:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            raise BagError(self.path, f"cannot open for writing: {exc}") from exc
        return self

    def __enter__(self) -> BagRecorder:
        return self.open()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def add_topic(self, topic: str, msgtype: str, qos: Qos | None = None) -> None:
        """Registers `topic` with `msgtype` and a QoS profile (default: `default_qos`)."""
        if self._writer is None:
            raise BagError(self.path, "not open")
        msgtype = codec.normalize_type(msgtype)
        codec.message_class(msgtype)
        if topic in self._types:
            if self._types[topic] != msgtype:
                raise BagError(self.path, f"topic {topic} is {self._types[topic]}, cannot also record {msgtype}")
            return
        qos = qos or default_qos(topic, msgtype)
        self._conns[topic] = self._writer.add_connection(topic, msgtype, typestore=typestore(),
                                                         offered_qos_profiles=[qos])
        self._types[topic] = msgtype
        self.counts[topic] = 0

    def write(self, topic: str, msg: Any, time_ns: int) -> None:
        """Encodes `msg` and writes it on `topic` at `time_ns` (registering the topic on first use)."""
        msgtype = codec.normalize_type(msg.__msgtype__)
        self.write_raw(topic, msgtype, codec.encode(msg, msgtype), time_ns)

    def write_raw(self, topic: str, msgtype: str, data: bytes | memoryview, time_ns: int) -> None:
        with self._lock:
            if self._writer is None:
                raise BagError(self.path, "not open (closed or aborted)")
            if topic not in self._conns:
                self.add_topic(topic, msgtype)
            elif self._types[topic] != codec.normalize_type(msgtype):
                raise BagError(self.path, f"topic {topic} is {self._types[topic]}, got a {msgtype}")
            self._writer.write(self._conns[topic], int(time_ns), data)
            self.counts[topic] += 1
            self.last_ns = max(self.last_ns, int(time_ns))

    @property
    def message_count(self) -> int:
        return sum(self.counts.values())

    def close(self) -> Path:
        """Finishes the bag (MCAP summary, metadata.yaml), fsyncs it and renames it into place."""
        if self._writer is None or self._tmpdir is None:
            raise BagError(self.path, "not open")
        staged = self._tmpdir / self.path.name
        try:
            with self._lock:
                self._writer.close()
                self._writer = None
            for f in staged.iterdir():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
            fsync_dir(staged)
            os.rename(staged, self.path)
            fsync_dir(self.path.parent)
        except OSError as exc:
            self.abort()
            raise BagError(self.path, f"cannot finish the bag: {exc}") from exc
        shutil.rmtree(self._tmpdir, ignore_errors=True)
        self._tmpdir = None
        log.info("wrote %s: %d messages on %d topics", self.path, self.message_count, len(self.counts))
        return self.path

    def abort(self) -> None:
        """Drops everything written so far (the final path is never created)."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            self._writer = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None


# ------------------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class BagMessage:
    topic: str
    time_ns: int
    msgtype: str
    msg: Any              # decoded message, or the raw CDR bytes when read with raw=True


@dataclass
class TopicSummary:
    msgtype: str
    count: int
    qos: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class BagInfo:
    path: Path
    storage: str
    message_count: int
    start_ns: int
    end_ns: int
    topics: dict[str, TopicSummary]

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "storage": self.storage, "message_count": self.message_count,
                "start_ns": self.start_ns, "end_ns": self.end_ns,
                "duration_s": max(0, self.end_ns - self.start_ns) / 1e9,
                "topics": {t: {"type": s.msgtype, "count": s.count, "qos": s.qos}
                           for t, s in sorted(self.topics.items())}}


def _check_path(path: Path) -> None:
    if not path.exists():
        raise BagError(path, "no such file or directory")
    if path.is_dir() and not (path / "metadata.yaml").exists():
        raise BagError(path, "not a rosbag2 bag: the folder has no metadata.yaml")
    if path.is_file() and path.suffix not in (".mcap", ".db3"):
        raise BagError(path, f"not a bag: expected a rosbag2 folder or an .mcap file, got {path.name!r}")


@contextlib.contextmanager
def _open_reader(path: Path) -> Iterator[Reader]:
    _check_path(path)
    try:
        reader = Reader(path)
        reader.open()
    except BagError:
        raise
    except Exception as exc:   # rosbags raises ReaderError, but also struct/zstd/lz4/YAML errors on corrupt files
        raise BagError(path, f"cannot open (truncated, corrupt or not a rosbag2 bag{_storage_note(path)}): "
                             f"{type(exc).__name__}: {exc}") from exc
    try:
        yield reader
    finally:
        with contextlib.suppress(Exception):
            reader.close()


def _storage_note(path: Path) -> str:
    """`; storage file NAME` for a bag folder, so an error names the file that is broken."""
    if not path.is_dir():
        return ""
    files = [p.name for p in _files(path) if p.suffix in (".mcap", ".db3")]
    return f"; storage file {', '.join(files)}" if files else ""


def _qos_dicts(conn: Any) -> list[dict[str, Any]]:
    out = []
    for q in getattr(conn.ext, "offered_qos_profiles", []) or []:
        out.append({"history": q.history.name.lower(), "depth": q.depth, "reliability": q.reliability.name.lower(),
                    "durability": q.durability.name.lower()})
    return out


def bag_info(path: str | Path) -> BagInfo:
    """Topics (type, count, offered QoS), message count and time span, from the bag's index."""
    path = Path(path)
    with _open_reader(path) as reader:
        try:
            topics = {}
            for topic, info in reader.topics.items():
                conn = info.connections[0]
                topics[topic] = TopicSummary(str(info.msgtype), int(info.msgcount), _qos_dicts(conn))
            storage = "mcap" if path.suffix == ".mcap" or any(p.suffix == ".mcap" for p in _files(path)) else "sqlite3"
            return BagInfo(path, storage, int(reader.message_count), int(reader.start_time), int(reader.end_time),
                           topics)
        except Exception as exc:
            raise BagError(path, f"cannot read the bag's index: {type(exc).__name__}: {exc}") from exc


def _files(path: Path) -> list[Path]:
    return sorted(path.iterdir()) if path.is_dir() else [path]


def read_bag(path: str | Path, topics: Iterable[str] | None = None, raw: bool = False) -> Iterator[BagMessage]:
    """Messages of `topics` (default: all), in the bag's order, decoded with FLAD's codec (`raw`: CDR bytes).

    Raises BagError naming the file on a missing path, a non-bag, a truncated/corrupt file, a topic whose
    type FLAD does not know, or a message that does not decode.
    """
    path = Path(path)
    want = set(topics) if topics is not None else None
    with _open_reader(path) as reader:
        conns = [c for c in reader.connections if want is None or c.topic in want]
        if want is not None and not conns:
            return
        for c in conns:
            try:
                codec.message_class(c.msgtype)
            except codec.CodecError as exc:
                raise BagError(path, f"topic {c.topic}: {exc}") from exc
        it = reader.messages(connections=conns)
        while True:
            try:
                conn, t, data = next(it)
            except StopIteration:
                return
            except Exception as exc:
                raise BagError(path, f"cannot read messages (truncated or corrupt{_storage_note(path)}): "
                                     f"{type(exc).__name__}: {exc}") from exc
            if raw:
                yield BagMessage(conn.topic, int(t), conn.msgtype, bytes(data))
                continue
            try:
                msg = codec.decode(data, conn.msgtype)
            except codec.CodecError as exc:
                raise BagError(path, f"topic {conn.topic} at t={int(t)} ns: {exc}") from exc
            yield BagMessage(conn.topic, int(t), conn.msgtype, msg)


def mcap_file(path: str | Path) -> Path:
    """The .mcap storage file of a bag folder (or the path itself when it is one)."""
    path = Path(path)
    _check_path(path)
    if path.is_file():
        return path
    files = [p for p in _files(path) if p.suffix == ".mcap"]
    if not files:
        raise BagError(path, "the bag has no .mcap storage file")
    return files[0]


# ------------------------------------------------------------------------------------------------ message builders


def features_msg(features: np.ndarray, t: float, vehicle_id: str = "", frame: int = 0) -> Any:
    """Encoder features [T, D] -> flad_msgs/EncodedFeatures (float32, row-major)."""
    arr = np.ascontiguousarray(np.asarray(features, np.float32))
    return codec.new("flad_msgs/msg/EncodedFeatures", header=bridge._header(t, f"{vehicle_id}/base_link"),
                     vehicle_id=vehicle_id,
                     frame=int(frame), dtype="float32", shape=np.asarray(arr.shape, np.uint32),
                     data=np.frombuffer(arr.tobytes(), np.uint8))


def traffic_light_msg(state: int, t: float) -> Any:
    return codec.new("flad_msgs/msg/TrafficLightState", header=bridge._header(t, ""), state=int(state))


# ------------------------------------------------------------------------------------------------ run recording


@dataclass
class RecordConfig:
    """One recorded embedded-world run: the route, how long, which rig, how often sensors publish."""

    town: str = "Town01"
    seed: int = 0
    seconds: float = 20.0           # simulated seconds (the route may end earlier)
    role: str = "hero"
    sensor_every: int = 2           # sensor frames every N world ticks (20 Hz ticks: 2 -> 10 Hz)
    front_size: int = 128
    side_size: int = 64             # 0: front camera only
    lidar_channels: int = 32
    lidar_azimuth_steps: int = 512
    min_route_m: float = 100.0
    max_route_m: float = 250.0

    def validate(self) -> None:
        from flad_sim.towns import town_config

        try:
            town_config(self.town)
        except KeyError as exc:
            raise ConfigError("town", str(exc).strip("'\"")) from exc
        if not (self.seconds > 0 and math.isfinite(self.seconds)):
            raise ConfigError("seconds", f"must be > 0, got {self.seconds}")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.role):
            raise ConfigError("role", f"{self.role!r} is not a valid ROS name")
        if self.sensor_every < 1:
            raise ConfigError("sensor_every", "must be >= 1")
        if self.front_size < 8 or (self.side_size and self.side_size < 8):
            raise ConfigError("front_size", "camera sizes must be >= 8 pixels (side_size 0 disables side cameras)")
        if self.lidar_channels < 1 or self.lidar_azimuth_steps < 1:
            raise ConfigError("lidar_channels", "lidar channels and azimuth steps must be >= 1")
        if not 0 < self.min_route_m <= self.max_route_m:
            raise ConfigError("min_route_m", "need 0 < min_route_m <= max_route_m")

    def camera_sizes(self) -> dict[str, tuple[int, int]]:
        sizes = {"rgb_front": (self.front_size, self.front_size)}
        if self.side_size:
            sizes.update({c: (self.side_size, self.side_size) for c in ("rgb_left", "rgb_right", "rgb_rear")})
        return sizes

    def rig_config(self) -> Any:
        from flad_sim.sensors import LidarConfig, RigConfig, default_cameras

        return RigConfig(cameras=default_cameras(self.camera_sizes()),
                         lidar=LidarConfig(channels=self.lidar_channels, azimuth_steps=self.lidar_azimuth_steps))


def cached_sensor_observer(rig: Any) -> Callable[[Any, int], dict[str, Any]]:
    """An `observe` for RouteRunner whose `obs["sensors"]()` renders at most once per tick, so the agent and the
    recorder share one rendering of a frame (and ticks nobody looks at are never rendered)."""

    def observe(world: Any, ego_id: int) -> dict[str, Any]:
        cache: dict[str, Any] = {}

        def sensors() -> dict[str, Any]:
            if "obs" not in cache:
                cache["obs"] = rig.observe(world.scene_view(ego_id), world.ego_state(ego_id))
            return cache["obs"]

        return {"sensors": sensors}

    return observe


#: extra messages an agent adds to a sensor frame: (obs, sim time, frame index) -> [(topic, message), ...]
FrameExtras = Callable[[dict[str, Any], float, int], list[tuple[str, Any]]]


@dataclass
class _Bundle:
    t_ns: int
    t: float
    frame: bool
    msgs: list[tuple[str, Any]]


class RunTap:
    """RouteRunner `on_tick` hook that turns each tick into bag messages.

    The expert waypoints of a frame are the ego's actual positions over the next 2.5 s (as in the dataset,
    `flad_sim.labels.WaypointLabeler`), known only 2.5 s later, so each tick's messages wait in a queue until
    its label is complete; the bag stays in time order.
    """

    def __init__(self, recorder: BagRecorder, cfg: RecordConfig, dt: float, cameras: list[str],
                 extras: FrameExtras | None = None, progress: Any = None, lidar: bool = True) -> None:
        from flad_sim.labels import WaypointLabeler

        self.rec = recorder
        self.cfg = cfg
        self.cameras = cameras
        self.lidar = lidar                 # cameras=[] and lidar=False: a light bag (no sensor data)
        self.extras = extras
        self.progress = progress
        self.labeler = WaypointLabeler(dt=dt)
        self.runner: Any = None
        self.tick = 0
        self.frames = 0
        self._n_inf = 0
        role = cfg.role
        self.t_odom, self.t_gnss = bridge.topic(role, "odometry"), bridge.topic(role, "gnss")
        self.t_speed, self.t_lidar = bridge.topic(role, "speedometer"), bridge.topic(role, "lidar")
        self.t_control = control_topic(role)
        self.t_nav, self.t_tl = bridge.topic(role, "navigation"), flad_topic(role, "traffic_light")
        self.t_expert, self.t_inf = flad_topic(role, "expert_waypoints"), bridge.topic(role, "infraction")
        self.t_score = bridge.topic(role, "driving_score")

    def _new_infractions(self) -> list[tuple[str, Any]]:
        infs = self.runner.scorer.infractions
        new, self._n_inf = infs[self._n_inf:], len(infs)
        return [(self.t_inf, bridge.infraction_msg(i, self.cfg.role)) for i in new]

    def on_tick(self, world: Any, ego_id: int, obs: dict[str, Any], control: Any) -> None:
        role, t = self.cfg.role, float(obs["time_s"])
        st = obs["ego"]
        msgs = self._new_infractions()
        msgs += [(self.t_odom, bridge.odometry_msg(st, role)), (self.t_gnss, bridge.gnss_msg(st, role)),
                 (self.t_speed, codec.new("std_msgs/msg/Float32", data=float(st.speed)))]
        frame = self.tick % self.cfg.sensor_every == 0
        if frame:
            if self.cameras or self.lidar:
                sensors = obs["sensors"]()
                for c in self.cameras:
                    msgs.append((bridge.topic(role, c), bridge.image_msg(sensors[c], t, f"{role}/{c}")))
                if self.lidar:
                    msgs.append((self.t_lidar, bridge.pointcloud_msg(sensors["lidar"], t, f"{role}/lidar")))
            labels = obs.get("labels", {})
            msgs.append((self.t_nav, bridge.navigation_msg(labels, t, role, self.runner.route.length)))
            msgs.append((self.t_tl, traffic_light_msg(int(labels.get("tl_state", 0)), t)))
            if self.extras is not None:
                msgs += self.extras(obs, t, self.frames)
            self.frames += 1
        msgs.append((self.t_control, bridge.control_msg(control.throttle, control.steer, control.brake,
                                                        control.hand_brake, control.reverse)))
        e = world.egos[ego_id]
        for b, wp in self.labeler.push((e.x, e.y, e.yaw), _Bundle(stamp_ns(t), t, frame, msgs)):
            self._write(b, wp)
        self.tick += 1
        if self.progress is not None:
            self.progress.update(1)

    def _write(self, b: _Bundle, expert_wp: np.ndarray | None) -> None:
        if b.frame and expert_wp is not None:
            b.msgs.insert(-1, (self.t_expert, bridge.path_msg(expert_wp, b.t, f"{self.cfg.role}/base_link")))
        for topic, msg in b.msgs:
            self.rec.write(topic, msg, b.t_ns)

    def finish(self, record: Any, t_end: float) -> None:
        """Writes the queued ticks (expert labels padded only when the route was completed: the ego stands at
        the goal), the remaining infractions and the final DrivingScore."""
        from flad_sim.metrics import STATUS_COMPLETED

        pad = record.status == STATUS_COMPLETED
        for b, wp in self.labeler.flush(pad=True):
            self._write(b, wp if pad else None)
        t_end = max(t_end, self.rec.last_ns / 1e9)
        t_ns = max(stamp_ns(t_end), self.rec.last_ns)
        for topic, msg in self._new_infractions():
            self.rec.write(topic, msg, t_ns)
        for inf in record.infractions:      # added by the scorer only when the record is made
            if inf.kind == "outside_route_lanes":
                self.rec.write(self.t_inf, bridge.infraction_msg(inf, self.cfg.role, t_end), t_ns)
        self.rec.write(self.t_score, bridge.score_msg(record, self.cfg.role, t_end, final=True), t_ns)


def record_route(cfg: RecordConfig, out: str | Path, make_agent: Callable[[Any], Any], agent_name: str,
                 privileged: bool = False, extras: FrameExtras | None = None, progress: bool = True
                 ) -> dict[str, Any]:
    """Runs `make_agent(world)` on the seeded route of (town, seed) for up to `cfg.seconds` and records the run
    to the bag `out` (atomically). Returns a summary: RC/IS/DS, status, frames, per-topic message counts."""
    from tqdm import tqdm

    from flad_sim.agent import RouteRunner
    from flad_sim.route import seeded_routes
    from flad_sim.sensors import SensorRig
    from flad_sim.world import World

    cfg.validate()
    world = World(cfg.town, seed=cfg.seed)
    route = seeded_routes(world.town, cfg.seed, 1, min_length=cfg.min_route_m, max_length=cfg.max_route_m)[0]
    rig = SensorRig(cfg.rig_config())
    max_ticks = max(1, int(round(cfg.seconds / world.dt)))
    agent = make_agent(world)
    with BagRecorder(out) as rec, tqdm(total=max_ticks, desc=f"recording {Path(out).name}", unit="tick",
                                       disable=not progress, leave=False) as bar:
        tap = RunTap(rec, cfg, world.dt, list(cfg.camera_sizes()), extras=extras, progress=bar)
        runner = RouteRunner(world, route, agent, observe=cached_sensor_observer(rig), on_tick=tap.on_tick,
                             max_ticks=max_ticks, privileged=privileged)
        tap.runner = runner
        record = runner.run()
        tap.finish(record, float(world.time_s))
        counts = dict(rec.counts)
    return {"bag": str(out), "agent": agent_name, "town": world.town.name, "seed": cfg.seed,
            "route_id": route.route_id, "route_length_m": round(route.length, 1), "status": record.status,
            "rc": record.rc, "is": record.is_, "ds": record.ds, "sim_seconds": round(float(world.time_s), 2),
            "ticks": tap.tick, "frames": tap.frames, "messages": sum(counts.values()), "topics": counts,
            "infractions": record.counts()}


# ------------------------------------------------------------------------------------------------ bus recording


def record_bus(bus: Any, topics: dict[str, str], out: str | Path, seconds: float,
               stop: threading.Event | None = None, progress: bool = True) -> dict[str, Any]:
    """Subscribes `bus` to `topics` ({topic: type}) for `seconds` (or until `stop`) and records every message
    at its receive time (wall clock, ns), as `ros2 bag record` does. Returns per-topic counts."""
    import time

    from tqdm import tqdm

    stop = stop or threading.Event()
    dropped = {"n": 0}
    with BagRecorder(out) as rec:
        for topic, typename in topics.items():
            rec.add_topic(topic, typename)

        def writer(topic: str, typename: str) -> Callable[[Any], None]:
            def on_msg(msg: Any) -> None:
                if stop.is_set():
                    dropped["n"] += 1
                    return
                try:
                    rec.write_raw(topic, typename, codec.encode(msg, typename), time.time_ns())
                except BagError:        # closed while this message was in flight
                    dropped["n"] += 1
            return on_msg

        for topic, typename in topics.items():
            bus.subscribe(topic, typename, writer(topic, typename))
        t0 = time.monotonic()
        with tqdm(total=round(seconds, 1), desc=f"recording {Path(out).name}", unit="s", disable=not progress,
                  leave=False, bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s") as bar:
            while not stop.is_set():
                left = seconds - (time.monotonic() - t0)
                if left <= 0:
                    break
                stop.wait(min(0.2, left))
                bar.n = round(min(seconds, time.monotonic() - t0), 1)
                bar.refresh()
        stop.set()     # callbacks arriving from now on are not written (the bus thread may still deliver)
        with rec._lock:
            counts = dict(rec.counts)
    return {"bag": str(out), "seconds": seconds, "messages": sum(counts.values()), "topics": counts}
