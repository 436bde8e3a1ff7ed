"""Shared plumbing of role processes (vehicle, edge, cloud): args, fleet, logging, bus security."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from flad_core.fleet import FleetConfig, load_fleet, with_port_base
from flad_core.runs import setup_logging
from flad_core.security import SecurityConfig


def default_fleet_path() -> Path:
    """`launch/fleet.yaml` in the working directory, else the one in this source checkout."""
    local = Path("launch/fleet.yaml")
    if local.exists():
        return local
    return Path(__file__).resolve().parents[3] / "launch" / "fleet.yaml"


def add_role_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fleet", type=Path, default=None, help="fleet YAML (default: launch/fleet.yaml)")
    parser.add_argument("--port-base", type=int, default=None,
                        help="renumber every TCP port from this base (several fleets on one host)")
    parser.add_argument("--run-dir", type=Path, default=None, help="folder for this process's log and records")
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")


def fleet_from_args(args: argparse.Namespace) -> FleetConfig:
    fleet = load_fleet(args.fleet or default_fleet_path())
    if args.port_base is not None:
        fleet = with_port_base(fleet, args.port_base)
    return fleet


def setup_role_logging(args: argparse.Namespace, role: str) -> None:
    logfile = None
    if args.run_dir is not None:
        Path(args.run_dir).mkdir(parents=True, exist_ok=True)
        logfile = Path(args.run_dir) / f"{role}.log"
    setup_logging(getattr(logging, str(args.log_level).upper(), logging.INFO), logfile)


def server_keys_for(fleet: FleetConfig) -> dict[str, str]:
    """Which key pair answers at each server address of the fleet (CURVE clients must know it): the cloud's
    services the cloud id's, the other bus services the edge id's, each vehicle's control socket its own id's
    (a pooled slot's fleet lists the slots, so there it is the slot id's). Entries of the fleet file's
    `security.server_keys` win."""
    keys = {address: fleet.cloud.id if service.startswith("cloud/") else fleet.edge.id
            for service, address in fleet.bus.services.items()}
    keys.update({v.control: v.id for v in fleet.vehicles if v.control})
    keys.update(fleet.security.server_keys)
    return keys


def security_for(fleet: FleetConfig, identity: str) -> SecurityConfig:
    """The fleet's security settings with this process's key name and the servers' key names filled in."""
    return dataclasses.replace(fleet.security, identity=identity, server=fleet.security.server or fleet.edge.id,
                               server_keys=server_keys_for(fleet))
