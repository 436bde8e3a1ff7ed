"""FHDP at the edge: FL rounds over resource-sufficient vehicles and clusters, with dynamic stage exchange.

Each round the edge selects its clients: every resource-sufficient vehicle (a one-stage pipeline of its
own) and every cluster (one FL client, trained by pipeline parallelism). A cluster runs its essential
pipelines in rotation (SWIFT plans one per member, with that member as the data-owning first stage), so
every member's data trains the model; between pipelines only the layers whose owner changes move, with
their optimizer state. At the end of the round the edge fetches each client's layers, FedAvgs the
clients by samples trained (`RoundCollector`: each update counted once, deadline + quorum), and -- with
a cloud -- uploads the edge aggregate and takes the cloud's global model back.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from flad_core import codec
from flad_core.bus import BusError
from flad_core.fleet import FleetConfig
from flad_core.runs import RunDir
from flad_edge.fl.aggregation import RoundCollector, Update
from flad_edge.fl.cloud import download, upload
from flad_edge.fl.edge_server import EdgeServer
from flad_vehicle.encoder.config import get_config
from flad_vehicle.encoder.model import VisionEncoder
from flad_vehicle.encoder.partition import Partitioner
from flad_vehicle.fhdp.layerstore import LayerStore
from flad_vehicle.fhdp.ushape import head_start, u_profile
from flad_vehicle.fhdp.worker import (
    EDGE_OWNER,
    SERVICE_ASSIGN,
    SERVICE_EDGE_LAYERS,
    SERVICE_EDGE_READY,
    SERVICE_EDGE_REPORT,
    SERVICE_LAYERS,
    SERVICE_START,
    LayerServer,
    fetch_layers,
)

log = logging.getLogger("flad_edge.fhdp.orchestrator")


@dataclass
class FhdpConfig:
    """How the edge trains (the paper: batch 4, 5 local epochs; ours are scaled for a CPU demo)."""

    rounds: int = 3
    local_steps: int = 3            # training steps per pipeline per round
    batch_size: int = 4
    n_micro: int = 2
    schedule: str = "1f1b"
    codec: str = "fp32"
    time_scale: float = 0.02        # emulation: every device runs 1/time_scale times faster than real
    round_deadline_s: float = 600.0
    quorum: int = 1
    clusters: list[list[str]] = field(default_factory=list)   # explicit clusters; others train alone
    planner: str = "exact"          # SWIFT method for the essential pipelines (exact: optimal, small clusters)
    encoder: str = "tiny"
    seed: int = 0
    # True: FHDP, a cluster rotates over its essential pipelines so every member's data trains the model.
    # False: traditional HDP, a cluster runs only its first pipeline (only that member's data is used), for
    # len(members) x local_steps steps so the step/sample budget per round is the same (non-IID studies).
    rotate: bool = True
    # True: U-shaped pipelines -- each pipeline's data owner (stage 0) also holds the task heads and the loss;
    # the last trunk stage returns its features to it, so labels never leave the vehicle that owns them
    # (flad_vehicle.fhdp.ushape). False (default): labels travel with the activations to the last stage.
    u_shaped: bool = False

    def validate(self) -> None:
        if self.schedule not in ("gpipe", "1f1b"):
            raise ValueError(f"schedule must be gpipe or 1f1b, got {self.schedule!r}")
        if self.n_micro < 1 or self.batch_size < self.n_micro:
            raise ValueError("need 1 <= n_micro <= batch_size")
        if not isinstance(self.u_shaped, bool):
            raise ValueError(f"u_shaped must be true or false, got {self.u_shaped!r}")


@dataclass
class Client:
    """One FL client: a vehicle alone (one pipeline of one stage) or a cluster (its essential pipelines)."""

    id: str
    members: list[str]
    pipelines: list[list[tuple[str, int, int]]]   # each: [(vehicle, start, end)] in stage order


class FhdpEdge:
    def __init__(self, fleet: FleetConfig, cfg: FhdpConfig, run: RunDir | None = None,
                 edge: EdgeServer | None = None) -> None:
        self.fleet, self.cfg, self.run = fleet, cfg, run
        torch.manual_seed(cfg.seed)
        self.model = VisionEncoder(get_config(cfg.encoder))
        self.part = Partitioner(self.model)
        self.layers = list(self.part.graph.names)
        self.global_store = LayerStore(self.model, self.layers)
        self.global_store.owned = set(self.layers)
        self.edge = edge or EdgeServer(fleet)
        self.bus = self.edge.bus
        self.server = LayerServer(fleet.edge.id, lambda names: self.global_store.export(names, with_optimizer=False))
        self._events: dict[tuple[str, str, str], threading.Event] = {}
        self._reports: dict[tuple[str, str, str], Any] = {}
        self._lock = threading.Lock()
        for service, handler, rtype in ((SERVICE_EDGE_LAYERS, self.server.handle, "flad_msgs/msg/WeightChunk"),
                                        (SERVICE_EDGE_READY, self._on_ready, "flad_msgs/msg/Ack"),
                                        (SERVICE_EDGE_REPORT, self._on_report, "flad_msgs/msg/Ack")):
            req = "flad_msgs/msg/LayerRequest" if service == SERVICE_EDGE_LAYERS else "flad_msgs/msg/StepReport"
            self.bus.serve(service, req, rtype, handler)
        self.version = 0
        self.collectors: dict[int, RoundCollector] = {}

    # -- reports from vehicles (bus thread) ----------------------------------------------------------
    def _slot(self, kind: str, pipeline_id: str, vehicle: str) -> threading.Event:
        with self._lock:
            return self._events.setdefault((kind, pipeline_id, vehicle), threading.Event())

    def _record(self, kind: str, msg) -> Any:
        with self._lock:
            self._reports[(kind, msg.pipeline_id, msg.vehicle_id)] = msg
        self._slot(kind, msg.pipeline_id, msg.vehicle_id).set()
        return codec.new("flad_msgs/msg/Ack", ok=True, message="noted")

    def _on_ready(self, msg):
        return self._record("ready", msg)

    def _on_report(self, msg):
        return self._record("report", msg)

    def _wait(self, kind: str, pipeline_id: str, vehicles: list[str], timeout_s: float) -> dict[str, Any]:
        """Every member's report of `kind`; fails as soon as any member reports an error."""
        deadline = time.monotonic() + timeout_s
        out: dict[str, Any] = {}
        while len(out) < len(vehicles):
            for v in vehicles:
                if v in out or not self._slot(kind, pipeline_id, v).is_set():
                    continue
                rep = self._reports[(kind, pipeline_id, v)]
                if rep.error:
                    raise RuntimeError(f"{v} failed {kind} of {pipeline_id}: {rep.error}")
                out[v] = rep
            if len(out) < len(vehicles):
                if time.monotonic() > deadline:
                    missing = [v for v in vehicles if v not in out]
                    raise TimeoutError(f"{missing} did not report {kind} for {pipeline_id} within {timeout_s:.0f} s")
                time.sleep(0.01)
        return out

    # -- planning --------------------------------------------------------------------------------------
    def clients(self) -> list[Client]:
        """Clusters from the config (pipelines planned by SWIFT); every other vehicle trains alone."""
        n = len(self.layers)
        in_cluster = {v for c in self.cfg.clusters for v in c}
        out = [Client(v.id, [v.id], [[(v.id, 0, n)]]) for v in self.fleet.vehicles if v.id not in in_cluster]
        for i, members in enumerate(self.cfg.clusters):
            pipelines = self.essential_pipelines(members)
            out.append(Client(f"cluster{i + 1}", list(members), pipelines if self.cfg.rotate else pipelines[:1]))
        return out

    def steps_per_pipeline(self, client: Client) -> int:
        """FHDP: `local_steps` per pipeline; HDP (no rotation): the cluster's whole budget on its one pipeline."""
        return self.cfg.local_steps if self.cfg.rotate else self.cfg.local_steps * len(client.members)

    def essential_pipelines(self, members: list[str]) -> list[list[tuple[str, int, int]]]:
        """One pipeline per member, that member first (SWIFT plans the rest of the order and the cuts)."""
        from flad_edge.swift import Cluster, Vehicle, plan
        from flad_edge.swift.model import load_profile

        raw = self.layer_profile()
        if self.cfg.u_shaped:
            # SWIFT cuts the trunk only; the heads are the data owner's extra layers (see ushape.u_profile)
            raw = u_profile(raw, self.part.graph)
        profile = load_profile(raw)
        profiles = self.fleet.all_profiles()
        cluster = Cluster([Vehicle(m, profiles[self.fleet.vehicle(m).profile].mem_bytes,
                                   profiles[self.fleet.vehicle(m).profile].tflops,
                                   profiles[self.fleet.vehicle(m).profile].link_mbps, 1.0) for m in members],
                          n_batch=self.cfg.batch_size)
        pipelines = []
        for first in members:
            p = plan(cluster, profile, self.cfg.planner, first=first, objective="bottleneck")
            if not p.feasible:
                raise RuntimeError(f"SWIFT found no pipeline with {first} first: {p.reason}")
            pipe = [(str(v), s, e) for v, (s, e) in zip(p.path, p.ranges, strict=True)]
            if len(pipe) == 1:   # one stage (U-shaped or not): the whole model, heads included
                pipe = [(pipe[0][0], 0, len(self.layers))]
            pipelines.append(pipe)
        return pipelines

    def layer_profile(self) -> dict:
        if not hasattr(self, "_profile"):
            from flad_vehicle.encoder.model import batch_to_torch
            from flad_vehicle.encoder.profile import profile_model
            from flad_vehicle.encoder.synthetic import synthetic_batches

            batch = batch_to_torch(next(synthetic_batches(1, 2, seed=0)))
            self._profile = profile_model(VisionEncoder(get_config(self.cfg.encoder)), batch, measure=False)
        return self._profile

    # -- one client's round ----------------------------------------------------------------------------
    def _assignment(self, client: Client, pipeline: list[tuple[str, int, int]], owners: list[str], rnd: int,
                    first_step: int, steps: int | None = None):
        specs = {v.id: v for v in self.fleet.vehicles}
        stages = [codec.new("flad_msgs/msg/StageAssignment", vehicle_id=v, stage_index=i, layer_start=s, layer_end=e)
                  for i, (v, s, e) in enumerate(pipeline)]
        template = codec.new("flad_msgs/msg/PipelineTemplate", header=codec.header(), cluster_id=client.id,
                             method=self.cfg.planner, stages=stages)
        return codec.new(
            "flad_msgs/msg/PipelineAssignment", header=codec.header(),
            pipeline_id=f"r{rnd}-{client.id}-{pipeline[0][0]}-{uuid.uuid4().hex[:6]}", round=rnd,
            pipeline_template=template,
            member_ids=client.members, member_control_addresses=[specs[m].control for m in client.members],
            stage_inbox_addresses=[specs[v].data for v, _, _ in pipeline], layer_owner=owners,
            schedule=self.cfg.schedule, codec=self.cfg.codec, n_micro=self.cfg.n_micro,
            batch_size=self.cfg.batch_size, steps=steps or self.cfg.local_steps, first_step=first_step,
            time_scale=self.cfg.time_scale, u_shaped=self.u_shaped(pipeline))

    def u_shaped(self, pipeline: list[tuple[str, int, int]]) -> bool:
        """A multi-stage pipeline runs U-shaped when configured (one stage has no hop: it is the whole model)."""
        return self.cfg.u_shaped and len(pipeline) > 1

    def loss_stage(self, pipeline: list[tuple[str, int, int]]) -> int:
        """Index of the stage that computes (and reports) the loss."""
        return 0 if self.u_shaped(pipeline) else len(pipeline) - 1

    def owners_after(self, pipeline: list[tuple[str, int, int]], owners: list[str]) -> list[str]:
        """Layer holders once `pipeline` has run: its stages' ranges, and the heads on its data owner if U-shaped."""
        owners = list(owners)
        for v, s, e in pipeline:
            for i in range(s, e):
                owners[i] = v
        if self.u_shaped(pipeline):
            for i in range(head_start(self.part.graph), len(self.layers)):
                owners[i] = pipeline[0][0]
        return owners

    def train_client(self, client: Client, rnd: int, timeout_s: float) -> dict[str, Any]:
        """Run the client's pipelines in rotation; return its update (layers fetched back) and stats."""
        specs = {v.id: v for v in self.fleet.vehicles}
        owners = [EDGE_OWNER] * len(self.layers)
        stats: dict[str, Any] = {"client": client.id, "pipelines": [], "moved_bytes": 0, "samples": 0}
        step = rnd * 10_000
        n_steps = self.steps_per_pipeline(client)
        for pipeline in client.pipelines:
            a = self._assignment(client, pipeline, owners, rnd, step, n_steps)
            members = [v for v, _, _ in pipeline]
            for v in members:
                self.bus.request(SERVICE_ASSIGN, a, "flad_msgs/msg/Ack", address=specs[v].control)
            ready = self._wait("ready", a.pipeline_id, members, timeout_s)
            for v in members:
                self.bus.request(SERVICE_START, a, "flad_msgs/msg/Ack", address=specs[v].control)
            reports = self._wait("report", a.pipeline_id, members, timeout_s)
            last = reports[members[self.loss_stage(pipeline)]]
            moved = sum(r.layer_bytes_fetched for r in ready.values()) if owners[0] != EDGE_OWNER else 0
            stats["moved_bytes"] += moved
            stats["samples"] += n_steps * self.cfg.batch_size
            stats["pipelines"].append({"first": members[0], "stages": [(v, s, e) for v, s, e in pipeline],
                                       "loss": last.loss, "wall_s": max(r.wall_s for r in reports.values()),
                                       "moved_bytes": moved})
            step += n_steps
            owners = self.owners_after(pipeline, owners)
        # gather the client's model back, layer by layer from their owners
        state: dict[str, torch.Tensor] = {}
        by_owner: dict[str, list[str]] = {}
        for layer, owner in zip(self.layers, owners, strict=True):
            by_owner.setdefault(owner, []).append(layer)
        for owner, layers in by_owner.items():
            payload, _ = fetch_layers(self.bus, specs[owner].control, SERVICE_LAYERS, layers, self.fleet.edge.id)
            state.update({k[2:]: v for k, v in payload.items() if k.startswith("p/")})
        stats["loss"] = float(sum(p["loss"] for p in stats["pipelines"]) / len(stats["pipelines"]))
        return {"state": state, "stats": stats}

    # -- rounds ----------------------------------------------------------------------------------------
    def run_round(self, rnd: int, clients: list[Client]) -> dict[str, Any]:
        t0 = time.monotonic()
        collector = RoundCollector(rnd, [c.id for c in clients], self.cfg.round_deadline_s, self.cfg.quorum)
        self.collectors[rnd] = collector   # kept: a straggler's late offer is refused (and recorded) here
        results: dict[str, dict] = {}
        errors: dict[str, str] = {}

        def work(c: Client) -> None:
            try:
                out = self.train_client(c, rnd, self.cfg.round_deadline_s)
                results[c.id] = out["stats"]
                collector.offer(Update(c.id, rnd, f"{c.id}-r{rnd}-{uuid.uuid4().hex[:8]}", out["stats"]["samples"],
                                       out["state"]))
            except (BusError, TimeoutError, RuntimeError, ValueError) as exc:
                log.error("round %d: client %s failed: %s", rnd, c.id, exc)
                errors[c.id] = str(exc)

        threads = [threading.Thread(target=work, args=(c,), name=f"client-{c.id}", daemon=True) for c in clients]
        for t in threads:
            t.start()
        collector.wait()
        if not collector.updates:
            raise RuntimeError(f"round {rnd}: no client delivered an update ({errors})")
        state, samples = collector.aggregate()
        self.model.load_state_dict({**self.model.state_dict(), **state})
        self.version += 1
        summary = {"round": rnd, "clients": len(clients), "accepted": len(collector.updates),
                   "missing": collector.missing(), "samples": samples,
                   "train_loss": float(sum(r["loss"] for r in results.values()) / max(1, len(results))),
                   "moved_bytes": int(sum(r["moved_bytes"] for r in results.values())),
                   "seconds": round(time.monotonic() - t0, 2), "errors": errors,
                   "per_client": {k: {"loss": v["loss"], "moved_bytes": v["moved_bytes"],
                                      "pipelines": len(v["pipelines"])} for k, v in results.items()}}
        if self.run is not None:
            self.run.log_metrics(summary)
        return summary


def wait_for_vehicles(edge: EdgeServer, ids: list[str], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = {r.vehicle_id for r in edge.snapshot() if r.state in ("alive", "registered")}
        if set(ids) <= alive:
            return
        time.sleep(0.1)
    alive = {r.vehicle_id for r in edge.snapshot()}
    raise TimeoutError(f"vehicles {sorted(set(ids) - alive)} did not register within {timeout_s:.0f} s")


def plan_table(clients: list[Client], heads: tuple[int, int] | None = None) -> Table:
    """The clients and their pipelines; `heads` = (H, n): U-shaped, the data owner also holds layers [H, n)."""
    title = "FHDP clients this edge trains (each cluster is one FL client)"
    if heads is not None:
        title += f"; U-shaped: heads [{heads[0]}:{heads[1]}) on each data owner"
    table = Table(title=title)
    for col in ("client", "members", "essential pipelines (vehicle[layers])"):
        table.add_column(col)

    def fmt(p: list[tuple[str, int, int]]) -> str:
        text = " -> ".join(f"{v}[{s}:{e})" for v, s, e in p)
        return text + (f" -> {p[0][0]}[{heads[0]}:{heads[1]})" if heads is not None and len(p) > 1 else "")

    for c in clients:
        pipes = "\n".join(fmt(p) for p in c.pipelines)
        table.add_row(c.id, ", ".join(c.members), pipes)
    return table


def run_training(fleet: FleetConfig, cfg: FhdpConfig, run: RunDir | None, console: Console,
                 use_cloud: bool = False, recovery: bool = False, edge: EdgeServer | None = None
                 ) -> list[dict[str, Any]]:
    """The edge's whole job: wait for the fleet, plan clients, run the rounds (with the cloud tier), report.

    With `recovery`, clusters survive departures (quick recovery: backups, preventive templates, layer moves).
    """
    if recovery:
        from flad_edge.fhdp.recovery.edge import RecoveringFhdpEdge

        if cfg.u_shaped:
            raise ValueError("quick recovery does not support U-shaped pipelines yet (set u_shaped: false)")

        fhdp: FhdpEdge = RecoveringFhdpEdge(fleet, cfg, run=run, edge=edge)
    else:
        fhdp = FhdpEdge(fleet, cfg, run, edge=edge)
    try:
        wait_for_vehicles(fhdp.edge, [v.id for v in fleet.vehicles])
        clients = fhdp.clients()
        console.print(plan_table(clients, (head_start(fhdp.part.graph), len(fhdp.layers)) if cfg.u_shaped else None))
        summaries = []
        with Progress(TextColumn("[bold]FHDP"), BarColumn(), MofNCompleteColumn(), TextColumn("rounds"),
                      TimeElapsedColumn(), console=console, transient=True) as progress:
            task = progress.add_task("rounds", total=cfg.rounds)
            for rnd in range(cfg.rounds):
                summary = fhdp.run_round(rnd, clients)
                if use_cloud:
                    state = {k: v for k, v in fhdp.model.state_dict().items()}
                    upload(fhdp.bus, state, sender=fleet.edge.id, rnd=rnd, samples=summary["samples"],
                           update_id=f"{fleet.edge.id}-r{rnd}")
                    fhdp.model.load_state_dict(download(fhdp.bus, rnd, fleet.edge.id))
                    summary["cloud"] = True
                summaries.append(summary)
                progress.console.print(
                    f"round {rnd}: train loss {summary['train_loss']:.4f}  clients {summary['accepted']}/"
                    f"{summary['clients']}  samples {summary['samples']}  moved {summary['moved_bytes'] / 1e6:.2f} MB"
                    f"  {summary['seconds']:.1f} s" + ("  (cloud aggregated)" if use_cloud else ""))
                progress.advance(task)
        if run is not None:
            from flad_core.atomic import atomic_write_bytes
            from flad_core.weights import to_bytes

            atomic_write_bytes(run.path / "global_encoder.safetensors", to_bytes(fhdp.model.state_dict()))
        fhdp.edge.stop_fleet()
        console.print(fhdp.edge.table())
        return summaries
    finally:
        fhdp.edge.close()


def load_fhdp_config(path: str | None) -> FhdpConfig:
    from flad_core.config import load_yaml

    return load_yaml(FhdpConfig, path) if path else FhdpConfig()


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from flad_core.config import ConfigError
    from flad_core.procs import install_stop_handlers
    from flad_core.roles import add_role_args, fleet_from_args, setup_role_logging

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
