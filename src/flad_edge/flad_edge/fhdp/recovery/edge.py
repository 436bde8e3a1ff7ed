"""Quick recovery for FHDP at the edge (paper §4.2): detect, switch to the preventive template, move only
what changed, resume -- without relaunching anything.

`RecoveringFhdpEdge` is an `FhdpEdge` whose cluster clients are `RecoveringClient`s, plus the edge-wide
machinery they share (`RecoveryContext`):
  * detection (`detection.py`): a dropped TCP connection to the vehicle's control socket, heartbeats
    missing for `heartbeat_timeout_s`, an error report, or a vehicle that cannot be reached;
  * preventive templates: SWIFT plans for every set of survivors of up to `templates_f` departures per
    cluster, generated in the background while training runs;
  * backups (`backups.py`): vehicles upload the layers that changed every `backup_every` steps; a departed
    vehicle's layers are restored from there ("backup" owner, served on `edge/backup-layers`);
  * planned departures: a member whose predicted dwell time runs out is handed over at a step boundary;
  * re-admission: a vehicle that comes back (heartbeats again, or re-registers) rejoins at the next round.
Every recovery is recorded with its detection / re-plan / redeploy / resume times, bytes moved, and steps lost.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any

from flad_core import codec
from flad_core.bus import BusError
from flad_core.fleet import FleetConfig, HeartbeatConfig
from flad_core.protocol import (
    SERVICE_ABORT,
    SERVICE_EDGE_BACKUP,
    SERVICE_EDGE_BACKUP_LAYERS,
    TOPIC_PROGRESS,
    edge_service_address,
)
from flad_core.runs import RunDir
from flad_edge.fhdp.client import RotationClient
from flad_edge.fhdp.config import FhdpConfig
from flad_edge.fhdp.orchestrator import FhdpEdge
from flad_edge.fhdp.recovery.backups import BackupStore, EdgeBackups
from flad_edge.fhdp.recovery.client import RecoveringClient, RecoveryContext
from flad_edge.fhdp.recovery.detection import DisconnectWatch, Membership, ProgressTracker, last_registration
from flad_edge.fhdp.recovery.records import RecoveryConfig, RecoveryRecord
from flad_edge.fl.edge_server import EdgeServer
from flad_edge.swift.model import load_profile
from flad_edge.swift.templates import PreventiveTemplates
from flad_vehicle.fhdp.layerstore import LayerStore

log = logging.getLogger(__name__)


def layer_tensor_bytes(store: LayerStore, layers: list[str]) -> dict[str, int]:
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
        self.membership = Membership()
        self.progress = ProgressTracker()
        self.backup_service = EdgeBackups(fleet.edge.id, self.rcfg.backup_dir,
                                          lambda names: self.global_store.export(names, with_optimizer=False))
        self.ctx = RecoveryContext(self.rcfg, self.membership, self.progress, self.backup_service,
                                   self.global_store, self.layer_bytes, self.model_bytes,
                                   leaving_within=self.leaving_within, abort=self.abort, snapshot=self.edge.snapshot)
        self.templates: dict[str, PreventiveTemplates] = {}
        self.readmitted: list[dict[str, Any]] = []
        self.predicted_departures: dict[str, float] = {}   # vehicle -> predicted leave time (mobility model)
        self._stop = threading.Event()
        self.bus.serve(SERVICE_EDGE_BACKUP, "flad_msgs/msg/WeightChunk", "flad_msgs/msg/Ack",
                       self.backup_service.on_backup, address=edge_service_address(fleet, SERVICE_EDGE_BACKUP))
        self.bus.serve(SERVICE_EDGE_BACKUP_LAYERS, "flad_msgs/msg/LayerRequest", "flad_msgs/msg/WeightChunk",
                       self.backup_service.on_backup_layers,
                       address=edge_service_address(fleet, SERVICE_EDGE_BACKUP_LAYERS))
        self.bus.subscribe(TOPIC_PROGRESS, "flad_msgs/msg/StepReport", self.progress.on_progress, finite=True)
        self.watch = DisconnectWatch(fleet, fleet.edge.id, self.notify_failure) if self.rcfg.watch_disconnects else None
        self._monitor = threading.Thread(target=self._liveness_loop, name="liveness", daemon=True)
        self._monitor.start()

    def use_fleet(self, fleet: FleetConfig, training: list[str] | None = None) -> None:
        """A new round's vehicles (`training`: the ones to watch; default all with a control address): watch
        their connections, forget who left before, drop old templates."""
        fleet = dataclasses.replace(fleet, heartbeat=self.fleet.heartbeat)
        super().use_fleet(fleet)
        if self.watch is not None:
            self.watch.close()
            watched = fleet if training is None else dataclasses.replace(
                fleet, vehicles=[v for v in fleet.vehicles if v.id in set(training)])
            self.watch = DisconnectWatch(watched, fleet.edge.id, self.notify_failure)
        self.membership.forget([v.id for v in fleet.vehicles])
        self.predicted_departures.clear()
        for t in self.templates.values():
            t.stop()
        self.templates.clear()

    # -- what tests, benchmarks and tools read ------------------------------------------------------------
    @property
    def records(self) -> list[RecoveryRecord]:
        return self.ctx.records

    @property
    def handovers(self) -> list[dict[str, Any]]:
        return self.ctx.handovers

    @property
    def backups(self) -> dict[str, BackupStore]:
        return self.backup_service.stores

    @property
    def backup_servers(self) -> dict[str, Any]:
        return self.backup_service.servers

    @property
    def departed(self) -> dict[str, float]:
        return self.membership.departed_since()

    @property
    def step_time(self) -> float | None:
        """Smoothed seconds per training step, from the progress messages (None before any)."""
        return self.progress.step_time

    # -- detection -------------------------------------------------------------------------------------------
    def notify_failure(self, vehicle: str, reason: str, when: float | None = None) -> None:
        """A vehicle is gone (disconnect, heartbeat timeout, error, chaos tool); the training threads react."""
        self.membership.notify(vehicle, reason, when)

    def _liveness_loop(self) -> None:
        while not self._stop.wait(0.02):
            for vid in self.edge.check_liveness():
                self.notify_failure(vid, "heartbeat timeout")

    # -- planning ------------------------------------------------------------------------------------------
    def cluster_client(self, members: list[str], client_id: str) -> RotationClient:
        """One cluster client over `members` (SWIFT essential pipelines), with its templates started."""
        if self.cfg.cluster_schedule != "rotation":
            raise ValueError(f"quick recovery re-plans the rotation's pipelines; cluster_schedule "
                             f"{self.cfg.cluster_schedule!r} is not supported with it (use rotation)")
        pipelines = self.essential_pipelines(members)
        swift = (self.swift_cluster(members), load_profile(self.layer_profile()))
        templates = None
        if len(members) > 1 and self.rcfg.templates_f > 0:
            running = {p.first: p.members for p in pipelines}
            templates = PreventiveTemplates(swift[0], swift[1], f=min(self.rcfg.templates_f, len(members) - 1),
                                            method=self.rcfg.template_method, objective="bottleneck",
                                            running=running).start()
            self.templates[client_id] = templates
        return RecoveringClient(client_id, members, pipelines, self.control, self.cfg, self.ctx, templates, swift)

    # -- liveness bookkeeping ---------------------------------------------------------------------------------
    def readmit(self) -> list[str]:
        """Vehicles that left and are back (heartbeating, or re-registered) rejoin; called between rounds."""
        back = []
        recs = {r.vehicle_id: r for r in self.edge.snapshot()}
        for v, since in self.membership.departed_since().items():
            rec = recs.get(v)
            if rec is None or rec.state not in ("alive", "registered") or rec.last_seen <= since:
                continue
            if self._dwell_left(rec) < self.rcfg.handover_margin_s:
                continue
            self.membership.readmit(v)
            back.append(v)
        for v in back:
            # whatever it was doing when it was taken out (a stopped vehicle resumes mid-step) is dropped
            self.abort("", [v], "re-admitted: drop stale work")
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

    def leaving_within(self, members: list[str], horizon_s: float) -> dict[str, float]:
        """Members whose predicted dwell ends within `horizon_s` (planned departures): vehicle -> seconds left."""
        recs = {r.vehicle_id: r for r in self.edge.snapshot()}
        left = {m: self._dwell_left(recs[m]) for m in members if m in recs}
        return {m: s for m, s in left.items() if s < horizon_s}

    def abort(self, pipeline_id: str, vehicles: list[str], reason: str, wait: bool = True) -> None:
        """Tell `vehicles` to abort `pipeline_id` (in parallel); with `wait`, until each has confirmed."""
        msg = codec.new("flad_msgs/msg/PipelineAbort", header=codec.header(), pipeline_id=pipeline_id, reason=reason)

        def send(v: str) -> None:
            try:
                self.bus.request(SERVICE_ABORT, msg, "flad_msgs/msg/Ack", timeout_s=self.rcfg.abort_wait_s,
                                 address=self.control.control_address(v))
            except BusError as exc:
                log.warning("abort of %s on %s not confirmed: %s", pipeline_id, v, exc)

        threads = [threading.Thread(target=send, args=(v,), daemon=True) for v in vehicles]
        for t in threads:
            t.start()
        if wait:
            for t in threads:
                t.join()

    # -- rounds ------------------------------------------------------------------------------------------
    def run_round(self, rnd: int, clients: list[RotationClient]) -> dict[str, Any]:
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

