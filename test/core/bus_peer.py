"""A separate process for bus tests: hosts the hub, serves `echo`, relays /t/in -> /t/out.

Run as a script by the tests (a real OS process on loopback); exits on SIGTERM.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from flad_core import codec
from flad_core.bus import BusConfig, BusHub, ZmqBus
from flad_core.procs import install_stop_handlers
from flad_core.runs import setup_logging
from flad_core.security import SecurityConfig


def bus_config(base: int) -> BusConfig:
    return BusConfig(hub_pub=f"tcp://127.0.0.1:{base}", hub_sub=f"tcp://127.0.0.1:{base + 1}",
                     services={"echo": f"tcp://127.0.0.1:{base + 2}"}, request_timeout_s=3.0)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", type=int, required=True)
    parser.add_argument("--keys", type=Path, default=None, help="CURVE keys dir (server key 'server', allowed/)")
    args = parser.parse_args()
    setup_logging("INFO")
    cfg = bus_config(args.base)
    sec = SecurityConfig()
    if args.keys:
        sec = SecurityConfig(curve=True, keys_dir=args.keys, identity="server", server="server",
                             allow_dir=args.keys / "allowed")
    hub = BusHub(cfg, sec, "server")
    bus = ZmqBus("server", cfg, sec)

    def echo(msg):
        if msg.vehicle_id == "explode":
            raise ValueError("asked to explode")
        return codec.new("flad_msgs/msg/Ack", ok=True, message=f"echo {msg.vehicle_id} {msg.seq}")

    def relay(msg):
        bus.publish("/t/out", codec.new("flad_msgs/msg/Heartbeat", vehicle_id=msg.vehicle_id, seq=msg.seq + 1000))

    bus.serve("echo", "flad_msgs/msg/Heartbeat", "flad_msgs/msg/Ack", echo)
    bus.subscribe("/t/in", "flad_msgs/msg/Heartbeat", relay)
    stop = threading.Event()
    install_stop_handlers(stop)
    print("READY", flush=True)
    stop.wait()
    print(f"DROPPED {bus.dropped}", flush=True)
    bus.close()
    hub.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
