"""Where an experiment's processes run: the engine behind `flad run --engine local|ray`.

The round loop (`flad_edge.experiment.run`) talks to its edges only through `EdgeHandle`s and to its cloud
only through the engine, so the same loop drives edges that live in its own process (`LocalEngine`: edges
in-process, cloud and pool slots as child processes on this host) and edges that are Ray actors on other
machines (`flad_edge.experiment.ray_engine.RayEngine`). Ray is imported only by the Ray engine.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import torch

from flad_core.fleet import FleetConfig, VehicleSpec
from flad_core.procs import ProcessGroup
from flad_edge.experiment.config import EdgeSpec, ExperimentConfig
from flad_edge.experiment.planning import ClientPlan
from flad_edge.experiment.pool import Identity
from flad_edge.experiment.rounds import CLOUD_TRY_S, Departure, EdgeRoundResult, train_edge_round
from flad_edge.experiment.sites import EdgeSite, start_cloud, start_sites
from flad_edge.fl.cloud import download

log = logging.getLogger(__name__)


class EdgeLostError(RuntimeError):
    """An edge's process is gone (its machine was lost): the round is redone from the checkpoint."""


class EdgeHandle(Protocol):
    """What the round loop does with an edge, wherever the edge runs."""

    id: str

    def train_round(self, rnd: int, clients: list[ClientPlan], identities: dict[str, Identity],
                    departures: list[Departure], local_steps: int, attempt: str) -> EdgeRoundResult: ...

    def load_state(self, state: dict[str, torch.Tensor]) -> None: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def forget_round(self, rnd: int) -> None: ...

    def release(self) -> None: ...

    def download(self, rnd: int) -> dict[str, torch.Tensor] | None: ...

    def close(self) -> None: ...


class LocalEdge:
    """An edge site in this process."""

    def __init__(self, site: EdgeSite) -> None:
        self.site = site
        self.id = site.id

    def train_round(self, rnd: int, clients: list[ClientPlan], identities: dict[str, Identity],
                    departures: list[Departure], local_steps: int, attempt: str) -> EdgeRoundResult:
        return train_edge_round(self.site, rnd, clients, identities, departures, local_steps, attempt)

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.site.fhdp.model.load_state_dict(state)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.site.fhdp.model.state_dict().items()}

    def forget_round(self, rnd: int) -> None:
        """Drop round `rnd`'s step counts: a redone round's departures time on its own steps only."""
        steps = self.site.fhdp.progress.steps
        for key in [k for k in steps if k.startswith(f"r{rnd}-")]:
            del steps[key]

    def release(self) -> None:
        self.site.pool.release()

    def download(self, rnd: int) -> dict[str, torch.Tensor] | None:
        """The cloud's global model of round `rnd` (None: every edge abstained), over this edge's bus."""
        return download(self.site.fhdp.bus, rnd, self.site.id, retry=True, try_timeout_s=CLOUD_TRY_S,
                        alive=self.site.cloud_alive)

    def close(self) -> None:
        self.site.close()


class LocalEngine:
    """Edges in this process; the cloud and every pool slot are its child processes (they die with it)."""

    name = "local"

    def __init__(self, cfg: ExperimentConfig, run_path: Path) -> None:
        self.cfg, self.run_path = cfg, run_path
        self.group = ProcessGroup(grace_s=5.0)
        self.edges: list[LocalEdge] = []
        self._cloud_fleet: FleetConfig | None = None
        self.last_restart = ""          # what `recover` last did, as an event kind ("cloud_restart")
        self._edge_ids: list[str] = []

    def start(self, edges: list[EdgeSpec], vehicles: list[VehicleSpec], data_root: str) -> list[EdgeHandle]:
        sites = start_sites(self.cfg, edges, vehicles, self.run_path, data_root, self.group)
        for site in sites:
            site.cloud_alive = self.cloud_alive
        self._cloud_fleet, self._edge_ids = sites[0].fleet, [e.id for e in edges]
        self.edges = [LocalEdge(s) for s in sites]
        return list(self.edges)

    def cloud_alive(self) -> bool:
        """Is the cloud process this run started still running (True while there is none to watch)?"""
        proc = self.group.procs.get("cloud")
        return proc is None or proc.poll() is None

    def recover(self) -> list[EdgeHandle] | None:
        """After a failed round: start the cloud again if it died (the edges, in this process, cannot have).
        Returns the edges to go on with, or None when nothing was lost (the failure is not the engine's).

        The cloud reloads the rounds it had aggregated (`<run>/logs/cloud_state`): a redone round that it had
        already aggregated before it died is answered "already counted" and gets that round's stored global
        model, so no edge round is counted twice."""
        proc = self.group.procs.get("cloud")
        if proc is None or proc.poll() is None or self._cloud_fleet is None:
            return None
        log.error("the cloud process exited (%s): starting it again", proc.returncode)
        start_cloud(self.group, self.run_path, self._cloud_fleet, self._edge_ids)
        self.last_restart = "cloud_restart"
        return list(self.edges)

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name}

    def close(self) -> None:
        for edge in self.edges:
            edge.close()
        self.group.stop()
