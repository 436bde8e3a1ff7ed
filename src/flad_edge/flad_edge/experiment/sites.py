"""The processes of an experiment: one edge site per coverage disc (hub, FHDP orchestrator, vehicle pool), a cloud.

Each edge has its own bus (hub and services on its own loopback ports) and its own pool of slot processes
that take on the identity of the vehicles it trains in a round; the cloud is a separate process both edges
upload to. Every child process dies with the experiment process (PR_SET_PDEATHSIG), so a crashed run leaves
nothing behind and `flad run --resume` starts them afresh.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import yaml

from flad_core.bus import BusConfig
from flad_core.config import to_dict
from flad_core.fleet import FleetConfig, HeartbeatConfig, RoleSpec, VehicleSpec
from flad_core.procs import ProcessGroup, free_port_base, python_module_cmd
from flad_core.protocol import (
    SERVICE_EDGE_BACKUP,
    SERVICE_EDGE_BACKUP_LAYERS,
    SERVICE_EDGE_LAYERS,
    SERVICE_EDGE_READY,
    SERVICE_EDGE_REPORT,
    SERVICE_GLOBAL,
    SERVICE_REGISTER,
    SERVICE_UPLOAD,
)
from flad_edge.experiment.config import EdgeSpec, ExperimentConfig
from flad_edge.experiment.pool import Identity, SlotLauncher, VehiclePool
from flad_edge.fhdp.config import FhdpConfig
from flad_edge.fhdp.recovery.edge import RecoveringFhdpEdge
from flad_edge.fhdp.recovery.records import RecoveryConfig
from flad_edge.fl.aggregation import AggregationConfig
from flad_edge.fl.edge_server import EdgeServer

log = logging.getLogger(__name__)

CLOUD_ID = "cloud"
#: the experiment's own clock drives departures; a slot's wall-clock dwell must never end a round by itself
WALL_DWELL_S = 1e7


def edge_services(port: int, host: str = "127.0.0.1") -> dict[str, str]:
    address = f"tcp://{host}:{port}"
    names = (SERVICE_REGISTER, SERVICE_EDGE_LAYERS, SERVICE_EDGE_READY, SERVICE_EDGE_REPORT, SERVICE_EDGE_BACKUP,
             SERVICE_EDGE_BACKUP_LAYERS)
    return dict.fromkeys(names, address)


def site_fleet(cfg: ExperimentConfig, edge_id: str, vehicles: list[VehicleSpec], base: int, cloud: str,
               host: str = "127.0.0.1") -> FleetConfig:
    """One edge's fleet view: its own hub and services (on `host`, the edge's machine), the shared cloud at
    address `cloud`, every vehicle of the experiment."""
    bus = BusConfig(hub_pub=f"tcp://{host}:{base}", hub_sub=f"tcp://{host}:{base + 1}",
                    services={**edge_services(base + 2, host), SERVICE_UPLOAD: cloud, SERVICE_GLOBAL: cloud},
                    request_timeout_s=10.0)
    return FleetConfig(name=f"{cfg.name}-{edge_id}", seed=cfg.seed, bus=bus,
                       # a killed slot is seen at once (dropped connection); heartbeats only catch silent ones, so
                       # their timeout is generous: 16+ slot processes on 2 cores must not look departed in a stall
                       heartbeat=HeartbeatConfig(interval_s=0.5, timeout_s=15.0),
                       profiles=dict(cfg.fleet.devices), edge=RoleSpec(id=edge_id), cloud=RoleSpec(id=CLOUD_ID),
                       vehicles=list(vehicles))


def fhdp_config(cfg: ExperimentConfig) -> FhdpConfig:
    t = cfg.train
    return FhdpConfig(rounds=cfg.rounds.rounds, local_steps=cfg.local_steps, batch_size=t.batch_size,
                      n_micro=t.n_micro, schedule=t.schedule, codec=t.codec, time_scale=t.time_scale,
                      round_deadline_s=cfg.rounds.deadline_s, quorum=1, planner=cfg.swift.method, encoder=t.encoder,
                      seed=cfg.seed, aggregation=dataclasses.replace(cfg.aggregation.edge),
                      precision=t.precision)


@dataclasses.dataclass
class EdgeSite:
    """One edge server: its coverage, bus hub, FHDP orchestrator (with quick recovery) and vehicle pool."""

    spec: EdgeSpec
    fleet: FleetConfig
    server: EdgeServer
    fhdp: RecoveringFhdpEdge
    pool: VehiclePool
    #: is the cloud process (started by the run) still running? Uploads to a dead cloud stop at once
    cloud_alive: Callable[[], bool] = lambda: True

    @property
    def id(self) -> str:
        return self.spec.id

    def round_fleet(self, identities: list[Identity]) -> FleetConfig:
        """The edge's fleet with this round's vehicles reachable at the slots that took them on."""
        self.pool.assign(identities, self.server)
        addresses = {v.id: v for v in self.pool.fleet_for([i.vehicle_id for i in identities]).vehicles}
        vehicles = [dataclasses.replace(v, control=addresses[v.id].control, data=addresses[v.id].data)
                    if v.id in addresses else v for v in self.fleet.vehicles]
        return dataclasses.replace(self.fleet, vehicles=vehicles)

    def close(self) -> None:
        for step in (self.pool.close, self.fhdp.close):
            try:
                step()
            except Exception:   # closing must not hide the error that ended the run
                log.exception("%s: error while closing", self.id)


def cloud_command(run_path: Path, fleet: FleetConfig, edge_ids: list[str],
                  aggregation: AggregationConfig | None = None) -> list[str]:
    """The cloud process's command line (its fleet file written into the run). Its aggregation is kept in the
    run folder, so a restart (`aggregation` None) combines edges the way the run's first cloud did."""
    cloud_fleet = run_path / "fleets" / "cloud.yaml"
    cloud_fleet.parent.mkdir(parents=True, exist_ok=True)
    cloud_fleet.write_text(yaml.safe_dump(to_dict(fleet), sort_keys=False))
    saved = run_path / "fleets" / "cloud-aggregation.txt"
    if aggregation is not None:
        saved.write_text(aggregation.to_spec() + "\n")
    spec = saved.read_text().strip() if saved.exists() else AggregationConfig().to_spec()
    return python_module_cmd("flad_edge.fl.cloud", "--fleet", str(cloud_fleet), "--run-dir", str(run_path / "logs"),
                             "--edges", *edge_ids, "--aggregation", spec)


def start_cloud(group: ProcessGroup, run_path: Path, fleet: FleetConfig, edge_ids: list[str],
                aggregation: AggregationConfig | None = None) -> None:
    """Start the cloud process as a child of this one (see `cloud_command`)."""
    group.start("cloud", cloud_command(run_path, fleet, edge_ids, aggregation))


def build_site(cfg: ExperimentConfig, spec: EdgeSpec, fleet: FleetConfig, run_path: Path, data_root: str, *,
               group: ProcessGroup | None = None, slot_port_base: int | None = None,
               launcher: SlotLauncher | None = None) -> EdgeSite:
    """One edge site in this process: its pool (not started yet), `EdgeServer` and FHDP orchestrator."""
    (run_path / "fleets").mkdir(parents=True, exist_ok=True)
    (run_path / "fleets" / f"{spec.id}.yaml").write_text(yaml.safe_dump(to_dict(fleet), sort_keys=False))
    pool = VehiclePool(fleet, cfg.pool.slots_per_edge, run_path / "pool" / spec.id, data_root, group=group,
                       encoder=cfg.train.encoder, port_base=slot_port_base, device=cfg.train.device,
                       launcher=launcher)
    try:
        # the edge admits the experiment's vehicles and its pool's slots (as themselves, while idle)
        slots = pool.slot_fleet()
        fleet = dataclasses.replace(fleet, vehicles=fleet.vehicles + slots.vehicles,
                                    profiles={**slots.profiles, **fleet.profiles})
        server = EdgeServer(fleet)
        rcfg = RecoveryConfig(backup_every=2, templates_f=cfg.swift.templates_f, template_method="swift",
                              handover_margin_s=1.0, link_timeout_s=30.0)
        fhdp = RecoveringFhdpEdge(fleet, fhdp_config(cfg), rcfg, run=None, edge=server)
        fhdp.layer_profile()    # torch.fx tracing is not thread-safe: one edge at a time
    except BaseException:
        pool.close()
        raise
    return EdgeSite(spec, fleet, server, fhdp, pool)


def start_sites(cfg: ExperimentConfig, edges: list[EdgeSpec], vehicles: list[VehicleSpec], run_path: Path,
                data_root: str, group: ProcessGroup) -> list[EdgeSite]:
    """Every edge site (in this process) with its pool's slot processes, and the cloud process."""
    # one free range for every port of the run, so no two allocations can pick the same port
    per_edge = 8 + 2 * cfg.pool.slots_per_edge
    base = free_port_base(2 + per_edge * len(edges))
    cloud_port = base
    sites: list[EdgeSite] = []
    fleets = []
    for i, spec in enumerate(edges):
        fleets.append(site_fleet(cfg, spec.id, vehicles, base + 2 + i * per_edge, f"tcp://127.0.0.1:{cloud_port}"))
    start_cloud(group, run_path, fleets[0], [e.id for e in edges], cfg.aggregation.cloud)
    try:
        for i, (spec, fleet) in enumerate(zip(edges, fleets, strict=True)):
            sites.append(build_site(cfg, spec, fleet, run_path, data_root, group=group,
                                    slot_port_base=base + 2 + i * per_edge + 8))
        for site in sites:
            site.pool.start()
    except BaseException:
        for site in sites:
            site.close()
        raise
    return sites
