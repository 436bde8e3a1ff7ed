"""`stage_worker_node` (alias `vehicle_node`): a vehicle joining the fleet as a ROS 2 node.

It registers with the edge (ZeroMQ request/reply), heartbeats and reports status on the ROS topics
`/flad/heartbeat` and `/flad/status`, obeys `/flad/round`, and -- in `fhdp` mode -- trains its encoder
partition on the edge's commands, exchanging activations/gradients with its pipeline neighbours over the
ZeroMQ data links as before (docs/architecture.md, "Transports"). `control_plane` mode only registers and heartbeats.

`edge_address` points a vehicle at an edge on another machine without editing the fleet file: it
replaces the host of the edge's hub and `edge/...` services (ports stay).

Run: `ros2 run flad_vehicle stage_worker_node --ros-args -p vehicle_id:=v000` or
`python -m flad_vehicle.nodes.stage_worker --ros-args -p vehicle_id:=v000`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

from flad_core.config import ConfigError
from flad_core.device import DeviceError, check_device_spec
from flad_core.fleet import FleetConfig

log = logging.getLogger("flad_vehicle.nodes.stage_worker")


@dataclass
class StageWorkerNodeConfig:
    """ROS parameters of a vehicle's stage-worker node."""

    vehicle_id: str = field(metadata={"help": "this vehicle's id in the fleet file"})
    fleet: str = field(default="", metadata={"help": "fleet YAML (empty: launch/fleet.yaml)"})
    port_base: int = field(default=0, metadata={"help": "renumber the fleet's TCP ports from this base (0: keep)"})
    run_dir: str = field(default="", metadata={"help": "folder for the audit log of what this vehicle sent"})
    edge_address: str = field(default="", metadata={
        "help": "host name or IP of the edge (replaces the host of its hub and edge/ services; empty: keep)"})
    mode: Literal["fhdp", "control_plane"] = field(default="fhdp", metadata={
        "help": "fhdp: train encoder stages on the edge's commands; control_plane: register and heartbeat only"})
    data: str = field(default="synthetic", metadata={"help": "fleet dataset root (`flad sim collect`), or 'synthetic'"})
    encoder: str = field(default="tiny", metadata={"help": "encoder config: tiny or paper"})
    seed: int = field(default=0, metadata={"help": "random seed of this vehicle's trainer"})
    threads: int = field(default=1, metadata={"help": "torch threads for stage compute"})
    device: str = field(default="", metadata={
        "help": "where its stages run: auto, cpu, cuda or cuda:N (empty: the fleet file's `device` for this vehicle)"})
    register_timeout_s: float = field(default=600.0, metadata={
        "help": "seconds to keep trying to register with the edge (it may start later) before failing"})

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_\-]{0,63}", self.vehicle_id):
            raise ConfigError("vehicle_id", f"must start with a letter and use [A-Za-z0-9_-], got {self.vehicle_id!r}")
        if self.edge_address and not re.fullmatch(r"[A-Za-z0-9_.\-]+", self.edge_address):
            raise ConfigError("edge_address", f"give a host name or IP only, got {self.edge_address!r}")
        if self.register_timeout_s <= 0:
            raise ConfigError("register_timeout_s", f"must be positive, got {self.register_timeout_s}")
        if self.threads < 1:
            raise ConfigError("threads", f"must be >= 1, got {self.threads}")
        if self.device:
            try:
                check_device_spec(self.device)
            except DeviceError as exc:
                raise ConfigError("device", str(exc)) from exc
        if self.port_base and not 1024 <= self.port_base < 65000:
            raise ConfigError("port_base", f"must be in [1024, 65000), got {self.port_base}")


def _rehost(address: str, host: str) -> str:
    return re.sub(r"^tcp://[^:/]+:", f"tcp://{host}:", address)


def with_edge_host(fleet: FleetConfig, host: str) -> FleetConfig:
    """The fleet with the edge's hub and `edge/...` service addresses moved to `host` (ports kept)."""
    bus = dataclasses.replace(
        fleet.bus, hub_pub=_rehost(fleet.bus.hub_pub, host), hub_sub=_rehost(fleet.bus.hub_sub, host),
        services={k: _rehost(v, host) if k.startswith("edge/") else v for k, v in fleet.bus.services.items()})
    return dataclasses.replace(fleet, bus=bus)


class StageWorkerJob:
    """FhdpVehicle (or the control-plane VehicleAgent) on a RosBus bound to `node`."""

    def __init__(self, node: Any, cfg: StageWorkerNodeConfig) -> None:
        from pathlib import Path

        from flad_core.role_node import load_role_fleet
        from flad_core.roles import security_for

        self.cfg = cfg
        fleet = load_role_fleet(cfg.fleet, cfg.port_base)
        if cfg.edge_address:
            fleet = with_edge_host(fleet, cfg.edge_address)
        try:
            fleet.vehicle(cfg.vehicle_id)
        except KeyError as exc:
            raise ConfigError(f"{node.get_name()}.vehicle_id", str(exc.args[0])) from None
        from flad_core.bus_ros import RosBus
        bus = RosBus(cfg.vehicle_id, fleet.bus, security_for(fleet, cfg.vehicle_id), node=node)
        self.vehicle = None
        if cfg.mode == "fhdp":
            from flad_vehicle.fhdp.worker import FhdpVehicle

            self.vehicle = FhdpVehicle(fleet, cfg.vehicle_id, data=cfg.data, encoder=cfg.encoder, seed=cfg.seed,
                                       threads=cfg.threads, audit_dir=Path(cfg.run_dir) if cfg.run_dir else None,
                                       bus=bus, device=cfg.device or None)
            self.agent = self.vehicle.agent
        else:
            from flad_vehicle.agent import VehicleAgent

            self.agent = VehicleAgent(fleet, cfg.vehicle_id, bus=bus)

    def run(self) -> int:
        from flad_core.bus import BusError

        try:
            # wait for the edge as long as configured; run() then re-registers at once (the edge is up)
            self.agent.register(deadline_s=self.cfg.register_timeout_s)
            if self.agent.stop.is_set():
                return 0
            return self.vehicle.run() if self.vehicle is not None else self.agent.run()
        except BusError as exc:
            log.error("%s", exc)
            return 1

    def stop(self) -> None:
        self.agent.stop.set()

    def close(self) -> None:
        (self.vehicle or self.agent).close()


def main(argv: list[str] | None = None) -> int:
    from flad_core.role_node import run_role_node

    return run_role_node("stage_worker", StageWorkerNodeConfig, StageWorkerJob, argv if argv is not None else sys.argv)


if __name__ == "__main__":
    sys.exit(main())
