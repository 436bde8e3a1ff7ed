"""`flad run --engine ray`: the experiment's edges, cloud and pool slots as Ray actors across a cluster's nodes.

The round loop stays in the `flad run` process (Ray's driver). Everything else is an actor placed by Ray with
its resource share (`engine.*_cpus`, `engine.slot_gpus`; the SPREAD strategy, so work goes to every node):

* one `EdgeHost` per edge: the edge site (hub, `EdgeServer`, FHDP orchestrator with quick recovery, FedAvg)
  exactly as the local engine runs it, on its node, at that node's address and free ports;
* one `ProcessHost` for the cloud and one per pool slot: each runs the same OS process the local engine starts
  (`flad_edge.fl.cloud`, `flad_vehicle.fhdp.pool_worker`), at its node's address and free ports, and dies
  with it (PR_SET_PDEATHSIG SIGKILL). A slot's addresses are chosen every time it starts, so a slot
  respawned after its node was lost comes back on a surviving node, at new addresses.

ZeroMQ does the talking, as with the local engine; Ray only places, starts and watches. Node loss: the slots
of a lost node vanish without a goodbye, the edge's quick recovery takes over their clients and the pool
respawns them elsewhere; a lost edge or cloud fails the round, and the engine starts it again on a
surviving node and the round is redone from the checkpoint (`Experiment.run_round_or_redo`).

Every node must see the run folder and the dataset at the same paths (a shared filesystem; on one machine,
trivially): slots read their shard and write their logs there, the cloud keeps its state there.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError
except ImportError as exc:      # the local engine needs no Ray; this one says how to get it
    raise ImportError("flad run --engine ray needs Ray: pip install '.[ray]' (ray==2.60.0)") from exc

import contextlib

import torch

from flad_core.atomic import atomic_write_json
from flad_core.config import from_dict, to_dict
from flad_core.fleet import VehicleSpec
from flad_core.procs import free_port_base
from flad_edge.experiment.config import EdgeSpec, ExperimentConfig
from flad_edge.experiment.engine import EdgeHandle, EdgeLostError, LocalEdge
from flad_edge.experiment.ray_hosts import ProcessHost, node_address, rss_bytes
from flad_edge.experiment.sites import build_site, cloud_command, site_fleet

log = logging.getLogger(__name__)

#: one remote poll of a process may wait this long (a busy node); no answer counts as "still running"
POLL_TIMEOUT_S = 10.0
#: an actor not placed within this time means no node has its resource share free
PLACE_TIMEOUT_S = 180.0
#: a lost node's processes are reported with this exit code (as if SIGKILLed)
LOST = -int(signal.SIGKILL)
#: after an actor was lost, how long to wait for Ray to declare its node dead before placing its replacement
#: (Ray keeps a node alive until its health checks fail, ~15 s; an actor placed there meanwhile never starts)
NODE_DEATH_WAIT_S = 30.0


def wait_node_dead(node: str, timeout_s: float = NODE_DEATH_WAIT_S) -> bool:
    """Wait until Ray no longer counts `node` alive (True), or `timeout_s` (False: the node lives, e.g. only
    the actor's worker died)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if node not in {n["NodeID"] for n in ray.nodes() if n.get("Alive")}:
            return True
        time.sleep(0.5)
    return False


def actor_alive(probe: Any) -> bool:
    """Does the actor answer `probe` (a call's reference)? A busy one that does not answer in time counts as alive."""
    try:
        ray.get(probe, timeout=POLL_TIMEOUT_S)
        return True
    except RayActorError:
        return False
    except GetTimeoutError:
        return True


ProcessHostActor = ray.remote(max_restarts=0)(ProcessHost)


class RayProc:
    """A `ProcessHost`'s process, as `subprocess.Popen` shows one (what `VehiclePool` and the engine use).

    When the actor is gone (its node was lost, or it was killed), the process is gone too: exit code LOST."""

    def __init__(self, actor: Any, pid: int, name: str) -> None:
        self.actor, self.pid, self.name = actor, pid, name
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                self.returncode = ray.get(self.actor.poll.remote(), timeout=POLL_TIMEOUT_S)
            except GetTimeoutError:
                return None
            except RayActorError:
                self.returncode = LOST
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        end = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if end is not None and time.monotonic() >= end:
                raise subprocess.TimeoutExpired(self.name, timeout or 0.0)
            time.sleep(0.05)
        return code

    def send_signal(self, sig: int) -> None:
        with contextlib.suppress(RayActorError, GetTimeoutError):
            ray.get(self.actor.signal.remote(int(sig)), timeout=POLL_TIMEOUT_S)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


def _placed(ref: Any, what: str, options: dict[str, Any]) -> Any:
    try:
        return ray.get(ref, timeout=PLACE_TIMEOUT_S)
    except GetTimeoutError as exc:
        raise RuntimeError(f"Ray placed no {what} in {PLACE_TIMEOUT_S:.0f} s: no node has {options} free "
                           f"(cluster resources: {ray.available_resources()}); lower engine.*_cpus or add "
                           "nodes") from exc


class RaySlotLauncher:
    """`VehiclePool`'s launcher under Ray: each start of a slot is a new `ProcessHost` actor, wherever Ray puts it."""

    def __init__(self, options: dict[str, Any], journal: Path | None = None) -> None:
        self.options = options
        self.journal = journal          # one JSON line per start of a slot: where it ran (the run's record)
        self.actors: dict[str, Any] = {}
        self.node_of: dict[str, str] = {}
        self.placements: list[dict[str, Any]] = []
        self._prepared: dict[str, tuple[Any, tuple[str, list[int], str]]] = {}

    def prepare(self, names: list[str], n_ports: int) -> None:
        """Place the hosts of `names` all at once (Ray starts their workers in parallel); `place` takes them."""
        actors = {n: ProcessHostActor.options(**self.options).remote() for n in names}
        refs = {n: a.where.remote(n_ports) for n, a in actors.items()}
        for name, actor in actors.items():
            try:
                self._prepared[name] = (actor, ray.get(refs[name], timeout=PLACE_TIMEOUT_S))
            except (RayActorError, GetTimeoutError):    # `place` tries this one again on its own
                ray.kill(actor)

    def place(self, name: str, n_ports: int) -> tuple[str, list[int]]:
        old = self.actors.pop(name, None)
        if old is not None:     # the slot's previous process ended (or was killed): free its share
            if not actor_alive(old.poll.remote()):  # its node may be lost: Ray must know before placing anew
                wait_node_dead(self.node_of[name])
            ray.kill(old)
        if name in self._prepared:
            actor, (host, ports, node) = self._prepared.pop(name)
        else:
            for attempt in range(3):
                actor = ProcessHostActor.options(**self.options).remote()
                try:
                    host, ports, node = _placed(actor.where.remote(n_ports), f"slot {name}", self.options)
                    break
                except RayActorError:     # placed on a node that died meanwhile: once more, elsewhere
                    ray.kill(actor)
                    if attempt == 2:
                        raise
        self.actors[name] = actor
        self.node_of[name] = node
        self.placements.append({"actor": name, "node": node, "ip": host, "t": time.time()})
        return host, ports

    def start(self, name: str, cmd: list[str], log_path: Path, env: dict[str, str]) -> RayProc:
        actor = self.actors[name]
        pid = ray.get(actor.start.remote(cmd, str(log_path), env))
        self.placements[-1]["pid"] = pid
        if self.journal is not None:
            with open(self.journal, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(self.placements[-1]) + "\n")
        return RayProc(actor, pid, name)

    def close(self) -> None:
        for actor in [*self.actors.values(), *(a for a, _ in self._prepared.values())]:
            ray.kill(actor)
        self.actors.clear()
        self._prepared.clear()


class EdgeHost:
    """One edge site, as the local engine runs it, inside a Ray actor on the node Ray chose."""

    def __init__(self, cfg_data: dict[str, Any], spec: EdgeSpec, vehicles: list[VehicleSpec], run_path: str,
                 data_root: str, cloud_address: str, cloud: RayProc, slot_options: dict[str, Any]) -> None:
        from flad_core.runs import setup_logging

        run = Path(run_path)
        if not run.is_dir() or not Path(data_root).exists():
            raise FileNotFoundError(f"node {node_address()[0]} does not see the run folder {run} or the dataset "
                                    f"{data_root}: every node must see them at the same paths (a shared filesystem)")
        (run / "logs").mkdir(exist_ok=True)
        setup_logging(logfile=run / "logs" / f"{spec.id}.log")
        torch.set_num_threads(1)
        cfg = from_dict(ExperimentConfig, cfg_data)
        host, self.node = node_address()
        base = free_port_base(8, host=host)
        fleet = site_fleet(cfg, spec.id, vehicles, base, cloud_address, host)
        self.launcher = RaySlotLauncher(slot_options, journal=run / "logs" / f"{spec.id}-slots.jsonl")
        site = build_site(cfg, spec, fleet, run, data_root, launcher=self.launcher)
        self.cloud = cloud
        site.cloud_alive = lambda: self.cloud.poll() is None
        try:
            site.pool.start()
        except BaseException:
            site.close()
            raise
        self.edge = LocalEdge(site)
        self.host = host

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.edge, method)(*args)

    def where(self) -> dict[str, Any]:
        return {"actor": self.edge.id, "node": self.node, "ip": self.host, "pid": os.getpid()}

    def rss_bytes(self) -> dict[str, int]:
        """This edge's process, and each of its slots (actor worker + slot process)."""
        slots = {name: ray.get(actor.rss_bytes.remote(), timeout=POLL_TIMEOUT_S)
                 for name, actor in self.launcher.actors.items()}
        return {"edge": rss_bytes(os.getpid()), **slots}


EdgeHostActor = ray.remote(max_restarts=0)(EdgeHost)


class RayEdge:
    """The round loop's handle on an `EdgeHost` actor; a lost actor raises `EdgeLostError`."""

    def __init__(self, actor: Any, edge_id: str, cloud_alive: Callable[[], bool]) -> None:
        self.actor, self.id, self.cloud_alive = actor, edge_id, cloud_alive

    def _get(self, ref: Any) -> Any:
        try:
            return ray.get(ref)
        except RayActorError as exc:
            raise EdgeLostError(f"edge {self.id} is lost (its Ray actor died: {type(exc).__name__})") from exc

    def _call(self, method: str, *args: Any) -> Any:
        return self._get(self.actor.call.remote(method, *args))

    def train_round(self, *args: Any) -> Any:
        """The edge's round; given up as soon as the cloud is lost (the engine then starts the cloud and every
        edge again and the round is redone, so training on towards an upload that cannot happen is waste)."""
        ref = self.actor.call.remote("train_round", *args)
        while not ray.wait([ref], timeout=1.0)[0]:
            if not self.cloud_alive():
                raise EdgeLostError(f"edge {self.id}: the cloud is lost, so this round cannot be uploaded")
        return self._get(ref)

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self._call("load_state", state)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._call("state_dict")

    def forget_round(self, rnd: int) -> None:
        self._call("forget_round", rnd)

    def release(self) -> None:
        self._call("release")

    def download(self, rnd: int) -> dict[str, torch.Tensor] | None:
        return self._call("download", rnd)

    def alive(self) -> bool:
        return actor_alive(self.actor.where.remote())

    def close(self) -> None:
        with contextlib.suppress(RayActorError, GetTimeoutError):
            ray.get(self.actor.call.remote("close"), timeout=60)
        ray.kill(self.actor)


class RayEngine:
    """The edges, the cloud and the pool slots as Ray actors (module docstring)."""

    name = "ray"

    def __init__(self, cfg: ExperimentConfig, run_path: Path) -> None:
        self.cfg, self.run_path = cfg, run_path
        self.edges: list[RayEdge] = []
        self.cloud: RayProc | None = None
        self.cloud_address = ""
        self.record: dict[str, Any] = {"engine": "ray", "placements": [], "restarts": []}
        self._owns_ray = False
        self.last_restart = ""          # what `recover` last did, as an event kind (cloud_restart / edge_restart)

    # -- resources ---------------------------------------------------------------------------------------------
    def slot_options(self) -> dict[str, Any]:
        e = self.cfg.engine
        opts: dict[str, Any] = {"num_cpus": e.slot_cpus, "scheduling_strategy": "SPREAD"}
        if self.cfg.train.device.startswith("cuda"):
            # default: every slot of the run shares one GPU (the run fits a one-GPU machine); more with slot_gpus
            opts["num_gpus"] = e.slot_gpus or 1.0 / (self.cfg.pool.slots_per_edge * self.cfg.edges.n)
        return opts

    def needed_cpus(self) -> float:
        e, n = self.cfg.engine, self.cfg.edges.n
        return e.cloud_cpus + n * (e.edge_cpus + self.cfg.pool.slots_per_edge * e.slot_cpus)

    def connect(self) -> None:
        if ray.is_initialized():
            return
        address = self.cfg.engine.address or None
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "logging_level": logging.WARNING}
        if address is None:      # a new one-machine instance: logical CPUs for every actor's share
            kwargs["num_cpus"] = max(os.cpu_count() or 1, int(self.needed_cpus() + 0.999))
        ray.init(address=address, **kwargs)
        self._owns_ray = True
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        self.record["address"] = address or "local"
        self.record["nodes"] = [{"node": n["NodeID"], "ip": n["NodeManagerAddress"],
                                 "resources": n.get("Resources", {})} for n in nodes]
        log.info("Ray cluster: %d node(s), resources %s", len(nodes), ray.cluster_resources())

    # -- processes ---------------------------------------------------------------------------------------------
    def start(self, edges: list[EdgeSpec], vehicles: list[VehicleSpec], data_root: str) -> list[EdgeHandle]:
        self.connect()
        self.edge_specs, self.vehicles, self.data_root = list(edges), list(vehicles), data_root
        self.start_cloud(first=True)
        try:
            self.edges = self.start_edges(self.edge_specs)
        except BaseException:
            self.close()
            raise
        return list(self.edges)

    def start_cloud(self, first: bool = False) -> None:
        opts = {"num_cpus": self.cfg.engine.cloud_cpus, "scheduling_strategy": "SPREAD"}
        actor = ProcessHostActor.options(**opts).remote()
        host, ports, node = _placed(actor.where.remote(4), "cloud", opts)
        self.cloud_address = f"tcp://{host}:{ports[3]}"
        # the cloud reads its service address (and the fleet's heartbeat, seed) from an edge's view of the fleet
        fleet = site_fleet(self.cfg, self.edge_specs[0].id, self.vehicles, ports[0], self.cloud_address, host)
        cmd = cloud_command(self.run_path, fleet, [e.id for e in self.edge_specs],
                            self.cfg.aggregation.cloud if first else None)
        (self.run_path / "logs").mkdir(exist_ok=True)
        pid = ray.get(actor.start.remote(cmd, str(self.run_path / "logs" / "cloud.stderr"), {}))
        self.cloud = RayProc(actor, pid, "cloud")
        self.record["placements"].append({"actor": "cloud", "node": node, "ip": host, "pid": pid, "t": time.time()})
        self.save()

    def start_edges(self, specs: list[EdgeSpec]) -> list[RayEdge]:
        cfg_data = to_dict(self.cfg)
        opts = {"num_cpus": self.cfg.engine.edge_cpus, "scheduling_strategy": "SPREAD", "max_concurrency": 8}
        actors = [EdgeHostActor.options(**opts).remote(cfg_data, spec, self.vehicles, str(self.run_path),
                                                       self.data_root, self.cloud_address, self.cloud,
                                                       self.slot_options())
                  for spec in specs]
        placed = []
        for spec, actor in zip(specs, actors, strict=True):
            try:
                where = _placed(actor.where.remote(), f"edge {spec.id}", opts)
            except BaseException:
                for a in actors:
                    ray.kill(a)
                raise
            placed.append(RayEdge(actor, spec.id, self.cloud_alive))
            self.record["placements"].append({**where, "t": time.time()})
        self.save()
        return placed

    def cloud_alive(self) -> bool:
        return self.cloud is None or self.cloud.poll() is None

    def recover(self) -> list[EdgeHandle] | None:
        """Start again what a lost node took: the cloud (then every edge, which must learn its new address)
        or the lost edges. None when everything is still there (the failure was not a lost process)."""
        cloud_lost = not self.cloud_alive()
        lost = [i for i, e in enumerate(self.edges) if not e.alive()]
        if not cloud_lost and not lost:
            return None
        latest = {p["actor"]: p["node"] for p in self.record["placements"]}
        for actor in [*(["cloud"] if cloud_lost else []), *(self.edges[i].id for i in lost)]:
            wait_node_dead(latest[actor])   # a node Ray still counts alive would be given the replacement
        if cloud_lost:
            log.error("the cloud is lost (exit %s): starting it again, and every edge with its new address",
                      self.cloud.returncode if self.cloud else None)
            self.start_cloud()
            lost = list(range(len(self.edges)))
        self.last_restart = "cloud_restart" if cloud_lost else "edge_restart"
        names = [self.edges[i].id for i in lost]
        log.error("starting edges %s again", names)
        self.record["restarts"].append({"t": time.time(), "cloud": cloud_lost, "edges": names})
        for i in lost:
            self.edges[i].close()
        fresh = self.start_edges([next(s for s in self.edge_specs if s.id == self.edges[i].id) for i in lost])
        for i, edge in zip(lost, fresh, strict=True):
            self.edges[i] = edge
        return list(self.edges)

    def save(self) -> None:
        """`<run>/engine.json`: where every actor runs (and ran), kept current while the run goes on."""
        atomic_write_json(self.run_path / "engine.json", self.describe())

    def memory(self) -> dict[str, Any]:
        """Resident bytes of every edge, slot (actor worker + its process) and the cloud, by actor."""
        out: dict[str, Any] = {}
        for edge in self.edges:
            out.update({f"{edge.id}:{k}": v for k, v in ray.get(edge.actor.rss_bytes.remote()).items()})
        if self.cloud is not None:
            out["cloud"] = ray.get(self.cloud.actor.rss_bytes.remote())
        return out

    def describe(self) -> dict[str, Any]:
        """Every start of an actor (cloud, edges; slots from the edges' journals), the restarts, the nodes used."""
        placements = list(self.record["placements"])
        for journal in sorted((self.run_path / "logs").glob("*-slots.jsonl")):
            placements += [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
        return {**self.record, "placements": placements, "nodes_used": sorted({p["node"] for p in placements})}

    def close(self) -> None:
        if not ray.is_initialized():
            return
        for edge in self.edges:
            edge.close()
        self.edges = []
        self.save()
        if self.cloud is not None:
            self.cloud.terminate()
            try:
                self.cloud.wait(5.0)
            except subprocess.TimeoutExpired:
                self.cloud.kill()
            ray.kill(self.cloud.actor)
            self.cloud = None
        if self._owns_ray:
            ray.shutdown()
