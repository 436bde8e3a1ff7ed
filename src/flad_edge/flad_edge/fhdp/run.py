"""The edge's FHDP process: wait for the fleet, plan the clients, run the rounds (with the cloud tier), report.

`python -m flad_edge.fhdp.run --fleet FLEET.yaml --config fhdp.yaml [--cloud] [--recovery]`; `flad demo`
and the orchestrator ROS node start it the same way.

With a run dir, every committed round is checkpointed there (`fhdp/checkpoint.py`), and an edge started
again with the same run dir -- after a crash, by its launcher -- resumes after the last committed round on
its own: a round that was interrupted is redone whole (or, if its edge aggregate existed, only its cloud
tier is finished, with that very aggregate), so the ledger counts each (round, client) exactly once.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
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
from flad_edge.fhdp.checkpoint import (
    CHECKPOINT,
    CheckpointError,
    EdgeCheckpoint,
    EdgeState,
    PendingRound,
    ledger_entries,
)
from flad_edge.fhdp.client import RotationClient
from flad_edge.fhdp.config import FhdpConfig
from flad_edge.fhdp.control import StepNumbers
from flad_edge.fhdp.orchestrator import FhdpEdge, wait_for_vehicles
from flad_edge.fhdp.recovery.edge import RecoveringFhdpEdge
from flad_edge.fl.cloud import download, upload
from flad_edge.fl.edge_server import EdgeServer

log = logging.getLogger(__name__)

#: how long a resumed edge waits for the fleet to register again before it goes on without the missing
RESUME_WAIT_S = 30.0

#: how long the edge keeps trying a cloud that stopped answering (its launcher restarts it within seconds)
CLOUD_RETRY_S = 300.0


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


class CommittedRounds:
    """The round loop's durable side: train (or finish a pending cloud tier), then commit a checkpoint.

    Without a run dir nothing is written and nothing resumed; the rounds run the same."""

    def __init__(self, fhdp: FhdpEdge, run: RunDir | None, use_cloud: bool) -> None:
        self.fhdp, self.run, self.use_cloud = fhdp, run, use_cloud
        self.edge_id = fhdp.fleet.edge.id
        self.ckpt = EdgeCheckpoint(run.path, self.edge_id) if run is not None else None
        self.next_round = 0
        self.ledger: list[dict[str, Any]] = []
        self.summaries: list[dict[str, Any]] = []
        self.resumes = 0
        self.pending: PendingRound | None = None

    def resume(self) -> str | None:
        """Pick up the checkpoint in the run dir, if any; a line saying what was resumed (None: a fresh start)."""
        if self.ckpt is None:
            return None
        saved = self.ckpt.load()
        if saved is not None:
            try:
                self.fhdp.model.load_state_dict(saved.model)
            except RuntimeError as exc:
                raise CheckpointError(f"{self.ckpt.path} does not fit this encoder ({exc}); start with --no-resume "
                                      "or another run dir") from exc
            self.fhdp.version = saved.version
            self.next_round, self.ledger, self.summaries = saved.round + 1, saved.ledger, saved.summaries
            self.resumes = saved.resumes + 1
        self.pending = self.ckpt.load_pending(self.next_round) if self.use_cloud else None
        if saved is None and self.pending is None:
            self.ckpt.clear_pending()
            return None
        if saved is None:
            self.resumes = 1
        what = (f"resuming after round {saved.round} ({len(self.ledger)} committed update(s), model version "
                f"{saved.version})" if saved is not None else "resuming before round 0")
        if self.pending is not None:
            what += f"; round {self.pending.round} was trained, finishing its cloud tier"
        elif self.next_round < self.fhdp.cfg.rounds:
            what += f"; round {self.next_round} starts over"
        if self.run is not None:
            self.run.log_metrics({"event": "edge_resume", "next_round": self.next_round,
                                  "pending_cloud_round": self.pending.round if self.pending else None,
                                  "committed_updates": len(self.ledger), "resumes": self.resumes})
        return what

    def run_round(self, rnd: int, clients: list[RotationClient]) -> dict[str, Any]:
        """Round `rnd` through to its commit; its summary."""
        if self.pending is not None and self.pending.round == rnd:
            summary = self.pending.summary
            self.fhdp.model.load_state_dict(self.pending.state)
            self.fhdp.version = self.pending.version
            self.pending = None
        else:
            summary = self.fhdp.run_round(rnd, clients)
            if self.use_cloud and self.ckpt is not None:
                self.ckpt.save_pending(PendingRound(rnd, self.fhdp.version,
                                                    dict(self.fhdp.model.state_dict()), summary))
        if self.use_cloud:
            self.cloud_tier(rnd, summary)
        self.commit(rnd, summary)
        return summary

    def cloud_tier(self, rnd: int, summary: dict[str, Any]) -> None:
        """Upload the edge aggregate (a fixed update id, so a repeat is counted once), load the global model."""
        ack = upload(self.fhdp.bus, dict(self.fhdp.model.state_dict()), sender=self.edge_id, rnd=rnd,
                     samples=summary["samples"], update_id=f"{self.edge_id}-r{rnd}", retry_s=CLOUD_RETRY_S,
                     try_timeout_s=15.0)
        if ack.startswith("already"):
            log.info("round %d: the cloud says %s", rnd, ack)
        global_state = download(self.fhdp.bus, rnd, self.edge_id, retry=True, try_timeout_s=10.0)
        if global_state is not None:
            self.fhdp.model.load_state_dict(global_state)
        summary["cloud"] = True

    def commit(self, rnd: int, summary: dict[str, Any]) -> None:
        entries = ledger_entries(self.edge_id, summary)
        self.ledger.extend(entries)
        self.summaries.append(summary)
        self.next_round = rnd + 1
        if self.ckpt is None:
            return
        self.ckpt.commit(EdgeState(rnd, self.fhdp.version, dict(self.fhdp.model.state_dict()), self.ledger,
                                   self.summaries, self.resumes))
        if self.run is not None:
            self.run.log_metrics({"event": "round_committed", "committed_round": rnd, "samples": summary["samples"],
                                  "updates": len(entries), "checkpoint": CHECKPOINT})


def run_training(fleet: FleetConfig, cfg: FhdpConfig, run: RunDir | None, console: Console,
                 use_cloud: bool = False, recovery: bool = False, edge: EdgeServer | None = None,
                 resume: bool = True) -> list[dict[str, Any]]:
    """The edge's whole job. With `recovery`, clusters survive departures (backups, templates, layer moves).
    With a run dir, each committed round is checkpointed there; with `resume`, a checkpoint found there is
    picked up (the module docstring). Returns the summaries of every committed round, resumed ones included."""
    if recovery and cfg.u_shaped:
        raise ValueError("quick recovery does not support U-shaped pipelines yet (set u_shaped: false)")
    if recovery and cfg.cluster_schedule != "rotation":
        raise ValueError(f"quick recovery re-plans the rotation's pipelines; cluster_schedule "
                         f"{cfg.cluster_schedule!r} is not supported with it (use rotation)")
    fhdp = RecoveringFhdpEdge(fleet, cfg, run=run, edge=edge) if recovery else FhdpEdge(fleet, cfg, run, edge=edge)
    # step numbers above any an earlier run of this edge handed out: a vehicle never takes a frame left over
    # from a pipeline of a crashed edge for one of ours (it drops frames below each assignment's first step)
    fhdp.control.steps = StepNumbers(start=time.time_ns() // 1000)
    try:
        rounds = CommittedRounds(fhdp, run, use_cloud)
        resumed = rounds.resume() if resume else None
        if resumed:
            log.warning("%s: %s", fleet.edge.id, resumed)
            console.print(f"{fleet.edge.id}: {resumed}")
        # a fresh start waits for the whole fleet; a resumed one goes on after RESUME_WAIT_S with whoever is
        # back (a vehicle lost while the edge was down must not keep the fleet from training)
        missing = wait_for_vehicles(fhdp.edge, [v.id for v in fleet.vehicles],
                                    timeout_s=RESUME_WAIT_S if resumed else 120.0, require_all=not resumed)
        if missing:
            log.warning("%s: resuming without %s (not registered %.0f s after the restart)", fleet.edge.id,
                        missing, RESUME_WAIT_S)
            for v in missing if recovery else ():
                fhdp.notify_failure(v, "not back when the edge resumed")
        clients = fhdp.clients()
        console.print(plan_table(clients, fhdp.heads))
        with Progress(TextColumn("[bold]FHDP"), BarColumn(), MofNCompleteColumn(), TextColumn("rounds"),
                      TimeElapsedColumn(), console=console, transient=True) as progress:
            task = progress.add_task("rounds", total=cfg.rounds, completed=min(rounds.next_round, cfg.rounds))
            for rnd in range(rounds.next_round, cfg.rounds):
                finishing = rounds.pending is not None
                summary = rounds.run_round(rnd, clients)
                progress.console.print(
                    f"round {rnd}: train loss {summary['train_loss']:.4f}  clients {summary['accepted']}/"
                    f"{summary['clients']}  samples {summary['samples']}  moved {summary['moved_bytes'] / 1e6:.2f} MB"
                    f"  {summary['seconds']:.1f} s" + ("  (cloud aggregated)" if use_cloud else "")
                    + ("  (trained before the edge restarted)" if finishing else ""))
                progress.advance(task)
        if run is not None:
            atomic_write_bytes(run.path / "global_encoder.safetensors", to_bytes(fhdp.model.state_dict()))
        fhdp.edge.stop_fleet()
        console.print(fhdp.edge.table())
        return rounds.summaries
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
    parser.add_argument("--no-resume", action="store_true",
                        help=f"start at round 0 even if --run-dir holds a checkpoint ({CHECKPOINT}, written after "
                             "every committed round); by default an edge started again with the same --run-dir "
                             "resumes after its last committed round, which is how a launcher restarts a crashed edge")
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
        run_training(fleet, cfg, run, console, use_cloud=args.cloud, recovery=args.recovery,
                     resume=not args.no_resume)
    except CheckpointError as exc:
        log.error("cannot resume: %s", exc)
        return 2
    except (TimeoutError, RuntimeError, ValueError, BusError) as exc:
        log.error("FHDP training failed: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
