"""FL clients of an FHDP edge: `train(round, global_model) -> Update | Failure`.

A client is what FedAvg averages: a resource-sufficient vehicle alone (`SoloClient`, a one-stage pipeline)
or a cluster (`RotationClient`, trained by pipeline parallelism). A cluster runs its essential pipelines in
rotation -- one per member, that member first, so every member's data trains the model -- and between
pipelines only the layers whose owner changes move. Quick recovery adds `RecoveringClient`
(`fhdp.recovery.client`). Each round a client goes through explicit states:

    plan -> assign -> run -> record  (once per pipeline)  -> gather

and hands its result back to the round loop as a value: the update (FedAvg weight = samples trained,
metrics = `ClientStats`) or a `Failure` naming why.
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

from flad_core.bus import BusError
from flad_core.protocol import EDGE_OWNER, SERVICE_ASSIGN, SERVICE_START
from flad_edge.fhdp.config import FhdpConfig
from flad_edge.fhdp.control import READY, REPORT, PipelineControl
from flad_edge.fl.aggregation import Update
from flad_vehicle.fhdp.fanin import FanInPlan
from flad_vehicle.fhdp.layerstore import LayerStore
from flad_vehicle.fhdp.pipeline import Assignment, Pipeline, Stage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Failure:
    """A client that delivered no update this round, and why."""

    client: str
    round: int
    reason: str


@dataclass
class PipelineRun:
    """One essential pipeline's part of a client's round."""

    first: str
    stages: list[Stage]
    loss: float
    steps: int = 0
    wall_s: float = 0.0
    moved_bytes: int = 0


@dataclass
class ClientStats:
    """What a client's round did (the round summary and the run log read these)."""

    client: str
    pipelines: list[PipelineRun] = field(default_factory=list)
    moved_bytes: int = 0            # layer bytes that moved between members (not the round's first fetch)
    samples: int = 0
    steps: int = 0
    steps_lost: int = 0             # quick recovery: steps whose updates a departure destroyed
    recoveries: int = 0
    handovers: int = 0
    skipped: list[str] = field(default_factory=list)   # data owners whose pipeline could not run
    steps_dropped: int = 0          # steps whose gradients were non-finite or exploding: not applied anywhere
    devices: dict[str, str] = field(default_factory=dict)   # vehicle -> "device precision" its reports named

    def note_devices(self, reports: dict) -> None:
        """Which device (and precision) each reporting vehicle trained on: the round summary says so."""
        for vid, r in reports.items():
            if getattr(r, "device", ""):
                self.devices[vid] = f"{r.device} {r.precision or 'fp32'}"

    @property
    def loss(self) -> float:
        """Mean training loss over the round's steps (pipelines weighted by their steps; a pipeline whose loss
        was never reported -- its last stage left -- is left out; NaN when none reported one)."""
        known = [p for p in self.pipelines if math.isfinite(p.loss)]
        if not known:
            return float("nan")
        total = sum(p.steps for p in known)
        if total == 0:
            return float(sum(p.loss for p in known) / len(known))
        return float(sum(p.loss * p.steps for p in known) / total)


class RotationClient:
    """A cluster: its essential pipelines in rotation (FHDP), or only the first one (HDP, `rotate: false`)."""

    kind = "cluster"

    def __init__(self, client_id: str, members: list[str], pipelines: list[Pipeline], control: PipelineControl,
                 cfg: FhdpConfig, heads: tuple[int, int] | None = None) -> None:
        self.id, self.members, self.pipelines = client_id, list(members), list(pipelines)
        self.control, self.cfg = control, cfg
        self.layers = control.layers
        self.heads = heads          # U-shaped: the [start, end) layer range the data owner also holds

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.id!r}, {self.members})"

    # -- the strategy interface ---------------------------------------------------------------------------
    def train(self, rnd: int, global_model: LayerStore) -> Update | Failure:
        """One round from `global_model` (the edge serves it to the first pipeline's stages)."""
        try:
            state, stats = self.run_round(rnd, global_model)
        except (BusError, TimeoutError, RuntimeError, ValueError) as exc:
            log.error("round %d: client %s failed: %s", rnd, self.id, exc)
            return Failure(self.id, rnd, str(exc))
        except Exception as exc:   # never lose a client silently: the round would wait for it
            log.exception("round %d: client %s failed", rnd, self.id)
            return Failure(self.id, rnd, f"{type(exc).__name__}: {exc}")
        return Update(self.id, rnd, f"{self.id}-r{rnd}-{uuid.uuid4().hex[:8]}", stats.samples, state, metrics=stats)

    # -- states ------------------------------------------------------------------------------------------------
    def steps_per_pipeline(self) -> int:
        """FHDP: `local_steps` per pipeline; HDP (no rotation): the cluster's whole budget on its one pipeline."""
        return self.cfg.local_steps if self.cfg.rotate else self.cfg.local_steps * len(self.members)

    def plan(self) -> list[Pipeline]:
        """The pipelines of this round, in the order they run."""
        return self.pipelines if self.cfg.rotate else self.pipelines[:1]

    def assign(self, pipeline: Pipeline, owners: list[str], rnd: int, steps: int) -> tuple[Assignment, dict]:
        """Send the assignment; every stage fetches the layers it lacks; returns (assignment, ready reports)."""
        a = self.control.assignment(self.id, self.members, pipeline, owners, rnd, steps)
        self.control.send(SERVICE_ASSIGN, a)
        return a, self.control.board.wait(READY, a.pipeline_id, pipeline.members, self.cfg.round_deadline_s)

    def run(self, a: Assignment) -> dict[str, Any]:
        """Start the prepared stages and wait until each reports its steps."""
        self.control.send(SERVICE_START, a)
        return self.control.board.wait(REPORT, a.pipeline_id, a.pipeline.members, self.cfg.round_deadline_s)

    def record(self, stats: ClientStats, a: Assignment, ready: dict, reports: dict, first_fetch: bool) -> None:
        moved = 0 if first_fetch else sum(r.layer_bytes_fetched for r in ready.values())
        loss_report = reports[a.pipeline.members[a.loss_stage]]
        stats.moved_bytes += moved
        stats.samples += a.steps * self.cfg.batch_size
        stats.steps += a.steps
        stats.steps_dropped += max(int(r.steps_dropped) for r in reports.values())
        stats.note_devices(reports)
        stats.pipelines.append(PipelineRun(a.pipeline.first, list(a.pipeline), loss_report.loss, a.steps,
                                           max(r.wall_s for r in reports.values()), moved))

    def owners_after(self, pipeline: Pipeline, owners: list[str]) -> list[str]:
        """Layer holders once `pipeline` has run: its stages' ranges, and the heads on its data owner if U-shaped."""
        owners = list(owners)
        for v, s, e in pipeline:
            owners[s:e] = [v] * (e - s)
        if self.heads is not None and self.cfg.u_shaped and len(pipeline) > 1:
            h, n = self.heads
            owners[h:n] = [pipeline.first] * (n - h)
        return owners

    def gather(self, owners: list[str], global_model: LayerStore) -> dict[str, torch.Tensor]:
        return self.control.gather(owners, self.control.fleet.edge.id)

    def run_round(self, rnd: int, global_model: LayerStore) -> tuple[dict[str, torch.Tensor], ClientStats]:
        stats = ClientStats(self.id)
        owners = [EDGE_OWNER] * len(self.layers)
        for pipeline in self.plan():
            a, ready = self.assign(pipeline, owners, rnd, self.steps_per_pipeline())
            reports = self.run(a)
            self.record(stats, a, ready, reports, first_fetch=owners[0] == EDGE_OWNER)
            owners = self.owners_after(pipeline, owners)
        return self.gather(owners, global_model), stats


class FanInClient(RotationClient):
    """A cluster that trains every member's data in every step (the fan-in schedule, `flad_vehicle.fhdp.fanin`):
    one assignment a round, `local_steps` steps of members x batch_size samples, so the rotation's samples per
    round in a members-th of its steps. The replicated raw-input layers are gathered from one keeper (the hub
    when it is a source): the replicas are identical after every step."""

    def __init__(self, client_id: str, members: list[str], plan: FanInPlan, control: PipelineControl,
                 cfg: FhdpConfig) -> None:
        super().__init__(client_id, members, [plan.trunk], control, cfg)
        self.fanin = plan

    def keeper(self) -> str:
        """The source whose replica of layers [0, cut) the edge gathers."""
        return self.fanin.hub if self.fanin.hub in self.fanin.sources else self.fanin.sources[0]

    def run_round(self, rnd: int, global_model: LayerStore) -> tuple[dict[str, torch.Tensor], ClientStats]:
        stats = ClientStats(self.id)
        plan = self.fanin
        owners = [EDGE_OWNER] * len(self.layers)
        a = self.control.assignment(self.id, self.members, plan.trunk, owners, rnd, self.cfg.local_steps,
                                    fanin_sources=plan.sources)
        self.control.send(SERVICE_ASSIGN, a)
        deadline = self.cfg.round_deadline_s
        self.control.board.wait(READY, a.pipeline_id, a.participants, deadline)
        self.control.send(SERVICE_START, a)
        reports = self.control.board.wait(REPORT, a.pipeline_id, a.participants, deadline)
        stats.samples += a.steps * self.cfg.batch_size * len(plan.sources)
        stats.steps += a.steps
        stats.steps_dropped += max(int(r.steps_dropped) for r in reports.values())
        stats.note_devices(reports)
        loss = reports[plan.trunk.members[-1]].loss
        stats.pipelines.append(PipelineRun(plan.hub, list(plan.trunk), loss, a.steps,
                                           max(r.wall_s for r in reports.values()), 0))
        owners = [self.keeper()] * plan.cut + self.owners_after(plan.trunk, owners)[plan.cut:]
        return self.gather(owners, global_model), stats


class SoloClient(RotationClient):
    """A resource-sufficient vehicle: one pipeline of one stage, the whole model."""

    kind = "solo"

    def __init__(self, vehicle: str, control: PipelineControl, cfg: FhdpConfig) -> None:
        super().__init__(vehicle, [vehicle], [Pipeline.whole(vehicle, len(control.layers))], control, cfg)
