"""`RosBus`: the Bus interface over real ROS 2 topics (rclpy), for deployments that run ROS.

Thin by design: messages stay rosbags objects in FLAD's code; on the wire they are the same CDR
bytes, handed to rclpy as serialized messages (`raw=True` subscriptions, `publish(bytes)`), so no
per-type conversion code exists. Request/reply (the control plane) stays on ZeroMQ, as DESIGN.md
§3 prescribes, through an embedded `ZmqBus`.

QoS follows the stream: sensor topics (`/carla/...` images, point clouds) are best-effort with a
shallow queue (`qos_profile_sensor_data`); everything else is reliable.

Exercised only where rclpy imports (the real-ROS test tier); importing this module without ROS
raises ImportError, and `make_bus` then falls back to ZeroMQ.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import rclpy
from rclpy.executors import MultiThreadedExecutor
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rosidl_runtime_py.utilities import get_message

from flad_core import codec
from flad_core.bus import Bus, BusConfig, Callback, Handler, ZmqBus
from flad_core.security import SecurityConfig

log = logging.getLogger(__name__)

SENSOR_TYPES = {"sensor_msgs/msg/Image", "sensor_msgs/msg/PointCloud2", "sensor_msgs/msg/CompressedImage",
                "sensor_msgs/msg/Imu", "sensor_msgs/msg/NavSatFix"}
RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)


def qos_for(topic: str, typename: str) -> QoSProfile:
    """Best-effort for sensor streams (fresh data beats complete data), reliable for the rest."""
    return qos_profile_sensor_data if typename in SENSOR_TYPES else RELIABLE


class RosBus(Bus):
    """Pub/sub on rclpy topics; request/reply on ZeroMQ. Callbacks run on a background executor."""

    def __init__(self, identity: str, cfg: BusConfig | None = None, security: SecurityConfig | None = None,
                 node: Node | None = None) -> None:
        if not rclpy.ok():
            rclpy.init()
        self.identity = identity
        self.node = node or rclpy.create_node(identity.replace("-", "_"))
        self._own_node = node is None
        self._publishers: dict[str, Any] = {}
        self._subscriptions: list[Any] = []
        self._lock = threading.Lock()
        self._zmq = ZmqBus(identity, cfg, security)
        self.dropped = 0
        self._executor = MultiThreadedExecutor()
        self._executor.add_node(self.node)
        self._spin = threading.Thread(target=self._executor.spin, name=f"rosbus-{identity}", daemon=True)
        self._spin.start()

    def publish(self, topic: str, msg: Any) -> None:
        typename = codec.normalize_type(msg.__msgtype__)
        with self._lock:
            pub = self._publishers.get(topic)
            if pub is None:
                pub = self.node.create_publisher(get_message(typename), topic, qos_for(topic, typename))
                self._publishers[topic] = pub
        pub.publish(codec.encode(msg, typename))  # rclpy publishes serialized bytes as they are

    def subscribe(self, topic: str, typename: str, callback: Callback, *, finite: bool = False) -> None:
        typename = codec.normalize_type(typename)

        def on_raw(data: bytes) -> None:
            try:
                msg = codec.decode(data, typename, finite=finite)
            except codec.CodecError as exc:
                self.dropped += 1
                log.warning("rejected message on %s: %s", topic, exc)
                return
            callback(msg)

        sub = self.node.create_subscription(get_message(typename), topic, on_raw, qos_for(topic, typename), raw=True)
        self._subscriptions.append(sub)

    def serve(self, service: str, request_type: str, response_type: str, handler: Handler,
              address: str | None = None) -> None:
        self._zmq.serve(service, request_type, response_type, handler, address)

    def request(self, service: str, msg: Any, response_type: str, timeout_s: float | None = None,
                address: str | None = None) -> Any:
        return self._zmq.request(service, msg, response_type, timeout_s, address)

    def close(self) -> None:
        self._executor.shutdown()
        if self._own_node:
            self.node.destroy_node()
        self._zmq.close()

