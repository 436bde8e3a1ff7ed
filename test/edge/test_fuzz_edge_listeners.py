"""Fuzzing the edge's and the cloud's network entry points over real loopback sockets (see test/fuzz_harness.py).

Each listener runs as in production -- the edge's registration service and its hub + heartbeat/status
subscriptions (`EdgeServer`), the cloud's upload and global-model services (`CloudServer`), the edge's
backup services (`EdgeBackups` handlers served on a ZmqBus, as `RecoveringFhdpEdge` does) and the waypoint
service (`WaypointService`) -- and gets random frames, mutations of valid frames, hypothesis-generated
messages of the right type and raw TCP garbage. After every batch it must answer a valid request correctly,
its threads must be alive and the rejections counted.
"""

from __future__ import annotations

import math
import random
import time
import uuid

import numpy as np
import pytest
import torch
import zmq
from fuzz_harness import (
    Campaign,
    Harness,
    Mutator,
    ProbeTimeoutError,
    RawDealer,
    Seed,
    WeightsFuzzer,
    frames_strategy,
    scaled,
)
from hypothesis import strategies as st

from flad_core import codec
from flad_core import weights as wts
from flad_core.bus import BusConfig, ZmqBus
from flad_core.fleet import FleetConfig, VehicleSpec
from flad_core.procs import free_port_base
from flad_core.protocol import (
    SERVICE_EDGE_BACKUP,
    SERVICE_EDGE_BACKUP_LAYERS,
    SERVICE_GLOBAL,
    SERVICE_REGISTER,
    SERVICE_UPLOAD,
    TOPIC_HEARTBEAT,
    TOPIC_STATUS,
)
from flad_edge.celladapt.service import (
    REQUEST_TYPE,
    RESPONSE_TYPE,
    SERVICE,
    ServiceConfig,
    WaypointService,
    make_request,
    path_to_waypoints,
)
from flad_edge.fhdp.recovery.backups import EdgeBackups
from flad_edge.fl.cloud import CloudServer
from flad_edge.fl.edge_server import EdgeServer

MAX_FRAME = 1024 * 1024
CODEC_LIMIT = 256 * 1024
HB, STATUS, ACK = "flad_msgs/msg/Heartbeat", "flad_msgs/msg/VehicleStatus", "flad_msgs/msg/Ack"
LAYER_REQ, CHUNK = "flad_msgs/msg/LayerRequest", "flad_msgs/msg/WeightChunk"

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def small_codec_limit(monkeypatch):
    monkeypatch.setattr(codec, "MAX_MESSAGE_BYTES", CODEC_LIMIT)


def _message_strategy(typename: str):
    from importlib import util
    from pathlib import Path

    spec = util.spec_from_file_location("msg_strategies", Path(__file__).parents[1] / "core" / "msg_strategies.py")
    module = util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.message(typename, max_len=8)


def _request(service: str, typename: str, msg) -> Seed:
    return Seed([b"", b"42", service.encode(), typename.encode(), codec.encode(msg, typename)], 3, 4, typename)


def _valid_requests(service: str, typename: str, n: int):
    """Hypothesis: batches of valid `typename` messages (random contents) sent to `service`."""
    one = _message_strategy(typename).map(
        lambda m: [b"", b"h", service.encode(), typename.encode(), codec.encode(m, typename)])
    return st.lists(one, min_size=1, max_size=n)


def _run(entry: str, harness: Harness, seeds: list[Seed], seed: int, *, random_n: int, mutation_n: int,
         hypothesis: list[tuple[str, st.SearchStrategy, int]], min_rejected: int,
         weights: tuple[str, bytes, list[str], dict] | None = None) -> None:
    rng = random.Random(seed)
    mut = Mutator(rng, seeds, max_frame_bytes=MAX_FRAME, codec_limit=CODEC_LIMIT,
                  prefix=getattr(harness, "prefix", None))
    with Campaign(entry, harness, seed=seed) as c:
        c.feed("random", mut.random_frames, scaled(random_n))
        c.feed("mutation", mut.mutate, scaled(mutation_n))
        if weights is not None:
            service, payload, names, fields = weights
            c.feed("weights_payload", WeightsFuzzer(rng, service, payload, names, **fields), scaled(200))
        c.feed_hypothesis("hypothesis_frames", st.lists(frames_strategy(7), min_size=1, max_size=8), scaled(10))
        for phase, strategy, n in hypothesis:
            c.feed_hypothesis(phase, strategy, scaled(n))
        c.raw_tcp(scaled(5))
    c.assert_clean(min_rejected=min_rejected)


def _status(vehicle_id: str, dwell: float = 60.0):
    return codec.new(STATUS, header=codec.header(), vehicle_id=vehicle_id, predicted_dwell_s=dwell, state="idle",
                     profile=codec.new("flad_msgs/msg/DeviceProfile", name="jetson_nano", mem_bytes=8 << 30,
                                       tflops=0.472, link_mbps=50.0))


# -- the edge: registration (ROUTER) and heartbeat/status (its hub + subscriber) -------------------------------------
class EdgeHarness(Harness):
    """A real EdgeServer (hub included). mode "register": fuzz the registration ROUTER; mode "topics": fuzz
    heartbeat/status through its hub (raw PUB)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.ctx = zmq.Context.instance()
        self.socket_type = b"DEALER" if mode == "register" else b"PUB"
        self.n = 0

    def start(self) -> None:
        base = free_port_base(4)
        bus = BusConfig(hub_pub=f"tcp://127.0.0.1:{base}", hub_sub=f"tcp://127.0.0.1:{base + 1}",
                        services={SERVICE_REGISTER: f"tcp://127.0.0.1:{base + 2}"}, max_message_bytes=MAX_FRAME)
        self.fleet = FleetConfig(bus=bus, vehicles=[VehicleSpec("v0"), VehicleSpec("v1")])
        self.edge = EdgeServer(self.fleet)
        self.dealer = RawDealer(self.ctx, bus.services[SERVICE_REGISTER])
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, 100000)
        self.pub.connect(bus.hub_pub)
        assert self.dealer.request(SERVICE_REGISTER, _status("v0"), ACK).ok

    def stop(self) -> None:
        self.dealer.close()
        self.pub.close(0)
        self.edge.close()

    def send(self, frames: list[bytes]) -> bool:
        if self.mode == "register":
            return self.dealer.send(frames)
        try:
            self.pub.send_multipart(frames, flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def probe(self) -> None:
        if self.mode == "register":
            ack = self.dealer.request(SERVICE_REGISTER, _status("v1"), ACK)
            assert ack.ok and ack.message == "welcome to edge-0", ack
            ack = self.dealer.request(SERVICE_REGISTER, _status("intruder"), ACK)
            assert not ack.ok, ack
            return
        self.n += 1
        rec = self.edge.vehicles["v0"]
        beats, dwell = rec.heartbeats, 1000.0 + self.n
        deadline = time.monotonic() + 10.0
        while rec.heartbeats == beats or rec.dwell_s != dwell:       # re-sent: a reconnected PUB is a slow joiner
            if time.monotonic() > deadline:
                raise ProbeTimeoutError("heartbeat/status probe not delivered through the edge's hub")
            self.pub.send_multipart([TOPIC_HEARTBEAT.encode(), HB.encode(),
                                     codec.encode(codec.new(HB, vehicle_id="v0", seq=10**9 + self.n, state=1))])
            self.pub.send_multipart([TOPIC_STATUS.encode(), STATUS.encode(), codec.encode(_status("v0", dwell))])
            time.sleep(0.02)
        assert all(math.isfinite(r.dwell_s) for r in self.edge.snapshot()), "a non-finite dwell time got through"

    @staticmethod
    def prefix(rng: random.Random) -> list[bytes]:
        return [rng.choice([TOPIC_HEARTBEAT, TOPIC_STATUS]).encode() + rng.choice([b"", b"", b"x"])]

    def alive(self) -> bool:
        return self.edge.bus._thread.is_alive() and self.edge.hub._thread.is_alive()

    def rejected(self) -> int:
        return self.edge.bus.dropped

    def addresses(self) -> list[str]:
        bus = self.fleet.bus
        return [bus.services[SERVICE_REGISTER]] if self.mode == "register" else [bus.hub_pub, bus.hub_sub]

    def extra(self) -> dict:
        return self.dealer.summary()


def test_fuzz_edge_registration():
    seeds = [_request(SERVICE_REGISTER, STATUS, _status("v0")), _request(SERVICE_REGISTER, STATUS, _status("zz"))]
    _run("edge registration (EdgeServer, edge/register)", EdgeHarness("register"), seeds, 11, random_n=200,
         mutation_n=600, hypothesis=[("hypothesis_messages", _valid_requests(SERVICE_REGISTER, STATUS, 4), 20)],
         min_rejected=50)


def test_fuzz_edge_heartbeat_and_status_topics():
    hb = codec.new(HB, header=codec.header(), vehicle_id="v0", seq=3, state=2, round=1)
    seeds = [Seed([TOPIC_HEARTBEAT.encode(), HB.encode(), codec.encode(hb)], 1, 2, HB),
             Seed([TOPIC_STATUS.encode(), STATUS.encode(), codec.encode(_status("v0"))], 1, 2, STATUS)]
    topics = st.one_of(
        _message_strategy(HB).map(lambda m: [TOPIC_HEARTBEAT.encode(), HB.encode(), codec.encode(m, HB)]),
        _message_strategy(STATUS).map(lambda m: [TOPIC_STATUS.encode(), STATUS.encode(), codec.encode(m, STATUS)]))
    _run("edge heartbeat/status topics (EdgeServer hub + subscriber)", EdgeHarness("topics"), seeds, 12,
         random_n=200, mutation_n=600, hypothesis=[("hypothesis_messages", st.lists(topics, min_size=1, max_size=4),
                                                   15)], min_rejected=50)


# -- the cloud: upload and global model ----------------------------------------------------------------------------
class CloudHarness(Harness):
    def __init__(self) -> None:
        self.ctx = zmq.Context.instance()
        self.n = 0

    def start(self) -> None:
        self.address = f"tcp://127.0.0.1:{free_port_base(2)}"
        bus = BusConfig(services={SERVICE_UPLOAD: self.address, SERVICE_GLOBAL: self.address},
                        max_message_bytes=MAX_FRAME)
        self.cloud = CloudServer(FleetConfig(bus=bus), ["edge-0"])
        self.dealer = RawDealer(self.ctx, self.address)

    def stop(self) -> None:
        self.dealer.close()
        self.cloud.close()

    def send(self, frames: list[bytes]) -> bool:
        return self.dealer.send(frames)

    def probe(self) -> None:
        self.n += 1
        rnd, state = 10**6 + self.n, {"w": torch.full((3, 2), float(self.n))}
        for chunk in wts.chunk_messages(wts.to_bytes(state), sender="edge-0", update_id=f"probe-{rnd}", round=rnd,
                                        num_samples=5, chunk_bytes=64):
            ack = self.dealer.request(SERVICE_UPLOAD, chunk, ACK)
            assert ack.ok, ack
        asm, index = wts.ChunkAssembler(), 0
        while True:
            req = codec.new(LAYER_REQ, requester="edge-0", transfer_id=f"round:{rnd}", chunk_index=index)
            if asm.add(self.dealer.request(SERVICE_GLOBAL, req, CHUNK)):
                break
            index += 1
        got = wts.from_bytes(asm.payload(), expect=state)
        assert torch.equal(got["w"], state["w"])

    def alive(self) -> bool:
        return self.cloud.bus._thread.is_alive()

    def rejected(self) -> int:
        return self.cloud.bus.dropped

    def addresses(self) -> list[str]:
        return [self.address]

    def extra(self) -> dict:
        return {**self.dealer.summary(),
                "rounds_created": len(self.cloud.rounds), "assemblers_left": len(self.cloud.assemblers)}


def test_fuzz_cloud_upload_and_global():
    payload = wts.to_bytes({"w": torch.ones(3, 2), "v": torch.zeros(2, dtype=torch.float16)})
    seeds = [_request(SERVICE_UPLOAD, CHUNK, c) for c in wts.chunk_messages(
        payload, sender="edge-0", update_id="u1", round=1, num_samples=4, chunk_bytes=80)[:2]]
    seeds += [_request(SERVICE_UPLOAD, CHUNK, wts.chunk_messages(payload, sender="edge-0", update_id="u2", round=2,
                                                                 num_samples=4)[0]),
              _request(SERVICE_GLOBAL, LAYER_REQ, codec.new(LAYER_REQ, requester="edge-0", transfer_id="round:1")),
              _request(SERVICE_GLOBAL, LAYER_REQ, codec.new(LAYER_REQ, requester="e", transfer_id="round:2",
                                                            chunk_index=1))]
    _run("cloud upload/global (CloudServer, cloud/upload + cloud/global)", CloudHarness(), seeds, 13, random_n=200,
         mutation_n=700, hypothesis=[("hypothesis_upload", _valid_requests(SERVICE_UPLOAD, CHUNK, 3), 15),
                                     ("hypothesis_global", _valid_requests(SERVICE_GLOBAL, LAYER_REQ, 3), 15)],
         min_rejected=50, weights=(SERVICE_UPLOAD, payload, ["w", "v", ""], {"sender": "edge-0", "round": 3,
                                                                              "num_samples": 4}))


# -- the edge's backup services -------------------------------------------------------------------------------------
class BackupHarness(Harness):
    """`EdgeBackups.on_backup` / `on_backup_layers` served on a ZmqBus (what `RecoveringFhdpEdge` serves), with
    backups written to disk."""

    def __init__(self, root) -> None:
        self.ctx = zmq.Context.instance()
        self.root = root
        self.n = 0

    def start(self) -> None:
        self.address = f"tcp://127.0.0.1:{free_port_base(2)}"
        bus = BusConfig(services={SERVICE_EDGE_BACKUP: self.address, SERVICE_EDGE_BACKUP_LAYERS: self.address},
                        max_message_bytes=MAX_FRAME)
        self.bus = ZmqBus("edge-0", bus, context=self.ctx)
        self.backups = EdgeBackups("edge-0", str(self.root / uuid.uuid4().hex[:8]), self._global)
        self.backups.start_round("c0", ["v0", "v1"], first_step=0)
        self.bus.serve(SERVICE_EDGE_BACKUP, CHUNK, ACK, self.backups.on_backup)
        self.bus.serve(SERVICE_EDGE_BACKUP_LAYERS, LAYER_REQ, CHUNK, self.backups.on_backup_layers)
        self.dealer = RawDealer(self.ctx, self.address)

    @staticmethod
    def _global(names: list[str]) -> dict[str, torch.Tensor]:
        unknown = [n for n in names if not n.startswith("enc_")]
        if unknown:
            raise KeyError(f"unknown layers {unknown[:3]}")
        return {f"p/layers.{n}.weight": torch.zeros(2) for n in names}

    def stop(self) -> None:
        self.dealer.close()
        self.bus.close()

    def send(self, frames: list[bytes]) -> bool:
        return self.dealer.send(frames)

    def probe(self) -> None:
        self.n += 1
        state = {"p/layers.enc_1.weight": torch.full((4,), float(self.n)), "m/layers.enc_1.weight": torch.ones(4)}
        for chunk in wts.chunk_messages(wts.to_bytes(state), sender="v0", model_version=str(10**6 + self.n),
                                        update_id=uuid.uuid4().hex, chunk_bytes=128):
            ack = self.dealer.request(SERVICE_EDGE_BACKUP, chunk, ACK)
        assert ack.ok and ack.message.startswith("stored"), ack
        asm, index, transfer = wts.ChunkAssembler(), 0, uuid.uuid4().hex
        while True:
            req = codec.new(LAYER_REQ, requester="v1", transfer_id=transfer, layers=["enc_1", "enc_2"],
                            chunk_index=index)
            if asm.add(self.dealer.request(SERVICE_EDGE_BACKUP_LAYERS, req, CHUNK)):
                break
            index += 1
        got = wts.from_bytes(asm.payload())
        assert torch.equal(got["p/layers.enc_1.weight"], state["p/layers.enc_1.weight"])
        assert torch.equal(got["p/layers.enc_2.weight"], torch.zeros(2))

    def alive(self) -> bool:
        return self.bus._thread.is_alive()

    def rejected(self) -> int:
        return self.bus.dropped

    def addresses(self) -> list[str]:
        return [self.address]

    def extra(self) -> dict:
        return {**self.dealer.summary(),
                "assemblers_left": len(self.backups._assemblers)}


def test_fuzz_edge_backup_services(tmp_path):
    state = {"p/layers.enc_0.weight": torch.ones(4), "v/layers.enc_0.weight": torch.ones(4)}
    payload = wts.to_bytes(state)
    seeds = [_request(SERVICE_EDGE_BACKUP, CHUNK, c) for c in wts.chunk_messages(
        payload, sender="v0", model_version="7", update_id="b1", chunk_bytes=150)[:2]]
    seeds += [_request(SERVICE_EDGE_BACKUP, CHUNK, wts.chunk_messages(payload, sender="v1", model_version="3",
                                                                      update_id="b2")[0]),
              _request(SERVICE_EDGE_BACKUP_LAYERS, LAYER_REQ,
                       codec.new(LAYER_REQ, requester="v0", transfer_id="t1", layers=["enc_0", "enc_3"]))]
    names = ["p/layers.enc_0.weight", "p/layers.enc_9.bias", "m/layers.enc_0.weight", "p/nolayer", "noslash", "",
             "p/layers.a/b.w"]
    _run("edge backups (EdgeBackups, edge/backup + edge/backup-layers)", BackupHarness(tmp_path), seeds, 14,
         random_n=200, mutation_n=700,
         hypothesis=[("hypothesis_backup", _valid_requests(SERVICE_EDGE_BACKUP, CHUNK, 3), 15),
                     ("hypothesis_layers", _valid_requests(SERVICE_EDGE_BACKUP_LAYERS, LAYER_REQ, 3), 15)],
         min_rejected=50, weights=(SERVICE_EDGE_BACKUP, payload, names, {"sender": "v0", "model_version": "9"}))


# -- the waypoint service ---------------------------------------------------------------------------------------------
FEATURES = (6, 4)


class WaypointHarness(Harness):
    """A WaypointService whose predictor returns the first 5x2 block of each request's features (so every answer
    can be checked); requests with a wrong shape, dtype, size or non-finite values must get error replies."""

    def __init__(self) -> None:
        self.ctx = zmq.Context.instance()
        self.rng = np.random.default_rng(0)

    def start(self) -> None:
        self.address = f"tcp://127.0.0.1:{free_port_base(2)}"
        cfg = ServiceConfig(address=self.address, max_batch=8, max_wait_ms=1.0, default_timeout_s=2.0,
                            max_message_bytes=MAX_FRAME)
        self.svc = WaypointService(lambda f, ins, nots: f[:, :5, :2].clone(), FEATURES, cfg).start()
        self.dealer = RawDealer(self.ctx, self.address)

    def stop(self) -> None:
        self.dealer.close()
        self.svc.stop()

    def send(self, frames: list[bytes]) -> bool:
        return self.dealer.send(frames)

    def probe(self) -> None:
        feats = self.rng.standard_normal(FEATURES).astype(np.float32)
        path = self.dealer.request(SERVICE, make_request(feats, "turn left", vehicle_id="probe", timeout_s=5.0),
                                   RESPONSE_TYPE)
        np.testing.assert_allclose(path_to_waypoints(path), feats[:5, :2])

    def alive(self) -> bool:
        return self.svc._thread is not None and self.svc._thread.is_alive()

    def rejected(self) -> int:
        return self.svc.stats.errors

    def addresses(self) -> list[str]:
        return [self.address]

    def extra(self) -> dict:
        return {"stats": self.svc.stats.to_dict(),
                **self.dealer.summary()}


def test_fuzz_waypoint_service():
    rng = np.random.default_rng(1)
    seeds = [_request(SERVICE, REQUEST_TYPE, make_request(rng.standard_normal(FEATURES).astype(np.float32),
                                                          "follow the lane", "red light", "v3", 7, 1.0, (3.0, -1.0))),
             _request(SERVICE, REQUEST_TYPE, make_request(rng.standard_normal(FEATURES).astype(np.float16),
                                                          "turn right now", vehicle_id="v4"))]
    _run("waypoint service (WaypointService, flad/waypoints)", WaypointHarness(), seeds, 15, random_n=200,
         mutation_n=700, hypothesis=[("hypothesis_messages", _valid_requests(SERVICE, REQUEST_TYPE, 3), 15)],
         min_rejected=50)


# -- found by reading what the fuzzing reaches: layer names from tensor names became file names -------------------
def test_backup_layer_names_cannot_escape_the_backup_dir(tmp_path):
    outside = tmp_path / "outside"
    if "." in str(outside):
        pytest.skip("the tmp path holds a dot, which the layer-name split would cut")
    backups = EdgeBackups("edge-0", str(tmp_path / "backups"), BackupHarness._global)
    backups.start_round("c0", ["v0"], first_step=0)
    chunk = wts.chunk_messages(wts.to_bytes({f"p/layers.{outside}/escaped.weight": torch.ones(2)}), sender="v0",
                               model_version="1", update_id="u1")[0]
    ack = backups.on_backup(chunk)
    assert not ack.ok and "bad tensor names" in ack.message
    assert not list(tmp_path.glob("outside/**/*")), "a vehicle's backup wrote outside the backup directory"
