"""FHDP at the edge: FL rounds over resource-sufficient vehicles and clusters, with dynamic stage exchange.

Each round the edge selects its clients: every resource-sufficient vehicle (a one-stage pipeline of its
own) and every cluster (one FL client, trained by pipeline parallelism; SWIFT plans one essential pipeline
per member, with that member as the data-owning first stage). The round loop is a strategy: each client
`train`s on its own thread and returns an `Update` or a `Failure` through a queue; the edge offers the
updates to a `RoundCollector` (each counted once; deadline + quorum; screened: a NaN or far-off update is
rejected and recorded) and aggregates them (FedAvg by samples trained, or the configured robust rule).
A straggler's update that arrives after the round closed is offered all the same, and refused as late.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from typing import Any

import torch

from flad_core.fleet import FleetConfig
from flad_core.protocol import SERVICE_EDGE_LAYERS
from flad_core.runs import RunDir
from flad_edge.fhdp.client import ClientStats, Failure, FanInClient, RotationClient, SoloClient
from flad_edge.fhdp.config import FhdpConfig
from flad_edge.fhdp.control import PipelineControl
from flad_edge.fl.aggregation import DistanceHistory, RoundCollector, Update
from flad_edge.fl.edge_server import EdgeServer
from flad_edge.swift import Cluster, Vehicle, plan
from flad_edge.swift.fanin import Device, plan_from_profile
from flad_edge.swift.model import load_profile
from flad_vehicle.encoder.config import get_config
from flad_vehicle.encoder.model import VisionEncoder, batch_to_torch
from flad_vehicle.encoder.partition import Partitioner
from flad_vehicle.encoder.profile import profile_model
from flad_vehicle.encoder.synthetic import synthetic_batches
from flad_vehicle.fhdp.fanin import FanInPlan
from flad_vehicle.fhdp.layerstore import LayerStore
from flad_vehicle.fhdp.pipeline import Pipeline
from flad_vehicle.fhdp.ushape import head_start, u_profile
from flad_vehicle.fhdp.worker import LayerServer

log = logging.getLogger(__name__)


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
        self.bus.serve(SERVICE_EDGE_LAYERS, "flad_msgs/msg/LayerRequest", "flad_msgs/msg/WeightChunk",
                       self.server.handle)
        self.control = PipelineControl(self.bus, fleet, cfg, self.layers)
        self.version = 0
        self.collectors: dict[int, RoundCollector] = {}
        self.norm_history = DistanceHistory()   # accepted updates' distances: the norm rule's scale in thin rounds
        self._profile: dict | None = None

    def use_fleet(self, fleet: FleetConfig) -> None:
        """Train a different set of vehicles from now on (a moving fleet: who is here changes every round)."""
        self.fleet = fleet
        self.control.fleet = fleet
        self.edge.fleet = fleet

    # -- planning --------------------------------------------------------------------------------------
    @property
    def heads(self) -> tuple[int, int] | None:
        """U-shaped: the layer range [H, n) of the task heads, which each pipeline's data owner holds."""
        return (head_start(self.part.graph), len(self.layers)) if self.cfg.u_shaped else None

    def clients(self) -> list[RotationClient]:
        """Clusters from the config (pipelines planned by SWIFT); every other vehicle trains alone."""
        in_cluster = {v for c in self.cfg.clusters for v in c}
        out: list[RotationClient] = [SoloClient(v.id, self.control, self.cfg)
                                     for v in self.fleet.vehicles if v.id not in in_cluster]
        out += [self.cluster_client(list(members), f"cluster{i + 1}") for i, members in enumerate(self.cfg.clusters)]
        return out

    def cluster_client(self, members: list[str], client_id: str) -> RotationClient:
        """One cluster client over `members`: its essential pipelines planned by SWIFT, or with
        `cluster_schedule: fanin` SWIFT's fan-in plan (every member's data in every step)."""
        if self.cfg.cluster_schedule == "fanin" and len(members) > 1:
            return FanInClient(client_id, members, self.fanin_plan(members), self.control, self.cfg)
        return RotationClient(client_id, members, self.essential_pipelines(members), self.control, self.cfg,
                              self.heads)

    def fanin_plan(self, members: list[str]) -> FanInPlan:
        """SWIFT's fan-in plan for `members` (`swift.fanin.plan_from_profile`: every member a source, the cut and
        trunk of the best predicted step under the paper's FLOP model at each device's TFLOPS and link rate)."""
        profiles = self.fleet.all_profiles()
        devices = [Device(m, profiles[self.fleet.vehicle(m).profile].tflops,
                          profiles[self.fleet.vehicle(m).profile].link_mbps) for m in members]
        best = plan_from_profile(devices, self.layer_profile(), self.cfg.batch_size, self.cfg.n_micro, self.cfg.codec)
        plan = FanInPlan.of(best.sources, best.trunk)
        log.info("fan-in plan for %s: %s (predicted %.3f s a step)", members, plan.describe(), best.step_s)
        return plan

    def swift_cluster(self, members: list[str]) -> Cluster:
        profiles = self.fleet.all_profiles()
        prof = {m: profiles[self.fleet.vehicle(m).profile] for m in members}
        return Cluster([Vehicle(m, prof[m].stage_mem_bytes, prof[m].tflops, prof[m].link_mbps, 1.0) for m in members],
                       n_batch=self.cfg.batch_size)

    def essential_pipelines(self, members: list[str]) -> list[Pipeline]:
        """One pipeline per member, that member first (SWIFT plans the rest of the order and the cuts)."""
        raw = self.layer_profile()
        if self.cfg.u_shaped:
            # SWIFT cuts the trunk only; the heads are the data owner's extra layers (see ushape.u_profile)
            raw = u_profile(raw, self.part.graph)
        profile = load_profile(raw)
        cluster = self.swift_cluster(members)
        pipelines = []
        for first in members:
            p = plan(cluster, profile, self.cfg.planner, first=first, objective="bottleneck")
            if not p.feasible:
                raise RuntimeError(f"SWIFT found no pipeline with {first} first: {p.reason}")
            pipe = Pipeline.from_plan(p.path, p.ranges)
            if len(pipe) == 1:   # one stage (U-shaped or not): the whole model, heads included
                pipe = Pipeline.whole(pipe.first, len(self.layers))
            pipelines.append(pipe)
        return pipelines

    def layer_profile(self) -> dict:
        """Per-layer FLOPs / memory of the encoder (SWIFT's cost model input), computed once."""
        if self._profile is None:
            batch = batch_to_torch(next(synthetic_batches(1, 2, seed=0)))
            self._profile = profile_model(VisionEncoder(get_config(self.cfg.encoder)), batch, measure=False)
        return self._profile

    # -- rounds ----------------------------------------------------------------------------------------
    def run_round(self, rnd: int, clients: list[RotationClient]) -> dict[str, Any]:
        t0 = time.monotonic()
        # the global model this round starts from: what each update is screened against (shape, dtype, how far
        # it moved); a copy, since nothing may change the reference while updates arrive
        reference = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        collector = RoundCollector(rnd, [c.id for c in clients], self.cfg.round_deadline_s, self.cfg.quorum,
                                   config=self.cfg.aggregation, reference=reference, history=self.norm_history)
        self.collectors[rnd] = collector   # kept: a straggler's late offer is refused (and recorded) here
        results: queue.Queue[Update | Failure] = queue.Queue()
        for c in clients:
            threading.Thread(target=lambda c=c: results.put(c.train(rnd, self.global_store)),
                             name=f"client-{c.id}", daemon=True).start()
        stats: dict[str, ClientStats] = {}
        errors: dict[str, str] = {}
        outstanding = len(clients)
        while outstanding and not collector.can_close():
            try:
                result = results.get(timeout=0.05)
            except queue.Empty:
                if time.monotonic() >= collector.deadline:
                    break      # past the deadline without a quorum: the round closes with what it has
                continue
            outstanding -= 1
            if isinstance(result, Failure):
                errors[result.client] = result.reason
            else:
                stats[result.client] = result.metrics
                collector.offer(result)
        if outstanding:
            threading.Thread(target=self._late_results, args=(collector, results, outstanding),
                             name=f"late-r{rnd}", daemon=True).start()
        if not collector.updates:
            rejected = f"; rejected: {collector.rejected}" if collector.rejected else ""
            raise RuntimeError(f"round {rnd}: no client delivered an update ({errors}{rejected})")
        state, samples = collector.aggregate()
        self.model.load_state_dict({**self.model.state_dict(), **state})
        self.version += 1
        summary = {"round": rnd, "clients": len(clients), "accepted": len(collector.updates),
                   "missing": collector.missing(), "samples": samples, "rejected": dict(collector.rejected),
                   "train_loss": _mean_finite([s.loss for s in stats.values()]),
                   "moved_bytes": int(sum(s.moved_bytes for s in stats.values())),
                   "steps_dropped": int(sum(s.steps_dropped for s in stats.values())),
                   "seconds": round(time.monotonic() - t0, 2), "errors": errors,
                   "per_client": {k: {"loss": s.loss, "moved_bytes": s.moved_bytes, "pipelines": len(s.pipelines),
                                      "devices": dict(s.devices)}
                                  for k, s in stats.items()},
                   "updates": {c: {"update_id": u.update_id, "samples": u.num_samples}
                               for c, u in collector.updates.items()}}
        if collector.aggregated_from != list(collector.updates):
            summary["aggregated_from"] = list(collector.aggregated_from)   # Krum / multi-Krum kept only these
        if self.run is not None:
            self.run.log_metrics(summary)
        return summary

    @staticmethod
    def _late_results(collector: RoundCollector, results: queue.Queue, outstanding: int) -> None:
        """After the round closed: offer what the remaining clients still deliver (refused as late, recorded)."""
        for _ in range(outstanding):
            result = results.get()
            if isinstance(result, Update):
                collector.offer(result)

    def close(self) -> None:
        self.edge.close()


def _mean_finite(values: list[float]) -> float:
    """Mean of the finite values (a client whose loss was never reported is left out); NaN if none."""
    ok = [v for v in values if math.isfinite(v)]
    return float(sum(ok) / len(ok)) if ok else float("nan")


def wait_for_vehicles(edge: EdgeServer, ids: list[str], timeout_s: float = 120.0,
                      require_all: bool = True) -> list[str]:
    """Wait until every vehicle of `ids` registered; the ones still missing at the timeout (TimeoutError if
    `require_all`, or if none came at all)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = {r.vehicle_id for r in edge.snapshot() if r.state in ("alive", "registered")}
        if set(ids) <= alive:
            return []
        time.sleep(0.1)
    alive = {r.vehicle_id for r in edge.snapshot() if r.state in ("alive", "registered")}
    missing = sorted(set(ids) - alive)
    if require_all or len(missing) == len(ids):
        raise TimeoutError(f"vehicles {missing} did not register within {timeout_s:.0f} s")
    return missing
