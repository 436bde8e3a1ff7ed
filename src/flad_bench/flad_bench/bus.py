"""`flad bench bus`: latency and throughput of the bus and of tensor frames between two processes.

Measured on loopback with real processes and the real code paths:
  * bus latency: ping-pong through the hub (encode -> PUB -> hub -> SUB -> decode -> callback and back);
    one-way latency is reported as half the round trip.
  * bus throughput: one process streams messages through the hub, the other counts what it decodes.
  * tensor frames: 4 MB activations over a direct PUSH/PULL link (the pipeline path), packed with
    checksums, unpacked with validation (checksum, finiteness) on the receiver.
  * stage links, plaintext vs CURVE: the same 4 MB activations through the FHDP stage-link classes
    (`OutLink` -> `Inbox`: codec, frame packing, the inbox's sender check, validation, decode), once plain
    and once CURVE-encrypted with throwaway keys; the ratio is what encryption costs a pipeline hop.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import zmq

from flad_core import codec
from flad_core import tensorframe as tf
from flad_core.bus import BusConfig, BusHub, ZmqBus
from flad_core.security import SecurityConfig, generate_keypair
from flad_vehicle.fhdp.links import Inbox, OutLink

KB = 1024
MB = 1024 * 1024


def _cfg(base: int) -> BusConfig:
    return BusConfig(hub_pub=f"tcp://127.0.0.1:{base}", hub_sub=f"tcp://127.0.0.1:{base + 1}",
                     high_water_mark=100_000)


def _messages() -> dict[str, tuple[str, object]]:
    small = codec.new("sensor_msgs/msg/Image", height=16, width=16, encoding="mono8", step=16,
                      data=np.zeros(1000, np.uint8))  # ~1 KB on the wire
    cloud = codec.new("sensor_msgs/msg/PointCloud2", height=1, width=100_000, point_step=16, row_step=1_600_000,
                      data=np.random.default_rng(0).integers(0, 255, 1_600_000, dtype=np.uint8))
    return {"1KB_image": ("sensor_msgs/msg/Image", small), "1.6MB_pointcloud2": ("sensor_msgs/msg/PointCloud2", cloud)}


#: key names of the stage-link measurement (throwaway keys in a temporary folder)
DRIVER_KEY, PEER_KEY = "bench-driver", "bench-peer"
#: the stage-link goal: CURVE keeps at least this share of the plaintext throughput
CURVE_RATIO_GOAL = 0.5


def _stage_port(base: int, curve: bool) -> int:
    """The peer's stage inbox port (between the hub's ports and the frame ports)."""
    return base + (3 if curve else 2)


def _stage_security(keys: str | None) -> SecurityConfig | None:
    return SecurityConfig(curve=True, keys_dir=Path(keys), allow_dir=Path(keys) / "allowed") if keys else None


def _stage_receive(ctx: zmq.Context, ctrl: zmq.Socket, cmd: dict) -> None:
    """Peer side of one stage-link run: bind an inbox, take `count` timed frames, answer with the timing."""
    inbox = Inbox(ctx, f"tcp://127.0.0.1:{cmd['port']}", security=_stage_security(cmd["keys"]), identity=PEER_KEY)
    try:
        inbox.allow([DRIVER_KEY])
        ctrl.send_json({})
        inbox.get(tf.KIND_ACTIVATION, 0, 0, timeout_s=60.0)      # time from the first frame's arrival
        t0 = time.perf_counter()
        nbytes = 0
        for step in range(1, cmd["count"] + 1):
            _, tensors = inbox.get(tf.KIND_ACTIVATION, step, 0, timeout_s=60.0)
            nbytes += sum(t.numel() * t.element_size() for t in tensors.values())
        dt = time.perf_counter() - t0
        refused = sum(inbox.refused_peers.values())
    finally:
        inbox.close()
    ctrl.recv_json()
    ctrl.send_json({"seconds": dt, "frames": cmd["count"], "bytes": nbytes, "refused": refused})


# -- the peer process -------------------------------------------------------------------------------
def _peer(base: int, frame_port: int) -> int:
    torch.set_num_threads(1)
    cfg = _cfg(base)
    bus = ZmqBus("bench-peer", cfg)
    counts = {name: 0 for name in _messages()}
    for name, (typename, _) in _messages().items():
        def echo(msg, name=name):
            bus.publish(f"/bench/pong/{name}", msg)
        bus.subscribe(f"/bench/ping/{name}", typename, echo)

        def count(msg, name=name):
            counts[name] += 1
        bus.subscribe(f"/bench/stream/{name}", typename, count)
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 8)
    pull.bind(f"tcp://127.0.0.1:{frame_port}")
    ctrl = ctx.socket(zmq.REP)
    ctrl.bind(f"tcp://127.0.0.1:{frame_port + 1}")
    print("READY", flush=True)
    while True:
        cmd = ctrl.recv_json()
        if cmd["op"] == "count":
            ctrl.send_json({"n": counts[cmd["name"]]})
        elif cmd["op"] == "frames":
            ctrl.send_json({})
            n, nbytes, t0 = 0, 0, None
            while n < cmd["count"]:
                _, tensors = tf.unpack(pull.recv_multipart(copy=False))
                if t0 is None:
                    t0 = time.perf_counter()
                    continue  # time from the first frame's arrival
                n += 1
                nbytes += sum(t.numel() * t.element_size() for t in tensors.values())
            dt = time.perf_counter() - t0
            ctrl.recv_json()
            ctrl.send_json({"seconds": dt, "frames": n, "bytes": nbytes})
        elif cmd["op"] == "stage":
            _stage_receive(ctx, ctrl, cmd)
        elif cmd["op"] == "quit":
            ctrl.send_json({})
            break
    bus.close()
    return 0


# -- the driver --------------------------------------------------------------------------------------
def _latency(bus: ZmqBus, topic_name: str, typename: str, msg, n: int, warmup: int) -> dict:
    got = threading.Event()
    bus.subscribe(f"/bench/pong/{topic_name}", typename, lambda _m: got.set())
    # wait until the round trip works (subscriptions propagate asynchronously)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        got.clear()
        bus.publish(f"/bench/ping/{topic_name}", msg)
        if got.wait(0.2):
            break
    rtts = []
    for i in range(n + warmup):
        got.clear()
        t0 = time.perf_counter()
        bus.publish(f"/bench/ping/{topic_name}", msg)
        if not got.wait(5):
            raise RuntimeError(f"{topic_name}: echo lost")
        if i >= warmup:
            rtts.append(time.perf_counter() - t0)
    one_way_ms = sorted(r * 500 for r in rtts)
    return {"samples": n, "one_way_p50_ms": round(statistics.median(one_way_ms), 4),
            "one_way_p99_ms": round(one_way_ms[int(0.99 * (len(one_way_ms) - 1))], 4),
            "round_trip_p50_ms": round(statistics.median(r * 1000 for r in rtts), 4)}


def _throughput(bus: ZmqBus, ctrl: zmq.Socket, topic_name: str, msg, seconds: float) -> dict:
    size = len(codec.encode(msg))
    sent = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(16):
            bus.publish(f"/bench/stream/{topic_name}", msg)
        sent += 16
    received, last = 0, -1
    while received != last:  # wait until the subscriber has drained its queue
        last = received
        time.sleep(0.3)
        ctrl.send_json({"op": "count", "name": topic_name})
        received = ctrl.recv_json()["n"]
    elapsed = time.perf_counter() - t0 - 0.6  # minus the two idle polls that confirmed the drain
    return {"sent": sent, "received": received, "message_bytes": size, "msgs_per_s": round(received / elapsed, 1),
            "MB_per_s": round(received * size / elapsed / MB, 1)}


def _frames(ctrl: zmq.Socket, frame_port: int, count: int, checksum: bool) -> dict:
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 8)
    push.connect(f"tcp://127.0.0.1:{frame_port}")
    act = torch.randn(MB)  # 4 MB of float32
    ctrl.send_json({"op": "frames", "count": count})
    ctrl.recv_json()
    t0 = time.perf_counter()
    for step in range(count + 1):
        push.send_multipart(tf.pack({"act": act}, step=step, checksum=checksum), copy=False)
    ctrl.send_json({"op": "done"})
    result = ctrl.recv_json()
    sender_s = time.perf_counter() - t0
    push.close(linger=1000)
    return {"frame_bytes": act.numel() * 4, "frames": result["frames"], "checksum": checksum,
            "MB_per_s": round(result["bytes"] / result["seconds"] / MB, 1),
            "GB_per_s": round(result["bytes"] / result["seconds"] / 1e9, 3), "sender_seconds": round(sender_s, 3)}


def _stage_link(ctrl: zmq.Socket, base: int, count: int, keys: Path | None) -> dict:
    """Stream `count` 4 MB activations through an OutLink to the peer's Inbox (CURVE when `keys` is given)."""
    port = _stage_port(base, keys is not None)
    ctrl.send_json({"op": "stage", "port": port, "count": count, "keys": str(keys) if keys else None})
    ctrl.recv_json()
    security = _stage_security(str(keys)) if keys else None
    link = OutLink(zmq.Context.instance(), PEER_KEY, f"tcp://127.0.0.1:{port}", 0, hwm=8, security=security,
                   identity=DRIVER_KEY)
    act = torch.randn(MB)  # 4 MB of float32
    t0 = time.perf_counter()
    try:
        for step in range(count + 1):
            link.send({"act": act}, kind=tf.KIND_ACTIVATION, step=step, micro_batch=0)
        ctrl.send_json({"op": "done"})
        result = ctrl.recv_json()
    finally:
        link.close()
    return {"frame_bytes": act.numel() * 4, "frames": result["frames"], "refused": result["refused"],
            "MB_per_s": round(result["bytes"] / result["seconds"] / MB, 1),
            "sender_seconds": round(time.perf_counter() - t0, 3)}


def _stage_links(ctrl: zmq.Socket, base: int, count: int) -> dict:
    """Plaintext vs CURVE over the stage-link path, with throwaway keys for both ends."""
    plain = _stage_link(ctrl, base, count, None)
    with tempfile.TemporaryDirectory(prefix="flad-bench-keys-") as tmp:
        keys = Path(tmp)
        for name in (DRIVER_KEY, PEER_KEY):
            generate_keypair(keys, name, allow_dir=keys / "allowed")
        curve = _stage_link(ctrl, base, count, keys)
    ratio = round(curve["MB_per_s"] / plain["MB_per_s"], 3) if plain["MB_per_s"] else 0.0
    return {"plaintext": plain, "curve": curve, "curve_over_plaintext": ratio,
            "goal": {"target_ratio": CURVE_RATIO_GOAL, "measured_ratio": ratio, "met": ratio >= CURVE_RATIO_GOAL},
            "path": "OutLink (fp32 codec, checksummed tensorframe, PUSH) -> Inbox (PULL, sender check, "
                    "validation, decode), tcp loopback, 2 processes"}


def run(n: int, seconds: float, frames: int, base: int) -> dict:
    torch.set_num_threads(1)
    frame_port = base + 10
    peer = subprocess.Popen([sys.executable, "-m", "flad_bench.bus", "--peer", "--base", str(base)],
                            stdout=subprocess.PIPE, text=True)
    hub = BusHub(_cfg(base))
    bus = ZmqBus("bench-driver", _cfg(base))
    try:
        if peer.stdout.readline().strip() != "READY":
            raise RuntimeError("bench peer failed to start")
        ctrl = zmq.Context.instance().socket(zmq.REQ)
        ctrl.connect(f"tcp://127.0.0.1:{frame_port + 1}")
        results: dict = {"latency": {}, "throughput": {}}
        for name, (typename, msg) in _messages().items():
            results["latency"][name] = _latency(bus, name, typename, msg, n, warmup=max(5, n // 20))
        for name, (_typename, msg) in _messages().items():
            results["throughput"][name] = _throughput(bus, ctrl, name, msg, seconds)
        results["tensor_frames_4MB"] = _frames(ctrl, frame_port, frames, checksum=True)
        results["tensor_frames_4MB_no_checksum"] = _frames(ctrl, frame_port, frames, checksum=False)
        results["stage_link_4MB_curve"] = _stage_links(ctrl, base, frames)
        ctrl.send_json({"op": "quit"})
        ctrl.recv_json()
        peer.wait(10)
    finally:
        bus.close()
        hub.close()
        if peer.poll() is None:
            peer.kill()
    lat = results["latency"]["1.6MB_pointcloud2"]["one_way_p50_ms"]
    gbps = results["tensor_frames_4MB"]["GB_per_s"]
    results["goals"] = {
        "pointcloud2_p50_le_3ms": {"target_ms": 3.0, "measured_ms": lat, "met": lat <= 3.0},
        "tensor_frames_ge_1GBps": {"target_GB_per_s": 1.0, "measured_GB_per_s": gbps, "met": gbps >= 1.0},
    }
    results["conditions"] = {
        "host": platform.node(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "pyzmq": zmq.pyzmq_version(), "libzmq": zmq.zmq_version(),
        "transport": "tcp loopback, 2 processes, through the XSUB/XPUB hub (bus) / direct PUSH-PULL (frames) / "
                     "OutLink -> Inbox, plaintext and CURVE (stage links)",
        "zmq_io_threads": zmq.Context.instance().get(zmq.IO_THREADS), "curve": zmq.has("curve"),
        "torch_threads": 1, "load_note": "shared 2-core host; other work may inflate tails",
    }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flad bench bus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--n", type=int, default=None, help="ping-pong samples per message size [300]")
    parser.add_argument("--seconds", type=float, default=None, help="streaming time per throughput test [2.0]")
    parser.add_argument("--frames", type=int, default=None, help="4 MB tensor frames to stream [200]")
    parser.add_argument("--base", type=int, default=None,
                        help="first of 12 loopback ports to use [12 free ones]")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run in seconds (30 samples, 0.3 s streams, 10 frames): numbers are noisy")
    parser.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args([a for a in (sys.argv[1:] if argv is None else argv) if a != "--"])
    if args.peer:
        return _peer(args.base, args.base + 10)
    sizes = {"n": 30, "seconds": 0.3, "frames": 10} if args.quick else {"n": 300, "seconds": 2.0, "frames": 200}
    sizes.update({k: v for k, v in vars(args).items() if k in sizes and v is not None})
    n, seconds, frames = sizes["n"], sizes["seconds"], sizes["frames"]
    if min(n, frames) < 1 or seconds <= 0:
        print("flad bench bus: --n and --frames must be >= 1 and --seconds > 0", file=sys.stderr)
        return 2
    base = args.base
    if base is None:
        from flad_core.procs import free_port_base

        base = free_port_base(12)
    results = run(n, seconds, frames, base)
    if args.quick:
        results["quick"] = "smoke run: numbers are not meaningful"
    if args.json:
        print(json.dumps(results))
    else:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
