"""The vehicle process's control-plane side: register with the edge, heartbeat, report status.

This is what a vehicle runs before and between training work: the edge learns who is in coverage,
with which device profile, where, and for how long (predicted dwell time). Training, sensing and
driving attach to the same bus connection as those capabilities land.

The edge may crash and be started again. Once registered, the agent watches its TCP connection to the
edge's bus hub (`EdgeWatch`: a ZeroMQ socket monitor, with ZMTP heartbeats for an edge that goes silent
without closing it): a killed edge is noticed within milliseconds, a silent one within the fleet's
heartbeat timeout. The agent logs one line (which edge, where, since when), tells its `edge_listeners`
(a trainer aborts its pipeline), and registers again by itself -- bounded exponential backoff with seeded
jitter, tried at once when the hub answers again -- because a restarted edge's registry starts empty.
ZeroMQ reconnects every socket on its own; only the registry has to learn about the vehicle again.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator

import zmq
import zmq.utils.monitor

from flad_core import codec
from flad_core.bus import Bus, BusError, ZmqBus
from flad_core.fleet import DeviceProfile, FleetConfig, VehicleSpec
from flad_core.procs import install_stop_handlers
from flad_core.protocol import SERVICE_REGISTER, TOPIC_HEARTBEAT, TOPIC_ROUND, TOPIC_STATUS
from flad_core.roles import add_role_args, fleet_from_args, security_for, setup_role_logging
from flad_core.security import SecurityConfig, make_client

log = logging.getLogger("flad_vehicle.agent")  # not __name__: this also runs as __main__

# constants come from the .msg files (the single source of truth)
Heartbeat = codec.message_class("flad_msgs/msg/Heartbeat")
RoundControl = codec.message_class("flad_msgs/msg/RoundControl")

#: re-registration after the edge was lost: first retry delay, doubling up to the cap (plus seeded jitter)
BACKOFF_START_S = 0.25
BACKOFF_CAP_S = 5.0
#: how long one registration attempt waits for the edge's answer
REGISTER_TRY_S = 2.0


class EdgeWatch:
    """Watches the TCP connection to the edge's bus hub and reports when it goes and when it is back.

    A SUB socket that subscribes to nothing is connected to the hub's subscriber side (the edge process hosts
    the hub); a socket monitor reports its connection events. A killed edge's kernel closes the connection:
    `on_lost` within milliseconds. An edge that goes silent (host down, network cut) stops answering the
    ZMTP heartbeats: `on_lost` after `timeout_s`. ZeroMQ keeps reconnecting; `on_back` fires when a
    handshake with the hub succeeds again. Both callbacks run on the watch thread."""

    def __init__(self, address: str, identity: str, security: SecurityConfig, on_lost: Callable[[float], None],
                 on_back: Callable[[], None], interval_s: float = 0.5, timeout_s: float = 3.0) -> None:
        self.address, self.identity, self.security = address, identity, security
        self.on_lost, self.on_back = on_lost, on_back
        self.interval_ms, self.timeout_ms = max(100, int(interval_s * 1000)), max(300, int(timeout_s * 1000))
        self.connected = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-watch", daemon=True)
        self._thread.start()

    def _socket(self, ctx: zmq.Context) -> tuple[zmq.Socket, zmq.Socket]:
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sock.setsockopt(zmq.HEARTBEAT_IVL, self.interval_ms)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, self.timeout_ms)
        if self.security.curve:
            make_client(sock, self.security, self.identity)
        mon = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        sock.connect(self.address)
        return sock, mon

    def _run(self) -> None:
        sock, mon = self._socket(zmq.Context.instance())     # used by this thread only
        try:
            while not self._stop.is_set():
                if not mon.poll(100):
                    continue
                event = zmq.utils.monitor.recv_monitor_message(mon)["event"]
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED and not self.connected:
                    self.connected = True
                    self.on_back()
                elif event == zmq.EVENT_DISCONNECTED and self.connected:
                    self.connected = False
                    self.on_lost(time.time())
        except zmq.ZMQError as exc:      # the context is being torn down at exit
            log.debug("edge watch ended: %s", exc)
        finally:
            sock.disable_monitor()
            mon.close(0)
            sock.close(0)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)


class VehicleAgent:
    """Registers `vehicle_id` with the edge, then heartbeats and reports status until stopped."""

    def __init__(self, fleet: FleetConfig, vehicle_id: str, bus: Bus | None = None, watch_edge: bool = True) -> None:
        self.fleet = fleet
        self.spec = fleet.vehicle(vehicle_id)
        self.profile = fleet.all_profiles()[self.spec.profile]
        self.bus = bus or ZmqBus(vehicle_id, fleet.bus, security_for(fleet, vehicle_id))
        self.seq = 0
        self.round = 0
        self.state = "idle"   # reported in status messages; trainers set "training"
        self.stop = threading.Event()
        # held while a beat is built and sent, so `adopt` (a pooled worker) swaps identity between two beats
        self.identity_lock = threading.RLock()
        self.bus.subscribe(TOPIC_ROUND, "flad_msgs/msg/RoundControl", self._on_round)
        # edge crashes: watched from the first registration on (see the module docstring)
        self.watch_edge = watch_edge
        self.edge_down_since: float | None = None   # wall time the edge was found gone; None while it is there
        self.edge_listeners: list[Callable[[str], None]] = []    # told (watch thread) with the reason
        self.reregistrations = 0
        self._watch: EdgeWatch | None = None
        self._edge_lost = threading.Event()
        self._edge_back = threading.Event()
        self._rng = random.Random(f"{fleet.seed}-{vehicle_id}")

    def status_msg(self, state: str = "idle"):
        profile = codec.new("flad_msgs/msg/DeviceProfile", name=self.spec.profile,
                            mem_bytes=self.profile.stage_mem_bytes, tflops=self.profile.tflops,
                            link_mbps=self.profile.link_mbps, emulated=True)
        # Pose and speed stay zero until the vehicle drives in a world (embedded or CARLA).
        return codec.new("flad_msgs/msg/VehicleStatus", header=codec.header(), vehicle_id=self.spec.id, profile=profile,
                         speed_mps=0.0, predicted_dwell_s=self.spec.predicted_dwell_s, state=state,
                         control_address=self.spec.control, data_address=self.spec.data)

    def heartbeat_msg(self, state: int):
        self.seq += 1
        return codec.new("flad_msgs/msg/Heartbeat", header=codec.header(), vehicle_id=self.spec.id, seq=self.seq,
                         state=state, round=self.round)

    def _on_round(self, msg) -> None:
        if msg.clients and self.spec.id not in msg.clients:
            return
        self.round = msg.round
        if msg.command in (RoundControl.CMD_STOP, RoundControl.CMD_ABORT):
            log.info("%s: edge asked to stop (round %d)", self.spec.id, msg.round)
            self.stop.set()

    def adopt(self, spec: VehicleSpec, profile: DeviceProfile) -> None:
        """Speak for another vehicle from the next beat on (a pooled worker, `fhdp/pool_worker.py`).

        The current identity says goodbye first, so the edge records a departure, not a loss; heartbeat
        numbering and the round start afresh for the new one. Call `register` next: until the edge admits
        the new id it ignores its beats (hold `identity_lock` around both to send none in between)."""
        with self.identity_lock:
            self.bus.publish(TOPIC_HEARTBEAT, self.heartbeat_msg(Heartbeat.STATE_LEAVING))
            self.spec, self.profile = spec, profile
            self.seq, self.round, self.state = 0, 0, "idle"

    def register(self, deadline_s: float = 30.0) -> None:
        """Ask the edge to admit us, retrying while it starts up."""
        end = time.monotonic() + deadline_s
        while not self.stop.is_set():
            try:
                ack = self.bus.request(SERVICE_REGISTER, self.status_msg("registering"), "flad_msgs/msg/Ack",
                                       timeout_s=min(2.0, max(0.1, end - time.monotonic())))
            except BusError as exc:
                if time.monotonic() >= end:
                    raise BusError(f"{self.spec.id}: edge did not admit us within {deadline_s:.0f} s ({exc})") from exc
                log.info("%s: waiting for the edge (%s)", self.spec.id, exc)
                continue
            if not ack.ok:
                raise BusError(f"{self.spec.id}: edge refused registration: {ack.message}")
            log.info("%s: registered (%s)", self.spec.id, ack.message)
            self._start_watch()
            return

    # -- a crashed edge ---------------------------------------------------------------------------------
    def _start_watch(self) -> None:
        if self._watch is not None or not self.watch_edge:
            return
        hb = self.fleet.heartbeat
        self._watch = EdgeWatch(self.fleet.bus.hub_sub, self.spec.id, security_for(self.fleet, self.spec.id),
                                self._on_edge_lost, self._edge_back.set, interval_s=hb.interval_s,
                                timeout_s=hb.timeout_s)
        threading.Thread(target=self._reregister_loop, name="reregister", daemon=True).start()

    def _on_edge_lost(self, when: float) -> None:
        """Watch thread: the connection to the edge's hub is gone."""
        if self.stop.is_set():
            return          # the edge stopped us and left: the end of the run, not a crash
        self.edge_down_since = when
        stamp = dt.datetime.fromtimestamp(when).strftime("%H:%M:%S.%f")[:-3]
        reason = (f"edge {self.fleet.edge.id} at {self.fleet.bus.hub_sub} is gone since {stamp} "
                  "(its connection closed or stopped answering heartbeats)")
        log.warning("%s: %s; registering again once it is back", self.spec.id, reason)
        for listener in list(self.edge_listeners):
            try:
                listener(reason)
            except Exception:
                log.exception("%s: an edge-loss listener failed", self.spec.id)
        self._edge_back.clear()
        self._edge_lost.set()

    def backoff_delays(self) -> Iterator[float]:
        """Delays between registration attempts: BACKOFF_START_S doubling to BACKOFF_CAP_S, times a seeded
        jitter in [0.75, 1.25) (capped too), so a fleet does not hit a restarted edge all at once."""
        delay = BACKOFF_START_S
        while True:
            yield min(BACKOFF_CAP_S, delay * self._rng.uniform(0.75, 1.25))
            delay = min(BACKOFF_CAP_S, delay * 2)

    def _reregister_loop(self) -> None:
        """One thread for the agent's life: after each loss of the edge, register again."""
        while not self.stop.is_set():
            if self._edge_lost.wait(0.5):
                self._edge_lost.clear()
                self._reregister()

    def _reregister(self) -> None:
        """Register again until the edge admits us (or we stop). An attempt starts at once when the hub answers
        again; while it does not, only the capped backoff ticks try (in case the watch missed the edge's return),
        so no attempt sits out its timeout on a dead edge just as the new one comes up."""
        t0, attempts = time.monotonic(), 0
        delays = self.backoff_delays()
        while not self.stop.is_set():
            delay = next(delays)
            back = self._edge_back.wait(delay)
            self._edge_back.clear()
            if self.stop.is_set():
                return
            hub_up = back or self._watch is None or self._watch.connected
            if not hub_up and delay < BACKOFF_CAP_S * 0.75:
                continue
            attempts += 1
            try:
                with self.identity_lock:
                    ack = self.bus.request(SERVICE_REGISTER, self.status_msg("registering"), "flad_msgs/msg/Ack",
                                           timeout_s=REGISTER_TRY_S)
            except BusError as exc:
                log.debug("%s: registration attempt %d: %s", self.spec.id, attempts, exc)
                continue
            if not ack.ok:
                log.error("%s: edge refused registration: %s (trying again)", self.spec.id, ack.message)
                continue
            self.reregistrations += 1
            self.edge_down_since = None
            log.info("%s: registered again with %s after %.1f s (%d attempt(s)): %s", self.spec.id,
                     self.fleet.edge.id, time.monotonic() - t0, attempts, ack.message)
            return

    def run(self) -> int:
        self.register()
        self.heartbeat_loop()
        return 0

    def heartbeat_loop(self) -> None:
        """Heartbeat and report status until `stop` is set, then say goodbye."""
        interval = self.fleet.heartbeat.interval_s
        next_beat = time.monotonic()
        while not self.stop.is_set():
            with self.identity_lock:
                self.bus.publish(TOPIC_HEARTBEAT, self.heartbeat_msg(Heartbeat.STATE_IDLE))
                self.bus.publish(TOPIC_STATUS, self.status_msg(self.state))
            next_beat += interval
            self.stop.wait(max(0.0, next_beat - time.monotonic()))
        # say goodbye so the edge records a departure rather than a loss
        with self.identity_lock:
            self.bus.publish(TOPIC_HEARTBEAT, self.heartbeat_msg(Heartbeat.STATE_LEAVING))
        time.sleep(0.1)

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
        self.bus.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flad-vehicle", description="Run one vehicle's control-plane process.")
    parser.add_argument("--id", required=True, help="vehicle id from the fleet file")
    add_role_args(parser)
    args = parser.parse_args(argv)
    setup_role_logging(args, f"vehicle-{args.id}")
    fleet = fleet_from_args(args)
    agent = VehicleAgent(fleet, args.id)
    install_stop_handlers(agent.stop)
    try:
        return agent.run()
    except BusError as exc:
        log.error("%s", exc)
        return 1
    finally:
        agent.close()


if __name__ == "__main__":
    sys.exit(main())
