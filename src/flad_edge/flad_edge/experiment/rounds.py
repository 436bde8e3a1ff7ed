"""One edge's FHDP round inside an experiment: take on the vehicles, inject the world's departures, train, upload.

Departures come from the moving fleet: before the round trains, the world is simulated through the round's
span, so the edge's vehicles that leave its coverage (and the ones that crash) are known with the simulated
time they go. Each is mapped onto training progress (a vehicle that leaves after 40% of the round's simulated
time leaves once its client has done 40% of its steps). A departure the edge's dwell regressor predicted
(predicted dwell shorter than the round) is a planned one: the edge hands the vehicle's layers over at a step
boundary. An unpredicted one (or a crash) kills the vehicle's process: quick recovery notices the dropped
connection and recovers from backups and templates.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from flad_edge.experiment.planning import ClientPlan
from flad_edge.experiment.pool import Identity
from flad_edge.experiment.sites import WALL_DWELL_S, EdgeSite
from flad_edge.fhdp.client import RotationClient
from flad_edge.fl.cloud import abstain, upload

log = logging.getLogger(__name__)

#: edge <-> cloud requests of `flad run`: one try waits this long, and tries repeat for CLOUD_RETRY_S while the
#: cloud process is alive (a busy cloud is waited for; a dead one is noticed within one try)
CLOUD_TRY_S = 15.0
CLOUD_RETRY_S = 60.0


@dataclass
class Departure:
    vehicle: str
    fraction: float          # of the round's simulated time (and so of each client's planned steps)
    sim_time_s: float
    predicted: bool
    kind: str                # "leave" (mobility) | "crash"


@dataclass
class EdgeRoundResult:
    edge: str
    summary: dict[str, Any] | None = None
    state: dict[str, torch.Tensor] | None = None
    samples: int = 0
    error: str = ""
    departures_done: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def client_progress(site: EdgeSite, rnd: int, client: str) -> int:
    """Steps this client's pipelines have completed in round `rnd` (every attempt of every pipeline)."""
    prefix = f"r{rnd}-{client}-"
    return sum(v[0] for k, v in list(site.fhdp.progress.steps.items()) if k.startswith(prefix))


class DepartureInjector:
    """Acts out the round's departures on training progress (see the module docstring)."""

    def __init__(self, site: EdgeSite, rnd: int, clients: list[ClientPlan], departures: list[Departure],
                 local_steps: int) -> None:
        self.site, self.rnd, self.clients, self.local_steps = site, rnd, clients, local_steps
        self.pending = sorted(departures, key=lambda d: d.fraction)
        self.done: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._client_of = {m: c for c in clients for m in c.members}
        self._thread = threading.Thread(target=self._run, name=f"departures-{site.id}", daemon=True)

    def start(self) -> DepartureInjector:
        self._thread.start()
        return self

    def _fraction(self, client: ClientPlan) -> float:
        planned = max(1, len(client.members) * self.local_steps)
        return client_progress(self.site, self.rnd, client.id) / planned

    def _run(self) -> None:
        while self.pending and not self._stop.wait(0.02):
            for d in list(self.pending):
                client = self._client_of[d.vehicle]
                if self._fraction(client) < d.fraction:
                    continue
                self.pending.remove(d)
                self._act(client, d)

    def _act(self, client: ClientPlan, d: Departure) -> None:
        entry = {"vehicle": d.vehicle, "client": client.id, "sim_time_s": round(d.sim_time_s, 2),
                 "fraction": round(d.fraction, 3), "predicted": d.predicted, "cause": d.kind, "wall_t": time.time()}
        if d.predicted and d.kind == "leave":
            self.site.fhdp.predict_departure(d.vehicle, time.time())
            entry["action"] = "handover"
        else:
            entry["action"] = "kill"
            entry["pid"] = self.site.pool.kill(d.vehicle)
        log.info("%s round %d: %s of %s (%s) at %.0f%% of its client's steps", self.site.id, self.rnd,
                 entry["action"], d.vehicle, d.kind, 100 * d.fraction)
        self.done.append(entry)

    def stop(self) -> list[dict[str, Any]]:
        self._stop.set()
        self._thread.join(timeout=2)
        return self.done


def train_edge_round(site: EdgeSite, rnd: int, clients: list[ClientPlan], identities: dict[str, Identity],
                     departures: list[Departure], local_steps: int, update_nonce: str) -> EdgeRoundResult:
    """The edge's part of round `rnd`: pool slots become the clients' vehicles, FHDP trains, the edge FedAvgs,
    and the aggregate goes to the cloud (or an abstention when no client delivered)."""
    res = EdgeRoundResult(site.id)
    t0 = time.perf_counter()
    try:
        if clients:
            members = [m for c in clients for m in c.members]
            site.fhdp.use_fleet(site.round_fleet([identities[m] for m in members]), training=members)
            res.timings["assign_s"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            # solo vehicles too run as recovering clients: a departure is detected at once, and the steps done
            # before it count (gathered from the vehicle, or from the edge's backup if it is gone)
            fl_clients: list[RotationClient] = [site.fhdp.cluster_client(c.members, c.id) for c in clients]
            res.timings["pipelines_s"] = time.perf_counter() - t1
            injector = DepartureInjector(site, rnd, clients, departures, local_steps).start()
            t2 = time.perf_counter()
            try:
                res.summary = site.fhdp.run_round(rnd, fl_clients)
            except RuntimeError as exc:      # no client delivered: the edge abstains this round
                res.error = str(exc)
                log.warning("%s round %d: %s", site.id, rnd, exc)
            finally:
                res.departures_done = injector.stop()
                res.timings["training_s"] = time.perf_counter() - t2
        t3 = time.perf_counter()
        if res.summary is not None:
            res.state = {k: v.detach().clone() for k, v in site.fhdp.model.state_dict().items()}
            res.samples = int(res.summary["samples"])
            # short tries, retried while the cloud process lives: a dead cloud fails the upload in seconds,
            # and the run restarts it and redoes the round
            upload(site.fhdp.bus, res.state, sender=site.id, rnd=rnd, samples=res.samples,
                   update_id=f"{site.id}-r{rnd}-{update_nonce}", retry_s=CLOUD_RETRY_S,
                   try_timeout_s=CLOUD_TRY_S, alive=site.cloud_alive)
        else:
            abstain(site.fhdp.bus, sender=site.id, rnd=rnd)
        res.timings["upload_s"] = time.perf_counter() - t3
    finally:
        t4 = time.perf_counter()
        try:
            site.pool.release()
        except Exception:
            log.exception("%s: releasing the pool failed", site.id)
        res.timings["release_s"] = time.perf_counter() - t4
    return res


def identity_for(vehicle: str, profile: str, town: str, seed: int) -> Identity:
    return Identity(vehicle_id=vehicle, profile=profile, town=town, predicted_dwell_s=WALL_DWELL_S, seed=seed)
