"""Quick recovery for FHDP at the edge (paper §4.2): detect, switch to the preventive template, move only
what changed, resume -- without relaunching anything.

`RecoveringFhdpEdge` trains a client's essential pipelines like `FhdpEdge`, and watches the members:
  * detection: a dropped TCP connection to the vehicle's control socket (a killed process: milliseconds),
    heartbeats missing for `heartbeat_timeout_s` (a stopped or cut-off vehicle), or an error report;
  * re-plan: abort the survivors (`vehicle/abort`: they drop the partial step, keep their weights and
    sockets), look up the survivors' pre-generated SWIFT template (`PreventiveTemplates`, built in the
    background while training runs) and diff it against the running pipeline with `plan_moves`;
  * redeploy: one assignment whose `layer_owner` keeps every layer on its healthy owner; moved layers
    come from their surviving owner, or -- the departed vehicle's layers -- from the edge backup
    ("backup" owner, served on `edge/backup-layers`), which vehicles refresh every `backup_every` steps
    with only the layers that changed;
  * resume: the pipeline continues with the steps it had left, in a fresh step range (stale frames from
    the aborted attempt can never be mistaken for new ones); the data owner's batch stream continues.
Planned departures (a member's predicted dwell time runs out) are handed over at a step boundary before
the vehicle leaves: its layers move from the vehicle itself, so no step is lost. A vehicle that comes
back (heartbeats again, or re-registers) rejoins at the next round. Every recovery is recorded with its
detection / re-plan / redeploy / resume times, bytes moved, and steps lost.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import zmq
import zmq.utils.monitor

from flad_core import codec
from flad_core import weights as wts
from flad_core.bus import BusError
from flad_core.fleet import FleetConfig, HeartbeatConfig
from flad_core.runs import RunDir
from flad_core.security import make_client
from flad_edge.fhdp.orchestrator import Client, FhdpConfig, FhdpEdge
from flad_edge.fhdp.recovery.backups import BackupStore
from flad_edge.fhdp.recovery.moves import departed_share, moved_bytes, plan_moves
from flad_edge.fl.edge_server import EdgeServer
from flad_vehicle.fhdp.backup import split_by_layer
from flad_vehicle.fhdp.worker import (
    ABORTED,
    BACKUP_OWNER,
    EDGE_OWNER,
    SERVICE_ABORT,
    SERVICE_ASSIGN,
    SERVICE_EDGE_BACKUP,
    SERVICE_EDGE_BACKUP_LAYERS,
    SERVICE_LAYERS,
    SERVICE_START,
    TOPIC_PROGRESS,
    LayerServer,
    edge_service_address,
    fetch_layers,
)

log = logging.getLogger("flad_edge.fhdp.recovery.edge")

Pipeline = list[tuple[str, int, int]]


@dataclass
class RecoveryConfig:
    """How the edge detects departures and recovers (paper §4.2)."""

    backup_every: int = 2                 # e: vehicles upload changed layers every e steps (0: no backups)
    heartbeat_timeout_s: float = 0.0      # detection of silent vehicles; 0: the fleet file's heartbeat.timeout_s
    watch_disconnects: bool = True        # also detect a dropped TCP connection (a killed process) at once
    link_timeout_s: float = 60.0          # a survivor gives up on a silent neighbour after this (abort comes first)
    templates_f: int = 2                  # preventive templates for up to f departures per cluster
    template_method: str = "exact"        # SWIFT method for the templates (exact | greedy | swift)
    handover_margin_s: float = 3.0        # planned departure: hand over when less than this dwell time is left
    # prefer "keep in place" (the departed stage's layers join its upstream neighbour, nothing else moves) over
    # the template when its bottleneck is at most this many times the template's (0: always the template)
    min_move_slowdown: float = 1.5
    backup_dir: str = ""                  # keep backups on disk here (atomic, checksummed); "": memory only
    abort_wait_s: float = 5.0             # how long survivors get to confirm an abort
    max_recoveries_per_pipeline: int = 8

    def validate(self) -> None:
        if self.backup_every < 0 or self.templates_f < 0:
            raise ValueError("backup_every and templates_f must be >= 0")
        if self.heartbeat_timeout_s < 0 or self.link_timeout_s <= 0:
            raise ValueError("heartbeat_timeout_s must be >= 0 and link_timeout_s > 0")


class PipelineFailedError(Exception):
    """Members of the running pipeline left (or failed); `departed` names them."""

    def __init__(self, departed: set[str], reason: str, t_detect: float) -> None:
        super().__init__(f"{sorted(departed)} left ({reason})")
        self.departed, self.reason, self.t_detect = departed, reason, t_detect


@dataclass
class RecoveryRecord:
    """One recovery, as the benchmark and the tests read it (times in seconds, wall clock stamps)."""

    client: str
    round: int
    pipeline: str
    departed: list[str]
    reason: str
    planned: bool
    t_failure: float                  # when the edge learned of it (disconnect / heartbeat / error event time)
    t_detect: float                   # when the training thread acted on it
    t_replanned: float = 0.0
    t_redeployed: float = 0.0
    t_resumed: float = 0.0            # first completed step afterwards (progress message received)
    completed_before: int = 0         # steps of the pipeline completed before the failure
    steps_lost: int = 0               # steps whose updates were lost (restored layers were backed up earlier)
    moved_bytes: int = 0              # layer payload bytes the new owners actually fetched
    planned_moved_bytes: int = 0      # plan_moves' exact tensor bytes
    departed_share_bytes: int = 0     # tensor bytes the departed vehicles held (the lower bound)
    model_bytes: int = 0              # the whole model's tensor bytes (weights + AdamW state)
    moves: list[tuple[str, str, str]] = field(default_factory=list)   # (layer, source, dest)
    template_precomputed: bool = True
    choice: str = "template"          # template | keep-in-place (fewer moved bytes, see RecoveryConfig)
    old_pipeline: list[tuple[str, int, int]] = field(default_factory=list)
    new_pipeline: list[tuple[str, int, int]] = field(default_factory=list)

    def phases(self) -> dict[str, float]:
        out = {"replan_s": self.t_replanned - self.t_detect if self.t_replanned else math.nan,
               "redeploy_s": self.t_redeployed - self.t_replanned if self.t_redeployed else math.nan,
               "resume_s": self.t_resumed - self.t_redeployed if self.t_resumed and self.t_redeployed else math.nan}
        out["recovery_s"] = self.t_resumed - self.t_detect if self.t_resumed else math.nan
        return out

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), **self.phases()}


class DisconnectWatch:
    """Detects a vehicle process vanishing from the TCP connection to its control socket (ZMQ monitor)."""

    def __init__(self, fleet: FleetConfig, identity: str, on_lost) -> None:
        self.fleet, self.identity, self.on_lost = fleet, identity, on_lost
        self.ctx = zmq.Context.instance()
        self._stop = threading.Event()
        self._watch: dict[str, tuple[zmq.Socket, zmq.Socket]] = {}
        self._connected: set[str] = set()
        for v in fleet.vehicles:
            if not v.control:
                continue
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RECONNECT_IVL, 100)
            if fleet.security.curve:
                make_client(sock, dataclasses.replace(fleet.security, identity=identity), identity, v.id)
            mon = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
            sock.connect(v.control)
            self._watch[v.id] = (sock, mon)
        self._thread = threading.Thread(target=self._run, name="disconnect-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        by_mon = {}
        for vid, (_, mon) in self._watch.items():
            poller.register(mon, zmq.POLLIN)
            by_mon[mon] = vid
        while not self._stop.is_set():
            try:
                ready = dict(poller.poll(100))
            except zmq.ZMQError:
                return
            for mon, vid in by_mon.items():
                if mon not in ready:
                    continue
                try:
                    evt = zmq.utils.monitor.recv_monitor_message(mon, zmq.NOBLOCK)
                except zmq.ZMQError:
                    continue
                if evt["event"] == zmq.EVENT_CONNECTED:
                    self._connected.add(vid)
                elif evt["event"] == zmq.EVENT_DISCONNECTED and vid in self._connected:
                    self._connected.discard(vid)
                    self.on_lost(vid, "disconnect", time.time())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        for sock, mon in self._watch.values():
            sock.disable_monitor()
            mon.close(0)
            sock.close(0)


def last_registration(rec) -> float:
    """When the vehicle last registered (a returning vehicle re-registers; its dwell time counts from then)."""
    times = [float(h.split("@", 1)[1]) for h in rec.history if h.startswith("registered@")]
    return max(times, default=rec.registered_at)


def layer_tensor_bytes(store, layers: list[str]) -> dict[str, int]:
    """Exact tensor bytes a layer move carries: weights + Adam m and v (+ one step counter per parameter)."""
    out = {}
    for layer in layers:
        total = 0
        for n in store.params_of([layer]):
            p = store.params[n]
            total += 3 * p.numel() * p.element_size() + 4
        out[layer] = total
    return out


class RecoveringFhdpEdge(FhdpEdge):
    """FhdpEdge with quick recovery (see the module docstring)."""

    def __init__(self, fleet: FleetConfig, cfg: FhdpConfig, rcfg: RecoveryConfig | None = None,
                 run: RunDir | None = None, edge: EdgeServer | None = None) -> None:
        self.rcfg = rcfg or RecoveryConfig()
        self.rcfg.validate()
        if self.rcfg.heartbeat_timeout_s > 0:
            hb = HeartbeatConfig(interval_s=min(fleet.heartbeat.interval_s, self.rcfg.heartbeat_timeout_s / 2),
                                 timeout_s=self.rcfg.heartbeat_timeout_s)
            fleet = dataclasses.replace(fleet, heartbeat=hb)
        super().__init__(fleet, cfg, run, edge)
        self.edge.fleet = fleet
        self.layer_bytes = layer_tensor_bytes(self.global_store, self.layers)
        self.model_bytes = sum(self.layer_bytes.values())
        self.client_of: dict[str, str] = {}
        self.backups: dict[str, BackupStore] = {}
        self.backup_servers: dict[str, LayerServer] = {}
        self._assemblers: dict[str, wts.ChunkAssembler] = {}
        self.records: list[RecoveryRecord] = []
        self.handovers: list[dict[str, Any]] = []
        self.readmitted: list[dict[str, Any]] = []
        self.templates: dict[str, Any] = {}
        self._swift: dict[str, tuple[Any, Any]] = {}      # client -> (SWIFT cluster, layer profile)
        self.departed: dict[str, float] = {}          # vehicle -> when it was taken out of training
        self.lost: set[str] = set()                   # departed without a hand-over (their layers: from backups)
        self.predicted_departures: dict[str, float] = {}   # vehicle -> predicted leave time (mobility model)
        self._backup_floor: dict[str, int] = {}       # client -> first step of its current round
        self._failures: dict[str, tuple[str, float]] = {}   # vehicle -> (reason, event time), not yet handled
        self._flock = threading.Lock()
        self._progress: dict[str, tuple[int, float]] = {}    # pipeline id -> (steps done, last stamp)
        self._first_progress: dict[str, float] = {}
        self._step_time: float | None = None
        self._stop = threading.Event()
        addr_b = edge_service_address(fleet, SERVICE_EDGE_BACKUP)
        addr_bl = edge_service_address(fleet, SERVICE_EDGE_BACKUP_LAYERS)
        self.bus.serve(SERVICE_EDGE_BACKUP, "flad_msgs/msg/WeightChunk", "flad_msgs/msg/Ack", self._on_backup,
                       address=addr_b)
        self.bus.serve(SERVICE_EDGE_BACKUP_LAYERS, "flad_msgs/msg/LayerRequest", "flad_msgs/msg/WeightChunk",
                       self._on_backup_layers, address=addr_bl)
        self.bus.subscribe(TOPIC_PROGRESS, "flad_msgs/msg/StepReport", self._on_progress, finite=True)
        self.watch = DisconnectWatch(fleet, fleet.edge.id, self.notify_failure) if self.rcfg.watch_disconnects else None
        self._monitor = threading.Thread(target=self._liveness_loop, name="liveness", daemon=True)
        self._monitor.start()

    # -- detection ---------------------------------------------------------------------------------
    def notify_failure(self, vehicle: str, reason: str, when: float | None = None) -> None:
        """A vehicle is gone (disconnect, heartbeat timeout, error, chaos tool); the training thread reacts."""
        when = time.time() if when is None else when
        with self._flock:
            if vehicle not in self._failures and vehicle not in self.departed:
                self._failures[vehicle] = (reason, when)
                log.warning("%s: lost (%s)", vehicle, reason)

    def _liveness_loop(self) -> None:
        while not self._stop.wait(0.02):
            for vid in self.edge.check_liveness():
                self.notify_failure(vid, "heartbeat timeout")

    def _on_progress(self, msg) -> None:
        now = time.time()
        prev = self._progress.get(msg.pipeline_id)
        self._progress[msg.pipeline_id] = (max(msg.steps_done, prev[0] if prev else 0), now)
        self._first_progress.setdefault(msg.pipeline_id, now)
        if prev is not None and msg.steps_done == prev[0] + 1:
            dt = now - prev[1]
            self._step_time = dt if self._step_time is None else 0.7 * self._step_time + 0.3 * dt

    def _failed_among(self, members: list[str]) -> tuple[set[str], str, float] | None:
        with self._flock:
            hit = {m: self._failures[m] for m in members if m in self._failures}
        if not hit:
            return None
        return set(hit), ", ".join(sorted({r for r, _ in hit.values()})), min(t for _, t in hit.values())

    # -- backups (bus thread) ----------------------------------------------------------------------
    def _backup_store(self, client_id: str) -> BackupStore:
        if client_id not in self.backups:
            root = Path(self.rcfg.backup_dir) / client_id if self.rcfg.backup_dir else None
            self.backups[client_id] = BackupStore(root)
        return self.backups[client_id]

    def _on_backup(self, chunk):
        asm = self._assemblers.setdefault(chunk.update_id, wts.ChunkAssembler())
        try:
            if not asm.add(chunk):
                return codec.new("flad_msgs/msg/Ack", ok=True, message="chunk stored")
            data = asm.payload()
        finally:
            if asm.first is not None and len(asm.parts) == asm.first.num_chunks:
                self._assemblers.pop(chunk.update_id, None)
        client = self.client_of.get(chunk.sender)
        if client is None:
            return codec.new("flad_msgs/msg/Ack", ok=False, message=f"{chunk.sender} belongs to no client")
        if int(chunk.model_version) < self._backup_floor.get(client, 0):
            return codec.new("flad_msgs/msg/Ack", ok=True, message="stale: from an earlier round, ignored")
        payload = wts.from_bytes(data, what=f"backup from {chunk.sender}")
        layers = sorted({k.split("/", 1)[1].split(".")[1] for k in payload})
        stored = self._backup_store(client).put_state(split_by_layer(payload, layers), step=int(chunk.model_version),
                                                      owner=chunk.sender)
        return codec.new("flad_msgs/msg/Ack", ok=True, message=f"stored {stored} bytes")

    def _on_backup_layers(self, req):
        """Serve the requester's client backup; a layer not backed up this round comes from the round's model."""
        client = self.client_of.get(req.requester)
        if client is None:
            raise ValueError(f"{req.requester} belongs to no client")
        store = self._backup_store(client)

        def export(names: list[str]) -> dict[str, torch.Tensor]:
            have = [n for n in names if n in store.entries]
            out = store.export(have)
            rest = [n for n in names if n not in store.entries]
            if rest:
                out.update(self.global_store.export(rest, with_optimizer=False))
            return out

        server = self.backup_servers.setdefault(client, LayerServer(self.fleet.edge.id, export))
        server.export = export
        return server.handle(req)

    # -- planning ------------------------------------------------------------------------------------
    def clients(self) -> list[Client]:
        out = super().clients()
        for c in out:
            for m in c.members:
                self.client_of[m] = c.id
            if len(c.members) > 1 and self.rcfg.templates_f > 0:
                self.templates[c.id] = self._start_templates(c)
        return out

    def cluster_client(self, members: list[str], client_id: str) -> Client:
        """One cluster client over `members` (SWIFT essential pipelines), with its templates started."""
        c = Client(client_id, list(members), self.essential_pipelines(list(members)))
        for m in members:
            self.client_of[m] = client_id
        if len(members) > 1 and self.rcfg.templates_f > 0:
            self.templates[client_id] = self._start_templates(c)
        return c

    def _start_templates(self, client: Client):
        """SWIFT preventive templates for this cluster, generated in the background alongside training."""
        from flad_edge.swift import Cluster, Vehicle
        from flad_edge.swift.model import load_profile
        from flad_edge.swift.templates import PreventiveTemplates

        profiles = self.fleet.all_profiles()
        prof = {m: profiles[self.fleet.vehicle(m).profile] for m in client.members}
        cluster = Cluster([Vehicle(m, prof[m].mem_bytes, prof[m].tflops, prof[m].link_mbps, 1.0)
                           for m in client.members], n_batch=self.cfg.batch_size)
        running = {p[0][0]: [v for v, _, _ in p] for p in client.pipelines}
        self._swift[client.id] = (cluster, load_profile(self.layer_profile()))
        tpl = PreventiveTemplates(cluster, self._swift[client.id][1], f=min(self.rcfg.templates_f,
                                                                                     len(client.members) - 1),
                                  method=self.rcfg.template_method, objective="bottleneck", running=running)
        return tpl.start()

    def _pipelines_for(self, client: Client, alive: list[str]) -> tuple[dict[str, Pipeline], bool]:
        """Essential pipelines (first vehicle -> pipeline) for the alive members; (plans, precomputed?)."""
        if set(alive) == set(client.members):
            return {p[0][0]: list(p) for p in client.pipelines}, True
        tpls = self.templates.get(client.id)
        if tpls is None:
            raise RuntimeError(f"{client.id}: no templates")
        key = frozenset(alive)
        precomputed = key in tpls.templates
        tpl = tpls.template_for(alive)
        if tpl is None or not tpl.feasible:
            raise RuntimeError(f"{client.id}: no feasible pipeline for survivors {sorted(alive)}")
        plans = {str(f): [(str(v), int(s), int(e)) for v, (s, e) in zip(p.path, p.ranges, strict=True)]
                 for f, p in tpl.pipelines.items() if p.feasible}
        return plans, precomputed

    # -- liveness bookkeeping -------------------------------------------------------------------------
    def _mark_departed(self, vehicles: set[str]) -> None:
        now = time.time()
        with self._flock:
            for v in vehicles:
                self.departed[v] = now
                self._failures.pop(v, None)

    def readmit(self) -> list[str]:
        """Vehicles that left and are back (heartbeating, or re-registered) rejoin; called between rounds."""
        back = []
        recs = {r.vehicle_id: r for r in self.edge.snapshot()}
        with self._flock:
            for v, since in list(self.departed.items()):
                rec = recs.get(v)
                if rec is None or rec.state not in ("alive", "registered") or rec.last_seen <= since:
                    continue
                if self._dwell_left(rec) < self.rcfg.handover_margin_s:
                    continue
                del self.departed[v]
                back.append(v)
        for v in back:
            # whatever it was doing when it was taken out (a stopped vehicle resumes mid-step) is dropped
            self._abort("", [v], "re-admitted: drop stale work")
            self.readmitted.append({"vehicle": v, "t": time.time()})
            log.info("%s is back: admitted again", v)
        return back

    def predict_departure(self, vehicle: str, at: float) -> None:
        """A mobility prediction (wall-clock time `at`) that overrides the vehicle's own dwell estimate."""
        self.predicted_departures[vehicle] = at

    def _dwell_left(self, rec) -> float:
        left = last_registration(rec) + rec.dwell_s - time.time()
        at = self.predicted_departures.get(rec.vehicle_id)
        if at is not None and at > last_registration(rec):
            left = min(left, at - time.time())
        return left

    def _leaving_within(self, members: list[str], horizon_s: float) -> dict[str, float]:
        """Members whose predicted dwell ends within `horizon_s` (planned departures): vehicle -> seconds left."""
        recs = {r.vehicle_id: r for r in self.edge.snapshot()}
        return {m: self._dwell_left(recs[m]) for m in members
                if m in recs and self._dwell_left(recs[m]) < horizon_s}

    # -- waiting with failure detection -----------------------------------------------------------------
    def _wait_watch(self, kind: str, pid: str, members: list[str], timeout_s: float) -> dict[str, Any]:
        """Every member's report of `kind`; raises PipelineFailedError as soon as a member is detected gone."""
        deadline = time.monotonic() + timeout_s
        out: dict[str, Any] = {}
        while len(out) < len(members):
            failed = self._failed_among(members)
            if failed:
                raise PipelineFailedError(*failed)
            for v in members:
                if v in out or not self._slot(kind, pid, v).is_set():
                    continue
                rep = self._reports[(kind, pid, v)]
                if rep.error and not rep.error.startswith(ABORTED):
                    # an error report: a member that cannot go on; if a neighbour is silent, it is the suspect
                    silent = self._silent(members)
                    self.notify_failure(*(silent[:1] or [v]), f"error report from {v}: {rep.error[:80]}")
                    break
                out[v] = rep
            if len(out) < len(members):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{[v for v in members if v not in out]} did not report {kind} for {pid}")
                time.sleep(0.002)
        return out

    def _silent(self, members: list[str]) -> list[str]:
        recs = {r.vehicle_id: r for r in self.edge.snapshot()}
        limit = 3 * self.fleet.heartbeat.interval_s
        return [m for m in members if m in recs and time.time() - recs[m].last_seen > limit]

    def _abort(self, pid: str, vehicles: list[str], reason: str, wait: bool = True) -> None:
        """Tell `vehicles` to abort `pid` (in parallel); with `wait`, until each has confirmed."""
        specs = {v.id: v for v in self.fleet.vehicles}
        abort = codec.new("flad_msgs/msg/PipelineAbort", header=codec.header(), pipeline_id=pid, reason=reason)

        def send(v: str) -> None:
            try:
                self.bus.request(SERVICE_ABORT, abort, "flad_msgs/msg/Ack", timeout_s=self.rcfg.abort_wait_s,
                                 address=specs[v].control)
            except BusError as exc:
                log.warning("abort of %s on %s not confirmed: %s", pid, v, exc)

        threads = [threading.Thread(target=send, args=(v,), daemon=True) for v in vehicles]
        for t in threads:
            t.start()
        if wait:
            for t in threads:
                t.join()

    # -- one client's round ------------------------------------------------------------------------------
    def train_client(self, client: Client, rnd: int, timeout_s: float) -> dict[str, Any]:
        """Run the client's pipelines in rotation, recovering from departures; return its update and stats."""
        for m in client.members:
            self.client_of[m] = client.id
        try:
            return self._train_client(client, rnd, timeout_s)
        except (BusError, TimeoutError, RuntimeError, ValueError):
            raise
        except Exception as exc:   # never let a client thread die silently: the round would wait for it
            log.exception("%s: round %d failed", client.id, rnd)
            raise RuntimeError(f"{client.id}: {type(exc).__name__}: {exc}") from exc

    def _train_client(self, client: Client, rnd: int, timeout_s: float) -> dict[str, Any]:
        store = self._backup_store(client.id)
        self._backup_floor[client.id] = rnd * 10_000
        with store._lock:   # a fresh round starts from the round's model: older backups are stale
            store.entries.clear()
            store.payloads.clear()
        with self._flock:
            gone = {m for m in client.members if m in self._failures}
        self._mark_departed(gone)
        self.lost |= gone
        alive = [m for m in client.members if m not in self.departed]
        if not alive:
            raise RuntimeError(f"{client.id}: no member left")
        plans, _ = self._pipelines_for(client, alive)
        usual = [p[0][0] for p in client.pipelines]
        order = [f for f in usual if f in plans] + [f for f in plans if f not in usual]
        owners = [EDGE_OWNER] * len(self.layers)
        layer_steps: dict[str, list[int]] = {layer: [] for layer in self.layers}   # abs steps that trained it
        stats: dict[str, Any] = {"client": client.id, "pipelines": [], "moved_bytes": 0, "samples": 0,
                                 "steps": 0, "steps_lost": 0, "recoveries": 0, "handovers": 0, "skipped": []}
        next_step = rnd * 10_000
        pending: RecoveryRecord | None = None     # a recovery waiting for its first completed step
        for first in order:
            if first in self.departed:
                stats["skipped"].append(first)
                continue
            pipeline = plans[first]
            remaining = self.steps_per_pipeline(client)   # local_steps (FHDP), or the whole budget without rotation
            base = f"r{rnd}-{client.id}-{first}-{uuid.uuid4().hex[:6]}"
            attempt, done_total, loss_sum = 0, 0, 0.0
            moved_here = 0
            while remaining > 0 and first not in self.departed:
                if any(v in self.departed for v, _, _ in pipeline):
                    # a member left while another pipeline ran: this one starts on the survivors' template
                    plans, _ = self._pipelines_for(client, [m for m in client.members if m not in self.departed])
                    if first not in plans:
                        break
                    pipeline = plans[first]
                members = [v for v, _, _ in pipeline]
                steps = remaining
                leaving = self._leaving_within(members, self.rcfg.handover_margin_s + self._segment_estimate(steps))
                if leaving:
                    fit = min(leaving.values()) - self.rcfg.handover_margin_s
                    steps = max(0, min(remaining, int(fit / self._step_time))) if self._step_time else 0
                    if steps == 0:
                        pipeline, owners, moved = self._handover(client, rnd, first, pipeline, owners, set(leaving),
                                                                 stats)
                        moved_here += moved
                        if pipeline is None:
                            break
                        plans, _ = self._pipelines_for(client, [m for m in client.members if m not in self.departed])
                        continue
                a = self._assignment(client, pipeline, owners, rnd, next_step)
                a.pipeline_id = f"{base}~{attempt}"
                a.steps = steps
                a.backup_every = self.rcfg.backup_every
                a.link_timeout_s = self.rcfg.link_timeout_s
                a.publish_progress = True
                next_step += steps
                attempt += 1
                started = False
                try:
                    self._command(SERVICE_ASSIGN, a, members)
                    ready = self._wait_watch("ready", a.pipeline_id, members, timeout_s)
                    fetched = sum(r.layer_bytes_fetched for r in ready.values())
                    if any(o != EDGE_OWNER for o in owners):
                        moved_here += fetched
                    if pending is not None:
                        pending.moved_bytes = fetched
                        pending.t_redeployed = time.time()
                    owners = self._owners_of(pipeline)
                    started = True
                    self._command(SERVICE_START, a, members)
                    reports = self._wait_watch("report", a.pipeline_id, members, timeout_s)
                except PipelineFailedError as exc:
                    rec, pipeline, owners, done = self._recover(client, rnd, first, a, pipeline, owners, exc,
                                                                layer_steps, started)
                    done_total += done
                    remaining -= done
                    stats["steps_lost"] = max(stats["steps_lost"], rec.steps_lost)
                    stats["recoveries"] += 1
                    if pending is not None and not pending.t_resumed:
                        pending.t_resumed = self._first_progress.get(a.pipeline_id, 0.0)
                    pending = rec
                    alive_now = [m for m in client.members if m not in self.departed]
                    if pipeline is None:
                        if alive_now:
                            plans, _ = self._pipelines_for(client, alive_now)
                        break
                    plans, _ = self._pipelines_for(client, alive_now)
                    if attempt > self.rcfg.max_recoveries_per_pipeline:
                        raise RuntimeError(f"{client.id}: pipeline {base} failed {attempt} times") from exc
                    continue
                if pending is not None:
                    pending.t_resumed = self._first_progress.get(a.pipeline_id, time.time())
                    if not pending.t_redeployed:
                        pending.t_redeployed = pending.t_resumed
                    pending = None
                done = reports[members[-1]].steps_done
                for i in range(done):
                    for _, s, e in pipeline:
                        for layer in self.layers[s:e]:
                            layer_steps[layer].append(a.first_step + i)
                done_total += done
                remaining -= done
                loss_sum += reports[members[-1]].loss * done
            stats["moved_bytes"] += moved_here
            stats["steps"] += done_total
            stats["samples"] += done_total * self.cfg.batch_size
            if done_total:
                stats["pipelines"].append({"first": first, "stages": pipeline or [], "loss": loss_sum / done_total,
                                           "steps": done_total, "moved_bytes": moved_here})
        if pending is not None and not pending.t_resumed:
            pending.t_resumed = math.nan   # no pipeline ran after it in this round
        if not stats["pipelines"]:
            raise RuntimeError(f"{client.id}: no pipeline completed a step this round")
        state = self._gather(client, owners)
        stats["loss"] = float(sum(p["loss"] * p["steps"] for p in stats["pipelines"]) / max(1, stats["steps"]))
        return {"state": state, "stats": stats}

    def _command(self, service: str, a, members: list[str]) -> None:
        """Send `a` to every member; one that cannot be reached is a departure (detected right here)."""
        specs = {v.id: v for v in self.fleet.vehicles}
        for v in members:
            failed = self._failed_among(members)
            if failed:
                raise PipelineFailedError(*failed)
            try:
                self.bus.request(service, a, "flad_msgs/msg/Ack", address=specs[v].control)
            except BusError as exc:
                raise PipelineFailedError({v}, f"unreachable: {exc}", time.time()) from exc

    def _segment_estimate(self, steps: int) -> float:
        return (self._step_time or 0.0) * steps

    @staticmethod
    def _owners_of(pipeline: Pipeline) -> list[str]:
        from flad_edge.fhdp.recovery.moves import owners

        return owners(pipeline, pipeline[-1][2])

    def _gather(self, client: Client, owners: list[str]) -> dict[str, torch.Tensor]:
        """The client's model: each layer from its owner; a departed owner's layers from the backup."""
        specs = {v.id: v for v in self.fleet.vehicles}
        state: dict[str, torch.Tensor] = {}
        by_owner: dict[str, list[str]] = {}
        for layer, owner in zip(self.layers, owners, strict=True):
            by_owner.setdefault(owner, []).append(layer)
        store = self._backup_store(client.id)
        for owner, layers in by_owner.items():
            payload: dict[str, torch.Tensor] | None = None
            if owner not in self.lost and owner in specs:
                try:
                    payload, _ = fetch_layers(self.bus, specs[owner].control, SERVICE_LAYERS, layers,
                                              self.fleet.edge.id, timeout_s=10.0)
                except BusError as exc:
                    log.warning("%s: could not fetch layers from %s (%s); using the backup", client.id, owner, exc)
            if payload is None:
                payload = {}
                for layer in layers:
                    payload.update(store.get(layer)[0] if layer in store.entries
                                   else self.global_store.export([layer], with_optimizer=False))
            state.update({k[2:]: v for k, v in payload.items() if k.startswith("p/")})
        return state

    # -- recovery --------------------------------------------------------------------------------------
    def _recover(self, client: Client, rnd: int, first: str, a, pipeline: Pipeline, owners: list[str],
                 fail: PipelineFailedError, layer_steps: dict[str, list[int]], started: bool):
        """Abort the survivors, switch to the survivors' template, plan the moves. Returns
        (record, new pipeline or None when the data owner left, new layer owners, steps completed)."""
        t_detect = time.time()
        members = [v for v, _, _ in pipeline]
        departed = set(fail.departed)
        survivors = [v for v in members if v not in departed]
        self._abort(a.pipeline_id, survivors, f"{sorted(departed)} left")
        for v in departed:   # a stopped or cut-off vehicle gets it when it is back (fire and forget)
            self._abort(a.pipeline_id, [v], "you were taken out of the pipeline", wait=False)
        self._mark_departed(departed)
        self.lost |= departed
        # steps completed before the failure: the last stage's count (its aborted report, or its progress)
        done = self._progress.get(a.pipeline_id, (0, 0.0))[0]
        last = members[-1]
        if last in survivors and started:
            try:
                rep = self._wait_watch("report", a.pipeline_id, [last], self.rcfg.abort_wait_s)
                done = max(done, rep[last].steps_done)
            except (PipelineFailedError, TimeoutError):
                pass
        for i in range(done):
            for _, s, e in pipeline:
                for layer in self.layers[s:e]:
                    layer_steps[layer].append(a.first_step + i)
        alive = [m for m in client.members if m not in self.departed]
        rec = RecoveryRecord(client.id, rnd, a.pipeline_id, sorted(departed), fail.reason, False, fail.t_detect,
                             t_detect, completed_before=done, model_bytes=self.model_bytes,
                             old_pipeline=list(pipeline))
        self.records.append(rec)
        new_pipeline: Pipeline | None = None
        if alive and first not in departed:
            plans_now, rec.template_precomputed = self._pipelines_for(client, alive)
            new_pipeline = plans_now.get(first)
        current = self._pipeline_from_owners(owners)
        if new_pipeline is not None and current is not None:
            alt = self._keep_in_place(client, current, departed, new_pipeline)
            if alt is not None and alt != new_pipeline:
                new_pipeline, rec.choice = alt, "keep-in-place"
            moves = plan_moves(current, new_pipeline, departed, self.layers, self.layer_bytes)
            rec.moves = [(m.layer, m.source, m.dest) for m in moves]
            rec.planned_moved_bytes = moved_bytes(moves)
            rec.departed_share_bytes = departed_share(current, departed, self.layers, self.layer_bytes)
            rec.new_pipeline = list(new_pipeline)
        # layers of departed owners are restored from the edge backup; count the steps their updates lost
        store = self._backup_store(client.id)
        lost = 0
        new_owners = []
        for layer, owner in zip(self.layers, owners, strict=True):
            if owner in departed:
                backed = store.entries[layer].step if layer in store.entries else -1
                if self.layer_bytes[layer]:   # a parameter-free layer has no update to lose
                    lost = max(lost, sum(1 for s in layer_steps[layer] if s > backed))
                layer_steps[layer] = [s for s in layer_steps[layer] if s <= backed]
                new_owners.append(BACKUP_OWNER)
            else:
                new_owners.append(owner)
        rec.steps_lost = lost
        rec.t_replanned = time.time()
        log.warning("%s: %s left during %s (%s): %d step(s) done, %d lost; %s", client.id, sorted(departed),
                    a.pipeline_id, fail.reason, done, lost,
                    f"resuming on {new_pipeline}" if new_pipeline else "its data owner left: pipeline ends")
        return rec, new_pipeline, new_owners, done

    def _keep_in_place(self, client: Client, current: Pipeline, departed: set[str], template: Pipeline
                       ) -> Pipeline | None:
        """The running pipeline with each departed stage's layers joined to its upstream neighbour, when that
        fits in memory and is at most `min_move_slowdown` x the template's bottleneck (Eq. 8/9 cost model)."""
        sw = self._swift.get(client.id)
        if sw is None or self.rcfg.min_move_slowdown <= 0:
            return None
        from flad_edge.swift.cost import bottleneck, stage_costs, validate_plan

        cluster, profile = sw
        out: Pipeline = []
        for v, s, e in current:
            if v in departed:
                if not out:
                    return None          # the data owner left: there is no pipeline to keep
                out[-1] = (out[-1][0], out[-1][1], e)
            else:
                out.append((v, s, e))
        path, ranges = [v for v, _, _ in out], [(s, e) for _, s, e in out]
        if validate_plan(path, ranges, cluster.subset(path), profile, require_all=True, first=path[0]):
            return None
        t_path_, t_ranges = [v for v, _, _ in template], [(s, e) for _, s, e in template]
        mine = bottleneck(stage_costs(path, ranges, cluster.subset(path), profile))
        theirs = bottleneck(stage_costs(t_path_, t_ranges, cluster.subset(t_path_), profile))
        return out if mine <= self.rcfg.min_move_slowdown * theirs else None

    def _pipeline_from_owners(self, owners: list[str]) -> Pipeline | None:
        """The (vehicle, start, end) runs of the current layer owners (None while the edge still holds some)."""
        if any(o in (EDGE_OWNER, BACKUP_OWNER) for o in owners):
            return None
        out: Pipeline = []
        for i, o in enumerate(owners):
            if out and out[-1][0] == o and out[-1][2] == i:
                out[-1] = (o, out[-1][1], i + 1)
            else:
                out.append((o, i, i + 1))
        if len({v for v, _, _ in out}) != len(out):
            return None
        return out

    def _handover(self, client: Client, rnd: int, first: str, pipeline: Pipeline, owners: list[str],
                  leaving: set[str], stats: dict[str, Any]):
        """Planned departure at a step boundary: the leaving vehicles' layers move from them (no loss)."""
        t0 = time.time()
        self._mark_departed(leaving)
        alive = [m for m in client.members if m not in self.departed]
        stats["handovers"] += 1
        entry = {"client": client.id, "round": rnd, "leaving": sorted(leaving), "t": t0, "moved_bytes": 0,
                 "steps_lost": 0}
        self.handovers.append(entry)
        log.info("%s: planned departure of %s: handing over before it leaves", client.id, sorted(leaving))
        if first in leaving or not alive:
            # the data owner leaves: its pipeline ends here, its layers are gathered back from it now
            return None, owners, 0
        plans, _ = self._pipelines_for(client, alive)
        new_pipeline = plans.get(first)
        current = self._pipeline_from_owners(owners)
        if current is not None and new_pipeline is not None:
            alt = self._keep_in_place(client, current, leaving, new_pipeline)
            if alt is not None and alt != new_pipeline:
                new_pipeline, entry["choice"] = alt, "keep-in-place"
            moves = plan_moves(current, new_pipeline, set(), self.layers, self.layer_bytes)
            entry["planned_moved_bytes"] = moved_bytes(moves)
            entry["moves"] = [(m.layer, m.source, m.dest) for m in moves]
        # owners stay as they are: the leaving vehicle still serves its layers to their new owners
        return new_pipeline, owners, 0

    # -- rounds ------------------------------------------------------------------------------------------
    def run_round(self, rnd: int, clients: list[Client]) -> dict[str, Any]:
        self.readmit()
        summary = super().run_round(rnd, clients)
        summary["recoveries"] = [r.to_json() for r in self.records if r.round == rnd]
        summary["handovers"] = [h for h in self.handovers if h["round"] == rnd]
        summary["departed"] = sorted(self.departed)
        return summary

    def close(self) -> None:
        self._stop.set()
        if self.watch is not None:
            self.watch.close()
        for t in self.templates.values():
            t.stop()
        self.edge.close()
