"""flad_core.bus_ros.RosBus on real rclpy: two processes, real DDS topics on loopback.

The peer (ros_bus_peer.py) runs its own RosBus and echoes what it receives; this test process runs
another. Reliable topics with volatile durability lose what is published before discovery matches
the endpoints, so senders repeat until the echo arrives (bounded by a deadline, not a speed goal).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rclpy
from rclpy.qos import ReliabilityPolicy

from flad_core import codec
from flad_core.bus import BusConfig, ZmqBus
from flad_core.bus_factory import make_bus
from flad_core.bus_ros import RELIABLE, RosBus, qos_for, ros_message_type
from flad_core.procs import free_port_base

from msg_strategies import assert_equal

HERE = Path(__file__).resolve().parent
DEADLINE_S = 60.0


class Peer:
    """The echo process: started, waited for, stopped with SIGTERM; its exit report parsed."""

    def __init__(self, identity: str, service_address: str | None = None) -> None:
        self.identity = identity
        args = [sys.executable, str(HERE / "ros_bus_peer.py"), identity]
        args += [service_address] if service_address else []
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=dict(os.environ))
        line = self.proc.stdout.readline()   # "ready" once its subscriptions exist (or EOF if it died)
        if line.strip() != "ready":
            self.proc.kill()
            raise AssertionError(f"peer did not start: {line!r} {self.proc.stderr.read()}")

    def stop(self, timeout: float = 20.0) -> tuple[int, dict[str, Any]]:
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=timeout)
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        assert lines, f"peer printed no report (rc {self.proc.returncode}): {out!r} {err!r}"
        return self.proc.returncode, json.loads(lines[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def live_pids_mentioning(marker: str) -> list[int]:
    """PIDs of live (non-zombie) processes whose command line contains `marker`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


def until(cond: Callable[[], bool], action: Callable[[], None], what: str, period_s: float = 0.2) -> None:
    """Repeat `action` until `cond()` holds; fail naming `what` after DEADLINE_S."""
    end = time.monotonic() + DEADLINE_S
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        action()
        time.sleep(period_s)


@pytest.fixture
def bus() -> Iterator[RosBus]:
    b = RosBus(f"rosbus-test-{os.getpid()}")
    yield b
    b.close()


@pytest.fixture
def peer(request) -> Iterator[Peer]:
    p = Peer(f"peer-{os.getpid()}-{request.node.name[:20]}".replace("[", "_").replace("]", "_"))
    yield p
    p.kill()


def sample_messages() -> dict[str, Any]:
    rng = np.random.default_rng(5)
    feats = rng.standard_normal((4, 32)).astype(np.float32)
    return {
        "heartbeat": codec.new("flad_msgs/msg/Heartbeat", header=codec.header(12.5, "base_link"), vehicle_id="v007",
                               seq=2**40 + 3, state=1, round=9),
        "features": codec.new("flad_msgs/msg/EncodedFeatures", header=codec.header(13.0), vehicle_id="v007", frame=77,
                              dtype="float32", shape=np.array(feats.shape, dtype=np.uint32),
                              data=np.frombuffer(feats.tobytes(), dtype=np.uint8)),
        "image": codec.new("sensor_msgs/msg/Image", header=codec.header(13.1, "cam_front"), height=48, width=64,
                           encoding="rgb8", is_bigendian=0, step=64 * 3,
                           data=rng.integers(0, 256, 48 * 64 * 3, dtype=np.uint8)),
    }


def test_two_processes_exchange_flad_and_sensor_messages(bus, peer):
    """Heartbeat, EncodedFeatures and a sensor_msgs/Image go out and come back unchanged over real DDS."""
    sent = sample_messages()
    got: dict[str, queue.Queue] = {s: queue.Queue() for s in sent}
    types = {"heartbeat": "flad_msgs/msg/Heartbeat", "features": "flad_msgs/msg/EncodedFeatures",
             "image": "sensor_msgs/msg/Image"}
    for stream, typename in types.items():
        bus.subscribe(f"/rosbus_test/out/{stream}", typename, got[stream].put)
    echoed = {}
    for stream, msg in sent.items():
        until(lambda s=stream: not got[s].empty(), lambda s=stream, m=msg: bus.publish(f"/rosbus_test/in/{s}", m),
              f"the {stream} echo")
        echoed[stream] = got[stream].get()
        assert_equal(echoed[stream], msg, stream)
    f = echoed["features"]   # the tensor a vehicle's encoder sent is the one the edge reads back
    tensor = np.frombuffer(f.data.tobytes(), np.dtype(f.dtype)).reshape(tuple(int(d) for d in f.shape))
    assert np.array_equal(tensor, np.frombuffer(sent["features"].data.tobytes(), np.float32).reshape(4, 32))
    rc, report = peer.stop()
    assert rc == 0 and report["dropped"] == 0
    assert all(report["received"].get(s, 0) >= 1 for s in types), report


def test_qos_per_stream_as_discovered_by_dds(bus, peer):
    """The peer's publishers, seen through the ROS graph: sensor images best-effort, the rest reliable."""
    sent = sample_messages()
    got = {s: threading.Event() for s in ("heartbeat", "image")}
    bus.subscribe("/rosbus_test/out/heartbeat", "flad_msgs/msg/Heartbeat", lambda _m: got["heartbeat"].set())
    bus.subscribe("/rosbus_test/out/image", "sensor_msgs/msg/Image", lambda _m: got["image"].set())
    for stream in got:
        until(got[stream].is_set, lambda s=stream: bus.publish(f"/rosbus_test/in/{s}", sent[s]), f"{stream} echo")
    expected = {"image": ReliabilityPolicy.BEST_EFFORT, "heartbeat": ReliabilityPolicy.RELIABLE}
    for stream, reliability in expected.items():
        infos = [i for i in bus.node.get_publishers_info_by_topic(f"/rosbus_test/out/{stream}")
                 if i.node_name == peer.identity.replace("-", "_")]
        assert len(infos) == 1, (stream, infos)
        assert infos[0].qos_profile.reliability == reliability, stream
        assert infos[0].topic_type == {"image": "sensor_msgs/msg/Image",
                                       "heartbeat": "flad_msgs/msg/Heartbeat"}[stream]
    # and this process's own publishers, as rclpy made them
    assert bus._publishers["/rosbus_test/in/image"].qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT
    assert bus._publishers["/rosbus_test/in/heartbeat"].qos_profile.reliability == ReliabilityPolicy.RELIABLE
    assert qos_for("/x", "sensor_msgs/Image").reliability == ReliabilityPolicy.BEST_EFFORT
    assert qos_for("/x", "nav_msgs/msg/Path") == RELIABLE
    peer.stop()


def test_malformed_bytes_are_counted_as_dropped(bus, peer):
    """Raw CDR garbage published by a plain rclpy publisher is rejected by the peer's codec and counted."""
    echoes: queue.Queue = queue.Queue()
    bus.subscribe("/rosbus_test/out/raw", "flad_msgs/msg/Heartbeat", echoes.put)
    raw_pub = bus.node.create_publisher(ros_message_type("flad_msgs/msg/Heartbeat"), "/rosbus_test/in/raw", RELIABLE)
    good = codec.encode(sample_messages()["heartbeat"])
    # (DDS pads a payload to a multiple of 4 bytes with zeros: a cut that only drops zero bytes would come back
    # whole, so the truncated one is cut in half.)
    junk = [b"\x00\x01\x00\x00\x05", good[: len(good) // 2], good + b"\x00" * 9, b"\x07\x07" + good[2:]]

    def send() -> None:   # each round: every kind of junk, then one valid message, all from one writer
        for bad in junk:
            raw_pub.publish(bad)
        raw_pub.publish(good)

    # two echoes: the first proves the writer matched, so the junk of the next round arrived before its echo
    until(lambda: echoes.qsize() >= 2, send, "two echoes of the valid raw Heartbeat")
    rc, report = peer.stop()
    assert rc == 0
    assert report["received"]["raw"] >= 2
    assert report["dropped"] >= len(junk), report


def test_request_reply_stays_on_zeromq(peer_with_service):
    peer_proc, address = peer_with_service
    with RosBus(f"rosbus-req-{os.getpid()}", BusConfig(services={"echo": address})) as client:
        reply = client.request("echo", codec.new("flad_msgs/msg/Ack", message="ping"), "flad_msgs/msg/Ack",
                               timeout_s=20)
    assert reply.ok and reply.message == f"{peer_proc.identity}: ping"
    assert peer_proc.stop()[0] == 0


@pytest.fixture
def peer_with_service() -> Iterator[tuple[Peer, str]]:
    address = f"tcp://127.0.0.1:{free_port_base(1)}"
    p = Peer(f"peer-svc-{os.getpid()}", address)
    yield p, address
    p.kill()


def test_make_bus_picks_rosbus_when_asked():
    """`transport="ros"` (and `auto` where rclpy imports) gives a RosBus; `zmq` stays ZeroMQ."""
    owned = []
    for transport, cls in (("ros", RosBus), ("auto", RosBus), ("zmq", ZmqBus)):
        b = make_bus(f"make-bus-{transport}", transport=transport)
        try:
            assert type(b) is cls, transport
            owned.append(getattr(b, "_own_context", False))
        finally:
            b.close()
    # the last RosBus to close shuts down the rclpy context it initialised (one it found is left to its owner)
    assert rclpy.ok() is not owned[0]


def test_clean_shutdown_leaves_no_process_or_thread():
    """SIGTERM ends the peer with exit 0 and nothing left running; close() stops this process's spin thread."""
    marker = f"peer-shutdown-{os.getpid()}"
    p = Peer(marker)
    try:
        rc, report = p.stop()
    finally:
        p.kill()
    assert rc == 0 and report["identity"] == marker
    assert live_pids_mentioning(marker) == []
    b = RosBus(f"rosbus-close-{os.getpid()}")
    b.subscribe("/rosbus_test/out/heartbeat", "flad_msgs/msg/Heartbeat", lambda _m: None)
    b.publish("/rosbus_test/in/heartbeat", sample_messages()["heartbeat"])
    spin = b._spin
    assert spin is not None and spin.is_alive()
    b.close()
    b.close()   # idempotent
    assert not spin.is_alive()
    assert rclpy.ok() is not b._own_context
    assert not [t.name for t in threading.enumerate() if t.name.startswith("rosbus-")]
