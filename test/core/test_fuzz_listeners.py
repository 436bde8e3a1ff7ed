"""Fuzzing the bus's network entry points over real loopback sockets: they reject garbage and keep serving.

The bus hub (XSUB/XPUB) with a ZmqBus subscriber behind it, and a ZmqBus request/reply service (ROUTER), get
random frames, mutations of valid frames, hypothesis-generated messages and raw TCP garbage; after every
batch a valid request must still be answered correctly, the receive threads must be alive and the
rejections counted (`ZmqBus.dropped`). See test/fuzz_harness.py (FLAD_FUZZ_EXAMPLES scales the counts,
FLAD_FUZZ_REPORT=path records them). The edge's and vehicle's own services are fuzzed in
test/edge/test_fuzz_edge_listeners.py and test/vehicle/test_fuzz_vehicle_listeners.py.
Also here: regression tests for what fuzzing found in the decoders.
"""

from __future__ import annotations

import random
import struct
import time
import uuid

import pytest
import torch
import zmq
from fuzz_harness import (
    Campaign,
    Entry,
    Harness,
    Mutator,
    ProbeTimeoutError,
    RawDealer,
    Seed,
    WeightsFuzzer,
    build_header,
    frames_strategy,
    scaled,
)
from hypothesis import strategies as st

from flad_core import codec, tensorcodec, tensorframe
from flad_core import weights as wts
from flad_core.bus import BusConfig, BusHub, ZmqBus
from flad_core.procs import free_port_base

from msg_strategies import message

MAX_FRAME = 1024 * 1024          # the sockets' MAXMSGSIZE in these tests (oversize inputs go past it)
CODEC_LIMIT = 256 * 1024         # codec.MAX_MESSAGE_BYTES, lowered so that oversize bodies are cheap
TOPIC_HB, TOPIC_ST = "/fuzz/heartbeat", "/fuzz/status"
HB, STATUS, ACK = "flad_msgs/msg/Heartbeat", "flad_msgs/msg/VehicleStatus", "flad_msgs/msg/Ack"
LAYER_REQ, CHUNK = "flad_msgs/msg/LayerRequest", "flad_msgs/msg/WeightChunk"


@pytest.fixture(autouse=True)
def small_codec_limit(monkeypatch):
    monkeypatch.setattr(codec, "MAX_MESSAGE_BYTES", CODEC_LIMIT)


def _status(vehicle_id: str, speed: float = 3.5) -> object:
    return codec.new(STATUS, header=codec.header(), vehicle_id=vehicle_id, speed_mps=speed, predicted_dwell_s=60.0,
                     state="idle", profile=codec.new("flad_msgs/msg/DeviceProfile", name="jetson_nano",
                                                     mem_bytes=8 << 30, tflops=0.472, link_mbps=50.0))


# -- the hub and a subscriber behind it ---------------------------------------------------------------------------
class HubHarness(Harness):
    """BusHub + ZmqBus subscriber (Heartbeat, and VehicleStatus with finite=True); fuzz goes in through a raw PUB
    (mode "pub", the hub's XSUB side) or a raw XSUB (mode "xsub", the hub's XPUB side). A spy SUB subscribed to
    everything makes the hub forward every frame, whatever its topic."""

    socket_type = b"PUB"

    def __init__(self) -> None:
        self.ctx = zmq.Context.instance()
        self.mode = "pub"
        self.nonfinite: list[str] = []

    def start(self) -> None:
        base = free_port_base(4)
        self.cfg = BusConfig(hub_pub=f"tcp://127.0.0.1:{base}", hub_sub=f"tcp://127.0.0.1:{base + 1}",
                             max_message_bytes=MAX_FRAME)
        self.hub = BusHub(self.cfg, context=self.ctx)
        self.bus = ZmqBus("fuzz-sub", self.cfg, context=self.ctx)
        self.seen: set[str] = set()
        self.bus.subscribe(TOPIC_HB, HB, lambda m: self.seen.add(m.vehicle_id))
        self.bus.subscribe(TOPIC_ST, STATUS, self._on_status, finite=True)
        self.pub = self._sock(zmq.PUB, self.cfg.hub_pub)
        self.xsub = self._sock(zmq.XSUB, self.cfg.hub_sub)
        self.spy = self._sock(zmq.SUB, self.cfg.hub_sub)
        self.spy.setsockopt(zmq.SUBSCRIBE, b"")
        self.n = 0

    def _sock(self, kind: int, address: str) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100000)
        sock.connect(address)
        return sock

    def _on_status(self, msg) -> None:
        bad = codec._first_nonfinite(msg)
        if bad:
            self.nonfinite.append(f"{msg.vehicle_id}: {bad}")
        self.seen.add(msg.vehicle_id)

    def stop(self) -> None:
        for sock in (self.pub, self.xsub, self.spy):
            sock.close(0)
        self.bus.close()
        self.hub.close()

    def send(self, frames: list[bytes]) -> bool:
        sock = self.pub if self.mode == "pub" else self.xsub
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def probe(self) -> None:
        self.n += 1
        hb_id, st_id = f"probe-hb-{self.n}", f"probe-st-{self.n}"
        hb = codec.encode(codec.new(HB, vehicle_id=hb_id, seq=self.n))
        status = codec.encode(_status(st_id))
        deadline = time.monotonic() + 10.0
        while not {hb_id, st_id} <= self.seen:          # re-sent: a reconnected publisher is a slow joiner again
            if time.monotonic() > deadline:
                raise ProbeTimeoutError(f"probe {self.n} not delivered through the hub")
            self.pub.send_multipart([TOPIC_HB.encode(), HB.encode(), hb])
            self.pub.send_multipart([TOPIC_ST.encode(), STATUS.encode(), status])
            self._drain_spy(0.05)
        bad, self.nonfinite = self.nonfinite, []
        assert not bad, f"a finite=True subscriber got non-finite values: {bad[:3]}"

    def _drain_spy(self, wait_s: float) -> None:
        end = time.monotonic() + wait_s
        while time.monotonic() < end:
            if self.spy.poll(5):
                while True:
                    try:
                        self.spy.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break

    def alive(self) -> bool:
        return self.hub._thread.is_alive() and self.bus._thread.is_alive()

    def rejected(self) -> int:
        return self.bus.dropped

    def addresses(self) -> list[str]:
        return [self.cfg.hub_pub, self.cfg.hub_sub]


def _pubsub_seeds() -> list[Seed]:
    hb = codec.new(HB, header=codec.header(), vehicle_id="v0", seq=7, state=1, round=2)
    return [Seed([TOPIC_HB.encode(), HB.encode(), codec.encode(hb)], 1, 2, HB),
            Seed([TOPIC_ST.encode(), STATUS.encode(), codec.encode(_status("v0"))], 1, 2, STATUS)]


def _topic_prefix(rng: random.Random) -> list[bytes]:
    return [rng.choice([TOPIC_HB, TOPIC_ST]).encode() + rng.choice([b"", b"", b"", b"x", b"/sub", b"\0"])]


def test_fuzz_hub_and_subscriber():
    harness = HubHarness()
    rng = random.Random(1)
    mut = Mutator(rng, _pubsub_seeds(), max_frame_bytes=MAX_FRAME, codec_limit=CODEC_LIMIT, prefix=_topic_prefix)
    with Campaign("bus hub (XSUB/XPUB) + ZmqBus subscriber", harness, seed=1) as c:
        c.feed("random", mut.random_frames, scaled(300))
        c.feed("mutation", mut.mutate, scaled(900))
        topic_frames = st.tuples(st.sampled_from([TOPIC_HB, TOPIC_ST]).map(str.encode), frames_strategy(4)).map(
            lambda t: [t[0], *t[1]])
        c.feed_hypothesis("hypothesis", st.lists(topic_frames, min_size=1, max_size=8), scaled(25))
        harness.mode = "xsub"           # the other side: what subscribers send the hub
        upstream = st.one_of(frames_strategy(4), st.binary(max_size=64).map(lambda b: [b"\x01" + b]),
                             st.binary(max_size=64).map(lambda b: [b"\x00" + b]))
        c.feed_hypothesis("xpub_side", st.lists(upstream, min_size=1, max_size=10), scaled(20))
        harness.mode = "pub"
        c.raw_tcp(scaled(10))
    c.assert_clean(min_rejected=50)


# -- a request/reply service -------------------------------------------------------------------------------------
SERVICES = {"fuzz/status": (STATUS, ACK), "fuzz/layers": (LAYER_REQ, CHUNK), "fuzz/weights": (CHUNK, ACK)}
STATE = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(3, dtype=torch.float16)}


class ServiceHarness(Harness):
    """A ZmqBus serving three services on one ROUTER: VehicleStatus -> Ack (checks finiteness), LayerRequest ->
    WeightChunk (chunked safetensors) and WeightChunk -> Ack (assembles and validates an upload)."""

    def __init__(self) -> None:
        self.ctx = zmq.Context.instance()
        self.nonfinite: list[str] = []
        self.contract: list[str] = []
        self.payload = wts.to_bytes(STATE)

    def start(self) -> None:
        self.address = f"tcp://127.0.0.1:{free_port_base(2)}"
        cfg = BusConfig(services=dict.fromkeys(SERVICES, self.address), max_message_bytes=MAX_FRAME)
        self.bus = ZmqBus("fuzz-server", cfg, context=self.ctx)
        self.assemblers: dict[str, wts.ChunkAssembler] = {}
        self.bus.serve("fuzz/status", STATUS, ACK, self._on_status)
        self.bus.serve("fuzz/layers", LAYER_REQ, CHUNK, self._on_layers)
        self.bus.serve("fuzz/weights", CHUNK, ACK, self._on_weights)
        self.dealer = RawDealer(self.ctx, self.address)

    def _on_status(self, msg):
        bad = codec._first_nonfinite(msg)
        if bad:
            self.nonfinite.append(bad)
        return codec.new(ACK, ok=True, message=msg.vehicle_id)

    def _on_layers(self, req):
        chunks = wts.chunk_messages(self.payload, sender="fuzz-server", update_id=req.transfer_id, chunk_bytes=64)
        return chunks[req.chunk_index]

    def _on_weights(self, chunk):
        try:
            asm = self.assemblers.setdefault(chunk.update_id, wts.ChunkAssembler(max_bytes=1 << 20))
            if not asm.add(chunk):
                return codec.new(ACK, ok=True, message="stored")
            del self.assemblers[chunk.update_id]
            state = wts.from_bytes(asm.payload(), what="upload")
        except wts.WeightsError:
            raise
        except Exception as exc:      # weights promises WeightsError for any bad payload: anything else is a bug
            self.contract.append(f"{type(exc).__name__}: {exc}")
            raise
        return codec.new(ACK, ok=True, message=",".join(sorted(state)))

    def stop(self) -> None:
        self.dealer.close()
        self.bus.close()

    def send(self, frames: list[bytes]) -> bool:
        return self.dealer.send(frames)

    def probe(self) -> None:
        vid = f"probe-{uuid.uuid4().hex[:8]}"
        assert self.dealer.request("fuzz/status", _status(vid), ACK).message == vid
        asm = wts.ChunkAssembler()
        index = 0
        while True:
            req = codec.new(LAYER_REQ, requester="probe", transfer_id=vid, layers=["w"], chunk_index=index)
            if asm.add(self.dealer.request("fuzz/layers", req, CHUNK)):
                break
            index += 1
        got = wts.from_bytes(asm.payload(), expect=STATE)
        assert all(torch.equal(got[k], STATE[k]) for k in STATE)
        for chunk in wts.chunk_messages(self.payload, sender="probe", update_id=vid, chunk_bytes=100):
            ack = self.dealer.request("fuzz/weights", chunk, ACK)
        assert ack.ok and ack.message == "b,w", ack
        bad, self.nonfinite = self.nonfinite, []
        assert not bad, f"a handler got non-finite values: {bad[:3]}"
        contract, self.contract = self.contract, []
        assert not contract, f"weights raised something else than WeightsError: {contract[:3]}"

    def alive(self) -> bool:
        return self.bus._thread.is_alive()

    def rejected(self) -> int:
        return self.bus.dropped

    def addresses(self) -> list[str]:
        return [self.address]

    def extra(self) -> dict:
        return self.dealer.summary()


def _request(service: str, msg) -> Seed:
    typename = SERVICES[service][0]
    return Seed([b"", b"17", service.encode(), typename.encode(), codec.encode(msg, typename)], 3, 4, typename)


def _service_seeds() -> list[Seed]:
    payload = wts.to_bytes(STATE)
    chunks = wts.chunk_messages(payload, sender="v0", update_id="u1", chunk_bytes=200)
    one = wts.chunk_messages(payload, sender="v0", update_id="u2")
    return [_request("fuzz/status", _status("v0")),
            _request("fuzz/layers", codec.new(LAYER_REQ, requester="v0", transfer_id="t", layers=["w", "b"])),
            *[_request("fuzz/weights", c) for c in chunks[:2]], _request("fuzz/weights", one[0])]


def test_fuzz_request_reply_service():
    harness = ServiceHarness()
    rng = random.Random(2)
    mut = Mutator(rng, _service_seeds(), max_frame_bytes=MAX_FRAME, codec_limit=CODEC_LIMIT)
    right_type = st.sampled_from(sorted(SERVICES)).flatmap(
        lambda s: message(SERVICES[s][0], max_len=8).map(
            lambda m, s=s: [b"", b"h", s.encode(), SERVICES[s][0].encode(), codec.encode(m, SERVICES[s][0])]))
    with Campaign("ZmqBus.serve (ROUTER request/reply)", harness, seed=2) as c:
        c.feed("random", mut.random_frames, scaled(300))
        c.feed("mutation", mut.mutate, scaled(1200))
        c.feed("weights_payload", WeightsFuzzer(rng, "fuzz/weights", harness.payload, ["w", "b", "", "x" * 300, "a.b"],
                                                sender="v0"), scaled(300))
        c.feed_hypothesis("hypothesis_frames", st.lists(frames_strategy(7), min_size=1, max_size=8), scaled(20))
        c.feed_hypothesis("hypothesis_messages", st.lists(right_type, min_size=1, max_size=4), scaled(40))
        c.raw_tcp(scaled(10))
    c.assert_clean(min_rejected=100)


# -- regression tests: what the fuzzing found in the decoders -----------------------------------------------------
def _frame(entries: list[Entry], bufs: list[bytes], flags: int = tensorframe.FLAG_CHECKSUM) -> list[bytes]:
    return [build_header(entries, flags=flags), *bufs]


@pytest.mark.parametrize("shape", [(65536,) * 4, (2**32 - 1,) * 3, (0x10000, 0x10000, 0x10000, 0x10000, 2)])
def test_overflowing_shape_is_a_frame_error(shape):
    """The product of the dimensions wrapped in int64 (to 0 or a small count), so a tiny buffer passed the size
    check and torch raised RuntimeError from unpack: a stage inbox only catches FrameError."""
    import numpy as np

    wrapped = int(np.prod(np.array(shape, dtype=np.int64), dtype=np.int64)) * 4 & (2**64 - 1)
    buf = b"\0" * wrapped if wrapped < 4096 else b""
    with pytest.raises(tensorframe.FrameError, match=r"does not match shape|exceeds"):
        tensorframe.unpack(_frame([Entry(b"x", 0, shape, wrapped, tensorframe.checksum_of(memoryview(buf)))], [buf]))


@pytest.mark.parametrize("tensors", [
    # a declared shape too large for zlib's max_length (OverflowError)
    {"a\x1fzlib\x1ffloat32\x1f4294967296x4294967296x4294967296": torch.zeros(10, dtype=torch.uint8)},
    {"a\x1fzlib\x1fuint8\x1f99999999999999999999": torch.zeros(10, dtype=torch.uint8)},
    # a scalar int8 tensor with a 3-element scale (RuntimeError from reshape)
    {"a\x1fint8\x1ff32": torch.zeros((), dtype=torch.int8), "a\x1fscale": torch.ones(3)},
    # int8 values times a huge scale overflow to inf
    {"b\x1fint8\x1ff32": torch.full((2,), 127, dtype=torch.int8), "b\x1fscale": torch.full((2,), 3e38)},
], ids=["zlib-shape-overflow", "zlib-shape-huge", "int8-scalar-scale-mismatch", "int8-overflow-to-inf"])
def test_hostile_codec_tensors_are_codec_errors(tensors):
    with pytest.raises(tensorcodec.CodecError):
        tensorcodec.decode(tensors)


def test_packed_float_label_that_inflates_to_nan_is_rejected():
    """Packed (exact) float tensors travel as DEFLATE bytes, which the frame's finiteness check cannot see."""
    import zlib

    raw = torch.tensor([1.0, float("nan")] * 40).numpy().tobytes()
    packed = torch.frombuffer(bytearray(zlib.compress(raw, 1)), dtype=torch.uint8)
    with pytest.raises(tensorcodec.CodecError, match="NaN or inf"):
        tensorcodec.decode({"y\x1fzlib\x1ffloat32\x1f80": packed})


def test_bf16_to_f16_overflow_is_rejected():
    big = torch.full((4,), 1e30, dtype=torch.bfloat16)          # finite in bf16, inf once cast to the f16 tag
    with pytest.raises(tensorcodec.CodecError, match="NaN or inf"):
        tensorcodec.decode({"z\x1fbf16\x1ff16": big})


def _safetensors(dtype: str, nbytes: int, fill: bytes) -> bytes:
    import json

    header = json.dumps({"t": {"dtype": dtype, "shape": [4], "data_offsets": [0, nbytes]}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + fill * nbytes


@pytest.mark.parametrize(("dtype", "nbytes", "fill"), [
    ("F4", 2, b"\x01"), ("F6_E2M3", 3, b"\x01"), ("F8_E8M0", 4, b"\x01"),   # no torch dtype: KeyError in safetensors
    ("F8_E4M3", 4, b"\xff"),                                                 # torch has no isfinite for float8
    ("C64", 32, b"\xff"),                                                    # complex NaN passed the float-only check
])
def test_weights_from_bytes_raises_only_weights_errors(dtype, nbytes, fill):
    with pytest.raises(wts.WeightsError):
        wts.from_bytes(_safetensors(dtype, nbytes, fill))


def test_bus_survives_a_decoder_that_raises_anything(monkeypatch):
    """A receive-path bug (any exception from decoding or dispatch) is counted as a rejection; the receive
    thread keeps serving instead of dying with it."""
    address = f"tcp://127.0.0.1:{free_port_base(2)}"
    bus = ZmqBus("s", BusConfig(services={"echo": address}), context=zmq.Context.instance())
    bus.serve("echo", HB, ACK, lambda m: codec.new(ACK, ok=True, message=m.vehicle_id))
    dealer = RawDealer(zmq.Context.instance(), address)
    try:
        real = codec.decode

        def flaky(data, typename, **kw):
            if bytes(data[-4:]) == b"boom":
                raise RuntimeError("decoder bug")
            return real(data, typename, **kw)

        monkeypatch.setattr(codec, "decode", flaky)
        body = codec.encode(codec.new(HB, vehicle_id="x" * 4)) + b"boom"
        dealer.send([b"", b"1", b"echo", HB.encode(), body])
        dealer.send([b"", b"2", b"nope", HB.encode(), body])                    # unknown service: counted too
        assert dealer.request("echo", codec.new(HB, vehicle_id="alive"), ACK).message == "alive"
        assert bus._thread.is_alive() and bus.dropped == 2
        assert dealer.replies[b"err"] == 2                                      # both still answered
    finally:
        dealer.close()
        bus.close()


def test_unknown_service_and_wrong_type_are_counted():
    address = f"tcp://127.0.0.1:{free_port_base(2)}"
    bus = ZmqBus("s", BusConfig(services={"echo": address}), context=zmq.Context.instance())
    bus.serve("echo", HB, ACK, lambda m: codec.new(ACK, ok=True, message="ok"))
    dealer = RawDealer(zmq.Context.instance(), address)
    try:
        body = codec.encode(codec.new(HB))
        dealer.send([b"", b"1", b"other", HB.encode(), body])
        dealer.send([b"", b"2", b"echo", STATUS.encode(), body])
        assert dealer.request("echo", codec.new(HB), ACK).ok
        assert bus.dropped == 2
    finally:
        dealer.close()
        bus.close()


def test_header_builder_matches_pack():
    """The fuzz header builder writes exactly what tensorframe.pack writes (so its mutations are meaningful)."""
    frames = tensorframe.pack({"x": torch.ones(2, 3)}, step=5, micro_batch=2, stage=1)
    entries = [Entry(b"x", 0, (2, 3), 24, tensorframe.checksum_of(frames[1]))]
    assert build_header(entries, step=5, micro_batch=2, stage=1) == bytes(frames[0])
    assert struct.unpack_from("<4s", frames[0])[0] == tensorframe.MAGIC
