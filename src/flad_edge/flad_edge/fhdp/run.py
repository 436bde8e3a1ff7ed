"""The edge's FHDP process: wait for the fleet, plan the clients, run the rounds (with the cloud tier), report.

`python -m flad_edge.fhdp.run --fleet FLEET.yaml --config fhdp.yaml [--cloud] [--recovery]`; `flad demo`
and the orchestrator ROS node start it the same way.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from flad_core.atomic import atomic_write_bytes
from flad_core.bus import BusError
from flad_core.config import ConfigError, load_yaml
from flad_core.fleet import FleetConfig
from flad_core.procs import install_stop_handlers
from flad_core.roles import add_role_args, fleet_from_args, setup_role_logging
from flad_core.runs import RunDir
from flad_core.weights import to_bytes
from flad_edge.fhdp.client import RotationClient
from flad_edge.fhdp.config import FhdpConfig
from flad_edge.fhdp.orchestrator import FhdpEdge, wait_for_vehicles
from flad_edge.fhdp.recovery.edge import RecoveringFhdpEdge
from flad_edge.fl.cloud import download, upload
from flad_edge.fl.edge_server import EdgeServer

log = logging.getLogger(__name__)


def plan_table(clients: list[RotationClient], heads: tuple[int, int] | None = None) -> Table:
    """The clients and their pipelines; `heads` = (H, n): U-shaped, the data owner also holds layers [H, n)."""
    title = "FHDP clients this edge trains (each cluster is one FL client)"
    if heads is not None:
        title += f"; U-shaped: heads [{heads[0]}:{heads[1]}) on each data owner"
    table = Table(title=title)
    for col in ("client", "members", "essential pipelines (vehicle[layers])"):
        table.add_column(col)
    for c in clients:
        pipes = "\n".join(p.describe() + (f" -> {p.first}[{heads[0]}:{heads[1]})" if heads and len(p) > 1 else "")
                          for p in c.pipelines)
        table.add_row(c.id, ", ".join(c.members), pipes)
    return table


def run_training(fleet: FleetConfig, cfg: FhdpConfig, run: RunDir | None, console: Console,
                 use_cloud: bool = False, recovery: bool = False, edge: EdgeServer | None = None
                 ) -> list[dict[str, Any]]:
    """The edge's whole job. With `recovery`, clusters survive departures (backups, templates, layer moves)."""
    if recovery and cfg.u_shaped:
        raise ValueError("quick recovery does not support U-shaped pipelines yet (set u_shaped: false)")
    fhdp = RecoveringFhdpEdge(fleet, cfg, run=run, edge=edge) if recovery else FhdpEdge(fleet, cfg, run, edge=edge)
    try:
        wait_for_vehicles(fhdp.edge, [v.id for v in fleet.vehicles])
        clients = fhdp.clients()
        console.print(plan_table(clients, fhdp.heads))
        summaries = []
        with Progress(TextColumn("[bold]FHDP"), BarColumn(), MofNCompleteColumn(), TextColumn("rounds"),
                      TimeElapsedColumn(), console=console, transient=True) as progress:
            task = progress.add_task("rounds", total=cfg.rounds)
            for rnd in range(cfg.rounds):
                summary = fhdp.run_round(rnd, clients)
                if use_cloud:
                    upload(fhdp.bus, dict(fhdp.model.state_dict()), sender=fleet.edge.id, rnd=rnd,
                           samples=summary["samples"], update_id=f"{fleet.edge.id}-r{rnd}")
                    global_state = download(fhdp.bus, rnd, fleet.edge.id)
                    if global_state is not None:
                        fhdp.model.load_state_dict(global_state)
                    summary["cloud"] = True
                summaries.append(summary)
                progress.console.print(
                    f"round {rnd}: train loss {summary['train_loss']:.4f}  clients {summary['accepted']}/"
                    f"{summary['clients']}  samples {summary['samples']}  moved {summary['moved_bytes'] / 1e6:.2f} MB"
                    f"  {summary['seconds']:.1f} s" + ("  (cloud aggregated)" if use_cloud else ""))
                progress.advance(task)
        if run is not None:
            atomic_write_bytes(run.path / "global_encoder.safetensors", to_bytes(fhdp.model.state_dict()))
        fhdp.edge.stop_fleet()
        console.print(fhdp.edge.table())
        return summaries
    finally:
        fhdp.close()


def load_fhdp_config(path: str | None) -> FhdpConfig:
    return load_yaml(FhdpConfig, path) if path else FhdpConfig()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flad-edge-fhdp", description="Run the edge's FHDP training rounds.")
    add_role_args(parser)
    parser.add_argument("--config", default=None, help="FHDP config YAML (default: built-in FhdpConfig)")
    parser.add_argument("--rounds", type=int, default=None, help="override the number of rounds")
    parser.add_argument("--cloud", action="store_true", help="aggregate through the cloud process (two tiers)")
    parser.add_argument("--recovery", action="store_true",
                        help="quick recovery: clusters keep training when members leave (backups, templates)")
    args = parser.parse_args(argv)
    setup_role_logging(args, "edge")
    try:
        fleet = fleet_from_args(args)
        cfg = load_fhdp_config(args.config)
    except ConfigError as exc:
        print(f"flad-edge-fhdp: {exc}", file=sys.stderr)
        return 2
    if args.rounds is not None:
        cfg.rounds = args.rounds
    run = RunDir(args.run_dir) if args.run_dir else None
    stop = threading.Event()
    install_stop_handlers(stop)
    console = Console() if sys.stdout.isatty() else Console(width=120)
    try:
        run_training(fleet, cfg, run, console, use_cloud=args.cloud, recovery=args.recovery)
    except (TimeoutError, RuntimeError, ValueError, BusError) as exc:
        log.error("FHDP training failed: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
