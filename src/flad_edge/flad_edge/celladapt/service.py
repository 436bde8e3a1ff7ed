"""The edge waypoint service: `WaypointRequest` (EncodedFeatures + instruction + notice) → `nav_msgs/Path`.

It speaks the bus's request/reply wire format on its own ROUTER socket, so any `ZmqBus.request(...)`
client works, but unlike `ZmqBus.serve` (one handler call per request) it batches dynamically: requests
from many vehicles that arrive within `max_wait_ms` of the oldest queued one (up to `max_batch`) run as one
forward pass. The window closes early once every vehicle (client socket + vehicle_id) heard from in the
last `peer_idle_s` has a request queued: a vehicle in closed loop has one request in flight, so waiting
longer would only add latency. Every request has a deadline (its `timeout_s`, or the service default); one
that expired while queued, or whose answer came too late, gets an error reply. A malformed request (bad
CDR, wrong type, wrong shape/dtype/size, non-finite values, oversized text) gets an error reply and never
stops the service. It runs on its own thread (or process, `flad llm serve`), independently of FHDP training.

Devices (`ServiceConfig.device`, `dtype`): `for_model` puts the model on the service's device, by default in
half precision on CUDA (fp16) and fp32 on the CPU, so CPU answers are unchanged. Each batch's features and
target points arrive as numpy, go to the device (through reused pinned buffers on CUDA) and the waypoints
come back as CPU float32 for the wire. A GPU batches more per forward pass: `max_batch` 0 means
`DEFAULT_MAX_BATCH` of the device (16 on the CPU, 32 on CUDA).

Wire format (as `flad_core.bus`): request [b"", req_id, service, typename, cdr] (DEALER → ROUTER);
reply [b"", req_id, b"ok" | b"err", typename, cdr | utf-8 error text].
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zmq

from flad_core import codec
from flad_core.bus import bind_address
from flad_core.device import HostStaging, log_device, resolve_device
from flad_core.protocol import SERVICE_WAYPOINTS

log = logging.getLogger(__name__)

SERVICE = SERVICE_WAYPOINTS
REQUEST_TYPE = "flad_msgs/msg/WaypointRequest"
RESPONSE_TYPE = "nav_msgs/msg/Path"
FEATURE_DTYPES = ("float32", "float16")
MAX_TEXT_CHARS = 512
#: requests per forward pass when `max_batch` is 0: a small model's forward pass on a GPU is bound by kernel
#: launches rather than arithmetic, so a larger batch costs little more per pass (the CPU's default is unchanged)
DEFAULT_MAX_BATCH = {"cpu": 16, "cuda": 32}


def default_max_batch(device: torch.device) -> int:
    return DEFAULT_MAX_BATCH.get(device.type, DEFAULT_MAX_BATCH["cpu"])

#: (features [B,T,D], instructions, notices) → waypoints [B,5,2]; a navigation predictor (`navigation=True`)
#: also takes the target points [B,2] (NaN rows: none known)
Predictor = Callable[..., torch.Tensor]


@dataclass
class ServiceConfig:
    """Where and how the waypoint service batches."""

    address: str = "tcp://127.0.0.1:7210"
    service: str = SERVICE
    max_batch: int = 0              # most requests per forward pass (0: DEFAULT_MAX_BATCH of the device)
    max_wait_ms: float = 2.0        # batching window, counted from the oldest queued request
    close_when_all_queued: bool = True   # run as soon as every recently active vehicle has a request queued
    peer_idle_s: float = 1.0        # a vehicle silent this long no longer holds the window open
    default_timeout_s: float = 1.0
    threads: int = 0                # torch threads for the forward pass (0: leave as is)
    max_message_bytes: int = 4 * 1024 * 1024
    device: str = "auto"            # where the model and the batches are: auto | cpu | cuda[:N] (flad_core.device)
    dtype: str = "auto"             # the model's dtype under `for_model` (model.SERVE_DTYPES; auto: fp16 on CUDA)


@dataclass
class ServiceStats:
    requests: int = 0
    replies_ok: int = 0
    errors: int = 0
    timeouts: int = 0
    batches: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)
    device: str = "cpu"             # what served: the device, the model's dtype ("" for a bare predictor), max batch
    dtype: str = ""
    max_batch: int = 0

    def to_dict(self) -> dict[str, Any]:
        mean = sum(k * v for k, v in self.batch_sizes.items()) / max(1, self.batches)
        return {"requests": self.requests, "ok": self.replies_ok, "errors": self.errors, "timeouts": self.timeouts,
                "batches": self.batches, "mean_batch": round(mean, 2),
                "batch_sizes": dict(sorted(self.batch_sizes.items())), "device": self.device, "dtype": self.dtype,
                "max_batch": self.max_batch}


class BadRequestError(ValueError):
    """The request cannot be answered (the text goes back to the vehicle)."""


def features_to_msg(features: np.ndarray | torch.Tensor, vehicle_id: str = "", frame: int = 0) -> Any:
    """[T, D] (or [1, T, D]) float features → flad_msgs/EncodedFeatures."""
    arr = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    arr = np.ascontiguousarray(arr, dtype=np.float32 if arr.dtype not in (np.float16, np.float32) else arr.dtype)
    return codec.new("flad_msgs/msg/EncodedFeatures", header=codec.header(), vehicle_id=vehicle_id, frame=frame,
                     dtype=str(arr.dtype), shape=np.asarray(arr.shape, np.uint32),
                     data=np.frombuffer(arr.tobytes(), np.uint8))


def make_request(features: np.ndarray | torch.Tensor, instruction: str, notice: str = "", vehicle_id: str = "",
                 frame: int = 0, timeout_s: float = 0.0, target_point: Any = None) -> Any:
    """A WaypointRequest; `target_point` (x, y) in the ego frame, or None when the vehicle has none."""
    msg = codec.new(REQUEST_TYPE, header=codec.header(), features=features_to_msg(features, vehicle_id, frame),
                    instruction=instruction, notice=notice, timeout_s=float(timeout_s))
    if target_point is not None:
        x, y = (float(v) for v in np.asarray(target_point, np.float64).reshape(2))
        msg.target_point.x, msg.target_point.y = x, y
        msg.has_target_point = True
    return msg


def msg_to_features(msg: Any, shape: tuple[int, int]) -> np.ndarray:
    """Validated [T, D] float32 array from an EncodedFeatures message (BadRequestError on any mismatch)."""
    if msg.dtype not in FEATURE_DTYPES:
        raise BadRequestError(f"features dtype {msg.dtype!r} not supported (use {', '.join(FEATURE_DTYPES)})")
    dims = tuple(int(s) for s in msg.shape)
    if dims[:1] == (1,) and len(dims) == 3:
        dims = dims[1:]
    if dims != tuple(shape):
        raise BadRequestError(f"features shape {list(msg.shape)}, the model expects {list(shape)}")
    itemsize = np.dtype(msg.dtype).itemsize
    if len(msg.data) != math.prod(dims) * itemsize:
        raise BadRequestError(f"features carry {len(msg.data)} bytes, shape {list(dims)} {msg.dtype} needs "
                         f"{math.prod(dims) * itemsize}")
    arr = np.frombuffer(np.asarray(msg.data, np.uint8).tobytes(), dtype=msg.dtype).reshape(dims).astype(np.float32)
    if not np.isfinite(arr).all():
        raise BadRequestError("features contain NaN or inf")
    return arr


def waypoints_to_path(wp: np.ndarray, frame_id: str = "base_link", stamp_s: float | None = None) -> Any:
    """[5, 2] waypoints -> nav_msgs/Path. Builds the message classes directly (every field given): this runs
    once per reply on the service's hot path, where `codec.new`'s default filling cost ~5x more."""
    header = codec.header(stamp_s, frame_id)
    stamped, pose, point, quat, path = (codec.message_class(n) for n in _PATH_TYPES)
    identity = quat(x=0.0, y=0.0, z=0.0, w=1.0)
    poses = [stamped(header=header, pose=pose(position=point(x=float(x), y=float(y), z=0.0), orientation=identity))
             for x, y in np.asarray(wp, np.float64).reshape(-1, 2).tolist()]
    return path(header=header, poses=poses)


_PATH_TYPES = ("geometry_msgs/msg/PoseStamped", "geometry_msgs/msg/Pose", "geometry_msgs/msg/Point",
               "geometry_msgs/msg/Quaternion", RESPONSE_TYPE)


def path_to_waypoints(path: Any) -> np.ndarray:
    return np.array([[p.pose.position.x, p.pose.position.y] for p in path.poses], np.float32).reshape(-1, 2)


@dataclass
class _Pending:
    peer: bytes
    req_id: bytes
    features: np.ndarray
    instruction: str
    notice: str
    vehicle_id: str
    arrived: float
    deadline: float
    target_point: tuple[float, float] = (math.nan, math.nan)


class WaypointService:
    """Dynamic-batching waypoint server on a ROUTER socket; `start()` runs it on a daemon thread.

    `device` (default: `cfg.device`) is where each batch goes before `predict` sees it."""

    def __init__(self, predict: Predictor, feature_shape: tuple[int, int], cfg: ServiceConfig | None = None,
                 context: zmq.Context | None = None, security: Any = None, navigation: bool = False,
                 device: str | torch.device | None = None, dtype: str = "") -> None:
        self.predict = predict
        self.navigation = navigation
        self.feature_shape = tuple(feature_shape)
        self.cfg = cfg or ServiceConfig()
        if self.cfg.max_batch < 0:
            raise ValueError(f"max_batch must be >= 0 (0: the device's default), got {self.cfg.max_batch}")
        self.device = resolve_device(self.cfg.device if device is None else device)
        self.device_info = log_device("waypoint service", self.device)
        self.max_batch = self.cfg.max_batch or default_max_batch(self.device)
        # pinned host buffers, reused per batch size, for the copies to the GPU
        self._staging = HostStaging(self.device) if self.device.type == "cuda" else None
        self.ctx = context or zmq.Context.instance()
        self.security = security
        self.stats = ServiceStats(device=str(self.device), dtype=dtype, max_batch=self.max_batch)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._peers: dict[tuple[bytes, str], float] = {}   # (client socket, vehicle_id) -> its last request
        self._auth: Any = None                               # the ZAP allow-list check, with CURVE

    @classmethod
    def for_model(cls, model: Any, cfg: ServiceConfig | None = None, **kw: Any) -> WaypointService:
        """Serves an `ADLLM` (AD-LLM or ADM), moved (in place: the service owns what it serves) to `cfg.device`
        in `cfg.dtype`."""
        from flad_edge.celladapt.model import dtype_name

        cfg = cfg or ServiceConfig()
        a = model.cfg.adapter
        model.place(resolve_device(cfg.device), cfg.dtype)
        kw.setdefault("navigation", bool(getattr(model.cfg, "navigation", False)))
        kw.setdefault("device", model.device)
        kw.setdefault("dtype", dtype_name(model.dtype))
        return cls(predictor_fn(model), (a.n_feature_tokens, a.d_feature), cfg, **kw)

    # ------------------------------------------------------------------------------------------ lifecycle

    def start(self) -> WaypointService:
        self._thread = threading.Thread(target=self._run, name="waypoint-service", daemon=True)
        self._thread.start()
        if not self._ready.wait(10.0) or self._error is not None:
            raise RuntimeError(f"waypoint service did not start on {self.cfg.address}: {self._error}")
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def __enter__(self) -> WaypointService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve_forever(self) -> None:
        """Blocking variant for a dedicated process."""
        self._run()

    # ------------------------------------------------------------------------------------------ loop

    def _bind(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.MAXMSGSIZE, self.cfg.max_message_bytes)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            if self.security is not None and getattr(self.security, "curve", False):
                self._secure(sock)
            sock.bind(bind_address(self.cfg.address))
        except Exception:
            sock.close(0)
            if self._auth is not None:
                self._auth.stop()
                self._auth = None
            raise
        return sock

    def _secure(self, sock: zmq.Socket) -> None:
        """CURVE server with the key pair of the process it runs for (`security_for(fleet, fleet.edge.id)`: the
        edge's), behind the allow-list."""
        from flad_core.security import CurveAuthority, SecurityError, make_server, require_allow_list

        if not self.security.identity:
            raise SecurityError("waypoint service: security.identity (its key name) is not set; use "
                                "flad_core.roles.security_for(fleet, fleet.edge.id)")
        allow = require_allow_list(self.security, f"waypoint service on {self.cfg.address}")
        make_server(sock, self.security, self.security.identity)
        self._auth = CurveAuthority.for_context(self.ctx, allow)

    def _run(self) -> None:
        try:
            sock = self._bind()
        except Exception as exc:
            self._error = exc
            self._ready.set()
            log.error("waypoint service cannot bind %s: %s", self.cfg.address, exc)
            return
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        self._ready.set()
        log.info("waypoint service on %s (%s%s, max batch %d, window %.1f ms)", self.cfg.address, self.device,
                 f" {self.stats.dtype}" if self.stats.dtype else "", self.max_batch, self.cfg.max_wait_ms)
        queue: list[_Pending] = []
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if queue:
                    wait_ms = max(0.0, self.cfg.max_wait_ms - (time.monotonic() - queue[0].arrived) * 1000)
                else:
                    wait_ms = 100.0
                if len(queue) < self.max_batch and poller.poll(wait_ms):
                    while len(queue) < self.max_batch:
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        item = self._accept(sock, frames)
                        if item is not None:
                            queue.append(item)
                    continue_batching = queue and len(queue) < self.max_batch and \
                        (time.monotonic() - queue[0].arrived) * 1000 < self.cfg.max_wait_ms and \
                        not self._everyone_queued(queue)
                    if continue_batching:
                        continue
                if queue:
                    batch, queue = queue[:self.max_batch], queue[self.max_batch:]
                    self._run_batch(sock, batch)
        finally:
            sock.close(0)
            if self._auth is not None:
                self._auth.stop()
                self._auth = None

    def _everyone_queued(self, queue: list[_Pending]) -> bool:
        """Whether every client active within `peer_idle_s` has a request in `queue` (the window may close)."""
        if not self.cfg.close_when_all_queued:
            return False
        cutoff = time.monotonic() - self.cfg.peer_idle_s
        for peer in [p for p, seen in self._peers.items() if seen < cutoff]:
            del self._peers[peer]
        queued = {(p.peer, p.vehicle_id) for p in queue}
        return all(peer in queued for peer in self._peers)

    def _to_device(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A batch's CPU tensors on the service's device (unchanged on the CPU)."""
        if self._staging is not None:
            return self._staging.to_device(tensors)
        return {k: v.to(self.device) for k, v in tensors.items()}

    def _reply(self, sock: zmq.Socket, peer: bytes, req_id: bytes, ok: bool, payload: bytes, rtype: str = "") -> None:
        sock.send_multipart([peer, b"", req_id, b"ok" if ok else b"err", rtype.encode(), payload])

    def _error_reply(self, sock: zmq.Socket, peer: bytes, req_id: bytes, text: str) -> None:
        self.stats.errors += 1
        log.warning("waypoint service: rejected request: %s", text)
        self._reply(sock, peer, req_id, False, text.encode())

    def _accept(self, sock: zmq.Socket, frames: list[bytes]) -> _Pending | None:
        now = time.monotonic()
        self.stats.requests += 1
        if len(frames) != 6:
            if len(frames) >= 3:
                self._error_reply(sock, frames[0], frames[2], f"request with {len(frames)} frames (expected 6)")
            else:
                self.stats.errors += 1
                log.warning("waypoint service: dropped a %d-frame message", len(frames))
            return None
        peer, _, req_id, service_b, typename_b, body = frames
        service, typename = service_b.decode(errors="replace"), typename_b.decode(errors="replace")
        if service != self.cfg.service:
            self._error_reply(sock, peer, req_id, f"unknown service {service!r}")
            return None
        if codec.normalize_type(typename) != REQUEST_TYPE:
            self._error_reply(sock, peer, req_id, f"{service} expects {REQUEST_TYPE}, got {typename}")
            return None
        try:
            msg = codec.decode(body, REQUEST_TYPE, finite=True)
            if len(msg.instruction) > MAX_TEXT_CHARS or len(msg.notice) > MAX_TEXT_CHARS:
                raise BadRequestError(f"instruction/notice longer than {MAX_TEXT_CHARS} characters")
            if not msg.instruction.strip():
                raise BadRequestError("empty instruction")
            feats = msg_to_features(msg.features, self.feature_shape)
            timeout = float(msg.timeout_s)
            if timeout < 0:
                raise BadRequestError(f"negative timeout_s {timeout}")
        except (codec.CodecError, BadRequestError) as exc:
            self._error_reply(sock, peer, req_id, f"bad request: {exc}")
            return None
        timeout = timeout or self.cfg.default_timeout_s
        self._peers[(peer, msg.features.vehicle_id)] = now
        tp = (msg.target_point.x, msg.target_point.y) if msg.has_target_point else (math.nan, math.nan)
        return _Pending(peer, req_id, feats, msg.instruction, msg.notice, msg.features.vehicle_id, now, now + timeout,
                        tp)

    def _run_batch(self, sock: zmq.Socket, batch: list[_Pending]) -> None:
        now = time.monotonic()
        live = []
        for p in batch:
            if now > p.deadline:
                self.stats.timeouts += 1
                self._error_reply(sock, p.peer, p.req_id, f"timeout: queued {1000 * (now - p.arrived):.0f} ms, "
                                                          f"past its {1000 * (p.deadline - p.arrived):.0f} ms deadline")
            else:
                live.append(p)
        if not live:
            return
        try:
            inputs = {"features": torch.from_numpy(np.stack([p.features for p in live]))}
            if self.navigation:
                inputs["target_points"] = torch.tensor([p.target_point for p in live], dtype=torch.float32)
            inputs = self._to_device(inputs)
            texts = ([p.instruction for p in live], [p.notice for p in live])
            with torch.no_grad():
                if self.navigation:
                    wp = self.predict(inputs["features"], *texts, inputs["target_points"])
                else:
                    wp = self.predict(inputs["features"], *texts)
                wp = wp.float().cpu().numpy()
        except Exception as exc:     # a model failure answers the batch with errors; the service stays up
            log.exception("waypoint service: prediction failed")
            for p in live:
                self._error_reply(sock, p.peer, p.req_id, f"prediction failed: {type(exc).__name__}: {exc}")
            return
        self.stats.batches += 1
        self.stats.batch_sizes[len(live)] = self.stats.batch_sizes.get(len(live), 0) + 1
        done = time.monotonic()
        for p, w in zip(live, wp, strict=True):
            if done > p.deadline:
                self.stats.timeouts += 1
                self._error_reply(sock, p.peer, p.req_id, f"timeout: answered after {1000 * (done - p.arrived):.0f} "
                                                          f"ms, past its deadline")
                continue
            path = waypoints_to_path(w, f"{p.vehicle_id}/base_link" if p.vehicle_id else "base_link")
            self.stats.replies_ok += 1      # counted before sending, so a client never sees a reply uncounted
            self._reply(sock, p.peer, p.req_id, True, codec.encode(path, RESPONSE_TYPE), RESPONSE_TYPE)


class WaypointClient:
    """A vehicle's side: features + instruction → waypoints [5, 2] via the bus's request/reply."""

    def __init__(self, bus: Any, address: str, service: str = SERVICE, timeout_s: float = 1.0) -> None:
        self.bus = bus
        self.address = address
        self.service = service
        self.timeout_s = timeout_s

    def waypoints(self, features: np.ndarray | torch.Tensor, instruction: str, notice: str = "",
                  vehicle_id: str = "", frame: int = 0, timeout_s: float | None = None, target_point: Any = None
                  ) -> np.ndarray:
        t = self.timeout_s if timeout_s is None else timeout_s
        req = make_request(features, instruction, notice, vehicle_id, frame, t, target_point)
        path = self.bus.request(self.service, req, RESPONSE_TYPE, timeout_s=t + 0.5, address=self.address)
        return path_to_waypoints(path)


def free_tcp_address(host: str = "127.0.0.1") -> str:
    """An unused loopback TCP address (tests, benchmarks)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"


def predictor_fn(model: Any) -> Predictor:
    """A `Predictor` for an ADLLM (it takes the target points when the model has a navigation token)."""
    def predict(f: torch.Tensor, ins: Sequence[str], nots: Sequence[str], tps: torch.Tensor | None = None
                ) -> torch.Tensor:
        return model.predict(f, list(ins), list(nots), tps)

    return predict
