"""Fuzzing a vehicle's network entry points over real loopback sockets (see test/fuzz_harness.py).

* its FHDP control services (`FhdpVehicle`: vehicle/assign, vehicle/start, vehicle/layers, vehicle/abort on
  one ROUTER), the real object in-process, its work loop not started (the handlers only enqueue);
* its stage inbox (`Inbox`, PULL of tensor frames, decoded with tensorcodec), fed random frames, mutated
  valid frames (header fields, overflowing shapes, corrupted buffers with fixed-up checksums, NaN/inf) and
  hypothesis-built frames whose tensor names use the codec's syntax (packed, int8, fp16 parts).
After every batch each must still answer a valid request / deliver a valid frame correctly.
"""

from __future__ import annotations

import random
import uuid
import zlib

import pytest
import torch
import zmq
from fuzz_harness import (
    Campaign,
    FrameMutator,
    Harness,
    Mutator,
    ProbeTimeoutError,
    RawDealer,
    Seed,
    frames_strategy,
    scaled,
)
from hypothesis import strategies as st

from flad_core import codec, tensorcodec, tensorframe
from flad_core import weights as wts
from flad_core.bus import BusConfig
from flad_core.fleet import FleetConfig, VehicleSpec
from flad_core.procs import free_port_base
from flad_core.protocol import SERVICE_ABORT, SERVICE_ASSIGN, SERVICE_LAYERS, SERVICE_START
from flad_vehicle.fhdp.links import Inbox, LinkTimeoutError
from flad_vehicle.fhdp.pipeline import Assignment, Pipeline, Stage
from flad_vehicle.fhdp.worker import FhdpVehicle

MAX_FRAME = 1024 * 1024
CODEC_LIMIT = 256 * 1024
ACK, LAYER_REQ, CHUNK = "flad_msgs/msg/Ack", "flad_msgs/msg/LayerRequest", "flad_msgs/msg/WeightChunk"
ASSIGN, ABORT = "flad_msgs/msg/PipelineAssignment", "flad_msgs/msg/PipelineAbort"

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def small_codec_limit(monkeypatch):
    monkeypatch.setattr(codec, "MAX_MESSAGE_BYTES", CODEC_LIMIT)


def _assignment(pid: str, n_layers: int, control: str) -> Assignment:
    return Assignment(pipeline_id=pid, round=1, cluster_id="c0", method="swift",
                      pipeline=Pipeline((Stage("v0", 0, n_layers // 2), Stage("v1", n_layers // 2, n_layers))),
                      members={"v0": control, "v1": "tcp://127.0.0.1:9"}, inboxes=["tcp://127.0.0.1:10"] * 2,
                      layer_owner=["edge"] * n_layers, codec="int8", n_micro=2, batch_size=4, steps=3,
                      time_scale=1.5, link_timeout_s=30.0, backup_every=2)


# -- the vehicle's control services ----------------------------------------------------------------------------------
class VehicleHarness(Harness):
    """A real FhdpVehicle (tiny encoder) serving its control services; it owns every layer, so vehicle/layers
    can answer the probe. Queued jobs are checked and cleared by the probe (no work loop runs)."""

    def __init__(self) -> None:
        self.ctx = zmq.Context.instance()
        self.fuzz_jobs = 0

    def start(self) -> None:
        base = free_port_base(6)
        self.control = f"tcp://127.0.0.1:{base + 2}"
        bus = BusConfig(hub_pub=f"tcp://127.0.0.1:{base}", hub_sub=f"tcp://127.0.0.1:{base + 1}",
                        max_message_bytes=MAX_FRAME)
        fleet = FleetConfig(bus=bus, vehicles=[VehicleSpec("v0", control=self.control,
                                                           data=f"tcp://127.0.0.1:{base + 3}")])
        self.vehicle = FhdpVehicle(fleet, "v0", encoder="tiny")
        self.vehicle.store.owned = set(self.vehicle.store.layer_names)
        self.dealer = RawDealer(self.ctx, self.control)

    def stop(self) -> None:
        self.dealer.close()
        self.vehicle.agent.stop.set()
        self.vehicle.close()

    def send(self, frames: list[bytes]) -> bool:
        return self.dealer.send(frames)

    def probe(self) -> None:
        v = self.vehicle
        layer = v.store.layer_names[1]
        asm, index, transfer = wts.ChunkAssembler(), 0, uuid.uuid4().hex
        while True:
            req = codec.new(LAYER_REQ, requester="v1", transfer_id=transfer, layers=[layer], chunk_index=index)
            if asm.add(self.dealer.request(SERVICE_LAYERS, req, CHUNK)):
                break
            index += 1
        got, want = wts.from_bytes(asm.payload()), v.store.export([layer])
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        pid = f"probe-{transfer[:8]}"
        msg = _assignment(pid, len(v.store.layer_names), self.control).to_msg()
        for service, kind in ((SERVICE_ASSIGN, "assign"), (SERVICE_START, "start")):
            ack = self.dealer.request(service, msg, ACK)
            assert ack.ok and ack.message == f"{kind} queued", ack
        ack = self.dealer.request(SERVICE_ABORT, codec.new(ABORT, pipeline_id=pid, reason="probe"), ACK)
        assert ack.ok and ack.message == "not running", ack
        with v._jobs_ready:
            assert all(m.pipeline_id != pid for _, m in v._jobs), "abort left the probe's jobs queued"
            self.fuzz_jobs += len(v._jobs)
            v._jobs.clear()
            v._aborted.clear()

    def alive(self) -> bool:
        return self.vehicle.bus._thread.is_alive()

    def rejected(self) -> int:
        return self.vehicle.bus.dropped

    def addresses(self) -> list[str]:
        return [self.control]

    def extra(self) -> dict:
        return {**self.dealer.summary(),
                "fuzz_jobs_queued": self.fuzz_jobs}


def _request(service: str, typename: str, msg) -> Seed:
    return Seed([b"", b"9", service.encode(), typename.encode(), codec.encode(msg, typename)], 3, 4, typename)


def _load_message_strategy(typename: str):
    from importlib import util
    from pathlib import Path

    spec = util.spec_from_file_location("msg_strategies", Path(__file__).parents[1] / "core" / "msg_strategies.py")
    module = util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.message(typename, max_len=6)


def test_fuzz_vehicle_control_services():
    harness = VehicleHarness()
    rng = random.Random(21)
    with Campaign("vehicle FHDP control (FhdpVehicle: assign/start/layers/abort)", harness, seed=21) as c:
        n_layers = len(harness.vehicle.store.layer_names)
        msg = _assignment("p1", n_layers, harness.control).to_msg()
        seeds = [_request(SERVICE_ASSIGN, ASSIGN, msg), _request(SERVICE_START, ASSIGN, msg),
                 _request(SERVICE_LAYERS, LAYER_REQ, codec.new(LAYER_REQ, requester="v1", transfer_id="t",
                                                               layers=harness.vehicle.store.layer_names[:2])),
                 _request(SERVICE_ABORT, ABORT, codec.new(ABORT, pipeline_id="p1", reason="member left"))]
        mut = Mutator(rng, seeds, max_frame_bytes=MAX_FRAME, codec_limit=CODEC_LIMIT)
        c.feed("random", mut.random_frames, scaled(200))
        c.feed("mutation", mut.mutate, scaled(700))
        c.feed_hypothesis("hypothesis_frames", st.lists(frames_strategy(7), min_size=1, max_size=8), scaled(10))
        for service, typename in ((SERVICE_ASSIGN, ASSIGN), (SERVICE_LAYERS, LAYER_REQ), (SERVICE_ABORT, ABORT)):
            one = _load_message_strategy(typename).map(
                lambda m, s=service, t=typename: [b"", b"h", s.encode(), t.encode(), codec.encode(m, t)])
            c.feed_hypothesis(f"hypothesis_{service.split('/')[1]}", st.lists(one, min_size=1, max_size=3), scaled(8))
        c.raw_tcp(scaled(5))
    c.assert_clean(min_rejected=50)


# -- the stage inbox ---------------------------------------------------------------------------------------------------
INBOX_MAX = 256 * 1024
PROBE_STEP = 2**40


class InboxHarness(Harness):
    """An Inbox (PULL) and a raw PUSH; the probe sends an int8-coded activation with a packed exact label and
    reads it back. Anything but a counted rejection escaping the inbox is a crash (a stage only catches
    FrameError and tensorcodec.CodecError around a receive)."""

    socket_type = b"PUSH"

    def __init__(self) -> None:
        self.ctx = zmq.Context.instance()
        self.n = 0
        self.max_pending = 0
        self.delivered_nonfinite: list[str] = []

    def start(self) -> None:
        self.address = f"tcp://127.0.0.1:{free_port_base(2)}"
        self.inbox = Inbox(self.ctx, self.address, max_frame_bytes=INBOX_MAX)
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.setsockopt(zmq.SNDHWM, 100000)
        self.push.connect(self.address)

    def stop(self) -> None:
        self.push.close(0)
        self.inbox.close()

    def send(self, frames: list[bytes]) -> bool:
        try:
            self.push.send_multipart(frames, flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def probe(self) -> None:
        self.n += 1
        step = PROBE_STEP + self.n
        x = torch.randn(3, 8)
        bev = torch.zeros(2, 64, dtype=torch.uint8)
        bev[0, self.n % 64] = 1
        payload = tensorcodec.encode({"x": x, "bev": bev}, "int8", exact={"bev"})
        got = None
        for _ in range(2):       # sent again once: a frame right behind an oversize one is lost with its connection
            self.push.send_multipart(tensorframe.pack(payload, step=step, micro_batch=1), copy=True)
            try:
                _, got = self.inbox.get(tensorframe.KIND_ACTIVATION, step, 1, timeout_s=5.0)
                break
            except LinkTimeoutError:
                continue
        if got is None:
            raise ProbeTimeoutError(f"probe frame for step {step} not delivered")
        assert torch.equal(got["bev"], bev) and torch.allclose(got["x"], x, atol=0.05, rtol=0.05)
        pending = self.inbox._pending
        self.max_pending = max(self.max_pending, sum(len(v) for v in pending.values()))
        for frames in pending.values():           # whatever the fuzz got delivered must be finite
            for _, tensors in frames:
                self.delivered_nonfinite += [k for k, t in tensors.items()
                                             if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        pending.clear()
        bad, self.delivered_nonfinite = self.delivered_nonfinite, []
        assert not bad, f"non-finite tensors delivered: {bad[:5]}"

    def rejected(self) -> int:
        return self.inbox.rejected

    def addresses(self) -> list[str]:
        return [self.address]

    def extra(self) -> dict:
        return {"max_pending_frames": self.max_pending}


def _frame_seeds() -> list[Seed]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, generator=g)
    lbl = torch.zeros(80, dtype=torch.uint8)
    lbl[::7] = 1
    wp = torch.randn(5, 2, generator=g)
    out = []
    for codec_name, kind in (("fp32", 0), ("fp16", 1), ("bf16", 0), ("int8", 0), ("int8", 2)):
        payload = tensorcodec.encode({"x": x, "bev": lbl, "wp": wp, "i": torch.arange(6)}, codec_name,
                                     exact={"bev", "wp"})
        out.append(Seed(tensorframe.pack(payload, kind=kind, step=3, micro_batch=1), body_idx=0))
    out.append(Seed(tensorframe.pack({"x": x, "s": torch.tensor(2.0)}, checksum=False), body_idx=0))
    return out


_SEP = "\x1f"
_PIECES = ["zlib", "int8", "fp16", "bf16", "scale", "f32", "f16", "bf16", "f64", "float32", "uint8", "bool", "scalar",
           "3", "2x3", "", "x", "99999999999x99999999999"]
_SHAPES = ["scalar", "3", "2x3", "6", "24", "6x4", "12x2", "96", "0", "-1", "", "x", "3x-1", "1x1x1x1x1x1x1x1",
           "99999999999x99999999999", "4294967296x4294967296x4294967296"]
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int64,
           torch.bool]


@st.composite
def _codec_tensor(draw) -> torch.Tensor:
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    if draw(st.integers(0, 3)) == 0:      # a DEFLATE payload of some size: inflates, maybe to the declared size
        n = draw(st.sampled_from([0, 3, 6, 24, 48, 64, 96, 192]))
        raw = draw(st.sampled_from([b"\xff" * n, b"\x7f" * n, torch.randint(0, 3, (n,), generator=gen,
                                                                           dtype=torch.uint8).numpy().tobytes()]))
        return torch.frombuffer(bytearray(zlib.compress(raw, 1)), dtype=torch.uint8)
    dtype = draw(st.sampled_from(_DTYPES))
    scale = draw(st.sampled_from([1.0, 100.0, 1e30, 3e38]))
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen) * scale).clamp(-3e38, 3e38).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=gen, dtype=dtype)


_names = st.sampled_from(["a", "b", "bev"])
# packed (exact) tensors: name|zlib|dtype|shape
_packed = st.tuples(_names, st.sampled_from([*tensorcodec._PACKABLE, "x", "complex64"]), st.sampled_from(_SHAPES),
                    _codec_tensor()).map(lambda t: {_SEP.join([t[0], "zlib", t[1], t[2]]): t[3]})
# lossy codec parts: name|codec|tag, maybe with an int8 scale
_coded = st.tuples(_names, st.sampled_from(["fp16", "bf16", "int8", "int8", "zz"]),
                   st.sampled_from(["f32", "f16", "bf16", "f64", "x"]), _codec_tensor(),
                   st.none() | _codec_tensor()).map(
    lambda t: {_SEP.join([t[0], t[1], t[2]]): t[3], **({f"{t[0]}{_SEP}scale": t[4]} if t[4] is not None else {})})
_free = st.dictionaries(st.tuples(_names, st.lists(st.sampled_from(_PIECES), max_size=4)).map(
    lambda t: _SEP.join([t[0], *t[1]])), _codec_tensor(), min_size=1, max_size=2)


def _pack_dicts(dicts: list[dict]) -> list[bytes]:
    merged: dict = {}
    for d in dicts:
        merged.update(d)
    return [bytes(f) for f in tensorframe.pack(merged, step=5)]


_codec_frame = st.lists(st.one_of(_packed, _coded, _free), min_size=1, max_size=3).map(_pack_dicts)


def test_fuzz_stage_inbox():
    rng = random.Random(22)
    mut = FrameMutator(rng, _frame_seeds(), max_frame_bytes=INBOX_MAX + 1024 * 1024, max_tensor_bytes=INBOX_MAX)
    with Campaign("stage inbox (Inbox, PULL tensor frames + tensorcodec)", InboxHarness(), seed=22) as c:
        c.feed("random", mut.random_frames, scaled(300))
        c.feed("mutation", mut.mutate, scaled(1200))
        c.feed_hypothesis("hypothesis_frames", st.lists(frames_strategy(5), min_size=1, max_size=8), scaled(10))
        c.feed_hypothesis("hypothesis_codec_names", st.lists(_codec_frame, min_size=1, max_size=4), scaled(150))
        c.raw_tcp(scaled(5))
    c.assert_clean(min_rejected=100)
