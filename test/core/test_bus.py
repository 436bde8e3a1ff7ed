"""The ZeroMQ bus between real processes on loopback: pub/sub, request/reply, validation."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from flad_core import codec
from flad_core.bus import BusError, RemoteError, RequestTimeoutError, ZmqBus

from bus_peer import bus_config

PEER = Path(__file__).with_name("bus_peer.py")


def start_peer(base: int, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(PEER), "--base", str(base), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line.strip() != "READY":
        proc.kill()
        raise RuntimeError(f"peer did not start: {line!r} {proc.stderr.read()}")
    return proc


def stop_peer(proc: subprocess.Popen) -> str:
    proc.terminate()
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    return out + err


@pytest.fixture
def peer(port_base):
    proc = start_peer(port_base)
    yield port_base, proc
    if proc.poll() is None:
        stop_peer(proc)


def wait_for(pred, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_pubsub_between_processes(peer):
    base, _ = peer
    got: list = []
    with ZmqBus("client", bus_config(base)) as bus:
        bus.subscribe("/t/out", "flad_msgs/msg/Heartbeat", got.append)
        seq = 0
        # keep publishing until the relay answers: subscriptions propagate asynchronously (ZeroMQ slow joiner)
        while not got and seq < 200:
            bus.publish("/t/in", codec.new("flad_msgs/msg/Heartbeat", vehicle_id="v7", seq=seq))
            seq += 1
            time.sleep(0.02)
        assert got, "no relayed message arrived"
        first = got[0].seq
        for i in range(seq, seq + 20):
            bus.publish("/t/in", codec.new("flad_msgs/msg/Heartbeat", vehicle_id="v7", seq=i))
        assert wait_for(lambda: got[-1].seq == seq + 19 + 1000)
        seqs = [m.seq for m in got]
        assert seqs == sorted(seqs) and first >= 1000  # in order, relayed by the other process
        assert all(m.vehicle_id == "v7" for m in got)


def test_topics_match_exactly(peer):
    base, _ = peer
    got: list = []
    with ZmqBus("client", bus_config(base)) as bus:
        bus.subscribe("/t/o", "flad_msgs/msg/Heartbeat", got.append)  # a prefix of /t/out
        for i in range(30):
            bus.publish("/t/in", codec.new("flad_msgs/msg/Heartbeat", seq=i))
            time.sleep(0.01)
        time.sleep(0.3)
        assert got == []


def test_request_reply_between_processes(peer):
    base, _ = peer
    with ZmqBus("client", bus_config(base)) as bus:
        for i in range(5):
            ack = bus.request("echo", codec.new("flad_msgs/msg/Heartbeat", vehicle_id="v1", seq=i), "flad_msgs/msg/Ack")
            assert ack.ok and ack.message == f"echo v1 {i}"


def test_concurrent_requests_from_threads(peer):
    base, _ = peer
    results: dict[int, str] = {}
    with ZmqBus("client", bus_config(base)) as bus:
        def worker(k: int) -> None:
            for i in range(10):
                ack = bus.request("echo", codec.new("flad_msgs/msg/Heartbeat", vehicle_id=f"t{k}", seq=i),
                                  "flad_msgs/msg/Ack")
                results[k * 100 + i] = ack.message
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(results) == 40
    assert all(msg == f"echo t{key // 100} {key % 100}" for key, msg in results.items())


def test_remote_errors_and_wrong_types_are_replied_not_crashed(peer):
    base, proc = peer
    with ZmqBus("client", bus_config(base)) as bus:
        with pytest.raises(RemoteError, match="asked to explode"):
            bus.request("echo", codec.new("flad_msgs/msg/Heartbeat", vehicle_id="explode"), "flad_msgs/msg/Ack")
        with pytest.raises(RemoteError, match="expects flad_msgs/msg/Heartbeat"):
            bus.request("echo", codec.new("flad_msgs/msg/Ack"), "flad_msgs/msg/Ack")
        # the server is still up
        assert bus.request("echo", codec.new("flad_msgs/msg/Heartbeat", vehicle_id="ok"), "flad_msgs/msg/Ack").ok
    assert proc.poll() is None


def test_malformed_frames_are_dropped_and_counted(peer):
    base, proc = peer
    cfg = bus_config(base)
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(cfg.services["echo"])
    # garbage CDR for the right type -> an error reply naming the problem
    raw.send_multipart([b"", b"1", b"echo", b"flad_msgs/msg/Heartbeat", b"\x00\x01\x00\x00garbage"])
    assert raw.poll(3000)
    frames = raw.recv_multipart()
    assert frames[2] == b"err" and b"bad request" in frames[4] and b"Heartbeat" in frames[4]
    # wrong frame count -> silently dropped (no reply possible), server survives
    raw.send_multipart([b"", b"only-two"])
    raw.close()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.connect(cfg.hub_pub)
    time.sleep(0.3)
    for _ in range(5):
        pub.send_multipart([b"/t/in", b"flad_msgs/msg/Heartbeat", b"\x00\x01\x00\x00\xff"])
        pub.send_multipart([b"/t/in", b"flad_msgs/msg/Ack", codec.encode(codec.new("flad_msgs/msg/Ack"))])
    time.sleep(0.3)
    pub.close()
    with ZmqBus("client", cfg) as bus:
        assert bus.request("echo", codec.new("flad_msgs/msg/Heartbeat", vehicle_id="alive"), "flad_msgs/msg/Ack").ok
    out = stop_peer(proc)
    dropped = int(out.split("DROPPED ")[1].split()[0])
    assert dropped >= 12  # 1 bad request + 1 bad frame count + 5 bad CDR + 5 wrong type
    assert "rejected message" in out


def test_large_pointcloud_roundtrip(peer):
    base, _ = peer
    got: list = []
    cfg = bus_config(base)
    data = np.random.default_rng(0).integers(0, 255, 1_600_000, dtype=np.uint8)
    pc = codec.new("sensor_msgs/msg/PointCloud2", height=1, width=100_000, point_step=16, row_step=1_600_000,
                   data=data)
    with ZmqBus("a", cfg) as a, ZmqBus("b", cfg) as b:
        b.subscribe("/carla/hero/lidar", "sensor_msgs/msg/PointCloud2", got.append)
        assert wait_for(lambda: (a.publish("/carla/hero/lidar", pc), time.sleep(0.05), bool(got))[-1], 10)
    assert np.array_equal(got[0].data, data) and got[0].width == 100_000


def test_request_timeout_and_unknown_service(port_base):
    cfg = bus_config(port_base)  # nobody is serving
    with ZmqBus("client", cfg) as bus:
        t0 = time.monotonic()
        with pytest.raises(RequestTimeoutError, match="echo"):
            bus.request("echo", codec.new("flad_msgs/msg/Heartbeat"), "flad_msgs/msg/Ack", timeout_s=0.3)
        assert time.monotonic() - t0 < 2.0
        with pytest.raises(BusError, match="no address"):
            bus.request("nope", codec.new("flad_msgs/msg/Heartbeat"), "flad_msgs/msg/Ack")
