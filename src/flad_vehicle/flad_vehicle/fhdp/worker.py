"""The FHDP vehicle process: registers with the edge, then trains encoder partitions on command.

The edge drives training with `flad_msgs/PipelineAssignment`s, in two phases per pipeline:
  1. `vehicle/assign` (prepare): take the stage's layer range; fetch every newly owned layer (weights +
     AdamW state) from its current owner, or from the edge for a fresh round; keep the rest. Then tell
     the edge `edge/ready`. Only layers whose owner changes move (dynamic stage exchange).
  2. `vehicle/start`: run the assignment's steps as that stage (the data owner feeds its own batches),
     then report to `edge/report` with timings, bytes and the loss.
With `u_shaped`, the template's ranges cut the encoder's trunk and stage 0 (the data owner) also holds the
heads and the loss (`ushape.py`): labels never leave the vehicle; when the rotation makes another member
the data owner, the heads move to it like any other layer whose owner changes.
Between the phases and afterwards the vehicle serves `vehicle/layers` so peers (and the edge, at the
end of a round) can fetch the layers it owns. A resource-sufficient vehicle is simply a one-stage
pipeline of its own. With `fanin_sources` (the fan-in schedule, `fanin.py`) the template's stages are the trunk
and every source also runs its own replica of the raw-input layers on its own data, so every source's data
trains in every step; the sources' replicas stay identical (the hub sums their gradients each step).

Quick recovery (paper §4.2): `vehicle/abort` stops the running pipeline at once (a member left): the
partial step is dropped, the weights stay as of the last completed optimizer step, and the vehicle waits
for the next assignment with its process and sockets up. With `backup_every = e`, every e steps the
layers that changed since the last upload are snapshotted and sent to `edge/backup` by a background
thread; with `publish_progress`, the last stage publishes a StepReport per completed step on
/flad/fhdp/progress, which the edge timestamps (recovery timing, steps lost). A layer whose owner is
"backup" is fetched from the edge's backup of this vehicle's client (`edge/backup-layers`).

The work runs on its own threads: bus handlers only enqueue, so vehicles that fetch layers from each
other at the same time cannot deadlock.

Each vehicle trains on its device (`--device`, else the fleet file's `device` for it; auto: CUDA when present,
else the CPU) in the precision the edge's assignment names (fp32, bf16, fp16); it logs which device it runs on and
names it, with the precision, in every report to the edge. Layers travel as CPU tensors whatever the device.

Stage links follow the fleet's security settings: with CURVE, the inbox is a CURVE server with this process's
key pair and each outbound link a CURVE client of its peer's key; when a pipeline starts, the inbox is told
to accept frames only from this stage's neighbours in it (previous, next and, U-shaped, the turnaround peer).
Key names are process identities: the vehicle id, or for a pooled slot the slot id whatever vehicle it plays.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import zmq

from flad_core import codec
from flad_core import weights as wts
from flad_core.bus import BusError, RequestTimeoutError
from flad_core.device import log_device, resolve_device
from flad_core.emulation import ComputeDilation, Radio
from flad_core.fleet import DeviceProfile, VehicleSpec
from flad_core.procs import install_stop_handlers
from flad_core.protocol import (
    ABORTED,
    BACKUP_OWNER,
    EDGE_OWNER,
    SERVICE_ABORT,
    SERVICE_ASSIGN,
    SERVICE_EDGE_BACKUP,
    SERVICE_EDGE_BACKUP_LAYERS,
    SERVICE_EDGE_LAYERS,
    SERVICE_EDGE_READY,
    SERVICE_EDGE_REPORT,
    SERVICE_LAYERS,
    SERVICE_START,
    TOPIC_PROGRESS,
    edge_service_address,
    pipeline_base_id,
)
from flad_core.roles import add_role_args, fleet_from_args, security_for, setup_role_logging
from flad_core.runs import seed_everything
from flad_vehicle.agent import VehicleAgent
from flad_vehicle.encoder.config import get_config
from flad_vehicle.encoder.model import LABEL_INPUTS, VisionEncoder
from flad_vehicle.encoder.partition import Partitioner
from flad_vehicle.fhdp.backup import BackupTracker, BackupUploader
from flad_vehicle.fhdp.data import vehicle_batches
from flad_vehicle.fhdp.fanin import FanInPlan, FanInRunner
from flad_vehicle.fhdp.layerstore import LayerStore
from flad_vehicle.fhdp.links import Inbox, LinkStats, OutLink, StepAbortedError
from flad_vehicle.fhdp.optim import stage_adamw
from flad_vehicle.fhdp.pipeline import Assignment
from flad_vehicle.fhdp.placement import stage_memory_guard
from flad_vehicle.fhdp.poison import Poison, PoisonError, parse_poison
from flad_vehicle.fhdp.runner import StageRunner
from flad_vehicle.fhdp.ushape import head_layers, u_stages

log = logging.getLogger("flad_vehicle.fhdp.worker")

DEFAULT_LINK_TIMEOUT_S = 120.0
#: how long a starting vehicle keeps asking the edge to admit it (the edge may be down, being restarted)
REGISTER_TIMEOUT_S = 180.0


def fetch_layers(bus, address: str, service: str, layers: list[str], requester: str,
                 timeout_s: float = 30.0, abort: threading.Event | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """Fetch `layers` (weights + optimizer state) from the holder at `address`; returns (payload, bytes).

    With `abort`, each chunk is asked for in short tries so that an abort (the holder left) ends the
    fetch at once instead of after `timeout_s`."""
    transfer = uuid.uuid4().hex
    asm = wts.ChunkAssembler()
    index = 0
    while True:
        req = codec.new("flad_msgs/msg/LayerRequest", requester=requester, transfer_id=transfer, layers=layers,
                        chunk_index=index)
        if abort is None:
            chunk = bus.request(service, req, "flad_msgs/msg/WeightChunk", timeout_s=timeout_s, address=address)
        else:
            deadline = time.monotonic() + timeout_s
            while True:
                if abort.is_set():
                    raise StepAbortedError(f"fetch of {len(layers)} layer(s) from {address} aborted")
                try:
                    chunk = bus.request(service, req, "flad_msgs/msg/WeightChunk", address=address,
                                        timeout_s=max(0.05, min(0.5, deadline - time.monotonic())))
                    break
                except RequestTimeoutError:
                    if time.monotonic() >= deadline:
                        raise
        if asm.add(chunk):
            break
        index += 1
    data = asm.payload()
    return wts.from_bytes(data, what=f"layers from {address}"), len(data)


def neighbour_stages(index: int, n_stages: int, u_shaped: bool) -> list[int]:
    """The stages that stage `index` exchanges frames with: previous, next and, in a U-shaped pipeline, the
    turnaround hop between the data owner (stage 0) and the last trunk stage. Its inbox accepts only these."""
    peers = [j for j in (index - 1, index + 1) if 0 <= j < n_stages]
    if u_shaped and n_stages > 1 and index in (0, n_stages - 1):
        turn = n_stages - 1 if index == 0 else 0
        if turn not in peers:
            peers.append(turn)
    return peers


def stage_key_names(fleet, a: Assignment) -> list[str]:
    """The CURVE key name of each stage's process, in stage order.

    That is the fleet entry whose data address the stage's inbox is: a pooled slot plays vehicles under its
    own (slot) key at its own address, and the slots are the vehicles of its fleet file. A stage at an
    address no entry has is named by its member id (the one-process-per-vehicle fleet: the two agree)."""
    return inbox_key_names(fleet, a.pipeline.members, a.inboxes)


def inbox_key_names(fleet, vehicles: list[str], inboxes: list[str]) -> list[str]:
    """The CURVE key name of the process behind each (vehicle, inbox address) pair (see `stage_key_names`)."""
    by_inbox = {v.data: v.id for v in fleet.vehicles if v.data}
    return [by_inbox.get(address, vid) for vid, address in zip(vehicles, inboxes, strict=True)]


class LayerServer:
    """Answers LayerRequests chunk by chunk from a cached payload per transfer.

    `transform(requester, payload)`, if given, sees each payload before it is served (the attack emulation
    of a poisoned vehicle, `poison.py`, corrupts what the edge gathers with it)."""

    def __init__(self, sender: str, export, max_cached: int = 8,
                 transform: Callable[[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None) -> None:
        self.sender = sender
        self.export = export
        self.transform = transform
        self.cache: dict[str, list[Any]] = {}
        self.max_cached = max_cached
        self.bytes_served = 0
        self.audit: list[dict] = []
        self._lock = threading.Lock()

    def handle(self, req):
        with self._lock:
            chunks = self.cache.get(req.transfer_id)
            if chunks is None:
                tensors = self.export(list(req.layers))
                if self.transform is not None:
                    tensors = self.transform(req.requester, tensors)
                payload = wts.to_bytes(tensors)
                chunks = wts.chunk_messages(payload, sender=self.sender, update_id=req.transfer_id)
                if len(self.cache) >= self.max_cached:
                    self.cache.pop(next(iter(self.cache)))
                self.cache[req.transfer_id] = chunks
                self.bytes_served += len(payload)
                self.audit.append({"to": req.requester, "kind": "layers", "names": list(req.layers),
                                   "nbytes": len(payload)})
            if req.chunk_index >= len(chunks):
                raise ValueError(f"chunk {req.chunk_index} of a {len(chunks)}-chunk transfer")
            chunk = chunks[req.chunk_index]
            if req.chunk_index == len(chunks) - 1:
                self.cache.pop(req.transfer_id, None)
            return chunk


class FhdpVehicle:
    """One vehicle's FHDP trainer (see the module docstring)."""

    register_timeout_s: float = REGISTER_TIMEOUT_S

    def __init__(self, fleet, vehicle_id: str, data: str = "synthetic", encoder: str = "tiny", seed: int = 0,
                 threads: int = 1, audit_dir: Path | None = None, bus=None, poison: Poison | str | None = None,
                 device: str | None = None) -> None:
        """`device`: where this vehicle's stages train (auto, cpu, cuda[:N]); None takes the fleet file's `device`
        for the vehicle (auto unless set)."""
        torch.set_num_threads(threads)
        seed_everything(seed)
        # the process's hardware, checked before any socket opens: it stays when a pooled slot plays another
        # vehicle (take_identity)
        self.device = resolve_device(device if device is not None else fleet.vehicle(vehicle_id).device)
        # ATTACK EMULATION (tests, chaos): corrupt the weights the edge gathers from this vehicle (poison.py)
        self.poison = parse_poison(poison)
        self._poison_rng = torch.Generator().manual_seed(seed + 7919)
        self.fleet = fleet
        self.agent = VehicleAgent(fleet, vehicle_id, bus=bus)  # bus: a RosBus in the ROS 2 node
        self.spec = self.agent.spec
        if not self.spec.control or not self.spec.data:
            raise ValueError(f"vehicle {vehicle_id} needs `control` and `data` addresses in the fleet file")
        self.device_info = log_device(f"FHDP vehicle {vehicle_id}", self.device)
        self.bus = self.agent.bus
        self.profile = self.agent.profile
        self.data = data
        self.cfg = get_config(encoder)
        self.model = VisionEncoder(self.cfg)
        self.part = Partitioner(self.model)
        self.store = LayerStore(self.model, self.part.graph.names)
        self.ctx = zmq.Context.instance()
        # the process's key name stays `vehicle_id` for its life: a pooled slot's sockets keep the slot's key
        self.key_name = vehicle_id
        self.security = security_for(fleet, vehicle_id)
        self.inbox = Inbox(self.ctx, self.spec.data, security=self.security, identity=self.key_name)
        self.link_stats = LinkStats()
        self.server = LayerServer(vehicle_id, self.store.export,
                                  transform=self._poison_for_edge if self.poison is not None else None)
        if self.poison is not None:
            log.warning("%s: ATTACK EMULATION: this vehicle poisons the weights the edge gathers from it (%s)",
                        vehicle_id, self.poison)
        # every frame and layer payload this vehicle sends is recorded: proof that raw data stays home
        self.audit_file = Path(audit_dir) / f"audit-{vehicle_id}.jsonl" if audit_dir else None
        self._audited = 0
        self._served_audited = 0
        self._batches: dict[str, Any] = {}
        self._current: dict[str, Any] | None = None
        self._jobs: list[tuple[str, Any]] = []
        self._jobs_ready = threading.Condition()
        self._abort = threading.Event()        # set while the running pipeline is being aborted
        self._aborted: set[str] = set()        # pipeline ids the edge aborted (queued jobs for them are dropped)
        self._running: str | None = None       # pipeline id being prepared or trained
        self.tracker = BackupTracker(self.store)
        self.uploader = BackupUploader(self._upload_backup)
        # a stop request (SIGTERM, the edge's STOP) also ends a running step instead of waiting out a link timeout
        threading.Thread(target=lambda: (self.agent.stop.wait(), self._abort.set()), name="stop-aborts",
                         daemon=True).start()
        self.bus.serve(SERVICE_ASSIGN, "flad_msgs/msg/PipelineAssignment", "flad_msgs/msg/Ack",
                       lambda m: self._enqueue("assign", m), address=self.spec.control)
        self.bus.serve(SERVICE_START, "flad_msgs/msg/PipelineAssignment", "flad_msgs/msg/Ack",
                       lambda m: self._enqueue("start", m), address=self.spec.control)
        self.bus.serve(SERVICE_LAYERS, "flad_msgs/msg/LayerRequest", "flad_msgs/msg/WeightChunk",
                       self.server.handle, address=self.spec.control)
        self.bus.serve(SERVICE_ABORT, "flad_msgs/msg/PipelineAbort", "flad_msgs/msg/Ack", self._on_abort,
                       address=self.spec.control)
        # a crashed edge voids its pipelines; the agent registers again by itself once the edge is back
        self.agent.edge_listeners.append(self._on_edge_lost)

    def take_identity(self, spec: VehicleSpec, profile: DeviceProfile, data: str, seed: int) -> None:
        """Become another vehicle between rounds (a pooled worker process, `pool_worker.py`).

        Everything tied to the previous identity goes, so nothing of one vehicle leaks into the next:
        queued jobs, aborted ids, batch streams, buffered frames, the layers it held (a fresh round fetches
        every layer from the edge anyway), the layer-transfer cache and the backup bookkeeping. Pending
        backups and audit records are written out first, under the old id. The sockets, the model object
        and the process stay. The caller makes sure no job runs, and switches the agent (registration,
        heartbeats: `VehicleAgent.adopt`) itself."""
        self.uploader.flush()
        if len(self.link_stats.audit) > self._audited or len(self.server.audit) > self._served_audited:
            self._write_audit()
        with self._jobs_ready:
            self._jobs.clear()
            self._aborted.clear()
        self._batches = {}
        self._current = None
        self.store.release(list(self.store.owned))
        self.tracker.sent.clear()
        self.inbox.drop_steps_below(sys.maxsize)
        self.inbox.allow(())          # the previous identity's neighbours send nothing more
        with self.server._lock:
            self.server.sender = spec.id
            self.server.cache.clear()
        if self.audit_file is not None:
            self.audit_file = self.audit_file.with_name(f"audit-{spec.id}.jsonl")
        self.spec, self.profile, self.data = spec, profile, data
        seed_everything(seed)

    def _poison_for_edge(self, requester: str, payload: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """LayerServer transform: the edge's gather gets poisoned weights; cluster peers get the real ones."""
        if self.poison is None or requester != self.fleet.edge.id:
            return payload
        log.warning("%s: ATTACK EMULATION: handing %s poisoned (%s) weights of %d tensor(s)", self.spec.id,
                    requester, self.poison, sum(k.startswith("p/") for k in payload))
        return self.poison.apply(payload, self._poison_rng)

    # -- control ------------------------------------------------------------------------------------
    def _enqueue(self, kind: str, msg):
        with self._jobs_ready:
            self._jobs.append((kind, msg))
            self._jobs_ready.notify()
        return codec.new("flad_msgs/msg/Ack", ok=True, message=f"{kind} queued")

    def _on_abort(self, msg):
        """Bus thread: abort the named (or the running) pipeline now; drop its queued jobs."""
        with self._jobs_ready:
            pid = msg.pipeline_id or self._running or ""
            if pid:
                self._aborted.add(pid)
            dropped = [k for k, m in self._jobs if m.pipeline_id == pid]
            self._jobs = [(k, m) for k, m in self._jobs if m.pipeline_id != pid]
            running = self._running is not None and self._running == pid
            if running:
                self._abort.set()
        log.info("%s: abort of %s (%s): %s%s", self.spec.id, pid or "nothing", msg.reason,
                 "stopping the running step" if running else "not running",
                 f"; dropped queued {dropped}" if dropped else "")
        return codec.new("flad_msgs/msg/Ack", ok=True, message="aborting" if running else "not running")

    def _on_edge_lost(self, reason: str) -> None:
        """The edge died (agent's watch thread): the pipelines it assigned can never be reported or gathered.
        Abort the running one (its partial step is dropped, weights stay as of the last whole step), drop the
        queued ones, and wait: the restarted edge redoes the round and assigns afresh."""
        with self._jobs_ready:
            queued = [m.pipeline_id for _, m in self._jobs]
            self._aborted.update(queued)
            self._jobs.clear()
            running = self._running
            if running is not None:
                self._aborted.add(running)
                self._abort.set()
        if running is not None or queued:
            log.warning("%s: %s%s; waiting for the edge", self.spec.id,
                        f"aborting pipeline {running}" if running else "no pipeline running",
                        f", dropped queued {sorted(set(queued))}" if queued else "")

    def work_loop(self) -> None:
        """Run queued assignments in order until the agent stops."""
        while not self.agent.stop.is_set():
            with self._jobs_ready:
                if not self._jobs:
                    self._jobs_ready.wait(0.2)
                    continue
                kind, msg = self._jobs.pop(0)
                if msg.pipeline_id in self._aborted:
                    continue
                self._running = msg.pipeline_id
                self._abort.clear()
            try:
                if kind == "assign":
                    self.prepare(Assignment.from_msg(msg))
                else:
                    self.train(Assignment.from_msg(msg))
            except StepAbortedError as exc:     # aborted while fetching layers: logged without a traceback
                log.info("%s: %s of %s aborted: %s", self.spec.id, kind, msg.pipeline_id, exc)
                self._report(msg, error=f"{type(exc).__name__}: {exc}", service=SERVICE_EDGE_READY
                             if kind == "assign" else SERVICE_EDGE_REPORT)
            except Exception as exc:
                log.exception("%s of %s failed", kind, msg.pipeline_id)
                self._report(msg, error=f"{type(exc).__name__}: {exc}", service=SERVICE_EDGE_READY
                             if kind == "assign" else SERVICE_EDGE_REPORT)
            finally:
                with self._jobs_ready:
                    self._running = None

    # -- phase 1: take the stage, moving only the layers whose owner changes ---------------------------
    def prepare(self, a: Assignment) -> None:
        plan = None
        if a.is_fanin:
            plan, index, wanted = self._fanin_role(a)
            layer_range = None
        else:
            index = a.pipeline.stage_of(self.spec.id)
            me = a.pipeline[index]
            layer_range = (me.start, me.end)
            wanted = self.store.layers_in(me.start, me.end)
            if a.runs_u_shaped and index == 0:
                wanted += [h for h in head_layers(self.part.graph) if h not in wanted]   # the heads live with the data
        owners = a.layer_owner
        if len(owners) != len(self.store.layer_names):
            raise ValueError(f"layer_owner lists {len(owners)} layers, the encoder has {len(self.store.layer_names)}")
        addresses = a.members
        fetched = 0
        by_source: dict[str, list[str]] = {}
        for layer in wanted:
            owner = owners[self.store.layer_names.index(layer)]
            if owner == self.spec.id and layer in self.store.owned:
                continue
            by_source.setdefault(owner, []).append(layer)
        for source, layers in by_source.items():
            if source == EDGE_OWNER:
                payload, n = fetch_layers(self.bus, self.fleet.bus.services.get(SERVICE_EDGE_LAYERS, ""),
                                          SERVICE_EDGE_LAYERS, layers, self.spec.id, abort=self._abort)
            elif source == BACKUP_OWNER:
                payload, n = fetch_layers(self.bus, edge_service_address(self.fleet, SERVICE_EDGE_BACKUP_LAYERS),
                                          SERVICE_EDGE_BACKUP_LAYERS, layers, self.spec.id, abort=self._abort)
            else:
                if source not in addresses:
                    raise ValueError(f"layer owner {source!r} is not a member of the cluster")
                payload, n = fetch_layers(self.bus, addresses[source], SERVICE_LAYERS, layers, self.spec.id,
                                          abort=self._abort)
            self.store.import_(layers, payload)
            fetched += n
        self._current = {"assignment": a, "stage_index": index, "range": layer_range, "fanin": plan,
                         "fetched": fetched, "wanted": wanted}
        log.info("%s ready for %s: %s, fetched %d bytes from %s", self.spec.id, a.pipeline_id,
                 f"stage {index} layers [{layer_range[0]}, {layer_range[1]})" if layer_range else
                 f"fan-in {plan.describe()}", fetched, sorted(by_source) or "nobody")
        self._report(a, service=SERVICE_EDGE_READY, fetched=fetched, stage_index=index)

    # -- phase 2: run the steps ------------------------------------------------------------------------
    def train(self, a: Assignment) -> None:
        cur = self._current
        if cur is None or cur["assignment"].pipeline_id != a.pipeline_id:
            raise ValueError(f"start for {a.pipeline_id} before it was prepared")
        # layers that moved to other stages are no longer ours (their new owners fetched them in phase 1)
        self.store.release([layer for layer in list(self.store.owned) if layer not in cur["wanted"]])
        if cur.get("fanin") is not None:
            self._train_fanin(a, cur)
            return
        index, n_stages = cur["stage_index"], len(a.pipeline)
        u = a.runs_u_shaped
        head = None
        if u:
            trunk, head = u_stages(self.part, a.pipeline.ranges)
            stage = trunk[index]
            if index != 0:
                head = None
        else:
            stage = self.part.stage(cur["range"])
        trained = torch.nn.ModuleList([stage, head.stage]) if head is not None else stage
        trained.to(self.device)        # before the optimizer: its state is attached on the parameters' device
        # a parameter-free stage (e.g. only the loss layer) has nothing to optimise
        optimizer = stage_adamw(trained, self.model) if any(True for _ in trained.parameters()) else None
        if optimizer is not None:
            self.store.attach(optimizer)
        log.info("%s: stage %d of %s on %s in %s", self.spec.id, index, a.pipeline_id, self.device, a.precision)
        stage_ids = a.pipeline.members
        keys = stage_key_names(self.fleet, a)
        scale = a.time_scale
        # from now on the inbox takes frames only from this pipeline's neighbours (enforced with CURVE)
        self.inbox.allow(keys[j] for j in neighbour_stages(index, n_stages, u))
        # one radio for the vehicle: every link of this assignment and the inbox share its rate (half duplex)
        radio = Radio(self.profile.link_mbps, scale)
        self.inbox.bucket = radio.recv_bucket

        def link(peer_index: int) -> OutLink:
            return OutLink(self.ctx, stage_ids[peer_index], a.inboxes[peer_index], index,
                           codec=a.codec, bucket=radio.send_bucket,
                           stats=self.link_stats, security=self.security, identity=self.key_name,
                           server_key=keys[peer_index])

        loss_stage = a.loss_stage
        totals = dict.fromkeys(("loss", "losses", "dropped", "wall", "compute", "emulated", "wait", "bytes"), 0.0)
        done = 0
        aborted = ""
        prev = nxt = turn = None
        try:
            # inside the try: a link that cannot be built (a peer's key missing) closes the ones built before it
            # and detaches the optimizer (finally), and the error is reported
            prev = link(index - 1) if index > 0 else None
            nxt = link(index + 1) if index < n_stages - 1 else None
            # U-shaped: the turnaround hop between the last trunk stage and the data owner (both ways)
            turn = link(n_stages - 1 if index == 0 else 0) if u and index in (0, n_stages - 1) else None
            runner = StageRunner(stage, index, n_stages, inbox=self.inbox, prev=prev, next=nxt, optimizer=optimizer,
                                 u_shaped=u, head=head, turn=turn,
                                 schedule=a.schedule, n_micro=a.n_micro, grad_clip=5.0,
                                 label_names=LABEL_INPUTS, dilation=ComputeDilation(self.profile.tflops, scale),
                                 memory=stage_memory_guard(self.device, self.profile, self.spec.profile),
                                 timeout_s=a.link_timeout_s if a.link_timeout_s > 0 else DEFAULT_LINK_TIMEOUT_S,
                                 abort=self._abort, device=self.device, precision=a.precision)
            self.agent.state = "training"
            # frames left from an aborted earlier pipeline carry lower step numbers: never take them for ours
            stale = self.inbox.drop_steps_below(a.first_step)
            if stale:
                log.info("%s: dropped %d stale frame group(s) before step %d", self.spec.id, stale, a.first_step)
            batches = self._batches_for(a) if index == 0 else None
            for i in range(a.steps):
                batch = next(batches) if batches is not None else None
                res = runner.run_step(a.first_step + i, batch)
                done = i + 1
                loss = _tally(totals, res)
                if a.publish_progress and index == loss_stage:
                    self._publish_progress(a, index, done, loss)
                if a.backup_every and done % a.backup_every == 0:
                    self._backup(a, optimizer, cur["wanted"], a.first_step + i)
        except StepAbortedError as exc:
            # drop the partial step: its gradients and every buffered frame of this pipeline's step range
            runner.discard_partial_step()
            self.inbox.drop_steps_below(a.first_step + a.steps)
            aborted = f"{ABORTED} after {done} of {a.steps} steps: {exc}"
            log.info("%s: %s", self.spec.id, aborted)
        finally:
            if optimizer is not None:
                self.store.detach(optimizer)
            for lk in (prev, nxt, turn):
                if lk is not None:
                    lk.close()
            self.agent.state = "idle"
        loss = totals["loss"] / totals["losses"] if index == loss_stage and totals["losses"] else None
        self._write_audit()
        self._report(a, service=SERVICE_EDGE_REPORT, steps=done, loss=loss, wall=totals["wall"],
                     compute=totals["compute"], emulated=totals["emulated"], wait=totals["wait"],
                     bytes_sent=int(totals["bytes"]), fetched=cur["fetched"], stage_index=index, error=aborted,
                     dropped=int(totals["dropped"]), precision=a.precision)

    # -- the fan-in schedule -------------------------------------------------------------------------------
    def _fanin_role(self, a: Assignment) -> tuple[FanInPlan, int, list[str]]:
        """(plan, this vehicle's index among the participants, the layers it holds: its replica of [0, cut) if a
        source, its trunk stage's range if in the trunk)."""
        plan = FanInPlan.of(a.fanin_sources, a.pipeline)
        plan.check_model(len(self.store.layer_names), self.part.graph.min_first_end)
        me = self.spec.id
        if me not in plan.members:
            raise ValueError(f"{me} takes no part in {a.pipeline_id}: {plan.describe()}")
        wanted = self.store.layers_in(0, plan.cut) if me in plan.sources else []
        if me in plan.trunk.members:
            st = plan.trunk[plan.trunk.stage_of(me)]
            wanted += self.store.layers_in(st.start, st.end)
        return plan, plan.members.index(me), wanted

    def _train_fanin(self, a: Assignment, cur: dict) -> None:
        """Run the assignment's steps in this vehicle's fan-in roles: a source (its replica on its own data), a
        trunk stage, or both (the hub); every participant's frames share this vehicle's radio."""
        plan: FanInPlan = cur["fanin"]
        me, index = self.spec.id, cur["stage_index"]
        replica = self.part.stage((0, plan.cut)) if me in plan.sources else None
        trunk_stage = None
        if me in plan.trunk.members:
            st = plan.trunk[plan.trunk.stage_of(me)]
            trunk_stage = self.part.stage((st.start, st.end))
        trained = torch.nn.ModuleList([m for m in (replica, trunk_stage) if m is not None])
        trained.to(self.device)        # before the optimizer: its state is attached on the parameters' device
        optimizer = stage_adamw(trained, self.model) if any(True for _ in trained.parameters()) else None
        if optimizer is not None:
            self.store.attach(optimizer)
        log.info("%s: fan-in roles in %s on %s in %s", me, a.pipeline_id, self.device, a.precision)
        keys = dict(zip(plan.members, inbox_key_names(self.fleet, plan.members,
                                                      [a.inbox_of(p) for p in plan.members]), strict=True))
        self.inbox.allow(keys[p] for p in plan.members if p != me)
        radio = Radio(self.profile.link_mbps, a.time_scale)
        self.inbox.bucket = radio.recv_bucket
        is_last = me == plan.trunk.members[-1]
        totals = dict.fromkeys(("loss", "losses", "dropped", "wall", "compute", "emulated", "wait", "bytes"), 0.0)
        done = 0
        aborted = ""
        links: dict[str, OutLink] = {}
        runner = None
        try:
            for p in plan.members:
                if p != me:
                    links[p] = OutLink(self.ctx, p, a.inbox_of(p), index, codec=a.codec, bucket=radio.send_bucket,
                                       stats=self.link_stats, security=self.security, identity=self.key_name,
                                       server_key=keys[p])
            runner = FanInRunner(me, plan, inbox=self.inbox, links=links, replica=replica, trunk_stage=trunk_stage,
                                 optimizer=optimizer, batch_size=a.batch_size, schedule=a.schedule,
                                 n_micro=a.n_micro, grad_clip=5.0, label_names=LABEL_INPUTS,
                                 dilation=ComputeDilation(self.profile.tflops, a.time_scale),
                                 memory=stage_memory_guard(self.device, self.profile, self.spec.profile),
                                 timeout_s=a.link_timeout_s if a.link_timeout_s > 0 else DEFAULT_LINK_TIMEOUT_S,
                                 abort=self._abort, sync_codec=a.codec, device=self.device, precision=a.precision)
            self.agent.state = "training"
            stale = self.inbox.drop_steps_below(a.first_step)
            if stale:
                log.info("%s: dropped %d stale frame group(s) before step %d", me, stale, a.first_step)
            batches = self._batches_for(a) if replica is not None else None
            for i in range(a.steps):
                batch = None
                if batches is not None:
                    full = next(batches)
                    batch = {n: full[n] for n in runner.batch_inputs}
                res = runner.run_step(a.first_step + i, batch)
                done = i + 1
                loss = _tally(totals, res)
                if a.publish_progress and is_last:
                    self._publish_progress(a, index, done, loss)
        except StepAbortedError as exc:
            if runner is not None:
                runner.discard_partial_step()
            self.inbox.drop_steps_below(a.first_step + a.steps)
            aborted = f"{ABORTED} after {done} of {a.steps} steps: {exc}"
            log.info("%s: %s", me, aborted)
        finally:
            if optimizer is not None:
                self.store.detach(optimizer)
            for lk in links.values():
                lk.close()
            self.agent.state = "idle"
        loss = totals["loss"] / totals["losses"] if is_last and totals["losses"] else None
        self._write_audit()
        self._report(a, service=SERVICE_EDGE_REPORT, steps=done, loss=loss, wall=totals["wall"],
                     compute=totals["compute"], emulated=totals["emulated"], wait=totals["wait"],
                     bytes_sent=int(totals["bytes"]), fetched=cur["fetched"], stage_index=index, error=aborted,
                     dropped=int(totals["dropped"]), precision=a.precision)

    def _batches_for(self, a: Assignment):
        """The data owner's batch stream: fresh per pipeline; a resumed pipeline (id `<base>~<attempt>`, from
        recovery) continues its base's stream, so it trains on the batches the aborted attempt had not reached."""
        key = (pipeline_base_id(a.pipeline_id), a.batch_size)
        if self._batches.get("key") != key:
            self._batches = {"key": key, "it": vehicle_batches(self.data, self.spec.id, a.batch_size,
                                                                seed=self.fleet.seed)}
        return self._batches["it"]

    def _publish_progress(self, a, stage_index: int, done: int, loss: float | None) -> None:
        msg = codec.new("flad_msgs/msg/StepReport", header=codec.header(), vehicle_id=self.spec.id,
                        pipeline_id=a.pipeline_id, stage_index=stage_index, steps_done=done,
                        has_loss=loss is not None, loss=loss or 0.0)
        try:
            self.bus.publish(TOPIC_PROGRESS, msg)
        except BusError as exc:
            log.warning("%s: progress not published: %s", self.spec.id, exc)

    def _backup(self, a, optimizer, layers: list[str], step: int) -> None:
        """Snapshot the changed layers (weights + current AdamW state) and hand them to the uploader."""
        if optimizer is not None:
            self.store.detach(optimizer)     # copies the optimizer's live state into the store; keeps training
        snapshot = self.tracker.snapshot([layer for layer in layers if layer in self.store.owned])
        self.uploader.submit(snapshot, step, a.pipeline_id)

    def _upload_backup(self, payload: dict[str, torch.Tensor], layers: list[str], step: int, pipeline_id: str) -> int:
        """Uploader thread: send one backup (chunked WeightChunks) to edge/backup; returns its bytes."""
        data = wts.to_bytes(payload, metadata={"layers": ",".join(layers), "step": str(step),
                                               "pipeline_id": pipeline_id})
        address = edge_service_address(self.fleet, SERVICE_EDGE_BACKUP)
        transfer = f"{self.spec.id}-{step}-{uuid.uuid4().hex[:8]}"
        for chunk in wts.chunk_messages(data, sender=self.spec.id, model_version=str(step), update_id=transfer):
            ack = self.bus.request(SERVICE_EDGE_BACKUP, chunk, "flad_msgs/msg/Ack", timeout_s=30.0, address=address)
            if not ack.ok:
                raise BusError(f"edge refused backup chunk {chunk.chunk_index}: {ack.message}")
        return len(data)

    def _write_audit(self) -> None:
        if self.audit_file is None:
            return
        records = self.link_stats.audit[self._audited:] + self.server.audit[self._served_audited:]
        self._audited = len(self.link_stats.audit)
        self._served_audited = len(self.server.audit)
        with open(self.audit_file, "a", encoding="utf-8") as fh:
            for rec in records:
                fh.write(json.dumps(dataclasses.asdict(rec) if dataclasses.is_dataclass(rec) else rec) + "\n")

    def _report(self, a, *, service: str, error: str = "", steps: int = 0, loss: float | None = None,
                wall: float = 0.0, compute: float = 0.0, emulated: float = 0.0, wait: float = 0.0,
                bytes_sent: int = 0, fetched: int = 0, stage_index: int = 0, dropped: int = 0,
                precision: str = "") -> None:
        """Report to the edge; every report names this vehicle's device (and the precision a run trained in)."""
        if dropped:
            log.warning("%s: %d of %d step(s) of %s dropped (non-finite or exploding gradients)", self.spec.id,
                        dropped, steps, a.pipeline_id)
        report = codec.new("flad_msgs/msg/StepReport", header=codec.header(), vehicle_id=self.spec.id,
                           pipeline_id=a.pipeline_id, stage_index=stage_index, steps_done=steps, steps_dropped=dropped,
                           has_loss=loss is not None, loss=loss or 0.0,
                           wall_s=wall, compute_s=compute, emulated_compute_s=emulated, wait_s=wait,
                           bytes_sent=bytes_sent, layer_bytes_fetched=fetched, error=error,
                           device=str(self.device), precision=precision)
        self._send_report(service, report)

    def _send_report(self, service: str, report, timeout_s: float = 30.0) -> None:
        """Send a report to the edge in short tries (a repeat is harmless: the edge keeps the last per key);
        give up at once when the edge is found dead -- the pipeline reported on died with it."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.agent.edge_down_since is not None:
                log.info("%s: not reporting %s to the edge: it is down", self.spec.id, report.pipeline_id)
                return
            try:
                self.bus.request(service, report, "flad_msgs/msg/Ack",
                                 timeout_s=max(0.1, min(2.0, deadline - time.monotonic())))
                return
            except RequestTimeoutError as exc:
                if time.monotonic() < deadline:
                    continue
                log.error("%s: could not report to the edge: %s", self.spec.id, exc)
                return
            except BusError as exc:
                log.error("%s: could not report to the edge: %s", self.spec.id, exc)
                return

    def run(self) -> int:
        self.agent.register(deadline_s=self.register_timeout_s)
        hb = threading.Thread(target=self.agent.heartbeat_loop, name="heartbeat", daemon=True)
        hb.start()
        try:
            self.work_loop()
        finally:
            hb.join(timeout=5)
        return 0

    def close(self) -> None:
        self.uploader.close()
        self.inbox.close()
        self.agent.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flad-fhdp-vehicle", description="Run one vehicle's FHDP trainer.")
    parser.add_argument("--id", required=True, help="vehicle id from the fleet file")
    parser.add_argument("--data", default="synthetic", help="fleet dataset root, or 'synthetic'")
    parser.add_argument("--encoder", default="tiny", help="encoder config (tiny or paper)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--register-timeout", type=float, default=REGISTER_TIMEOUT_S,
                        help=f"give up when the edge has not admitted this vehicle after this many seconds (default "
                             f"{REGISTER_TIMEOUT_S:.0f}: long enough for a crashed edge to be restarted and resume)")
    add_device_arg(parser)
    add_poison_arg(parser)
    add_role_args(parser)
    args = parser.parse_args(argv)
    setup_role_logging(args, f"vehicle-{args.id}")
    fleet = fleet_from_args(args)
    vehicle = FhdpVehicle(fleet, args.id, data=args.data, encoder=args.encoder, seed=args.seed,
                          audit_dir=args.run_dir, poison=args.poison, device=args.device)
    vehicle.register_timeout_s = args.register_timeout
    install_stop_handlers(vehicle.agent.stop)
    return run_until_stopped(vehicle)


def _tally(totals: dict[str, float], res) -> float | None:
    """Add one step's `StepResult` to a pipeline's totals; returns its loss if finite (a dropped step's loss
    may be NaN: it is left out of the mean, and never reported -- the edge refuses non-finite reports)."""
    loss = res.loss if res.loss is not None and math.isfinite(res.loss) else None
    if loss is not None:
        totals["loss"] += loss
        totals["losses"] += 1
    totals["dropped"] += res.dropped      # NaN / exploding gradients: no stage applied this step
    totals["wall"] += res.wall_s
    totals["compute"] += res.compute_s
    totals["emulated"] += res.emulated_compute_s
    totals["wait"] += res.wait_s
    totals["bytes"] += res.bytes_sent
    return loss


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    """`--device`: where this process's stages train; without it, the fleet file's `device` for the vehicle."""
    parser.add_argument("--device", default=None, metavar="auto|cpu|cuda[:N]",
                        help="where this vehicle's stages train (default: the fleet file's `device` for it, else auto: "
                             "CUDA when present, else the CPU)")


def add_poison_arg(parser: argparse.ArgumentParser) -> None:
    """`--poison MODE`: the attack emulation of poison.py (tests and chaos runs only)."""
    def poison(text: str) -> Poison:
        try:
            return Poison.parse(text)
        except PoisonError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parser.add_argument("--poison", type=poison, default=None, metavar="MODE",
                        help="ATTACK EMULATION for robustness tests: corrupt the weights the edge gathers from this "
                             "vehicle -- scale:K (multiply by K), nan (NaN in every tensor), noise:S (Gaussian, std S)")


def run_until_stopped(vehicle: FhdpVehicle) -> int:
    """A vehicle process's main loop: run until stopped; a bus failure is logged as exit 1; always close."""
    try:
        return vehicle.run()
    except BusError as exc:
        log.error("%s", exc)
        return 1
    finally:
        vehicle.close()


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["ABORTED", "BACKUP_OWNER", "FhdpVehicle", "LayerServer", "add_device_arg", "edge_service_address",
           "fetch_layers", "main", "neighbour_stages", "run_until_stopped", "stage_key_names"]
