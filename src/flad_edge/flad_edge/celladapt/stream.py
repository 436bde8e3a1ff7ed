"""The edge waypoint predictor as a topic front end: /flad/<vid>/features -> CELLAdapt model -> /flad/<vid>/waypoints.

`WaypointStream` is the logic of the `waypoint_node` (flad_edge/nodes/waypoint_node.py) and runs on any
`flad_core.bus.Bus`. It serves a list of vehicles: it subscribes each one's flad_msgs/EncodedFeatures and
flad_msgs/Navigation (relayed by the vehicle's encoder node: instruction and notice for the LLM), batches
features across vehicles dynamically (every frame that arrives within `max_wait_ms` of the oldest queued one,
up to `max_batch`, runs as one forward pass, as `WaypointService` does for request/reply) and publishes each
vehicle's nav_msgs/Path with the features' header stamp (frame id `<vid>/base_link`).

Features are validated as the request/reply service validates them (dtype, shape, size, finite values); a bad
one is logged and counted, never fatal. The model runs on the node's `device` (in half precision on CUDA by
default, `dtype`), batches of up to `max_batch` frames (0: 16 on the CPU, 32 on CUDA). The request/reply
`WaypointService` (ZeroMQ) is unchanged; both are front ends of the same `ADLLM.predict`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from flad_core.config import ConfigError
from flad_core.device import DeviceError, check_device_spec, log_device, resolve_device
from flad_edge.celladapt.service import BadRequestError, default_max_batch, msg_to_features
from flad_sim import bridge as B

log = logging.getLogger(__name__)

DEFAULT_INSTRUCTION = "follow the lane"


@dataclass
class WaypointNodeConfig:
    """Parameters of the waypoint node (one ROS parameter per field)."""

    vehicle_ids: list[str] = field(default_factory=lambda: ["v0"], metadata={
        "help": "vehicles served: subscribes /flad/<id>/features and /flad/<id>/navigation of each"})
    model_dir: str = field(default="", metadata={
        "help": "CELLAdapt model (ADLLM.save_pretrained directory: ADM or AD-LLM); empty: a tiny randomly "
                "initialised model of `preset` (tests and plumbing only)"})
    preset: str = field(default="student", metadata={
        "help": "size of the random model when model_dir is empty: student (ADM), teacher or general"})
    max_batch: int = field(default=0, metadata={
        "help": "most frames per forward pass (0: 16 on the CPU, 32 on CUDA)"})
    max_wait_ms: float = field(default=2.0, metadata={
        "help": "batching window, counted from the oldest queued frame (ms)"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    device: str = field(default="auto", metadata={
        "help": "where the model runs: auto (CUDA when present), cpu, cuda or cuda:N"})
    dtype: str = field(default="auto", metadata={
        "help": "the model's dtype: auto (fp16 on CUDA, fp32 on the CPU), fp32, half, bf16 or fp16"})

    def validate(self) -> None:
        if not self.vehicle_ids or any(not v for v in self.vehicle_ids):
            raise ConfigError("vehicle_ids", f"need one or more non-empty vehicle ids, got {self.vehicle_ids}")
        if len(set(self.vehicle_ids)) != len(self.vehicle_ids):
            raise ConfigError("vehicle_ids", f"duplicate vehicle ids in {self.vehicle_ids}")
        from flad_edge.celladapt.model import PRESETS

        if not self.model_dir and self.preset not in PRESETS:
            raise ConfigError("preset", f"must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.max_batch < 0 or self.threads < 1:
            raise ConfigError("max_batch", "max_batch must be >= 0 (0: the device's default) and threads >= 1")
        try:
            check_device_spec(self.device)
        except DeviceError as exc:
            raise ConfigError("device", str(exc)) from exc
        from flad_edge.celladapt.model import SERVE_DTYPES

        if self.dtype not in SERVE_DTYPES:
            raise ConfigError("dtype", f"must be one of {', '.join(SERVE_DTYPES)}, got {self.dtype!r}")
        if self.max_wait_ms < 0:
            raise ConfigError("max_wait_ms", f"must be >= 0, got {self.max_wait_ms}")


def load_model(model_dir: str, preset: str = "student", device: str | torch.device = "cpu", dtype: str = "fp32"
               ) -> Any:
    """The CELLAdapt model from a `save_pretrained` directory, or a tiny random one (clearly logged), on
    `device` in `dtype`."""
    from flad_edge.celladapt.model import ADLLM

    if model_dir:
        model = ADLLM.from_pretrained(model_dir, device=device, dtype=dtype)
        log.info("waypoint model: %s (%s)", model_dir, model.cfg.name)
    else:
        model = ADLLM.build(preset, device=device, dtype=dtype)
        log.warning("waypoint model: NO model_dir given: a tiny RANDOMLY INITIALISED %s model; its waypoints are "
                    "meaningless (tests/plumbing only)", preset)
    return model.eval()


@dataclass
class _Item:
    vehicle_id: str
    msg: Any
    arrived: float


class WaypointStream:
    """Topic-based dynamic-batching waypoint predictor (module docstring)."""

    def __init__(self, bus: Any, cfg: WaypointNodeConfig, model: Any | None = None) -> None:
        self.bus = bus
        self.cfg = cfg
        torch.set_num_threads(cfg.threads)
        # a model handed in runs where it is; one loaded here goes to cfg.device
        self.device = resolve_device(cfg.device) if model is None else model.device
        self.model = model if model is not None else load_model(cfg.model_dir, cfg.preset, self.device, cfg.dtype)
        self.device_info = log_device("waypoint node", self.device)
        self.max_batch = cfg.max_batch or default_max_batch(self.device)
        a = self.model.cfg.adapter
        self.feature_shape = (int(a.n_feature_tokens), int(a.d_feature))
        self._queue: list[_Item] = []
        self._nav: dict[str, OrderedDict[int, Any]] = {v: OrderedDict() for v in cfg.vehicle_ids}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self.done = threading.Event()
        self.exit_code = 0
        self.published = 0
        self.rejected = 0
        self.batch_sizes: dict[int, int] = {}
        self._thread: threading.Thread | None = None
        for vid in cfg.vehicle_ids:
            bus.subscribe(f"/flad/{vid}/features", "flad_msgs/msg/EncodedFeatures",
                          lambda m, v=vid: self._on_features(v, m))
            bus.subscribe(f"/flad/{vid}/navigation", "flad_msgs/msg/Navigation",
                          lambda m, v=vid: self._on_navigation(v, m), finite=True)

    def _on_navigation(self, vid: str, msg: Any) -> None:
        with self._cond:
            nav = self._nav[vid]
            nav[B.stamp_key(msg.header)] = msg
            while len(nav) > 50:
                nav.popitem(last=False)

    def has_navigation(self, vid: str) -> bool:
        """Whether any navigation of `vid` has arrived (before that, its frames get the default instruction)."""
        with self._cond:
            return bool(self._nav.get(vid))

    def _on_features(self, vid: str, msg: Any) -> None:
        with self._cond:
            self._queue.append(_Item(vid, msg, time.monotonic()))
            self._cond.notify_all()

    def _text(self, vid: str, key: int) -> tuple[str, str, tuple[float, float]]:
        """Instruction, notice and target point of the frame (its own navigation if it came, else the newest
        one; NaN target point when none came)."""
        nav = self._nav[vid]
        msg = nav.get(key)
        if msg is None and nav:
            msg = next(reversed(nav.values()))
        if msg is None:
            return DEFAULT_INSTRUCTION, "", (float("nan"), float("nan"))
        tp = (float(msg.target_point.x), float(msg.target_point.y))
        if not msg.instruction.strip():
            return DEFAULT_INSTRUCTION, "", tp
        return msg.instruction, msg.notice, tp

    def _take_batch(self) -> list[_Item]:
        with self._cond:
            while not self._queue and not self._stop.is_set():
                self._cond.wait(0.1)
            while (self._queue and len(self._queue) < self.max_batch and not self._stop.is_set()):
                left = self.cfg.max_wait_ms / 1000 - (time.monotonic() - self._queue[0].arrived)
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
            texts = [self._text(i.vehicle_id, B.stamp_key(i.msg.header)) for i in batch]
        return [(i, t) for i, t in zip(batch, texts, strict=True)]

    def run_batch(self, batch: list[tuple[_Item, tuple[str, str, tuple[float, float]]]]) -> None:
        """Validate, predict in one pass, publish one Path per frame."""
        good, feats = [], []
        for item, text in batch:
            try:
                feats.append(msg_to_features(item.msg, self.feature_shape))
                good.append((item, text))
            except BadRequestError as exc:
                self.rejected += 1
                log.warning("/flad/%s/features rejected: %s", item.vehicle_id, exc)
        if not good:
            return
        features = torch.from_numpy(np.stack(feats)).to(self.device)
        targets = torch.tensor([t[2] for _, t in good], dtype=torch.float32).to(self.device)
        with torch.no_grad():      # predict answers CPU float32 whatever the device
            wp = self.model.predict(features, [t[0] for _, t in good], [t[1] for _, t in good], targets).numpy()
        self.batch_sizes[len(good)] = self.batch_sizes.get(len(good), 0) + 1
        for (item, _), w in zip(good, wp, strict=True):
            path = B.path_msg(w, 0.0, f"{item.vehicle_id}/base_link")
            path.header.stamp = item.msg.header.stamp
            self.bus.publish(f"/flad/{item.vehicle_id}/waypoints", path)
            self.published += 1

    # ------------------------------------------------------------------------------------------ component
    def _loop(self) -> None:
        while not self._stop.is_set():
            batch = self._take_batch()
            if not batch:
                continue
            try:
                self.run_batch(batch)
            except Exception:          # a model failure loses these frames; the node stays up
                log.exception("waypoint prediction failed for %d frame(s)", len(batch))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="waypoint-stream", daemon=True)
        self._thread.start()
        log.info("waypoint node: serving %s on %s (max batch %d, window %.1f ms)", ", ".join(self.cfg.vehicle_ids),
                 self.device, self.max_batch, self.cfg.max_wait_ms)

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self.done.set()
