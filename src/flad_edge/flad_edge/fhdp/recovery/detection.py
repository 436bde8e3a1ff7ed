"""Who left, and when: departure detection and the edge's membership bookkeeping for quick recovery.

A departure is detected from a dropped TCP connection to the vehicle's control socket (a killed process:
milliseconds, `DisconnectWatch`), from heartbeats missing for the heartbeat timeout (a stopped or cut-off
vehicle), from an error report, or from a vehicle that cannot be reached. Every source calls
`Membership.notify`; the training threads act on it at their next check.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

import zmq
import zmq.utils.monitor

from flad_core.fleet import FleetConfig
from flad_core.roles import security_for
from flad_core.security import make_client

log = logging.getLogger(__name__)


class DisconnectWatch:
    """Detects a vehicle process vanishing from the TCP connection to its control socket (ZMQ monitor)."""

    def __init__(self, fleet: FleetConfig, identity: str, on_lost: Callable[[str, str, float], None]) -> None:
        self.fleet, self.identity, self.on_lost = fleet, identity, on_lost
        self.ctx = zmq.Context.instance()
        self._stop = threading.Event()
        self._watch: dict[str, tuple[zmq.Socket, zmq.Socket]] = {}
        self._connected: set[str] = set()
        # the key each control socket serves with: the vehicle's, or a pooled slot's whoever it plays (as the bus)
        security = security_for(fleet, identity)
        for v in fleet.vehicles:
            if not v.control:
                continue
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RECONNECT_IVL, 100)
            if security.curve:
                make_client(sock, security, identity, security.server_keys.get(v.control, v.id))
            mon = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
            sock.connect(v.control)
            self._watch[v.id] = (sock, mon)
        self._thread = threading.Thread(target=self._run, name="disconnect-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        by_mon = {}
        for vid, (_, mon) in self._watch.items():
            poller.register(mon, zmq.POLLIN)
            by_mon[mon] = vid
        while not self._stop.is_set():
            try:
                ready = dict(poller.poll(100))
            except zmq.ZMQError:
                return
            for mon, vid in by_mon.items():
                if mon in ready:
                    self._on_event(mon, vid)

    def _on_event(self, mon: zmq.Socket, vid: str) -> None:
        try:
            evt = zmq.utils.monitor.recv_monitor_message(mon, zmq.NOBLOCK)
        except zmq.ZMQError:
            return
        if evt["event"] == zmq.EVENT_CONNECTED:
            self._connected.add(vid)
        elif evt["event"] == zmq.EVENT_DISCONNECTED and vid in self._connected:
            self._connected.discard(vid)
            self.on_lost(vid, "disconnect", time.time())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        for sock, mon in self._watch.values():
            sock.disable_monitor()
            mon.close(0)
            sock.close(0)


def last_registration(rec) -> float:
    """When the vehicle last registered (a returning vehicle re-registers; its dwell time counts from then)."""
    times = [float(h.split("@", 1)[1]) for h in rec.history if h.startswith("registered@")]
    return max(times, default=rec.registered_at)


class Membership:
    """Failures not yet acted on, vehicles taken out of training, and those lost without a hand-over."""

    def __init__(self) -> None:
        self.departed: dict[str, float] = {}          # vehicle -> when it was taken out of training
        self.lost: set[str] = set()                   # departed without a hand-over (their layers: from backups)
        self._failures: dict[str, tuple[str, float]] = {}   # vehicle -> (reason, event time), not yet handled
        self._lock = threading.Lock()

    def notify(self, vehicle: str, reason: str, when: float | None = None) -> None:
        """A vehicle is gone (disconnect, heartbeat timeout, error, chaos tool); the training thread reacts."""
        when = time.time() if when is None else when
        with self._lock:
            if vehicle not in self._failures and vehicle not in self.departed:
                self._failures[vehicle] = (reason, when)
                log.warning("%s: lost (%s)", vehicle, reason)

    def failure_of(self, vehicle: str) -> tuple[str, float] | None:
        """(reason, event time) of a failure not yet acted on."""
        with self._lock:
            return self._failures.get(vehicle)

    def failed_among(self, members: Iterable[str]) -> tuple[set[str], str, float] | None:
        """(failed members, reasons, earliest event time), or None while every member is fine."""
        with self._lock:
            hit = {m: self._failures[m] for m in members if m in self._failures}
        if not hit:
            return None
        return set(hit), ", ".join(sorted({r for r, _ in hit.values()})), min(t for _, t in hit.values())

    def take_out(self, vehicles: Iterable[str], *, lost: bool = False) -> None:
        """Take `vehicles` out of training (a departure acted on); `lost`: without a hand-over."""
        now = time.time()
        with self._lock:
            for v in vehicles:
                self.departed[v] = now
                self._failures.pop(v, None)
                if lost:
                    self.lost.add(v)

    def alive(self, members: Iterable[str]) -> list[str]:
        with self._lock:
            return [m for m in members if m not in self.departed]

    def is_departed(self, vehicle: str) -> bool:
        with self._lock:
            return vehicle in self.departed

    def readmit(self, vehicle: str) -> None:
        with self._lock:
            self.departed.pop(vehicle, None)

    def forget(self, vehicles: Iterable[str]) -> None:
        """Clear every record of `vehicles` (a harness that manages membership itself, e.g. a relaunch)."""
        with self._lock:
            for v in vehicles:
                self._failures.pop(v, None)
                self.departed.pop(v, None)
                self.lost.discard(v)

    def departed_since(self) -> dict[str, float]:
        with self._lock:
            return dict(self.departed)


class ProgressTracker:
    """Per-step progress of running pipelines (the loss stage publishes one StepReport per step)."""

    def __init__(self) -> None:
        self.steps: dict[str, tuple[int, float]] = {}    # pipeline id -> (steps done, last stamp)
        self.first: dict[str, float] = {}                # pipeline id -> when its first step completed
        self.step_time: float | None = None              # smoothed seconds per step (planned departures)

    def on_progress(self, msg) -> None:
        now = time.time()
        prev = self.steps.get(msg.pipeline_id)
        self.steps[msg.pipeline_id] = (max(msg.steps_done, prev[0] if prev else 0), now)
        self.first.setdefault(msg.pipeline_id, now)
        if prev is not None and msg.steps_done == prev[0] + 1:
            dt = now - prev[1]
            self.step_time = dt if self.step_time is None else 0.7 * self.step_time + 0.3 * dt

    def done(self, pipeline_id: str) -> int:
        return self.steps.get(pipeline_id, (0, 0.0))[0]

    def first_step_at(self, pipeline_id: str) -> float | None:
        return self.first.get(pipeline_id)

    def estimate(self, steps: int) -> float:
        """Seconds `steps` more steps should take (0 before any step was timed)."""
        return (self.step_time or 0.0) * steps
