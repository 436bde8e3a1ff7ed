"""`flad demo`: the whole system on one machine, as real processes on loopback ZeroMQ.

Today: an edge (hosting the bus hub) and the fleet's vehicles start as separate OS processes; the
vehicles register, heartbeat and report status; the edge prints its fleet table; everything exits
cleanly, also on Ctrl-C (children are stopped and never outlive the launcher). The demo grows with
each capability (world, training rounds, recovery, waypoint service).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

import yaml

from flad_core.config import ConfigError, to_dict
from flad_core.fleet import FleetConfig, VehicleSpec, load_fleet, with_port_base
from flad_core.procs import ProcessGroup, python_module_cmd
from flad_core.roles import default_fleet_path
from flad_core.runs import RunDir
from flad_core.security import generate_keypair

log = logging.getLogger(__name__)


def _prepare_fleet(args: argparse.Namespace, run: RunDir) -> FleetConfig:
    fleet = load_fleet(args.fleet or default_fleet_path())
    if args.vehicles is not None:
        base = fleet.vehicles or [VehicleSpec(id="v1")]
        fleet = dataclasses.replace(fleet, vehicles=[
            dataclasses.replace(base[i % len(base)], id=f"v{i + 1}") for i in range(args.vehicles)])
    if args.port_base is not None:
        fleet = with_port_base(fleet, args.port_base)
    if args.curve:
        keys, allowed = run.path / "keys", run.path / "keys" / "allowed"
        # the edge's own bus endpoint is a client of its hub, so its key is allowed too
        generate_keypair(keys, fleet.edge.id, allow_dir=allowed)
        for v in fleet.vehicles:
            generate_keypair(keys, v.id, allow_dir=allowed)
        fleet = dataclasses.replace(fleet, security=dataclasses.replace(
            fleet.security, curve=True, keys_dir=keys, allow_dir=allowed, server=fleet.edge.id))
    return fleet


def run_demo(args: argparse.Namespace) -> int:
    try:
        probe = load_fleet(args.fleet or default_fleet_path())
    except ConfigError as exc:
        print(f"flad demo: bad fleet file: {exc}", file=sys.stderr)
        return 2
    run = RunDir.create("demo", probe, root=args.runs_dir)
    fleet = _prepare_fleet(args, run)
    fleet_file = run.path / "fleet.yaml"
    fleet_file.write_text(yaml.safe_dump(to_dict(fleet), sort_keys=False))
    common = ["--fleet", str(fleet_file), "--run-dir", str(run.path)]
    print(f"FLAD demo: edge + {len(fleet.vehicles)} vehicle processes on loopback "
          f"({'CURVE-encrypted' if fleet.security.curve else 'plain TCP'}); records in {run.path}")
    started = time.monotonic()
    code = 1
    with ProcessGroup(grace_s=5.0) as group:
        try:
            group.start("edge", python_module_cmd("flad_edge.edge", *common, "--duration", str(args.duration)),
                        show_stdout=True)
            for v in fleet.vehicles:
                group.start(v.id, python_module_cmd("flad_vehicle.agent", *common, "--id", v.id))
            code = group.wait("edge", timeout=args.duration + 90)
            if code is None:
                log.error("edge did not finish in time")
                code = 1
            for v in fleet.vehicles:
                vcode = group.wait(v.id, timeout=10)
                if vcode not in (0, None):
                    log.error("vehicle %s exited with %s (see %s)", v.id, vcode, run.path / f"vehicle-{v.id}.log")
                    code = code or 1
        except KeyboardInterrupt:
            print("\ninterrupted: stopping all processes", file=sys.stderr)
            code = 130
        codes = group.stop()
    run.log_metrics({"event": "demo_done", "exit_codes": codes, "seconds": round(time.monotonic() - started, 3)})
    edge_log = run.path / "edge.log"
    if code != 0 and edge_log.exists():
        print(f"demo failed (exit {code}); edge log: {edge_log}", file=sys.stderr)
    return code


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo", help="run the whole system on this machine (edge + vehicles on loopback)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--fleet", type=Path, default=None, help="fleet YAML (default: launch/fleet.yaml)")
    demo.add_argument("--vehicles", type=int, default=None, help="override the number of vehicles")
    demo.add_argument("--duration", type=float, default=4.0, help="seconds to run once all vehicles are up")
    demo.add_argument("--port-base", type=int, default=None, help="renumber the fleet's TCP ports from this base")
    demo.add_argument("--curve", action="store_true", help="generate keys and run every link with CURVE")
    demo.add_argument("--runs-dir", type=Path, default=None, help="where runs/<id>/ goes (default: ./runs)")
    demo.set_defaults(func=run_demo)
