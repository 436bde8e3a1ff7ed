"""`RosBus`: the Bus interface over real ROS 2 topics (rclpy), for deployments that run ROS.

Thin by design: messages stay rosbags objects in FLAD's code; on the wire they are the same CDR
bytes, handed to rclpy as serialized messages (`raw=True` subscriptions, `publish(bytes)`), so no
per-type conversion code exists. Request/reply (the control plane) stays on ZeroMQ, as docs/architecture.md
("Transports") prescribes, through an embedded `ZmqBus`.

QoS follows the stream: sensor topics (images, point clouds, IMU, GNSS) are best-effort with a
shallow queue (`qos_profile_sensor_data`); everything else is reliable.

Spinning: a RosBus that creates its own node spins it on a background executor thread; one handed an
existing `node` leaves spinning to that node's owner (`ros_node.run_node`), since a node can belong
to one executor only.

Shutdown (`close`): stop accepting work, stop and join the spin thread, close ZeroMQ, shut the executor
down, destroy the node (or only this bus's endpoints on a borrowed node), and the last bus to close shuts
down the rclpy context it initialised. A context this module initialises has no rclpy signal handlers
(`SignalHandlerOptions.NO`): rclpy's handlers shut contexts down and trigger guard conditions from their
own C++ thread on SIGINT/SIGTERM, racing this orderly path (a process's own handlers decide what a signal
does; see ros_node.py).

Exercised only where rclpy imports (the real-ROS test tier, test_ros/); importing this module without
ROS raises ImportError, and `bus_factory.make_bus(transport="auto")` then falls back to ZeroMQ.
"""

from __future__ import annotations

import importlib
import logging
import re
import threading
from typing import Any

import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.signals import SignalHandlerOptions

from flad_core import codec
from flad_core.bus import Bus, BusConfig, BusError, Callback, Handler, ZmqBus
from flad_core.security import SecurityConfig

log = logging.getLogger(__name__)

SENSOR_TYPES = frozenset({"sensor_msgs/msg/Image", "sensor_msgs/msg/PointCloud2", "sensor_msgs/msg/CompressedImage",
                          "sensor_msgs/msg/Imu", "sensor_msgs/msg/NavSatFix", "sensor_msgs/msg/LaserScan"})
RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)

# rclpy's default context is process-wide: the buses that had to initialise it share it, and the last
# of them to close shuts it down (a context someone else initialised is left to its owner).
_context_lock = threading.Lock()
_context_users = 0


def qos_for(topic: str, typename: str) -> QoSProfile:
    """Best-effort for sensor streams (fresh data beats complete data), reliable for the rest."""
    return qos_profile_sensor_data if codec.normalize_type(typename) in SENSOR_TYPES else RELIABLE


def ros_message_type(typename: str) -> type:
    """The rclpy (rosidl-generated) class of `pkg/msg/Name`; BusError naming the type if it is not built.

    (rosidl_runtime_py.utilities.get_message does the same, but no wheel of it exists on PyPI.)
    """
    name = codec.normalize_type(typename)
    package, kind, cls_name = name.split("/")
    try:
        return getattr(importlib.import_module(f"{package}.{kind}"), cls_name)
    except (ImportError, AttributeError) as exc:
        raise BusError(f"{name}: no generated ROS type ({exc}); is the interface package built and sourced?") from exc


def node_name(identity: str) -> str:
    """A valid ROS node name for a FLAD identity (`v-0` -> `v_0`)."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", identity)
    return name if re.match(r"[A-Za-z_]", name) else f"n_{name}"


def _acquire_context() -> bool:
    """Initialise rclpy if nobody has; True when this caller now shares the bus-owned context."""
    global _context_users
    with _context_lock:
        if _context_users == 0 and rclpy.ok():
            return False
        if _context_users == 0:
            rclpy.init(signal_handler_options=SignalHandlerOptions.NO)
        _context_users += 1
        return True


def _release_context() -> None:
    global _context_users
    with _context_lock:
        _context_users -= 1
        if _context_users == 0 and rclpy.ok():
            rclpy.shutdown()


class RosBus(Bus):
    """Pub/sub on rclpy topics; request/reply on ZeroMQ. Callbacks run on rclpy executor threads."""

    def __init__(self, identity: str, cfg: BusConfig | None = None, security: SecurityConfig | None = None,
                 node: Node | None = None) -> None:
        self._own_context = _acquire_context()
        self.identity = identity
        self.node = node or rclpy.create_node(node_name(identity))
        self._own_node = node is None
        self._publishers: dict[str, Any] = {}
        self._subscriptions: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False
        self._zmq = ZmqBus(identity, cfg, security)
        self.dropped = 0   # messages rejected by validation (counted, logged), as on ZmqBus
        self._executor: SingleThreadedExecutor | None = None
        self._spin: threading.Thread | None = None
        self._stop_spin = threading.Event()
        if self._own_node:
            self._executor = SingleThreadedExecutor()
            self._executor.add_node(self.node)
            self._spin = threading.Thread(target=self._spin_loop, name=f"rosbus-{identity}", daemon=True)
            self._spin.start()

    def _spin_loop(self) -> None:
        """The executor's only spinner, until close() asks it to stop (checked at least every 0.1 s).

        (Not `executor.spin()` + `executor.shutdown()` from close(): rclpy 7.1's Executor.shutdown does not wait
        for a spin in progress and destroys the guard conditions that spin is waiting on.)
        """
        executor = self._executor
        assert executor is not None
        try:
            while not self._stop_spin.is_set() and executor.context.ok():
                executor.spin_once(timeout_sec=0.1)
        except ExternalShutdownException:   # someone else shut the context down: nothing left to spin
            pass
        except Exception:
            log.exception("rosbus %s: the executor failed; no more messages are delivered", self.identity)

    def publish(self, topic: str, msg: Any) -> None:
        """Encode `msg` once (rosbags CDR) and publish the bytes; the publisher is made on first use."""
        typename = codec.normalize_type(msg.__msgtype__)
        payload = codec.encode(msg, typename)
        with self._lock:
            if self._closed:
                raise BusError("bus is closed")
            pub = self._publishers.get(topic)
            if pub is None:
                pub = self.node.create_publisher(ros_message_type(typename), topic, qos_for(topic, typename))
                self._publishers[topic] = pub
        try:
            pub.publish(payload)  # bytes: rclpy publishes a serialized message as it is
        except Exception as exc:  # InvalidHandle/RCLError: close() destroyed the publisher meanwhile
            if self._closed:
                raise BusError("bus is closed") from exc
            raise

    def subscribe(self, topic: str, typename: str, callback: Callback, *, finite: bool = False) -> None:
        """Call `callback(msg)` for every valid `typename` message on `topic`; malformed ones are counted."""
        typename = codec.normalize_type(typename)
        codec.message_class(typename)

        def on_raw(data: bytes) -> None:
            if self._closed:    # closing: what the executor still delivers is not handed over any more
                return
            try:
                msg = codec.decode(data, typename, finite=finite)
            except codec.CodecError as exc:
                with self._lock:
                    self.dropped += 1
                log.warning("rejected message on %s: %s", topic, exc)
                return
            try:
                callback(msg)
            except BusError:
                if not self._closed:   # else: the callback's publish met close() running meanwhile
                    log.exception("subscriber callback for %s raised", topic)
            except Exception:   # as on ZmqBus: one bad callback must not stop the executor's spin
                log.exception("subscriber callback for %s raised", topic)

        with self._lock:
            if self._closed:
                raise BusError("bus is closed")
            sub = self.node.create_subscription(ros_message_type(typename), topic, on_raw,
                                                qos_for(topic, typename), raw=True)
            self._subscriptions.append(sub)

    def serve(self, service: str, request_type: str, response_type: str, handler: Handler,
              address: str | None = None) -> None:
        self._zmq.serve(service, request_type, response_type, handler, address)

    def request(self, service: str, msg: Any, response_type: str, timeout_s: float | None = None,
                address: str | None = None) -> Any:
        return self._zmq.request(service, msg, response_type, timeout_s, address)

    def close(self) -> None:
        """Stop spinning (own node), drop publishers and subscriptions, close ZeroMQ; idempotent.

        Order: no new publish/subscribe, and subscriber callbacks are no longer called; the spin thread
        stopped and joined; ZeroMQ closed (no service handler runs past it); the executor shut down; then the
        node (or this bus's endpoints) destroyed; then the context, by the last bus that initialised it.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            endpoints = [*self._publishers.values(), *self._subscriptions]
            self._publishers.clear()
            self._subscriptions.clear()
        if self._spin is not None:
            self._stop_spin.set()
            self._executor.wake()        # out of its wait now rather than at the next 0.1 s timeout
            self._spin.join(timeout=10.0)
        self._zmq.close()                # no service handler runs past this point
        if self._spin is not None:
            if self._spin.is_alive():
                # a callback that does not return: destroying the node (or the context) under it would crash
                # rclpy, so both are left to process exit -- logged, as this is a bug in that callback
                log.error("rosbus %s: the executor thread did not stop within 10 s (a callback still runs); "
                          "its node and context are left alive", self.identity)
                return
            self._executor.remove_node(self.node)
            self._executor.shutdown()    # nothing spins it any more: safe to destroy its guard conditions
        if self._own_node:
            self.node.destroy_node()     # destroys its publishers and subscriptions too
        else:
            for ep in endpoints:         # the owner keeps its node; take back only what this bus made
                if hasattr(ep, "publish"):
                    self.node.destroy_publisher(ep)
                else:
                    self.node.destroy_subscription(ep)
        if self._own_context:
            _release_context()
