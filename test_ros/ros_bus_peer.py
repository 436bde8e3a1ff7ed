"""A second process for the RosBus tests: echoes messages over real rclpy topics, reports on exit.

    python ros_bus_peer.py IDENTITY [SERVICE_ADDRESS]

Subscribes (through flad_core's RosBus) to /rosbus_test/in/<stream> and republishes every valid
message on /rosbus_test/out/<stream>; serves `echo` on ZeroMQ at SERVICE_ADDRESS when given. Prints
`ready` once subscribed, and on SIGTERM/SIGINT closes the bus and prints one JSON line with what it
received and how many malformed messages it dropped.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections import Counter

from flad_core import codec
from flad_core.bus import BusConfig
from flad_core.bus_ros import RosBus

STREAMS = {"heartbeat": "flad_msgs/msg/Heartbeat", "features": "flad_msgs/msg/EncodedFeatures",
           "image": "sensor_msgs/msg/Image", "raw": "flad_msgs/msg/Heartbeat"}


def main(identity: str, service_address: str | None) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    cfg = BusConfig(services={"echo": service_address} if service_address else {})
    bus = RosBus(identity, cfg)
    received: Counter[str] = Counter()

    def echo(stream: str):
        def on_msg(msg) -> None:
            received[stream] += 1
            bus.publish(f"/rosbus_test/out/{stream}", msg)
        return on_msg

    for stream, typename in STREAMS.items():
        bus.subscribe(f"/rosbus_test/in/{stream}", typename, echo(stream))
    if service_address:
        bus.serve("echo", "flad_msgs/msg/Ack", "flad_msgs/msg/Ack",
                  lambda req: codec.new("flad_msgs/msg/Ack", ok=True, message=f"{identity}: {req.message}"))
    print("ready", flush=True)
    stop.wait()
    bus.close()
    print(json.dumps({"identity": identity, "received": dict(received), "dropped": bus.dropped}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None))
