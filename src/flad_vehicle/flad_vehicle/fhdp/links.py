"""Point-to-point stage links over ZeroMQ: one inbox per worker, one outbound link per neighbour.

Frames are `flad_core.tensorframe` multipart messages (zero-copy, checksummed, validated). Every send
goes through the link's token bucket (emulated link rate) and is recorded in an audit log (tensor
names, kind, bytes and a content digest of every tensor), so tests can prove that raw sensor tensors --
and, in a U-shaped pipeline, labels -- never leave their vehicle.

With CURVE on (`SecurityConfig.curve`), each inbox is a CURVE server with its vehicle's key pair behind the
process's ZAP allow-list, each outbound link a CURVE client that knows its peer's public key: frames are
encrypted, and a peer without an allow-listed key never completes a handshake. On top of that the inbox takes
frames only from the neighbours its current assignment names (`Inbox.allow`): ZAP stamps each message with
the sender's public key ("User-Id"), which the inbox maps to a key name. Without CURVE no sender is
authenticated, so the inbox cannot tell who sent a frame and takes every well-formed one (as before).
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import zmq
import zmq.auth

from flad_core import tensorcodec, tensorframe
from flad_core.emulation import TokenBucket
from flad_core.security import CurveAuthority, SecurityConfig, SecurityError, make_client, make_server
from flad_vehicle.encoder.model import LABEL_INPUTS

log = logging.getLogger(__name__)

KIND_CONTROL = tensorframe.KIND_LABELS  # small control tensors (norm reduction) ride as "labels" frames


class LinkTimeoutError(TimeoutError):
    """A neighbour did not deliver an expected frame in time (it may have left)."""


class StepAbortedError(RuntimeError):
    """The edge aborted the running pipeline (a member left): stop waiting, drop the partial step."""


#: frame groups an inbox buffers before it drops frames for new ones (bounds its memory under a flood)
MAX_PENDING_GROUPS = 4096
#: error-feedback residual slots an OutLink keeps (kind, tensor, micro-batch): a pipeline uses a few dozen
MAX_RESIDUALS = 4096
#: how often a blocked send or receive looks at its abort flag (bounds how fast a survivor stops)
ABORT_POLL_S = 0.02


def tensor_digest(t: torch.Tensor) -> str:
    """Identity of a tensor's content (dtype, shape, bytes), for the audit: a test can prove that a given
    tensor -- a label, a raw sensor reading -- is in no frame a vehicle sent, whatever its name."""
    t = t.detach().cpu().contiguous()
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class AuditRecord:
    to: str
    kind: int
    step: int
    micro_batch: int
    names: tuple[str, ...]
    nbytes: int
    digests: tuple[str, ...] = ()     # `tensor_digest` of each named tensor as handed to the link (before the codec)


@dataclass
class LinkStats:
    frames: int = 0
    bytes: int = 0
    shaping_wait_s: float = 0.0
    audit: list[AuditRecord] = field(default_factory=list)


class PeerKeys:
    """Key names of the public keys in an allow-list folder (`<name>.key`), looked up by z85 text.

    ZAP tells an inbox a sender's public key; the assignment names vehicles. This table joins the two, and
    re-reads the folder when a key is unknown (a key allow-listed after the table was built)."""

    def __init__(self, allow_dir: str | Path) -> None:
        self.allow_dir = Path(allow_dir)
        self._names: dict[str, str] = {}
        self.reload()

    def reload(self) -> None:
        names = {}
        for path in sorted(self.allow_dir.glob("*.key")):
            try:
                public, _ = zmq.auth.load_certificate(str(path))
            except (OSError, ValueError) as exc:
                log.warning("allow-list key %s is unreadable: %s", path, exc)
                continue
            names[public.decode("ascii")] = path.name.removesuffix(".key")
        self._names = names

    def name(self, z85: str) -> str | None:
        """The key name of public key `z85`, None if no `<name>.key` of the folder holds it."""
        if z85 not in self._names:
            self.reload()
        return self._names.get(z85)


class OutLink:
    """Sends frames to one peer's inbox (PUSH), compressed with `codec`, shaped by `bucket`.

    Tensors named in `exact` (the labels) always travel bit-exact, whatever the codec. With `security.curve`
    the link is a CURVE client with the key pair named `identity` (the sending vehicle), and expects the
    peer inbox to hold the key named `server_key` (default: `peer`).

    `error_feedback` (with a lossy codec; EF-SGD / Optimus-CC style): a lossy codec's error on a tensor is not
    dropped but kept as a residual for its slot (frame kind, tensor name, micro-batch) and added to that slot's
    next send, before encoding; the new residual is what that send still missed, (input + residual) - decoded.
    So what the receiver gets, summed over the steps, equals what was sent, summed, up to the one residual still
    held (half a quantisation step at most): the error of a coarse codec such as int4 -- deterministic rounding,
    so correlated from step to step -- does not build up in what the stages train on; its sum over the steps is
    unbiased, where without feedback the same rounding would push the same way step after step. The slot
    omits the step on purpose: step s + 1's micro-batch m continues step s's feedback. Only quantised tensors
    (float, not in `exact`) get residuals, only frames sent with `compress` do (control frames never); a
    residual whose shape no longer fits its slot is dropped, and at most MAX_RESIDUALS slots are kept (the
    least recently sent go first)."""

    def __init__(self, ctx: zmq.Context, peer: str, address: str, stage_index: int, *, codec: str = "fp32",
                 bucket: TokenBucket | None = None, stats: LinkStats | None = None, hwm: int = 64,
                 exact: Collection[str] = LABEL_INPUTS, security: SecurityConfig | None = None,
                 identity: str = "", server_key: str = "", error_feedback: bool = False) -> None:
        self.peer = peer
        self.exact = frozenset(exact)
        self.address = address
        self.stage_index = stage_index
        self.codec = codec
        self.error_feedback = error_feedback
        # (kind, tensor name, micro-batch) -> float32 residual of that slot's last send, least recently sent first
        self._residuals: OrderedDict[tuple[int, str, int], torch.Tensor] = OrderedDict()
        self._residual_lock = threading.Lock()
        self.bucket = bucket
        self.stats = stats or LinkStats()
        self.sock = ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, hwm)
        self.sock.setsockopt(zmq.LINGER, 2000)
        if security is not None and security.curve:
            try:
                make_client(self.sock, security, identity, server_key or peer)
            except SecurityError:
                self.sock.close(0)
                raise
        self.sock.connect(address)

    def send(self, tensors: Mapping[str, torch.Tensor], *, kind: int, step: int, micro_batch: int,
             compress: bool = True, abort: threading.Event | None = None, copy: bool = False) -> int:
        """Send `tensors` as one frame; returns its bytes. Frames alias the tensors and ZeroMQ reads them later, from
        its I/O thread: `copy` copies them at the call instead, for tensors whose memory is reused right after (host
        staging buffers, `flad_core.device.HostStaging`)."""
        if not compress:
            payload = dict(tensors)
        elif self.error_feedback and self.codec != "fp32":
            payload = self._encode_with_feedback(tensors, kind, micro_batch)
        else:
            payload = tensorcodec.encode(tensors, self.codec, self.exact)
        frames = tensorframe.pack(payload, kind=kind, step=step, micro_batch=micro_batch, stage=self.stage_index)
        nbytes = sum(memoryview(f).nbytes for f in frames)
        if self.bucket is not None:
            self.stats.shaping_wait_s += self.bucket.consume(nbytes)
        if abort is None:
            self.sock.send_multipart(frames, copy=copy)
        else:
            # a departed peer stops draining its queue: never block past an abort
            while True:
                if abort.is_set():
                    raise StepAbortedError(f"send to {self.peer} aborted")
                try:
                    self.sock.send_multipart(frames, copy=copy, flags=zmq.NOBLOCK)
                    break
                except zmq.Again:
                    self.sock.poll(int(ABORT_POLL_S * 1000), zmq.POLLOUT)
        self.stats.frames += 1
        self.stats.bytes += nbytes
        self.stats.audit.append(AuditRecord(self.peer, kind, step, micro_batch, tuple(tensors), nbytes,
                                            tuple(tensor_digest(t) for t in tensors.values())))
        return nbytes

    def _encode_with_feedback(self, tensors: Mapping[str, torch.Tensor], kind: int, micro_batch: int
                              ) -> dict[str, torch.Tensor]:
        """Encode `tensors` with each quantised one's residual added; keep what the codec missed as the new one."""
        quantised = [n for n, t in tensors.items() if t.is_floating_point() and n not in self.exact]
        with self._residual_lock:
            targets: dict[str, torch.Tensor] = {}
            for name in quantised:
                t = tensors[name].detach()
                old = self._residuals.pop((kind, name, micro_batch), None)
                fits = old is not None and old.shape == t.shape and old.device == t.device
                targets[name] = t.float() + old if fits else t.float()
            corrected = {n: targets[n].to(t.dtype) if n in targets else t for n, t in tensors.items()}
            payload = tensorcodec.encode(corrected, self.codec, self.exact)
            decoded = tensorcodec.decode_names(payload, quantised, finite=False)
            for name in quantised:
                residual = targets[name] - decoded[name].float()
                if not bool(torch.isfinite(residual).all()):
                    continue            # a non-finite input (sent as is; the step guard drops it): no feedback
                self._residuals[(kind, name, micro_batch)] = residual
            while len(self._residuals) > MAX_RESIDUALS:
                self._residuals.popitem(last=False)
        return payload

    def residual_norm(self) -> float:
        """L2 norm of every residual this link keeps (0.0 without error feedback)."""
        with self._residual_lock:
            return math.sqrt(sum(float(r.double().pow(2).sum()) for r in self._residuals.values()))

    def close(self) -> None:
        self.sock.close()


class Inbox:
    """A worker's single receive socket (PULL); frames are matched by (kind, step, micro-batch).

    With `security.curve` the socket is a CURVE server with the key pair named `identity` (the owning
    vehicle) and only peers whose public key is in `security.allow_dir` connect (the context's ZAP handler).
    Of those, only the key names last given to `allow` may deliver: a frame from anyone else is dropped
    before it is decoded, counted in `refused_peers` (by sender) and logged. Nobody is allowed until the
    first `allow`. Without CURVE there is no authenticated sender: `allow` is recorded but not enforced,
    and every well-formed frame is delivered. With `bucket` (the device's `Radio.recv_bucket`) every frame
    read, refused ones included, is charged to it, so receiving shares the vehicle's radio with sending: a frame
    becomes available only once its air time has passed (`TokenBucket.reserve`), while the vehicle goes on
    computing -- reception happens in the background, as a radio's does."""

    def __init__(self, ctx: zmq.Context, address: str, max_frame_bytes: int = 512 * 1024 * 1024, *,
                 security: SecurityConfig | None = None, identity: str = "",
                 bucket: TokenBucket | None = None) -> None:
        self.address = address
        self.max_frame_bytes = max_frame_bytes
        self.bucket = bucket
        self.shaping_wait_s = 0.0     # time spent waiting for the radio budget (`bucket`) after reading frames
        self._pending: dict[tuple[int, int, int], list[tuple[tensorframe.FrameHeader, dict]]] = defaultdict(list)
        self._ready_at: dict[tuple[int, int, int], list[float]] = defaultdict(list)   # per pending frame (`bucket`)
        self.rejected = 0
        self.received_bytes = 0
        self.refused_peers: Counter[str] = Counter()   # sender (key name, or z85 key if unnamed) -> frames refused
        self.allowed: frozenset[str] = frozenset()
        self._auth: CurveAuthority | None = None
        self._keys: PeerKeys | None = None
        self.sock = ctx.socket(zmq.PULL)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes + 1024 * 1024)
        try:
            if security is not None and security.curve:
                self._secure(ctx, security, identity)
            self.sock.bind(address)
        except BaseException:
            self.close()
            raise

    def _secure(self, ctx: zmq.Context, security: SecurityConfig, identity: str) -> None:
        """Make the socket a CURVE server behind the allow-list (ZAP), and learn the allowed keys' names."""
        if not security.allow_dir:
            # without ZAP every CURVE client gets in and no message carries the sender's key
            raise SecurityError(f"inbox {self.address}: CURVE needs security.allow_dir to tell who sends frames")
        self._keys = PeerKeys(security.allow_dir)
        self._auth = CurveAuthority.for_context(ctx, security.allow_dir)
        make_server(self.sock, security, identity)

    @property
    def authenticated(self) -> bool:
        """Whether senders are authenticated (CURVE), so that `allow` is enforced."""
        return self._keys is not None

    def allow(self, peers: Iterable[str]) -> None:
        """Accept frames only from these key names from now on (the current assignment's neighbours).

        Enforced only with CURVE (`authenticated`); frames already received were checked when they came."""
        self.allowed = frozenset(peers)
        log.debug("inbox %s accepts frames from %s", self.address, sorted(self.allowed) or "nobody")

    def get(self, kind: int, step: int, micro_batch: int, timeout_s: float,
            abort: threading.Event | None = None) -> tuple[tensorframe.FrameHeader, dict]:
        """The frame for (kind, step, micro_batch), decoded; buffers any other frame that arrives first.

        With `abort`, the wait is sliced so that an abort (a neighbour left) ends it within ABORT_POLL_S
        instead of after the full link timeout."""
        key = (kind, step, micro_batch)
        deadline = time.monotonic() + timeout_s
        while not self._pending.get(key):
            if abort is not None and abort.is_set():
                raise StepAbortedError(f"wait for step {step} micro-batch {micro_batch} aborted")
            remaining = deadline - time.monotonic()
            slice_s = min(remaining, ABORT_POLL_S) if abort is not None else remaining
            if remaining <= 0 or not self.sock.poll(int(slice_s * 1000) + 1):
                if time.monotonic() >= deadline:
                    raise LinkTimeoutError(f"no {tensorframe.KIND_NAMES[kind]} frame for step {step} "
                                           f"micro-batch {micro_batch} within {timeout_s:.1f} s")
                continue
            self._receive_one()
        wait = self._ready_in(key)
        if wait > 0:      # still on the air (`bucket`)
            time.sleep(wait)
            self.shaping_wait_s += wait
        return self._pop(key)

    def _pop(self, key: tuple[int, int, int]) -> tuple[tensorframe.FrameHeader, dict]:
        if self._ready_at.get(key):
            self._ready_at[key].pop(0)
        return self._pending[key].pop(0)

    def _ready_in(self, key: tuple[int, int, int]) -> float:
        """Seconds until the first pending frame of `key` is through the radio (<= 0: it is; inf: none here)."""
        if not self._pending.get(key):
            return math.inf
        ready = self._ready_at.get(key)
        return ready[0] - time.monotonic() if ready else 0.0

    def has(self, kind: int, step: int, micro_batch: int) -> bool:
        """Whether the frame for (kind, step, micro_batch) is here (reads what already arrived, never blocks)."""
        key = (kind, step, micro_batch)
        while not self._pending.get(key) and self.sock.poll(0):
            self._receive_one()
        return self._ready_in(key) <= 0

    def wait_any(self, keys: list[tuple[int, int, int]], timeout_s: float,
                 abort: threading.Event | None = None) -> tuple[int, int, int]:
        """Block until the frame of one of `keys` (kind, step, micro-batch) is here; returns that key.

        A stage with two independent op streams (the data owner of a U-shaped pipeline: its trunk and
        its heads) waits on both, so neither stream can deadlock the other."""
        if not keys:
            raise ValueError("nothing to wait for")
        deadline = time.monotonic() + timeout_s
        while True:
            soonest = math.inf
            for key in keys:
                ready_in = self._ready_in(key)
                if ready_in <= 0:
                    return key
                soonest = min(soonest, ready_in)
            if abort is not None and abort.is_set():
                raise StepAbortedError(f"wait for {keys} aborted")
            remaining = deadline - time.monotonic()
            slice_s = min(remaining, ABORT_POLL_S) if abort is not None else remaining
            if soonest < slice_s:     # a wanted frame is on the air: wake when it is through
                if not self.sock.poll(int(soonest * 1000) + 1):
                    continue
                self._receive_one()
                continue
            if remaining <= 0 or not self.sock.poll(int(slice_s * 1000) + 1):
                if time.monotonic() >= deadline:
                    want = ", ".join(f"{tensorframe.KIND_NAMES[k]} step {s} mb {m}" for k, s, m in keys)
                    raise LinkTimeoutError(f"none of [{want}] arrived within {timeout_s:.1f} s")
                continue
            self._receive_one()

    def _receive_one(self) -> None:
        """Read one frame, check its sender, validate and decode it into the pending buffer (a refused or
        invalid frame is counted and dropped)."""
        frames = self.sock.recv_multipart(copy=False)
        nbytes = sum(len(f.buffer) for f in frames)
        self.received_bytes += nbytes
        # the frame takes air time whoever sent it: charged before the sender check and the decode
        ready_at = time.monotonic() + self.bucket.reserve(nbytes) if self.bucket is not None else 0.0
        if self._keys is not None and not self._sender_allowed(frames):
            return
        try:
            header, tensors = tensorframe.unpack(frames, max_bytes=self.max_frame_bytes)
            tensors = tensorcodec.decode(tensors)
        except (tensorframe.FrameError, tensorcodec.CodecError) as exc:
            self.rejected += 1
            log.warning("inbox %s rejected a frame: %s", self.address, exc)
            return
        except Exception as exc:    # a decoder bug must cost one frame, never the worker
            self.rejected += 1
            log.exception("inbox %s could not decode a frame (%s): dropped", self.address, type(exc).__name__)
            return
        key = (header.kind, header.step, header.micro_batch)
        if key not in self._pending and len(self._pending) >= MAX_PENDING_GROUPS:
            # a pipeline waits on a few dozen (kind, step, micro-batch) groups at most: a flood of others is dropped
            self.rejected += 1
            log.warning("inbox %s dropped a frame for %s: %d frame groups already waiting", self.address, key,
                        len(self._pending))
            return
        self._pending[key].append((header, tensors))
        if self.bucket is not None:
            self._ready_at[key].append(ready_at)

    def _sender_allowed(self, frames: list[zmq.Frame]) -> bool:
        """Whether the authenticated sender of `frames` is an allowed neighbour; counts and logs a refusal."""
        try:
            key = frames[0].get("User-Id")
        except zmq.ZMQError:
            key = ""       # no ZAP metadata on the message: not an authenticated sender
        name = self._keys.name(key) if key and self._keys is not None else None
        if name is not None and name in self.allowed:
            return True
        who = name or key or "an unauthenticated peer"
        self.refused_peers[who] += 1
        try:
            header, _ = tensorframe.parse_header(frames[0].buffer)
            what = (f"{tensorframe.KIND_NAMES[header.kind]} frame of step {header.step} "
                    f"micro-batch {header.micro_batch}")
        except tensorframe.FrameError:
            what = "an unparseable frame"
        log.warning("inbox %s refused %s from %s: not a neighbour of the current assignment (allowed: %s)",
                    self.address, what, who, ", ".join(sorted(self.allowed)) or "nobody")
        return False

    def drop_step(self, step: int) -> None:
        """Forget buffered frames of `step` (after an aborted step)."""
        for key in [k for k in self._pending if k[1] == step]:
            del self._pending[key]
            self._ready_at.pop(key, None)

    def drop_steps_below(self, step: int) -> int:
        """Forget buffered frames of every step before `step`, first draining what already arrived.

        Each (re)assignment uses a fresh, higher step range, so frames from an aborted pipeline (a
        departed neighbour's last activations) can never be taken for the resumed one; this frees them."""
        while self.sock.poll(0):
            self._receive_one()
        stale = [k for k in self._pending if k[1] < step]
        for key in stale:
            del self._pending[key]
            self._ready_at.pop(key, None)
            self._ready_at.pop(key, None)
        return len(stale)

    def close(self) -> None:
        """Close the socket; release this inbox's share of the context's ZAP authenticator."""
        self.sock.close()
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
