"""The vehicle process's control-plane side: register with the edge, heartbeat, report status.

This is what a vehicle runs before and between training work: the edge learns who is in coverage,
with which device profile, where, and for how long (predicted dwell time). Training, sensing and
driving attach to the same bus connection as those capabilities land.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time

from flad_core import codec
from flad_core.bus import Bus, BusError, ZmqBus
from flad_core.fleet import DeviceProfile, FleetConfig, VehicleSpec
from flad_core.procs import install_stop_handlers
from flad_core.protocol import SERVICE_REGISTER, TOPIC_HEARTBEAT, TOPIC_ROUND, TOPIC_STATUS
from flad_core.roles import add_role_args, fleet_from_args, security_for, setup_role_logging

log = logging.getLogger("flad_vehicle.agent")  # not __name__: this also runs as __main__

# constants come from the .msg files (the single source of truth)
Heartbeat = codec.message_class("flad_msgs/msg/Heartbeat")
RoundControl = codec.message_class("flad_msgs/msg/RoundControl")



class VehicleAgent:
    """Registers `vehicle_id` with the edge, then heartbeats and reports status until stopped."""

    def __init__(self, fleet: FleetConfig, vehicle_id: str, bus: Bus | None = None) -> None:
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

    def status_msg(self, state: str = "idle"):
        profile = codec.new("flad_msgs/msg/DeviceProfile", name=self.spec.profile, mem_bytes=self.profile.mem_bytes,
                            tflops=self.profile.tflops, link_mbps=self.profile.link_mbps, emulated=True)
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
