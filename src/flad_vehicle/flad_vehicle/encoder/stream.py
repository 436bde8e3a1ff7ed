"""The vehicle's perception loop on the bus: sensor topics -> vision encoder -> EncodedFeatures (+ waypoints).

`EncoderLoop` is the logic of the `encoder_node` (flad_vehicle/nodes/encoder_node.py) and runs on any
`flad_core.bus.Bus`. It subscribes the carla-ros-bridge topics of its ego (role name R) that the encoder reads:
the cameras (/carla/R/rgb_*/image), /carla/R/lidar, /carla/R/odometry (speed) and /carla/R/navigation (route
target point, instruction, notice), assembles the messages of one frame by their header stamp, runs the
encoder and publishes, stamped with the frame's time:

  /flad/<vid>/features     flad_msgs/EncodedFeatures   the LLM features [T, D] float32 (what leaves the vehicle)
  /flad/<vid>/navigation   flad_msgs/Navigation        the frame's guidance, relayed for the edge waypoint node
  /flad/<vid>/waypoints    nav_msgs/Path               only with waypoint_source = encoder_head: the encoder's
                                                       own waypoint head (no edge in the loop)

Raw sensor data never leaves this process. LiDAR: carla-ros-bridge leaves out rays without a return; the
encoder's fixed-size input is restored by padding with no-return rows (intensity -1), as the dataset has them.
A frame still incomplete `frame_timeout_s` after its first message is dropped (logged); frames are encoded
in stamp order, newest first when the encoder falls behind (older complete frames are dropped, counted).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from flad_core import codec
from flad_core.config import ConfigError
from flad_core.device import DeviceError, check_device_spec, log_device, resolve_device, to_device
from flad_sim import bridge as B

log = logging.getLogger(__name__)


@dataclass
class EncoderNodeConfig:
    """Parameters of the encoder node (one ROS parameter per field)."""

    vehicle_id: str = field(default="v0", metadata={"help": "vehicle id (the /flad/<vehicle_id>/... topics)"})
    role_name: str = field(default="hero", metadata={"help": "ego role name (the /carla/<role_name>/... topics)"})
    checkpoint: str = field(default="", metadata={
        "help": "encoder checkpoint (safetensors, from `flad vehicle train`); empty: a tiny randomly "
                "initialised encoder (tests and plumbing only)"})
    waypoint_source: Literal["edge", "encoder_head"] = field(default="edge", metadata={
        "help": "edge: the edge waypoint node answers the features; encoder_head: also publish the encoder's "
                "own waypoints on /flad/<vehicle_id>/waypoints"})
    seed: int = field(default=0, metadata={"help": "seed of the random encoder (when no checkpoint)"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    device: str = field(default="auto", metadata={
        "help": "where the encoder runs: auto (CUDA when present), cpu, cuda or cuda:N"})
    frame_timeout_s: float = field(default=5.0, metadata={
        "help": "drop a frame still incomplete this many wall seconds after its first message"})

    def validate(self) -> None:
        if not self.vehicle_id or not self.role_name:
            raise ConfigError("vehicle_id", "vehicle_id and role_name must not be empty")
        if self.threads < 1:
            raise ConfigError("threads", f"must be >= 1, got {self.threads}")
        try:
            check_device_spec(self.device)
        except DeviceError as exc:
            raise ConfigError("device", str(exc)) from exc
        if not self.frame_timeout_s > 0:
            raise ConfigError("frame_timeout_s", f"must be > 0, got {self.frame_timeout_s}")


def load_encoder(checkpoint: str, seed: int = 0, device: str | torch.device = "cpu") -> Any:
    """The encoder from a checkpoint, or (empty path) a tiny randomly initialised one, clearly logged, on
    `device` (flad_core.device)."""
    from flad_vehicle.encoder.checkpoint import load_checkpoint
    from flad_vehicle.encoder.model import VisionEncoder

    if checkpoint:
        model, meta = load_checkpoint(checkpoint, device=device)
        log.info("encoder: %s (config %s, step %s)", checkpoint, model.cfg.name, meta.get("step"))
    else:
        torch.manual_seed(seed)
        model = VisionEncoder("tiny", device=device)
        log.warning("encoder: NO CHECKPOINT given: a tiny RANDOMLY INITIALISED encoder (seed %d); its features "
                    "and waypoints are meaningless (tests/plumbing only)", seed)
    return model.eval()


def pad_lidar(points: np.ndarray, rays: int) -> np.ndarray:
    """[N, 4] returns -> [rays, 4]: padded with no-return rows (0, 0, 0, -1), or cut to `rays`."""
    out = np.zeros((rays, 4), np.float32)
    out[:, 3] = -1.0
    n = min(len(points), rays)
    out[:n] = points[:n]
    return out


class _Frame:
    __slots__ = ("first_seen", "parts")

    def __init__(self) -> None:
        self.parts: dict[str, Any] = {}
        self.first_seen = time.monotonic()


class EncoderLoop:
    """Sensors -> encoder -> features on the bus (module docstring)."""

    def __init__(self, bus: Any, cfg: EncoderNodeConfig, encoder: Any | None = None) -> None:
        self.bus = bus
        self.cfg = cfg
        torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device) if encoder is None else encoder.device
        self.encoder = encoder if encoder is not None else load_encoder(cfg.checkpoint, cfg.seed, self.device)
        self.device_info = log_device(f"encoder node {cfg.vehicle_id}", self.device)
        self.cameras = [n for n in self.encoder.sensor_inputs if n != "lidar"]
        self.lidar_rays = int(self.encoder.cfg.lidar_rays)
        self.needed = (*self.cameras, "lidar", "odometry", "navigation")
        vid, role = cfg.vehicle_id, cfg.role_name
        self.features_topic = f"/flad/{vid}/features"
        self.navigation_topic = f"/flad/{vid}/navigation"
        self.waypoints_topic = f"/flad/{vid}/waypoints"
        self._frames: dict[int, _Frame] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self.done = threading.Event()
        self.exit_code = 0
        self.encoded = 0
        self.dropped = 0
        self.encode_s: list[float] = []
        self._thread: threading.Thread | None = None
        for cam in self.cameras:
            bus.subscribe(B.topic(role, cam), "sensor_msgs/msg/Image", lambda m, c=cam: self._on(c, m))
        bus.subscribe(B.topic(role, "lidar"), "sensor_msgs/msg/PointCloud2", lambda m: self._on("lidar", m),
                      finite=True)
        bus.subscribe(B.topic(role, "odometry"), "nav_msgs/msg/Odometry", lambda m: self._on("odometry", m),
                      finite=True)
        bus.subscribe(B.topic(role, "navigation"), "flad_msgs/msg/Navigation", lambda m: self._on("navigation", m),
                      finite=True)

    def _on(self, part: str, msg: Any) -> None:
        key = B.stamp_key(msg.header)
        with self._cond:
            if part == "odometry" and key not in self._frames:
                # odometry comes every tick, sensors only on sensor ticks: keep it only for frames that exist
                # or may still come (a short window), so the table does not grow
                self._prune(keep_odometry_only=40)
            self._frames.setdefault(key, _Frame()).parts[part] = msg
            if all(p in self._frames[key].parts for p in self.needed):
                self._cond.notify_all()

    def _prune(self, keep_odometry_only: int) -> None:
        odo_only = [k for k, f in self._frames.items() if set(f.parts) == {"odometry"}]
        for k in sorted(odo_only)[:-keep_odometry_only or None]:
            del self._frames[k]
        now = time.monotonic()
        for k in [k for k, f in self._frames.items() if set(f.parts) != {"odometry"}
                  and now - f.first_seen > self.cfg.frame_timeout_s]:
            missing = [p for p in self.needed if p not in self._frames[k].parts]
            log.warning("frame t=%.2f s incomplete after %.1f s (missing %s): dropped", k * 1e-9,
                        self.cfg.frame_timeout_s, missing)
            del self._frames[k]
            self.dropped += 1

    def _next_complete(self) -> dict[str, Any] | None:
        with self._cond:
            ready = [k for k, f in self._frames.items() if all(p in f.parts for p in self.needed)]
            if not ready:
                self._prune(keep_odometry_only=40)
                return None
            key = max(ready)
            for k in [k for k in self._frames if k < key]:      # older frames are superseded by this one
                if k in ready:
                    self.dropped += 1
                del self._frames[k]
            return self._frames.pop(key).parts

    def batch(self, parts: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One frame's messages -> the encoder's input batch (batch size 1)."""
        batch: dict[str, torch.Tensor] = {}
        for cam in self.cameras:
            img = B.image_from_msg(parts[cam])
            want = tuple(self.encoder.cfg.cameras[cam])
            if img.shape[:2] != want:
                raise ValueError(f"{cam}: image {img.shape[0]}x{img.shape[1]}, the encoder expects {want[0]}x{want[1]} "
                                 "(world rig and encoder config differ)")
            batch[cam] = torch.from_numpy(img)[None]
        batch["lidar"] = torch.from_numpy(pad_lidar(B.points_from_msg(parts["lidar"]), self.lidar_rays))[None]
        batch["speed"] = torch.tensor([float(parts["odometry"].twist.twist.linear.x)], dtype=torch.float32)
        tp = parts["navigation"].target_point
        batch["target_point"] = torch.tensor([[float(tp.x), float(tp.y)]], dtype=torch.float32)
        return batch

    @torch.no_grad()
    def encode(self, parts: dict[str, Any]) -> None:
        """Encode one complete frame and publish its features (and head waypoints)."""
        t0 = time.perf_counter()
        header = parts["odometry"].header
        out = self.encoder(to_device(self.batch(parts), self.device))
        out = {k: out[k].float().cpu() for k in ("features", "pred.waypoints")}
        feats = np.ascontiguousarray(out["features"][0].numpy())
        msg = codec.new("flad_msgs/msg/EncodedFeatures", header=header, vehicle_id=self.cfg.vehicle_id,
                        frame=self.encoded, dtype="float32", shape=np.asarray(feats.shape, np.uint32),
                        data=np.frombuffer(feats.tobytes(), np.uint8))
        nav = parts["navigation"]
        self.bus.publish(self.navigation_topic, nav)
        self.bus.publish(self.features_topic, msg)
        if self.cfg.waypoint_source == "encoder_head":
            path = B.path_msg(out["pred.waypoints"][0].numpy(), 0.0, f"{self.cfg.vehicle_id}/base_link")
            path.header.stamp = header.stamp
            self.bus.publish(self.waypoints_topic, path)
        self.encoded += 1
        self.encode_s.append(time.perf_counter() - t0)

    # ------------------------------------------------------------------------------------------ component
    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                self._cond.wait(0.1)
            while not self._stop.is_set():
                parts = self._next_complete()
                if parts is None:
                    break
                try:
                    self.encode(parts)
                except (ValueError, KeyError) as exc:
                    self.dropped += 1
                    log.warning("frame rejected: %s", exc)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="encoder", daemon=True)
        self._thread.start()
        log.info("encoder: %s -> %s%s", ", ".join(B.topic(self.cfg.role_name, n) for n in self.needed),
                 self.features_topic, f" + {self.waypoints_topic}" if self.cfg.waypoint_source == "encoder_head"
                 else "")

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self.done.set()
