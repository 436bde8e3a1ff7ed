"""A cluster client that survives departures: quick recovery (paper §4.2) inside a client's round.

`RecoveringClient` trains its essential pipelines in rotation like `RotationClient`; each pipeline of the
round goes through explicit states until its steps are done or its data owner is gone:

    PLAN ----> ASSIGN ----> RUN ----> RECORD ----> PLAN ...
      |          |           |
      |          +-----------+--> RECOVER --> PLAN      (a member left: unplanned)
      +--> HAND_OVER --> PLAN                           (a member is about to leave: planned)

  * PLAN: re-plan on the survivors' preventive template if a member left meanwhile; if a member's predicted
    dwell time ends before the remaining steps would, run only the steps that fit, or hand over now.
  * ASSIGN / RUN: the two protocol phases (`vehicle/assign`, `vehicle/start`), watching for departures.
  * RECOVER: abort the survivors, switch to the survivors' template (or keep the layers in place when that
    is cheaper), restore departed owners' layers from the edge backup, count the steps lost.
  * HAND_OVER: the leaving vehicle's layers move from the vehicle itself, at a step boundary: nothing lost.
  * RECORD: count the steps and the loss, stamp the resumption of a pending recovery.
Every resumption runs in a fresh range of step numbers, so stale frames of an aborted attempt can never be
mistaken for new ones; the data owner's batch stream continues across attempts (same pipeline base id).
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from flad_core.bus import BusError
from flad_core.protocol import ABORTED, BACKUP_OWNER, EDGE_OWNER, SERVICE_ASSIGN, SERVICE_START
from flad_edge.fhdp.client import ClientStats, PipelineRun, RotationClient
from flad_edge.fhdp.config import FhdpConfig
from flad_edge.fhdp.control import READY, REPORT, PipelineControl
from flad_edge.fhdp.recovery.backups import EdgeBackups
from flad_edge.fhdp.recovery.detection import Membership, ProgressTracker
from flad_edge.fhdp.recovery.moves import Move, departed_share, keep_in_place, moved_bytes, plan_moves
from flad_edge.fhdp.recovery.records import PipelineFailedError, RecoveryConfig, RecoveryRecord
from flad_vehicle.fhdp.layerstore import LayerStore
from flad_vehicle.fhdp.pipeline import Assignment, Pipeline, pipeline_from_owners

log = logging.getLogger(__name__)


@dataclass
class RecoveryContext:
    """Edge-wide recovery machinery that every recovering client of the edge shares."""

    rcfg: RecoveryConfig
    membership: Membership
    progress: ProgressTracker
    backups: EdgeBackups
    global_store: LayerStore
    layer_bytes: dict[str, int]
    model_bytes: int
    leaving_within: Callable[[list[str], float], dict[str, float]]   # members -> seconds of dwell left
    abort: Callable[..., None]                                        # (pipeline id, vehicles, reason, wait=)
    snapshot: Callable[[], list[Any]]                                 # the edge's vehicle records (liveness)
    records: list[RecoveryRecord] = field(default_factory=list)
    handovers: list[dict[str, Any]] = field(default_factory=list)


class Phase(enum.Enum):
    PLAN = "plan"
    ASSIGN = "assign"
    RUN = "run"
    RECORD = "record"
    RECOVER = "recover"
    HAND_OVER = "hand over"
    DONE = "done"


@dataclass
class ClientRound:
    """A recovering client's round so far."""

    rnd: int
    plans: dict[str, Pipeline]                  # data owner -> its pipeline on the members still here
    owners: list[str]                           # current holder of each layer
    layer_steps: dict[str, list[int]]           # layer -> the (absolute) steps that trained it this round
    stats: ClientStats
    pending: RecoveryRecord | None = None       # a recovery waiting for its first completed step


@dataclass
class PipelineRound:
    """One data owner's pipeline within the round: its attempts, until its steps are done or it ends."""

    first: str
    pipeline: Pipeline | None
    remaining: int
    base: str
    attempts: int = 0
    done: int = 0
    loss_sum: float = 0.0
    loss_steps: int = 0                         # steps whose loss was reported (a departure loses the report)
    moved: int = 0
    steps: int = 0                              # steps of the current attempt
    a: Assignment | None = None
    started: bool = False
    reports: dict[str, Any] = field(default_factory=dict)
    failure: PipelineFailedError | None = None
    leaving: set[str] = field(default_factory=set)


class RecoveringClient(RotationClient):
    """A cluster client with quick recovery (see the module docstring)."""

    def __init__(self, client_id: str, members: list[str], pipelines: list[Pipeline], control: PipelineControl,
                 cfg: FhdpConfig, ctx: RecoveryContext, templates: Any = None, swift: tuple[Any, Any] | None = None
                 ) -> None:
        super().__init__(client_id, members, pipelines, control, cfg)
        self.ctx, self.rcfg = ctx, ctx.rcfg
        self.templates = templates      # PreventiveTemplates (built in the background), None for one member
        self.swift = swift              # (SWIFT cluster, layer profile): the keep-in-place cost check

    # -- the round ---------------------------------------------------------------------------------------------
    def run_round(self, rnd: int, global_model: LayerStore) -> tuple[dict[str, torch.Tensor], ClientStats]:
        cr = self._begin(rnd)
        usual = [p.first for p in self.pipelines]
        for first in [f for f in usual if f in cr.plans] + [f for f in cr.plans if f not in usual]:
            if self.ctx.membership.is_departed(first):
                cr.stats.skipped.append(first)
                continue
            pr = PipelineRound(first, cr.plans[first], self.steps_per_pipeline(),
                               self.control.pipeline_base(rnd, self.id, first))
            phase = Phase.PLAN
            while phase is not Phase.DONE:
                phase = self._step(phase, cr, pr)
            self._close_pipeline(cr, pr)
        if cr.pending is not None and not cr.pending.t_resumed:
            cr.pending.t_resumed = math.nan   # no pipeline ran after it in this round
        if not cr.stats.pipelines:
            raise RuntimeError(f"{self.id}: no pipeline completed a step this round")
        return self.gather(cr.owners, global_model), cr.stats

    def _step(self, phase: Phase, cr: ClientRound, pr: PipelineRound) -> Phase:
        handlers = {Phase.PLAN: self._plan, Phase.ASSIGN: self._assign, Phase.RUN: self._run,
                    Phase.RECORD: self._record, Phase.RECOVER: self._recover, Phase.HAND_OVER: self._hand_over}
        return handlers[phase](cr, pr)

    def _begin(self, rnd: int) -> ClientRound:
        """Plan the round: a fresh backup store, departures noticed between rounds, the survivors' pipelines."""
        self.ctx.backups.start_round(self.id, self.members, self.control.steps.peek())
        failed = self.ctx.membership.failed_among(self.members)
        if failed:
            self.ctx.membership.take_out(failed[0], lost=True)
        alive = self.ctx.membership.alive(self.members)
        if not alive:
            raise RuntimeError(f"{self.id}: no member left")
        plans, _ = self.pipelines_for(alive)
        stats = ClientStats(self.id)
        return ClientRound(rnd, plans, [EDGE_OWNER] * len(self.layers), {layer: [] for layer in self.layers}, stats)

    def _close_pipeline(self, cr: ClientRound, pr: PipelineRound) -> None:
        cr.stats.moved_bytes += pr.moved
        cr.stats.steps += pr.done
        cr.stats.samples += pr.done * self.cfg.batch_size
        if pr.done:
            loss = pr.loss_sum / pr.loss_steps if pr.loss_steps else float("nan")
            cr.stats.pipelines.append(PipelineRun(pr.first, list(pr.pipeline or []), loss, pr.done,
                                                  moved_bytes=pr.moved))

    # -- states --------------------------------------------------------------------------------------------------
    def _plan(self, cr: ClientRound, pr: PipelineRound) -> Phase:
        if pr.remaining <= 0 or self.ctx.membership.is_departed(pr.first):
            return Phase.DONE
        assert pr.pipeline is not None
        if any(self.ctx.membership.is_departed(v) for v in pr.pipeline.members):
            # a member left while another pipeline ran: this one starts on the survivors' template
            cr.plans, _ = self.pipelines_for(self.ctx.membership.alive(self.members))
            if pr.first not in cr.plans:
                return Phase.DONE
            pr.pipeline = cr.plans[pr.first]
        pr.steps = pr.remaining
        margin = self.rcfg.handover_margin_s
        leaving = self.ctx.leaving_within(pr.pipeline.members, margin + self.ctx.progress.estimate(pr.steps))
        if leaving:
            fit = min(leaving.values()) - margin
            step_time = self.ctx.progress.step_time
            pr.steps = max(0, min(pr.remaining, int(fit / step_time))) if step_time else 0
            if pr.steps == 0:
                pr.leaving = set(leaving)
                return Phase.HAND_OVER
        return Phase.ASSIGN

    def _assign(self, cr: ClientRound, pr: PipelineRound) -> Phase:
        assert pr.pipeline is not None
        a = self.control.assignment(self.id, self.members, pr.pipeline, cr.owners, cr.rnd, pr.steps,
                                    pipeline_id=pr.base, attempt=pr.attempts)
        a.backup_every, a.link_timeout_s, a.publish_progress = self.rcfg.backup_every, self.rcfg.link_timeout_s, True
        pr.a, pr.started, pr.failure = a, False, None
        pr.attempts += 1
        try:
            self.command(SERVICE_ASSIGN, a)
            ready = self.wait_reports(READY, a, self.cfg.round_deadline_s)
        except PipelineFailedError as exc:
            pr.failure = exc
            return Phase.RECOVER
        fetched = sum(r.layer_bytes_fetched for r in ready.values())
        if any(o != EDGE_OWNER for o in cr.owners):
            pr.moved += fetched
        if cr.pending is not None:
            cr.pending.moved_bytes = fetched
            cr.pending.t_redeployed = time.time()
        cr.owners = pr.pipeline.owners(len(self.layers))
        return Phase.RUN

    def _run(self, cr: ClientRound, pr: PipelineRound) -> Phase:
        assert pr.a is not None
        pr.started = True
        try:
            self.command(SERVICE_START, pr.a)
            pr.reports = self.wait_reports(REPORT, pr.a, self.cfg.round_deadline_s)
        except PipelineFailedError as exc:
            pr.failure = exc
            return Phase.RECOVER
        return Phase.RECORD

    def _record(self, cr: ClientRound, pr: PipelineRound) -> Phase:
        a = pr.a
        assert a is not None and pr.pipeline is not None
        if cr.pending is not None:
            cr.pending.t_resumed = self.ctx.progress.first_step_at(a.pipeline_id) or time.time()
            if not cr.pending.t_redeployed:
                cr.pending.t_redeployed = cr.pending.t_resumed
            cr.pending = None
        last = pr.reports[pr.pipeline.members[-1]]
        self._count_steps(cr, a, pr.pipeline, last.steps_done)
        cr.stats.steps_dropped += max(int(r.steps_dropped) for r in pr.reports.values())
        cr.stats.note_devices(pr.reports)
        pr.done += last.steps_done
        pr.remaining -= last.steps_done
        pr.loss_sum += last.loss * last.steps_done
        pr.loss_steps += last.steps_done
        return Phase.PLAN

    def _recover(self, cr: ClientRound, pr: PipelineRound) -> Phase:
        """Abort the survivors, switch to the survivors' template, plan the moves; the data owner gone: DONE."""
        a, fail = pr.a, pr.failure
        assert a is not None and fail is not None and pr.pipeline is not None
        rec, pr.pipeline, cr.owners, done = self._recover_from(cr, pr.first, a, pr.pipeline, fail, pr.started)
        pr.done += done
        pr.remaining -= done
        cr.stats.steps_lost = max(cr.stats.steps_lost, rec.steps_lost)
        cr.stats.recoveries += 1
        if cr.pending is not None and not cr.pending.t_resumed:
            cr.pending.t_resumed = self.ctx.progress.first_step_at(a.pipeline_id) or 0.0
        cr.pending = rec
        alive = self.ctx.membership.alive(self.members)
        if alive:
            cr.plans, _ = self.pipelines_for(alive)
        if pr.pipeline is None:
            return Phase.DONE
        if pr.attempts > self.rcfg.max_recoveries_per_pipeline:
            raise RuntimeError(f"{self.id}: pipeline {pr.base} failed {pr.attempts} times") from fail
        return Phase.PLAN

    def _hand_over(self, cr: ClientRound, pr: PipelineRound) -> Phase:
        """Planned departure at a step boundary: the leaving vehicles' layers move from them (no loss)."""
        assert pr.pipeline is not None
        leaving = pr.leaving
        self.ctx.membership.take_out(leaving)
        alive = self.ctx.membership.alive(self.members)
        cr.stats.handovers += 1
        entry: dict[str, Any] = {"client": self.id, "round": cr.rnd, "leaving": sorted(leaving), "t": time.time(),
                                 "moved_bytes": 0, "steps_lost": 0}
        self.ctx.handovers.append(entry)
        log.info("%s: planned departure of %s: handing over before it leaves", self.id, sorted(leaving))
        if pr.first in leaving or not alive:
            return Phase.DONE     # the data owner leaves: its pipeline ends, its layers are gathered from it now
        plans, _ = self.pipelines_for(alive)
        new = plans.get(pr.first)
        _, new, choice, moves = self._replacement(cr, leaving, new, lost=False)
        if moves is not None:
            if choice != "template":
                entry["choice"] = choice
            entry["planned_moved_bytes"] = moved_bytes(moves)
            entry["moves"] = [(m.layer, m.source, m.dest) for m in moves]
        # the owners stay as they are: the leaving vehicle still serves its layers to their new owners
        pr.pipeline = new
        cr.plans = plans
        return Phase.PLAN if new is not None else Phase.DONE

    # -- recovery ---------------------------------------------------------------------------------------------
    def _recover_from(self, cr: ClientRound, first: str, a: Assignment, pipeline: Pipeline,
                      fail: PipelineFailedError, started: bool
                      ) -> tuple[RecoveryRecord, Pipeline | None, list[str], int]:
        """Returns (record, new pipeline or None when the data owner left, new layer owners, steps completed)."""
        t_detect = time.time()
        departed = set(fail.departed)
        survivors = [v for v in pipeline.members if v not in departed]
        self.ctx.abort(a.pipeline_id, survivors, f"{sorted(departed)} left")
        for v in departed:   # a stopped or cut-off vehicle gets it when it is back (fire and forget)
            self.ctx.abort(a.pipeline_id, [v], "you were taken out of the pipeline", wait=False)
        self.ctx.membership.take_out(departed, lost=True)
        done = self._steps_before_failure(a, pipeline, survivors, started)
        self._count_steps(cr, a, pipeline, done)
        rec = RecoveryRecord(self.id, cr.rnd, a.pipeline_id, sorted(departed), fail.reason, False, fail.t_detect,
                             t_detect, completed_before=done, model_bytes=self.ctx.model_bytes,
                             old_pipeline=list(pipeline))
        self.ctx.records.append(rec)
        alive = self.ctx.membership.alive(self.members)
        new: Pipeline | None = None
        if alive and first not in departed:
            plans, rec.template_precomputed = self.pipelines_for(alive)
            new = plans.get(first)
        current, new, rec.choice, moves = self._replacement(cr, departed, new, lost=True)
        if moves is not None and current is not None and new is not None:
            rec.moves = [(m.layer, m.source, m.dest) for m in moves]
            rec.planned_moved_bytes = moved_bytes(moves)
            rec.departed_share_bytes = departed_share(current, departed, self.layers, self.ctx.layer_bytes)
            rec.new_pipeline = list(new)
        owners, rec.steps_lost = self._restore_from_backup(cr, departed)
        rec.t_replanned = time.time()
        log.warning("%s: %s left during %s (%s): %d step(s) done, %d lost; %s", self.id, sorted(departed),
                    a.pipeline_id, fail.reason, done, rec.steps_lost,
                    f"resuming on {new.describe()}" if new else "its data owner left: pipeline ends")
        return rec, new, owners, done

    def _steps_before_failure(self, a: Assignment, pipeline: Pipeline, survivors: list[str], started: bool) -> int:
        """Steps completed before the failure: the last stage's count (its aborted report, or its progress)."""
        done = self.ctx.progress.done(a.pipeline_id)
        last = pipeline.members[-1]
        if last in survivors and started:
            try:
                rep = self.wait_reports(REPORT, a, self.rcfg.abort_wait_s, [last])
                done = max(done, rep[last].steps_done)
            except (PipelineFailedError, TimeoutError):
                pass
        return done

    def _restore_from_backup(self, cr: ClientRound, departed: set[str]) -> tuple[list[str], int]:
        """Departed owners' layers come back from the edge backup; returns (new owners, steps lost)."""
        store = self.ctx.backups.store(self.id)
        lost = 0
        owners = []
        for layer, owner in zip(self.layers, cr.owners, strict=True):
            if owner not in departed:
                owners.append(owner)
                continue
            backed = store.step_of(layer)
            if self.ctx.layer_bytes[layer]:   # a parameter-free layer has no update to lose
                lost = max(lost, sum(1 for s in cr.layer_steps[layer] if s > backed))
            cr.layer_steps[layer] = [s for s in cr.layer_steps[layer] if s <= backed]
            owners.append(BACKUP_OWNER)
        return owners, lost

    def _count_steps(self, cr: ClientRound, a: Assignment, pipeline: Pipeline, done: int) -> None:
        for i in range(done):
            for _, s, e in pipeline:
                for layer in self.layers[s:e]:
                    cr.layer_steps[layer].append(a.first_step + i)

    def _replacement(self, cr: ClientRound, gone: set[str], template: Pipeline | None, *, lost: bool
                     ) -> tuple[Pipeline | None, Pipeline | None, str, list[Move] | None]:
        """What replaces the running pipeline once `gone` leave: (running pipeline, replacement, choice, moves).

        The replacement is the survivors' template, or the running pipeline with each gone stage's layers joined
        to its upstream neighbour ("keep-in-place") when that is cheap enough (`min_move_slowdown`). `lost`:
        the gone vehicles' layers come from the edge backup (unplanned), else from the vehicles themselves.
        Moves are None while the edge still holds layers (no pipeline runs on vehicles yet) or with no template."""
        held_by_edge = any(o in (EDGE_OWNER, BACKUP_OWNER) for o in cr.owners)
        current = None if held_by_edge else pipeline_from_owners(cr.owners)
        if current is None or template is None:
            return current, template, "template", None
        new, choice = template, "template"
        if self.swift is not None:
            cluster, profile = self.swift
            alt = keep_in_place(current, gone, template, cluster, profile, self.rcfg.min_move_slowdown)
            if alt is not None and alt != template:
                new, choice = alt, "keep-in-place"
        moves = plan_moves(current, new, gone if lost else set(), self.layers, self.ctx.layer_bytes)
        return current, new, choice, moves

    # -- planning on the survivors ----------------------------------------------------------------------------
    def pipelines_for(self, alive: list[str]) -> tuple[dict[str, Pipeline], bool]:
        """Essential pipelines (data owner -> pipeline) for the alive members; (plans, precomputed?)."""
        if set(alive) == set(self.members):
            return {p.first: p for p in self.pipelines}, True
        if self.templates is None:
            raise RuntimeError(f"{self.id}: no templates")
        precomputed = frozenset(alive) in self.templates.templates
        tpl = self.templates.template_for(alive)
        if tpl is None or not tpl.feasible:
            raise RuntimeError(f"{self.id}: no feasible pipeline for survivors {sorted(alive)}")
        plans = {str(f): Pipeline.from_plan(p.path, p.ranges) for f, p in tpl.pipelines.items() if p.feasible}
        return plans, precomputed

    # -- talking to the members, watching for departures -------------------------------------------------------
    def _check(self, members: list[str]) -> None:
        failed = self.ctx.membership.failed_among(members)
        if failed:
            raise PipelineFailedError(*failed)

    def command(self, service: str, a: Assignment) -> None:
        """Send `a` to every stage; one that cannot be reached is a departure (detected right here)."""
        members = a.pipeline.members
        for v in members:
            self._check(members)
            try:
                self.control.send(service, a, [v])
            except BusError as exc:
                raise PipelineFailedError({v}, f"unreachable: {exc}", time.time()) from exc

    def wait_reports(self, kind: str, a: Assignment, timeout_s: float,
                     vehicles: list[str] | None = None) -> dict[str, Any]:
        """Every stage's report of `kind`; raises PipelineFailedError as soon as a member is detected gone."""
        members = a.pipeline.members
        watched = vehicles or members

        def on_error(v: str, rep: Any) -> bool:
            if rep.error.startswith(ABORTED):
                return True
            # an error report: a member that cannot go on; if a neighbour is silent, it is the suspect
            silent = self._silent(members)
            self.ctx.membership.notify(*(silent[:1] or [v]), f"error report from {v}: {rep.error[:80]}")
            return False

        return self.control.board.wait(kind, a.pipeline_id, watched, timeout_s,
                                       check=lambda: self._check(watched), on_error=on_error, poll_s=0.002)

    def _silent(self, members: list[str]) -> list[str]:
        recs = {r.vehicle_id: r for r in self.ctx.snapshot()}
        limit = 3 * self.control.fleet.heartbeat.interval_s
        return [m for m in members if m in recs and time.time() - recs[m].last_seen > limit]

    def gather(self, owners: list[str], global_model: LayerStore) -> dict[str, torch.Tensor]:
        """The client's model: each layer from its owner; a departed owner's layers from the backup."""
        store = self.ctx.backups.store(self.id)

        def from_backup(_owner: str, layers: list[str], _error: Exception | None) -> dict[str, torch.Tensor]:
            out: dict[str, torch.Tensor] = {}
            for layer in layers:
                out.update(store.get(layer)[0] if layer in store.entries
                           else global_model.export([layer], with_optimizer=False))
            return out

        known = {v.id for v in self.control.fleet.vehicles}
        return self.control.gather(owners, self.control.fleet.edge.id, fallback=from_backup,
                                   reachable=lambda o: o in known and o not in self.ctx.membership.lost)
