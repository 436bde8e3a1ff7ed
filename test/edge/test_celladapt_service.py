"""The edge waypoint service over real ZeroMQ sockets: concurrent vehicles, batching, bad requests, timeouts."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
import zmq

from flad_core import codec
from flad_core.bus import BusConfig, RemoteError, ZmqBus
from flad_edge.celladapt.model import ADLLM, AdapterConfig, ADLLMConfig, tiny_llama
from flad_edge.celladapt.service import (
    REQUEST_TYPE,
    SERVICE,
    ServiceConfig,
    WaypointClient,
    WaypointService,
    free_tcp_address,
    make_request,
)

torch.set_num_threads(1)

INSTR = ["turn left now", "follow the lane for 30 m", "go straight through this intersection", "turn right now"]


@pytest.fixture(scope="module")
def model() -> ADLLM:
    return ADLLM.build(ADLLMConfig(llm=tiny_llama(32, 1, 4, 2), adapter=AdapterConfig(d_model=32, n_queries=2)))


@pytest.fixture
def bus():
    b = ZmqBus("vehicle-test", BusConfig())
    yield b
    b.close()


def test_concurrent_clients_get_their_own_answers_batched(model: ADLLM, bus: ZmqBus) -> None:
    addr = free_tcp_address()
    cfg = ServiceConfig(address=addr, max_batch=8, max_wait_ms=20.0, default_timeout_s=5.0)
    n_clients, per_client = 8, 6
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((n_clients, per_client, 31, 64)).astype(np.float32)
    results: dict[tuple[int, int], np.ndarray] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(n_clients)

    def vehicle(i: int) -> None:
        try:
            client = WaypointClient(bus, addr, timeout_s=5.0)
            barrier.wait()
            for k in range(per_client):
                results[i, k] = client.waypoints(feats[i, k], INSTR[(i + k) % 4], "red light ahead" if k % 2 else "",
                                                 vehicle_id=f"v{i:03d}", frame=k)
        except BaseException as exc:       # surfaced below
            errors.append(exc)

    def predict(f: torch.Tensor, ins: list[str], nots: list[str]) -> torch.Tensor:
        time.sleep(0.01)        # a forward pass that takes a while: later arrivals must queue and share a batch
        return model.predict(f, ins, nots)

    with WaypointService(predict, (31, 64), cfg) as svc:
        threads = [threading.Thread(target=vehicle, args=(i,)) for i in range(n_clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    stats = svc.stats.to_dict()
    assert not errors, errors
    assert len(results) == n_clients * per_client
    for (i, k), wp in results.items():
        want = model.predict(torch.from_numpy(feats[i, k][None]), [INSTR[(i + k) % 4]],
                             ["red light ahead" if k % 2 else ""])[0].numpy()
        np.testing.assert_allclose(wp, want, atol=1e-4, rtol=1e-4)
    assert stats["ok"] == n_clients * per_client and stats["errors"] == 0
    assert stats["mean_batch"] > 1.0, stats            # requests from different vehicles shared forward passes


def _raw(addr: str, frames: list[bytes], timeout_ms: int = 5000) -> list[bytes]:
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(addr)
    try:
        s.send_multipart(frames)
        assert s.poll(timeout_ms), "no reply to a malformed request"
        return s.recv_multipart()
    finally:
        s.close(0)


def test_malformed_requests_get_errors_and_service_stays_up(model: ADLLM, bus: ZmqBus) -> None:
    addr = free_tcp_address()
    good = np.zeros((31, 64), np.float32)
    with WaypointService.for_model(model, ServiceConfig(address=addr, max_wait_ms=1.0)) as svc:
        client = WaypointClient(bus, addr, timeout_s=5.0)
        # garbage CDR
        reply = _raw(addr, [b"", b"1", SERVICE.encode(), REQUEST_TYPE.encode(), b"\x00\x01\x00\x00garbage"])
        assert reply[2] == b"err" and b"bad request" in reply[4]
        # wrong message type, unknown service
        assert _raw(addr, [b"", b"2", SERVICE.encode(), b"std_msgs/msg/String", b"x"])[2] == b"err"
        assert _raw(addr, [b"", b"3", b"nope", REQUEST_TYPE.encode(), b"x"])[2] == b"err"
        bad_cases = {
            "shape": make_request(np.zeros((30, 64), np.float32), "turn left now"),
            "nan": make_request(np.full((31, 64), np.nan, np.float32), "turn left now"),
            "empty instruction": make_request(good, ""),
        }
        wrong_dtype = make_request(good, "turn left now")
        wrong_dtype.features.dtype = "int8"
        bad_cases["dtype"] = wrong_dtype
        short = make_request(good, "turn left now")
        short.features.data = short.features.data[:100]
        bad_cases["size"] = short
        for name, req in bad_cases.items():
            with pytest.raises(RemoteError):
                bus.request(SERVICE, req, "nav_msgs/msg/Path", timeout_s=5.0, address=addr)
            assert svc._thread is not None and svc._thread.is_alive(), name
        # still serving
        wp = client.waypoints(good, "turn left now")
        assert wp.shape == (5, 2) and np.isfinite(wp).all()
        assert svc.stats.errors == 3 + len(bad_cases)


def test_per_request_timeout_replies_with_error(bus: ZmqBus) -> None:
    addr = free_tcp_address()

    def slow(f: torch.Tensor, ins: list[str], nots: list[str]) -> torch.Tensor:
        time.sleep(0.3)
        return torch.zeros(len(ins), 5, 2)

    with WaypointService(slow, (31, 64), ServiceConfig(address=addr, max_wait_ms=1.0)) as svc:
        req = make_request(np.zeros((31, 64), np.float32), "follow the lane", timeout_s=0.05)
        with pytest.raises(RemoteError, match="timeout"):
            bus.request(SERVICE, req, "nav_msgs/msg/Path", timeout_s=5.0, address=addr)
        ok = make_request(np.zeros((31, 64), np.float32), "follow the lane", timeout_s=2.0)
        path = bus.request(SERVICE, ok, "nav_msgs/msg/Path", timeout_s=5.0, address=addr)
        assert len(path.poses) == 5
        assert svc.stats.timeouts == 1


def test_model_failure_is_an_error_reply(bus: ZmqBus) -> None:
    addr = free_tcp_address()

    def broken(f: torch.Tensor, ins: list[str], nots: list[str]) -> torch.Tensor:
        raise RuntimeError("boom")

    with WaypointService(broken, (31, 64), ServiceConfig(address=addr, max_wait_ms=1.0)) as svc:
        req = make_request(np.zeros((31, 64), np.float32), "turn left now")
        for _ in range(2):
            with pytest.raises(RemoteError, match="boom"):
                bus.request(SERVICE, req, "nav_msgs/msg/Path", timeout_s=5.0, address=addr)
        assert svc._thread is not None and svc._thread.is_alive()


def test_request_message_round_trip() -> None:
    req = make_request(np.arange(31 * 64, dtype=np.float32).reshape(31, 64), "turn right now", "stop sign ahead",
                       "v007", 42, 0.25)
    back = codec.decode(codec.encode(req), REQUEST_TYPE)
    assert back.features.vehicle_id == "v007" and back.features.frame == 42 and list(back.features.shape) == [31, 64]
    assert back.instruction == "turn right now" and back.notice == "stop sign ahead"
    assert back.timeout_s == pytest.approx(0.25)
    assert not back.has_target_point
    tp = codec.decode(codec.encode(make_request(np.zeros((31, 64), np.float32), "turn left now",
                                                target_point=[12.5, -3.0])), REQUEST_TYPE)
    assert tp.has_target_point and (tp.target_point.x, tp.target_point.y) == (12.5, -3.0)


def test_service_passes_each_vehicles_target_point_to_the_model(model: ADLLM, bus: ZmqBus) -> None:
    addr = free_tcp_address()
    f = np.random.default_rng(3).standard_normal((31, 64)).astype(np.float32)
    with WaypointService.for_model(model, ServiceConfig(address=addr, max_wait_ms=1.0)) as svc:
        assert svc.navigation
        client = WaypointClient(bus, addr, timeout_s=5.0)
        got_left = client.waypoints(f, "turn left now", target_point=(14.0, 9.0))
        got_none = client.waypoints(f, "turn left now")
    with torch.no_grad():
        want_left = model.predict(torch.from_numpy(f[None]), ["turn left now"], [""], torch.tensor([[14.0, 9.0]]))
        want_none = model.predict(torch.from_numpy(f[None]), ["turn left now"], [""])
    np.testing.assert_allclose(got_left, want_left[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(got_none, want_none[0].numpy(), atol=1e-4)
    assert not np.allclose(got_left, got_none, atol=1e-3)


def test_window_closes_once_every_active_vehicle_is_queued(model: ADLLM, bus: ZmqBus) -> None:
    """A lone vehicle is answered without waiting out a long window; while another vehicle is active but has
    nothing queued, the window is waited out (up to max_wait_ms)."""
    addr = free_tcp_address()
    cfg = ServiceConfig(address=addr, max_batch=8, max_wait_ms=2000.0, peer_idle_s=60.0, default_timeout_s=10.0)
    f = np.zeros((31, 64), np.float32)
    with WaypointService.for_model(model, cfg) as svc:
        client = WaypointClient(bus, addr, timeout_s=10.0)
        t0 = time.monotonic()
        client.waypoints(f, "follow the lane", vehicle_id="v1")
        alone = time.monotonic() - t0
        client.waypoints(f, "follow the lane", vehicle_id="v2")          # v2 becomes active too
        t0 = time.monotonic()
        client.waypoints(f, "follow the lane", vehicle_id="v1")          # v2 is active, nothing of it queued
        waited = time.monotonic() - t0
    assert alone < 1.0, alone               # far below the 2 s window: everyone active was queued
    assert waited >= 1.9, waited            # the window ran out (v2 might still have sent something)
    assert svc.stats.replies_ok == 3
