"""The message bus: publish/subscribe by topic and type, and request/reply, across processes.

`ZmqBus` is the default transport (works on loopback and across machines by address); `RosBus` in
`bus_ros.py` is a thin rclpy implementation for a ROS 2 deployment. Both carry the same CDR bytes,
encoded from the `.msg` files, so a node cannot tell which one it runs on; `bus_factory.make_bus` picks one.

ZeroMQ topology: a `BusHub` (XSUB/XPUB forwarder, usually hosted by the edge) lets any number of
processes publish and subscribe without knowing each other's addresses. Request/reply goes straight
to the serving process's ROUTER socket, named in `BusConfig.services`.

Wire format (ZeroMQ multipart):
  pub/sub:  [topic, typename, cdr]
  request:  [b"", request_id, service, typename, cdr]       (DEALER -> ROUTER)
  reply:    [b"", request_id, b"ok" | b"err", typename, cdr | utf-8 error text]
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.utils.monitor

from flad_core import codec
from flad_core.config import ConfigError
from flad_core.security import (
    CurveAuthority,
    SecurityConfig,
    SecurityError,
    make_client,
    make_server,
    require_allow_list,
)

log = logging.getLogger(__name__)

#: handshake outcomes a CURVE requester watches for: its key refused (AUTH), or no handshake at all (a server
#: with another key pair drops the connection, NO_DETAIL; a plaintext one fails the protocol)
HANDSHAKE_FAILURES = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                      | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)

Callback = Callable[[Any], None]
Handler = Callable[[Any], Any]


class BusError(RuntimeError):
    """A bus operation failed (timeout, remote error, closed bus)."""


class RequestTimeoutError(BusError):
    """No reply arrived in time."""


class RemoteError(BusError):
    """The serving process answered with an error (its text is the message)."""


@dataclass
class BusConfig:
    """Addresses of one bus. Loopback defaults; a real fleet puts the edge's address here."""

    hub_pub: str = "tcp://127.0.0.1:7100"     # hub XSUB: publishers connect here
    hub_sub: str = "tcp://127.0.0.1:7101"     # hub XPUB: subscribers connect here
    services: dict[str, str] = field(default_factory=dict)  # service name -> ROUTER address
    max_message_bytes: int = 256 * 1024 * 1024
    high_water_mark: int = 1000
    request_timeout_s: float = 5.0

    def validate(self) -> None:
        addresses = {"hub_pub": self.hub_pub, "hub_sub": self.hub_sub,
                     **{f"services.{k}": v for k, v in self.services.items()}}
        for key, address in addresses.items():
            if not re.fullmatch(r"(tcp://[^:/]+:\d+|ipc://.+|inproc://.+)", address):
                raise ConfigError(key, f"bad ZeroMQ address {address!r} (expected e.g. tcp://127.0.0.1:7100)")
        if self.max_message_bytes <= 0:
            raise ConfigError("max_message_bytes", "must be positive")
        if self.request_timeout_s <= 0:
            raise ConfigError("request_timeout_s", "must be positive")


def bind_address(address: str) -> str:
    """The address a server binds for the address its clients connect to.

    Clients may name the server by DNS (`tcp://edge:7100` in a compose network), but ZeroMQ binds
    interfaces or IPs: a TCP address with a host name binds every interface on that port; numeric
    IPs, `*` and other transports bind as given; `localhost` binds loopback.
    """
    match = re.fullmatch(r"tcp://([^:]+):(\d+)", address)
    if not match:
        return address
    host, port = match.groups()
    if host == "localhost":
        return f"tcp://127.0.0.1:{port}"
    if host == "*" or re.fullmatch(r"[0-9.]+", host):
        return address
    return f"tcp://*:{port}"


class Bus(ABC):
    """Topic pub/sub and request/reply with CDR-encoded ROS messages."""

    @abstractmethod
    def publish(self, topic: str, msg: Any) -> None: ...

    @abstractmethod
    def subscribe(self, topic: str, typename: str, callback: Callback, *, finite: bool = False) -> None: ...

    @abstractmethod
    def serve(self, service: str, request_type: str, response_type: str, handler: Handler,
              address: str | None = None) -> None: ...

    @abstractmethod
    def request(self, service: str, msg: Any, response_type: str, timeout_s: float | None = None,
                address: str | None = None) -> Any: ...

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Bus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _apply_limits(sock: zmq.Socket, cfg: BusConfig) -> None:
    sock.setsockopt(zmq.MAXMSGSIZE, cfg.max_message_bytes)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, cfg.high_water_mark)
    sock.setsockopt(zmq.RCVHWM, cfg.high_water_mark)


class BusHub:
    """XSUB/XPUB forwarder: the meeting point of every publisher and subscriber on one bus."""

    def __init__(self, cfg: BusConfig, security: SecurityConfig | None = None, identity: str = "edge",
                 context: zmq.Context | None = None) -> None:
        self.cfg = cfg
        self.ctx = context or zmq.Context.instance()
        security = security or SecurityConfig()
        self._auth = (CurveAuthority.for_context(self.ctx, require_allow_list(security, "bus hub"))
                      if security.curve else None)
        self._xsub = self.ctx.socket(zmq.XSUB)
        self._xpub = self.ctx.socket(zmq.XPUB)
        for sock in (self._xsub, self._xpub):
            _apply_limits(sock, cfg)
            if security.curve:
                make_server(sock, security, identity)
        self._xsub.bind(bind_address(cfg.hub_pub))
        self._xpub.bind(bind_address(cfg.hub_sub))
        self._ctrl_addr = f"inproc://flad-hub-{id(self)}"
        self._ctrl = self.ctx.socket(zmq.PAIR)
        self._ctrl.bind(self._ctrl_addr)
        self._thread = threading.Thread(target=self._run, name="bus-hub", daemon=True)
        self._thread.start()
        log.info("bus hub up: publishers -> %s, subscribers -> %s", cfg.hub_pub, cfg.hub_sub)

    def _run(self) -> None:
        ctrl = self.ctx.socket(zmq.PAIR)
        ctrl.connect(self._ctrl_addr)
        try:
            zmq.proxy_steerable(self._xsub, self._xpub, None, ctrl)
        except zmq.ZMQError as exc:  # context terminated
            log.debug("hub proxy ended: %s", exc)
        finally:
            ctrl.close(0)

    def close(self) -> None:
        if self._thread.is_alive():
            self._ctrl.send(b"TERMINATE")
            self._thread.join(timeout=2.0)
        for sock in (self._ctrl, self._xsub, self._xpub):
            sock.close(0)
        if self._auth:
            self._auth.stop()


class ZmqBus(Bus):
    """One process's endpoint on a ZeroMQ bus. Callbacks and handlers run on one receive thread."""

    def __init__(self, identity: str, cfg: BusConfig | None = None, security: SecurityConfig | None = None,
                 context: zmq.Context | None = None) -> None:
        self.identity = identity
        self.cfg = cfg or BusConfig()
        self.security = security or SecurityConfig()
        self.ctx = context or zmq.Context.instance()
        self._auth: CurveAuthority | None = None
        self._lock = threading.Lock()
        self._pub: zmq.Socket | None = None
        self._sub: zmq.Socket | None = None
        self._subs: dict[str, list[tuple[str, Callback, bool]]] = {}
        self._routers: dict[str, zmq.Socket] = {}          # address -> ROUTER
        self._handlers: dict[str, tuple[str, str, Handler]] = {}
        self._pending: list[tuple[str, Any]] = []          # sockets to add to the poller
        self._local = threading.local()
        self._req_ids = itertools.count(1)
        self._closed = threading.Event()
        self._wake_addr = f"inproc://flad-bus-wake-{id(self)}-{os.getpid()}"
        self._wake_rx = self.ctx.socket(zmq.PAIR)
        self._wake_rx.bind(self._wake_addr)
        self._wake_tx = self.ctx.socket(zmq.PAIR)
        self._wake_tx.connect(self._wake_addr)
        self.dropped = 0   # messages rejected by validation (counted, logged)
        self.errors: list[str] = []   # socket set-up failures on the receive thread
        self._thread = threading.Thread(target=self._loop, name=f"bus-{identity}", daemon=True)
        self._thread.start()

    # -- sockets ----------------------------------------------------------------------------------
    def _client(self, sock: zmq.Socket, address: str = "") -> zmq.Socket:
        """Limits, and with CURVE this process's key pair and the public key of the server at `address`
        (`security.server_keys`; the hub and unlisted addresses: `security.server`)."""
        _apply_limits(sock, self.cfg)
        if self.security.curve:
            make_client(sock, self.security, self.identity, self.security.server_key(address))
        return sock

    def _wake(self) -> None:
        with self._lock:
            self._wake_tx.send(b"")

    # -- pub/sub ----------------------------------------------------------------------------------
    def publish(self, topic: str, msg: Any) -> None:
        """Encode and send `msg` on `topic`; never blocks (drops at the high-water mark, like ROS best-effort)."""
        typename = codec.normalize_type(msg.__msgtype__)
        self.publish_raw(topic, typename, codec.encode_view(msg, typename))

    def publish_raw(self, topic: str, typename: str, payload: bytes | memoryview) -> None:
        if self._closed.is_set():
            raise BusError("bus is closed")
        with self._lock:
            if self._pub is None:
                self._pub = self._client(self.ctx.socket(zmq.PUB), self.cfg.hub_pub)
                self._pub.connect(self.cfg.hub_pub)
            self._pub.send_multipart([topic.encode(), typename.encode(), payload],
                                     copy=memoryview(payload).nbytes < 65536)

    def subscribe(self, topic: str, typename: str, callback: Callback, *, finite: bool = False) -> None:
        """Call `callback(msg)` for every valid `typename` message on `topic` (exact match)."""
        typename = codec.normalize_type(typename)
        codec.message_class(typename)
        with self._lock:
            self._subs.setdefault(topic, []).append((typename, callback, finite))
            self._pending.append(("sub", topic))
        self._wake()

    # -- request/reply ----------------------------------------------------------------------------
    def serve(self, service: str, request_type: str, response_type: str, handler: Handler,
              address: str | None = None) -> None:
        """Answer requests to `service` with `handler(request) -> response`, on `address` (default: the
        service's address in `cfg.services`). Several services may share one address."""
        address = address or self.cfg.services.get(service)
        if address is None:
            raise BusError(f"service {service!r} has no address in the bus config (services: "
                           f"{sorted(self.cfg.services)})")
        request_type, response_type = codec.normalize_type(request_type), codec.normalize_type(response_type)
        with self._lock:
            self._handlers[service] = (request_type, response_type, handler)
            self._pending.append(("serve", address))
        self._wake()

    def request(self, service: str, msg: Any, response_type: str, timeout_s: float | None = None,
                address: str | None = None) -> Any:
        """Send `msg` to `service` (at `address`, default from `cfg.services`) and wait for its typed reply.

        Raises RequestTimeoutError (with a CURVE hint when the handshake was refused), RemoteError when the
        server answered with an error, CodecError when the reply is malformed.
        """
        address = address or self.cfg.services.get(service)
        if address is None:
            raise BusError(f"service {service!r} has no address in the bus config")
        timeout_s = self.cfg.request_timeout_s if timeout_s is None else timeout_s
        response_type = codec.normalize_type(response_type)
        typename = codec.normalize_type(msg.__msgtype__)
        payload = codec.encode(msg, typename)
        sock, monitor = self._dealer(address)
        req_id = str(next(self._req_ids)).encode()
        sock.send_multipart([b"", req_id, service.encode(), typename.encode(), payload])
        deadline_ms = int(timeout_s * 1000)
        while True:
            if not sock.poll(deadline_ms):
                failed = self._handshake_failures(monitor)
                self._drop_dealer(address)
                if zmq.EVENT_HANDSHAKE_FAILED_AUTH in failed:
                    raise SecurityError(f"{service} at {address} refused our CURVE key "
                                        f"{self.security.identity or self.identity!r} (is its public key in the "
                                        "server's allow-list?)")
                raise RequestTimeoutError(f"no reply from {service} at {address} within {timeout_s:.1f} s"
                                          + (self._curve_hint(address) if failed else ""))
            frames = sock.recv_multipart()
            if len(frames) != 5 or frames[1] != req_id:
                continue  # a late reply to an earlier, timed-out request
            _, _, status, rtype, body = frames
            if status != b"ok":
                raise RemoteError(f"{service}: {body.decode(errors='replace')}")
            if rtype.decode() != response_type:
                raise codec.CodecError(response_type, f"reply has type {rtype.decode()!r}")
            return codec.decode(body, response_type)

    def _dealer(self, address: str) -> tuple[zmq.Socket, zmq.Socket | None]:
        cache = getattr(self._local, "dealers", None)
        if cache is None:
            cache = self._local.dealers = {}
        if address not in cache:
            sock = self._client(self.ctx.socket(zmq.DEALER), address)
            monitor = sock.get_monitor_socket(HANDSHAKE_FAILURES) if self.security.curve else None
            sock.connect(address)
            cache[address] = (sock, monitor)
        return cache[address]

    def _drop_dealer(self, address: str) -> None:
        sock, monitor = self._local.dealers.pop(address)
        if monitor is not None:
            sock.disable_monitor()
            monitor.close(0)
        sock.close(0)

    def _curve_hint(self, address: str) -> str:
        """Why a CURVE handshake that the server did not refuse by key still failed: the server at `address`
        holds another key pair than the one we expect there, or runs without CURVE."""
        return (f"; the CURVE handshake failed: we expect server key {self.security.server_key(address)!r} there "
                "(security.server_keys, else security.server), the server has another key pair or no CURVE")

    @staticmethod
    def _handshake_failures(monitor: zmq.Socket | None) -> set[int]:
        """The handshake-failure events the dealer's monitor saw (none without CURVE)."""
        events: set[int] = set()
        while monitor is not None and monitor.poll(0):
            events.add(zmq.utils.monitor.recv_monitor_message(monitor)["event"])
        return events

    # -- receive loop -----------------------------------------------------------------------------
    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._wake_rx, zmq.POLLIN)
        while not self._closed.is_set():
            with self._lock:
                pending, self._pending = self._pending, []
            for kind, arg in pending:
                try:
                    self._setup(kind, arg, poller)
                except Exception as exc:  # a bad address or key must not kill the receive thread
                    log.error("%s: cannot %s %s: %s", self.identity, kind, arg, exc)
                    self.errors.append(f"{kind} {arg}: {exc}")
            try:
                ready = dict(poller.poll(500))
            except zmq.ZMQError:
                break
            if self._wake_rx in ready:
                self._wake_rx.recv()
            if self._sub is not None and self._sub in ready:
                for _ in range(256):  # drain a burst without re-polling every message
                    try:
                        frames = self._sub.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    try:
                        self._dispatch(frames)
                    except Exception:  # a receive-path bug drops this message, never the receive thread
                        self.dropped += 1
                        log.exception("%s: dispatching a message failed; dropped", self.identity)
            for router in self._routers.values():
                if router in ready:
                    try:
                        self._answer(router, router.recv_multipart())
                    except Exception:  # likewise: the other services on this thread keep answering
                        self.dropped += 1
                        log.exception("%s: answering a request failed; dropped", self.identity)

    def _setup(self, kind: str, arg: str, poller: zmq.Poller) -> None:
        if kind == "sub":
            if self._sub is None:
                self._sub = self._client(self.ctx.socket(zmq.SUB), self.cfg.hub_sub)
                self._sub.connect(self.cfg.hub_sub)
                poller.register(self._sub, zmq.POLLIN)
            self._sub.setsockopt(zmq.SUBSCRIBE, arg.encode())
        elif kind == "serve" and arg not in self._routers:
            self._routers[arg] = self._bind_router(arg)
            poller.register(self._routers[arg], zmq.POLLIN)

    def _bind_router(self, address: str) -> zmq.Socket:
        curve = self.security.curve
        allow = require_allow_list(self.security, f"{self.identity} serving on {address}") if curve else None
        sock = self.ctx.socket(zmq.ROUTER)
        _apply_limits(sock, self.cfg)
        if allow is not None:
            if self._auth is None:
                self._auth = CurveAuthority.for_context(self.ctx, allow)
            make_server(sock, self.security, self.identity)
        sock.bind(bind_address(address))
        log.debug("%s serving on %s", self.identity, address)
        return sock

    def _dispatch(self, frames: list[zmq.Frame]) -> None:
        if len(frames) != 3:
            self._reject(f"pub/sub message with {len(frames)} frames (expected 3)")
            return
        topic = frames[0].bytes.decode(errors="replace")
        typename = frames[1].bytes.decode(errors="replace")
        for want_type, callback, finite in self._subs.get(topic, ()):
            if typename != want_type:
                self._reject(f"{topic}: got type {typename!r}, subscribed as {want_type!r}")
                continue
            try:
                msg = codec.decode(frames[2].buffer, want_type, finite=finite)
            except Exception as exc:  # CodecError; anything else from a decoder is rejected the same way
                self._reject(f"{topic}: {exc}")
                continue
            try:
                callback(msg)
            except Exception:
                log.exception("subscriber callback for %s raised", topic)

    def _answer(self, router: zmq.Socket, frames: list[bytes]) -> None:
        if len(frames) != 6:
            self._reject(f"request with {len(frames)} frames (expected 6)")
            return
        peer, empty, req_id, service_b, typename_b, body = frames
        service, typename = service_b.decode(errors="replace"), typename_b.decode(errors="replace")

        def reply(status: bytes, rtype: str, payload: bytes) -> None:
            router.send_multipart([peer, empty, req_id, status, rtype.encode(), payload])

        entry = self._handlers.get(service)
        if entry is None:
            self._reject(f"request for unknown service {service!r}")
            reply(b"err", "", f"unknown service {service!r}".encode())
            return
        request_type, response_type, handler = entry
        if typename != request_type:
            self._reject(f"{service}: request of type {typename!r}, expected {request_type!r}")
            reply(b"err", "", f"{service} expects {request_type}, got {typename}".encode())
            return
        try:
            request = codec.decode(body, request_type, finite=True)
        except Exception as exc:  # CodecError; anything else from a decoder is rejected the same way
            self._reject(f"{service}: {exc}")
            reply(b"err", "", f"bad request: {exc}".encode())
            return
        try:
            response = handler(request)
            reply(b"ok", response_type, codec.encode(response, response_type))
        except Exception as exc:
            log.exception("handler for %s raised", service)
            reply(b"err", "", f"{type(exc).__name__}: {exc}".encode())

    def _reject(self, reason: str) -> None:
        self.dropped += 1
        log.warning("rejected message on %s: %s", self.identity, reason)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._wake()
        self._thread.join(timeout=2.0)
        with self._lock:
            for sock in [self._pub, self._sub, self._wake_rx, self._wake_tx, *self._routers.values()]:
                if sock is not None:
                    sock.close(0)
        for sock, monitor in getattr(self._local, "dealers", {}).values():
            if monitor is not None:
                monitor.close(0)
            sock.close(0)
        if self._auth:
            self._auth.stop()

