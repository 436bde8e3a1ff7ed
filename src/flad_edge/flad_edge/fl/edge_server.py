"""The edge process: hosts the bus hub, admits vehicles, tracks liveness, shows the fleet.

Vehicles register over request/reply, then heartbeat and report status over pub/sub. A vehicle
that misses heartbeats for `heartbeat.timeout_s` is marked lost; one that says goodbye is marked
departed. SWIFT scheduling, FL rounds and recovery hang off this registry as they land.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from flad_core import codec
from flad_core.atomic import atomic_write_json
from flad_core.bus import Bus, BusHub, ZmqBus
from flad_core.fleet import FleetConfig
from flad_core.procs import install_stop_handlers
from flad_core.protocol import SERVICE_REGISTER, TOPIC_HEARTBEAT, TOPIC_ROUND, TOPIC_STATUS
from flad_core.roles import add_role_args, fleet_from_args, security_for, setup_role_logging

log = logging.getLogger("flad_edge.fl.edge_server")  # not __name__: this also runs as __main__

Heartbeat = codec.message_class("flad_msgs/msg/Heartbeat")
RoundControl = codec.message_class("flad_msgs/msg/RoundControl")


@dataclass
class VehicleRecord:
    vehicle_id: str
    profile: str
    mem_gb: float
    tflops: float
    link_mbps: float
    dwell_s: float
    registered_at: float
    last_seen: float
    heartbeats: int = 0
    last_seq: int = 0
    missed: int = 0             # heartbeat sequence gaps
    status_reports: int = 0
    state: str = "registered"   # registered | alive | lost | departed
    history: list[str] = field(default_factory=list)


class EdgeServer:
    """Registry of the vehicles in this edge's coverage, fed by the bus."""

    def __init__(self, fleet: FleetConfig, host_hub: bool = True, bus: Bus | None = None) -> None:
        self.fleet = fleet
        security = security_for(fleet, fleet.edge.id)
        self.hub = BusHub(fleet.bus, security, fleet.edge.id) if host_hub else None
        self.bus = bus or ZmqBus(fleet.edge.id, fleet.bus, security)  # a RosBus in the ROS 2 node
        self.vehicles: dict[str, VehicleRecord] = {}
        self._lock = threading.Lock()
        self.stop = threading.Event()
        self.bus.serve(SERVICE_REGISTER, "flad_msgs/msg/VehicleStatus", "flad_msgs/msg/Ack", self._on_register)
        self.bus.subscribe(TOPIC_HEARTBEAT, "flad_msgs/msg/Heartbeat", self._on_heartbeat)
        self.bus.subscribe(TOPIC_STATUS, "flad_msgs/msg/VehicleStatus", self._on_status, finite=True)

    # -- handlers (bus thread) --------------------------------------------------------------------
    def _on_register(self, msg):
        known = {v.id for v in self.fleet.vehicles}
        if known and msg.vehicle_id not in known:
            log.warning("refused registration of unknown vehicle %r", msg.vehicle_id)
            return codec.new("flad_msgs/msg/Ack", ok=False, message=f"{msg.vehicle_id} is not in this fleet")
        now = time.time()
        with self._lock:
            rec = self.vehicles.get(msg.vehicle_id)
            if rec is None:
                rec = VehicleRecord(msg.vehicle_id, msg.profile.name, msg.profile.mem_bytes / 1024**3,
                                    msg.profile.tflops, msg.profile.link_mbps, msg.predicted_dwell_s, now, now)
                self.vehicles[msg.vehicle_id] = rec
            else:  # a returning vehicle (same process restarted, or back in coverage)
                rec.state, rec.last_seen = "registered", now
            rec.history.append(f"registered@{now:.3f}")
        log.info("admitted %s (%s, %.1f GB, %.3f TFLOPS)", msg.vehicle_id, msg.profile.name,
                 msg.profile.mem_bytes / 1024**3, msg.profile.tflops)
        return codec.new("flad_msgs/msg/Ack", ok=True, message=f"welcome to {self.fleet.edge.id}")

    def _on_heartbeat(self, msg) -> None:
        with self._lock:
            rec = self.vehicles.get(msg.vehicle_id)
            if rec is None:
                return  # not registered: ignore (it will register first)
            if rec.last_seq and msg.seq > rec.last_seq + 1:
                rec.missed += msg.seq - rec.last_seq - 1
            rec.last_seq = max(rec.last_seq, msg.seq)
            rec.heartbeats += 1
            rec.last_seen = time.time()
            if msg.state == Heartbeat.STATE_LEAVING:
                rec.state = "departed"
                rec.history.append(f"departed@{rec.last_seen:.3f}")
                log.info("%s departed", msg.vehicle_id)
            elif rec.state in ("registered", "lost"):
                rec.state = "alive"

    def _on_status(self, msg) -> None:
        with self._lock:
            rec = self.vehicles.get(msg.vehicle_id)
            if rec is not None:
                rec.status_reports += 1
                rec.dwell_s = msg.predicted_dwell_s

    # -- main loop --------------------------------------------------------------------------------
    def check_liveness(self, now: float | None = None) -> list[str]:
        """Mark vehicles silent for longer than the heartbeat timeout as lost; return newly lost ids."""
        now = time.time() if now is None else now
        lost = []
        with self._lock:
            for rec in self.vehicles.values():
                if rec.state in ("registered", "alive") and now - rec.last_seen > self.fleet.heartbeat.timeout_s:
                    rec.state = "lost"
                    rec.history.append(f"lost@{now:.3f}")
                    lost.append(rec.vehicle_id)
        for vid in lost:
            log.warning("%s lost (no heartbeat for %.1f s)", vid, self.fleet.heartbeat.timeout_s)
        return lost

    def snapshot(self) -> list[VehicleRecord]:
        with self._lock:
            return [dataclasses.replace(r, history=list(r.history)) for r in self.vehicles.values()]

    def table(self) -> Table:
        table = Table(title=f"{self.fleet.edge.id}: vehicles in coverage (device figures emulated)")
        for col in ("vehicle", "profile", "mem GB", "TFLOPS", "link Mb/s", "dwell s", "heartbeats", "missed",
                    "status msgs", "state"):
            table.add_column(col, justify="left" if col in ("vehicle", "profile", "state") else "right")
        for r in sorted(self.snapshot(), key=lambda r: r.vehicle_id):
            table.add_row(r.vehicle_id, r.profile, f"{r.mem_gb:.1f}", f"{r.tflops:.3f}", f"{r.link_mbps:.0f}",
                          f"{r.dwell_s:.0f}", str(r.heartbeats), str(r.missed), str(r.status_reports), r.state)
        return table

    def stop_fleet(self, wait_s: float = 5.0) -> None:
        """Broadcast STOP until every vehicle has departed (or `wait_s` passes)."""
        end = time.monotonic() + wait_s
        while time.monotonic() < end:
            stop = codec.new("flad_msgs/msg/RoundControl", header=codec.header(), command=RoundControl.CMD_STOP)
            self.bus.publish(TOPIC_ROUND, stop)
            if all(r.state in ("departed", "lost") for r in self.snapshot()):
                return
            time.sleep(0.1)

    def run(self, duration_s: float, expect: int = 0, run_dir: Path | None = None, console: Console | None = None
            ) -> int:
        """Serve for `duration_s` (after `expect` vehicles registered), then stop the fleet and report."""
        console = console or (Console() if sys.stdout.isatty() else Console(width=120))
        start = time.monotonic()
        armed_at = None
        while not self.stop.is_set():
            self.check_liveness()
            alive = sum(r.state == "alive" for r in self.snapshot())
            if armed_at is None and alive >= expect:
                armed_at = time.monotonic()
                log.info("%d vehicle(s) alive; serving for %.1f s", alive, duration_s)
            if armed_at is not None and time.monotonic() - armed_at >= duration_s:
                break
            if armed_at is None and time.monotonic() - start > 60:
                log.error("only %d of %d vehicles came up within 60 s", alive, expect)
                break
            self.stop.wait(0.1)
        self.stop_fleet()
        console.print(self.table())
        records = [dataclasses.asdict(r) for r in self.snapshot()]
        if run_dir is not None:
            atomic_write_json(Path(run_dir) / "edge_summary.json", {"edge": self.fleet.edge.id, "vehicles": records,
                                                                    "dropped_messages": self.bus.dropped})
        ok = len(records) >= expect and all(r["heartbeats"] > 0 for r in records)
        return 0 if ok else 1

    def close(self) -> None:
        self.bus.close()
        if self.hub is not None:
            self.hub.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flad-edge", description="Run the edge server process.")
    add_role_args(parser)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds to serve once the fleet is up")
    parser.add_argument("--expect", type=int, default=None, help="vehicles to wait for (default: all in the fleet)")
    args = parser.parse_args(argv)
    setup_role_logging(args, "edge")
    fleet = fleet_from_args(args)
    edge = EdgeServer(fleet)
    install_stop_handlers(edge.stop)
    try:
        expect = len(fleet.vehicles) if args.expect is None else args.expect
        return edge.run(args.duration, expect=expect, run_dir=args.run_dir)
    finally:
        edge.close()


if __name__ == "__main__":
    sys.exit(main())
