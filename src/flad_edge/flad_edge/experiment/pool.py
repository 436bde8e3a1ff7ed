"""Virtual vehicles: a fixed pool of worker processes ("slots") that take on vehicles' identities per round.

An experiment has 50-1,000 vehicles but only a handful train in any round, and one idle torch process per
vehicle does not fit a small machine. Like a federated-learning simulation engine (Flower's simulation
instantiates a client app per round with one node's partition), `VehiclePool` keeps N slot processes
(`flad_vehicle.fhdp.pool_worker`, the same `FhdpVehicle` training code as a real vehicle process) and maps the
round's vehicles onto them: a slot adopts a vehicle's id, device profile (emulated speed, memory, link), town,
data shard, dwell and seed, registers with the edge under that id and heartbeats as it. To the edge -- its
registry, SWIFT, FHDP's `PipelineControl` and `DisconnectWatch` (through `fleet_for`) -- the vehicle is then
simply there, reachable at its slot's control and data addresses. The real-fleet path (one process per
vehicle) does not use this module.

The pool runs in the edge's process, next to an `EdgeServer` the caller owns: slots register with it (as
themselves while idle), so its fleet must admit the slot ids and the vehicle ids (a fleet listing no vehicles
admits everyone).

Where a slot's process runs is the launcher's business: by default a child process of the pool on this host
(loopback addresses fixed at construction); with a `SlotLauncher` (`flad run --engine ray`), each start of a slot
asks the launcher for a machine and free ports there, so a slot respawned after its machine was lost comes back
elsewhere, at new addresses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from flad_core import codec
from flad_core.bus import BusError, RemoteError, ZmqBus
from flad_core.config import to_dict
from flad_core.fleet import FleetConfig, VehicleSpec
from flad_core.procs import ProcessGroup, free_port_base, python_module_cmd
from flad_core.protocol import SERVICE_ADOPT
from flad_core.roles import security_for
from flad_edge.fl.edge_server import EdgeServer, VehicleRecord

log = logging.getLogger(__name__)

WORKER_MODULE = "flad_vehicle.fhdp.pool_worker"
#: the profile a slot reports while it plays no vehicle (it trains nothing then; any built-in profile does)
IDLE_PROFILE = "jetson_nano"
#: slot states: starting (process up, not yet registered), free, busy (plays a vehicle), dead (will not come back)
STARTING, FREE, BUSY, DEAD = "starting", "free", "busy", "dead"


@dataclass
class Identity:
    """A vehicle as a slot plays it for a round: who, on what device, where, for how long, seeded how."""

    vehicle_id: str
    profile: str               # a profile name of the edge's fleet (built-in paper profiles included)
    town: str
    predicted_dwell_s: float
    seed: int = 0


class ProcHandle(Protocol):
    """What the pool needs of a slot's process: `subprocess.Popen`, or a process on another machine."""

    pid: int
    returncode: int | None

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...


class SlotLauncher(Protocol):
    """Starts slot processes somewhere else than as children of this process (`flad run --engine ray`)."""

    def place(self, name: str, n_ports: int) -> tuple[str, list[int]]:
        """Choose where process `name` will run; its host address and `n_ports` free ports there."""
        ...

    def start(self, name: str, cmd: list[str], log_path: Path, env: dict[str, str]) -> ProcHandle:
        """Start `cmd` where `place(name)` chose."""
        ...

    def prepare(self, names: list[str], n_ports: int) -> None:
        """Optionally place several processes at once before their `place` calls (a faster start)."""
        ...

    def close(self) -> None: ...


class PoolError(RuntimeError):
    """The pool cannot do what was asked (no free slot, a slot that does not come up or will not adopt)."""


@dataclass
class _Slot:
    spec: VehicleSpec                      # the slot's own id and addresses (the slot fleet's entry)
    proc: ProcHandle | None = None
    state: str = STARTING
    identity: Identity | None = None       # what it plays while busy


class _Spawner:
    """Runs every slot start on one long-lived thread.

    A child's PR_SET_PDEATHSIG (`ProcessGroup`) fires when the *thread* that forked it ends, so a slot
    respawned from a short-lived thread would be killed as soon as that thread finished."""

    def __init__(self) -> None:
        self._tasks: queue.Queue[tuple[Callable[[], Any], queue.Queue] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="pool-spawner", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (task := self._tasks.get()) is not None:
            fn, reply = task
            try:
                reply.put((True, fn()))
            except BaseException as exc:  # handed to the caller, never lost on this thread
                reply.put((False, exc))

    def call(self, fn: Callable[[], Any], wait: bool = True) -> Any:
        """Run `fn` on the spawner thread; with `wait`, return its result (or raise its exception)."""
        reply: queue.Queue = queue.Queue()
        self._tasks.put((fn, reply))
        if not wait:
            return None
        ok, value = reply.get()
        if not ok:
            raise value
        return value

    def close(self) -> None:
        self._tasks.put(None)
        self._thread.join(timeout=30)


class VehiclePool:
    """N slot processes for one edge (its bus / EdgeServer); vehicles are mapped onto slots per round."""

    def __init__(self, fleet: FleetConfig, n_slots: int, workdir: Path, data_root: str,
                 group: ProcessGroup | None = None, encoder: str = "tiny", port_base: int | None = None,
                 device: str = "auto", launcher: SlotLauncher | None = None) -> None:
        if n_slots < 1:
            raise ValueError(f"a pool needs at least one slot, got {n_slots}")
        self.fleet = fleet
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_root = data_root
        self.encoder = encoder
        self.device = device            # where every slot process trains its stages (flad_core.device)
        self.launcher = launcher        # None: slots are child processes on this host, at fixed loopback ports
        self._own_group = group is None
        self.group = group or ProcessGroup(grace_s=5.0)
        base = free_port_base(2 * n_slots) if port_base is None else port_base   # slot i: base + 2i, base + 2i + 1
        self._slots: dict[str, _Slot] = {}
        for i in range(n_slots):
            sid = f"slot{i:02d}"
            self._slots[sid] = _Slot(VehicleSpec(id=sid, profile=IDLE_PROFILE, predicted_dwell_s=0.0,
                                                 control=f"tcp://127.0.0.1:{base + 2 * i}",
                                                 data=f"tcp://127.0.0.1:{base + 2 * i + 1}"))
        self.fleet_file = self.workdir / "slots.yaml"
        self.fleet_file.write_text(yaml.safe_dump(to_dict(self.slot_fleet()), sort_keys=False))
        self._cv = threading.Condition()
        self._closed = False
        self._spawner = _Spawner()
        # the pool's own endpoint for adopt requests, with the edge's credentials (it runs in the edge's process);
        # the slot fleet names each slot's control address with the slot id, the key its process serves with
        self.bus = ZmqBus(fleet.edge.id, fleet.bus, security_for(self.slot_fleet(), fleet.edge.id))

    # -- processes ---------------------------------------------------------------------------------------------
    def slot_fleet(self) -> FleetConfig:
        """The edge's fleet with the slots as its vehicles: what the slot processes read (bus, heartbeat, seed)."""
        return dataclasses.replace(self.fleet, vehicles=[dataclasses.replace(s.spec) for s in self._slots.values()])

    def start(self, timeout_s: float = 120.0) -> None:
        """Start every slot process and wait until each has registered with the edge (the caller runs it)."""
        if self.launcher is not None:
            self.launcher.prepare([f"{self.fleet.edge.id}/{sid}" for sid in self._slots], 2)
        for sid in self._slots:
            self._spawner.call(lambda sid=sid: self._spawn(sid))
        deadline = time.monotonic() + timeout_s
        for sid in self._slots:
            self._wait_ready(sid, deadline)

    def _spawn(self, sid: str) -> None:
        """Start slot `sid`'s process (spawner thread only)."""
        slot = self._slots[sid]
        name, fleet_file, env = f"{self.fleet.edge.id}/{sid}", self.fleet_file, {"OMP_NUM_THREADS": "1"}
        if self.launcher is not None:      # a machine and ports chosen per start: the slot's addresses change
            host, (control, data) = self.launcher.place(name, 2)
            with self._cv:
                slot.spec = dataclasses.replace(slot.spec, control=f"tcp://{host}:{control}",
                                                data=f"tcp://{host}:{data}")
                fleet = self.slot_fleet()
            fleet_file = self.workdir / f"{sid}.yaml"
            fleet_file.write_text(yaml.safe_dump(to_dict(fleet), sort_keys=False))
        cmd = python_module_cmd(WORKER_MODULE, "--slot", sid, "--fleet", str(fleet_file),
                                "--run-dir", str(self.workdir), "--data", self.data_root, "--encoder", self.encoder,
                                "--device", self.device)
        if self.launcher is not None:
            proc = self.launcher.start(name, cmd, self.workdir / f"{sid}.stderr", env)
        else:
            proc = self.group.start(name, cmd, log_path=self.workdir / f"{sid}.stderr", env=env)
        with self._cv:
            slot.proc, slot.state, slot.identity = proc, STARTING, None
        log.info("%s: started slot %s (pid %d)", self.fleet.edge.id, sid, proc.pid)

    def _wait_ready(self, sid: str, deadline: float) -> None:
        """Wait until slot `sid` answers adopt (it serves adopt only once registered with the edge); then free."""
        slot = self._slots[sid]
        release = self._identity_msg(None)
        while True:
            if self._closed:
                raise PoolError(f"slot {sid}: the pool is closing")
            proc = slot.proc
            if proc is None or proc.poll() is not None:
                with self._cv:
                    slot.state = DEAD
                    self._cv.notify_all()
                raise PoolError(f"slot {sid} exited (rc {proc.returncode if proc else None}) before registering "
                                f"with the edge; the edge's fleet must admit the slot ids. Its log ends:\n"
                                f"{self._log_tail(sid)}")
            try:
                ack = self.bus.request(SERVICE_ADOPT, release, "flad_msgs/msg/Ack", timeout_s=1.0,
                                       address=slot.spec.control)
                if ack.ok:
                    break
                log.info("slot %s not ready: %s", sid, ack.message)
            except RemoteError:
                pass                       # up, but not registered yet (adopt is not served before)
            except BusError:
                pass                       # not listening yet
            if time.monotonic() >= deadline:
                raise PoolError(f"slot {sid} did not register with the edge in time. Its log ends:\n"
                                f"{self._log_tail(sid)}")
            time.sleep(0.1)
        with self._cv:
            slot.state, slot.identity = FREE, None
            self._cv.notify_all()
        log.info("slot %s registered, free", sid)

    def _log_tail(self, sid: str, lines: int = 15) -> str:
        path = self.workdir / f"{sid}.stderr"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- identities ----------------------------------------------------------------------------------------------
    def _identity_msg(self, ident: Identity | None) -> Any:
        if ident is None:
            return codec.new("flad_msgs/msg/VehicleIdentity", header=codec.header())
        prof = self.fleet.all_profiles()[ident.profile]
        device = codec.new("flad_msgs/msg/DeviceProfile", name=ident.profile, mem_bytes=prof.stage_mem_bytes,
                           tflops=prof.tflops, link_mbps=prof.link_mbps, emulated=True)
        return codec.new("flad_msgs/msg/VehicleIdentity", header=codec.header(), vehicle_id=ident.vehicle_id,
                         profile_name=ident.profile, device=device, town=ident.town, data_root=self.data_root,
                         predicted_dwell_s=float(ident.predicted_dwell_s), seed=int(ident.seed))

    def _check_identities(self, identities: list[Identity]) -> None:
        ids = [i.vehicle_id for i in identities]
        dupes = sorted({v for v in ids if ids.count(v) > 1})
        if dupes:
            raise ValueError(f"vehicles listed twice: {dupes}")
        known = self.fleet.all_profiles()
        for i in identities:
            if i.profile not in known:
                raise ValueError(f"{i.vehicle_id}: unknown profile {i.profile!r} (known: {', '.join(sorted(known))})")
            if i.vehicle_id in self._slots:
                raise ValueError(f"{i.vehicle_id!r} is a slot id, not a vehicle id")
        held = {v: self.slot_of(v) for v in ids if self.slot_of(v) is not None}
        if held:
            raise PoolError(f"already placed: {held}; release them first")

    def _describe(self) -> str:
        return ", ".join(f"{sid}: {s.identity.vehicle_id if s.state == BUSY and s.identity else s.state}"
                         for sid, s in self._slots.items())

    def _reap(self) -> None:
        """Respawn slots whose process ended on its own (a crash, or the edge's STOP broadcast, which every
        vehicle process obeys); the vehicle such a slot played is gone without a goodbye, as after `kill`."""
        with self._cv:
            if self._closed:
                return
            ended = [sid for sid, s in self._slots.items()
                     if s.state in (FREE, BUSY) and s.proc is not None and s.proc.poll() is not None]
            for sid in ended:
                slot = self._slots[sid]
                log.warning("slot %s (pid %d, playing %s) exited with rc %s; restarting it", sid, slot.proc.pid,
                            slot.identity.vehicle_id if slot.identity else "nobody", slot.proc.returncode)
                slot.state, slot.identity = STARTING, None
        for sid in ended:
            self._spawner.call(lambda sid=sid: self._respawn(sid), wait=False)

    def _take_free(self, identities: list[Identity], deadline: float) -> list[str]:
        """Reserve a free slot per identity, waiting for starting (respawning) slots if those are needed."""
        n = len(identities)
        self._reap()
        with self._cv:
            while True:
                free = [sid for sid, s in self._slots.items() if s.state == FREE]
                if len(free) >= n:
                    break
                starting = [sid for sid, s in self._slots.items() if s.state == STARTING]
                if len(free) + len(starting) < n:
                    raise PoolError(f"cannot place {n} vehicle(s): only {len(free)} of the {len(self._slots)} slots "
                                    f"are free ({self._describe()}); release vehicles or make a bigger pool")
                if time.monotonic() >= deadline:
                    raise PoolError(f"cannot place {n} vehicle(s): slots {starting} are still starting "
                                    f"({self._describe()})")
                self._cv.wait(0.1)
            chosen = free[:n]
            for sid, ident in zip(chosen, identities, strict=True):
                self._slots[sid].state, self._slots[sid].identity = BUSY, ident
            return chosen

    def assign(self, identities: list[Identity], edge: EdgeServer, timeout_s: float = 60.0) -> dict[str, str]:
        """Place each vehicle on a free slot (vehicle -> slot) and wait until the edge has it alive.

        Raises PoolError, naming every slot's state, when there are more vehicles than free slots (slots
        being respawned after a `kill` are waited for). If a slot does not adopt its vehicle, every slot this
        call placed is released again before the error is raised."""
        self._check_identities(identities)
        if not identities:
            return {}
        deadline = time.monotonic() + timeout_s
        since = time.time()
        chosen = self._take_free(identities, deadline)
        placed: list[str] = []
        unsure: list[str] = []      # adopt requests that got no answer: the slot may speak for the vehicle
        try:
            for sid, ident in zip(chosen, identities, strict=True):
                try:
                    ack = self.bus.request(SERVICE_ADOPT, self._identity_msg(ident), "flad_msgs/msg/Ack",
                                           timeout_s=max(5.0, deadline - time.monotonic()),
                                           address=self._slots[sid].spec.control)
                except BusError as exc:
                    unsure.append(sid)
                    raise PoolError(f"slot {sid} did not answer the adoption of {ident.vehicle_id}: {exc}") from exc
                if not ack.ok:     # the slot stayed (or went back to) idle as itself
                    raise PoolError(f"slot {sid} did not adopt {ident.vehicle_id}: {ack.message}")
                placed.append(sid)
            self._wait_alive(edge, identities, since, deadline)
        except BaseException:
            self._undo(chosen, placed, unsure)
            raise
        mapping = {i.vehicle_id: sid for sid, i in zip(chosen, identities, strict=True)}
        log.info("placed %s", mapping)
        return mapping

    def _undo(self, chosen: list[str], placed: list[str], unsure: list[str]) -> None:
        """A failed `assign`: release what it placed, restart slots that may have adopted, free the rest."""
        release = [self._slots[sid].identity.vehicle_id for sid in placed if self._slots[sid].identity]
        with self._cv:
            for sid in chosen:
                if sid not in placed and sid not in unsure and self._slots[sid].state == BUSY:
                    self._slots[sid].state, self._slots[sid].identity = FREE, None
            self._cv.notify_all()
        self.release(release)
        for sid in unsure:
            self._kill_slot(sid)

    @staticmethod
    def _alive_as(rec: VehicleRecord | None, ident: Identity, since: float) -> bool:
        """The edge has `ident` alive, registered since `since`, with its dwell (its status arrived)."""
        if rec is None or rec.state != "alive":
            return False
        registered = max((float(h.split("@", 1)[1]) for h in rec.history if h.startswith("registered@")),
                         default=rec.registered_at)
        # VehicleStatus carries the dwell as float32
        return registered >= since and abs(rec.dwell_s - ident.predicted_dwell_s) <= 1e-5 * max(
            1.0, abs(ident.predicted_dwell_s))

    def _wait_alive(self, edge: EdgeServer, identities: list[Identity], since: float, deadline: float) -> None:
        while True:
            recs = {r.vehicle_id: r for r in edge.snapshot()}
            missing = [i.vehicle_id for i in identities if not self._alive_as(recs.get(i.vehicle_id), i, since)]
            if not missing:
                return
            if time.monotonic() >= deadline:
                states = {v: recs[v].state if v in recs else "unknown" for v in missing}
                raise PoolError(f"the edge does not see {states} alive after adoption")
            time.sleep(0.02)

    def fleet_for(self, vehicle_ids: list[str]) -> FleetConfig:
        """The edge's fleet whose vehicles are `vehicle_ids`, each at its slot's control/data addresses with
        its own profile, town and dwell: what FHDP's PipelineControl and DisconnectWatch work from. A slot serves
        with its slot id's key whichever vehicle it plays: `security.server_keys` names it per control address."""
        vehicles = []
        server_keys = {}
        with self._cv:
            for vid in vehicle_ids:
                sid = self._slot_of(vid)
                if sid is None:
                    raise PoolError(f"{vid} is not placed on any slot ({self._describe()})")
                slot = self._slots[sid]
                ident = slot.identity
                assert ident is not None
                vehicles.append(VehicleSpec(id=vid, profile=ident.profile, town=ident.town,
                                            predicted_dwell_s=ident.predicted_dwell_s, control=slot.spec.control,
                                            data=slot.spec.data))
                server_keys[slot.spec.control] = sid
        security = dataclasses.replace(self.fleet.security,
                                       server_keys={**self.fleet.security.server_keys, **server_keys})
        return dataclasses.replace(self.fleet, vehicles=vehicles, security=security)

    def release(self, vehicle_ids: list[str] | None = None) -> None:
        """Free the slots of `vehicle_ids` (None: all): each says goodbye as its vehicle and idles as itself.

        A slot that does not confirm is killed and respawned, so it cannot go on speaking for the vehicle."""
        self._reap()       # a slot whose process already ended has nothing left to release
        with self._cv:
            if vehicle_ids is None:
                vehicle_ids = [s.identity.vehicle_id for s in self._slots.values() if s.state == BUSY and s.identity]
            targets = [(vid, self._slot_of(vid)) for vid in vehicle_ids]
        for vid, sid in targets:
            if sid is None:
                log.warning("release of %s: not placed on any slot", vid)
                continue
            try:
                ack = self.bus.request(SERVICE_ADOPT, self._identity_msg(None), "flad_msgs/msg/Ack", timeout_s=30.0,
                                       address=self._slots[sid].spec.control)
                if not ack.ok:
                    raise PoolError(ack.message)
            except (BusError, PoolError) as exc:
                log.warning("slot %s did not release %s (%s); restarting it", sid, vid, exc)
                self._kill_slot(sid)
                continue
            with self._cv:
                self._slots[sid].state, self._slots[sid].identity = FREE, None
                self._cv.notify_all()
            log.info("released %s from %s", vid, sid)

    def kill(self, vehicle_id: str) -> int:
        """SIGKILL the slot process playing `vehicle_id` (an unpredicted departure: no goodbye); returns its pid.

        The slot is respawned in the background and is free again once re-registered with the edge."""
        with self._cv:
            sid = self._slot_of(vehicle_id)
        if sid is None:
            raise KeyError(f"{vehicle_id} is not placed on any slot")
        return self._kill_slot(sid)

    def _kill_slot(self, sid: str) -> int:
        slot = self._slots[sid]
        with self._cv:     # STARTING first: `_reap` must not respawn it a second time
            slot.state, slot.identity = STARTING, None
            proc, closed = slot.proc, self._closed
        assert proc is not None
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(10)
        log.info("killed slot %s (pid %d)", sid, proc.pid)
        if not closed:
            self._spawner.call(lambda: self._respawn(sid), wait=False)
        return proc.pid

    def _respawn(self, sid: str, timeout_s: float = 120.0) -> None:
        """Spawner thread: start the slot again and wait until it is registered (then free)."""
        if self._closed:
            return
        try:
            self._spawn(sid)
            self._wait_ready(sid, time.monotonic() + timeout_s)
        except Exception as exc:  # on the spawner thread: recorded as a dead slot, never lost
            log.error("slot %s did not come back: %s", sid, exc)
            with self._cv:
                self._slots[sid].state = DEAD
                self._cv.notify_all()

    # -- views -------------------------------------------------------------------------------------------------
    def _slot_of(self, vehicle_id: str) -> str | None:
        for sid, s in self._slots.items():
            if s.state == BUSY and s.identity is not None and s.identity.vehicle_id == vehicle_id:
                return sid
        return None

    def slot_of(self, vehicle_id: str) -> str | None:
        """The slot playing `vehicle_id`, None if none does."""
        with self._cv:
            return self._slot_of(vehicle_id)

    def free_slots(self) -> list[str]:
        """Slots registered and playing no vehicle (what `assign` can use right away)."""
        self._reap()
        with self._cv:
            return [sid for sid, s in self._slots.items() if s.state == FREE]

    def pids(self) -> dict[str, int]:
        """Slot -> pid of its live process."""
        self._reap()
        with self._cv:
            return {sid: s.proc.pid for sid, s in self._slots.items() if s.proc is not None and s.proc.poll() is None}

    def close(self) -> None:
        """Stop every slot process (SIGTERM: each says goodbye as whoever it plays; SIGKILL after a grace)."""
        with self._cv:
            self._closed = True
        self._spawner.close()      # after a respawn in progress gave up (it checks `_closed`)
        procs = [s.proc for s in self._slots.values() if s.proc is not None and s.proc.poll() is None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + self.group.grace_s
        for proc in procs:
            try:
                proc.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("slot pid %d ignored SIGTERM; killing it", proc.pid)
                proc.kill()
                proc.wait()
        if self._own_group:
            self.group.stop()
        if self.launcher is not None:
            self.launcher.close()
        self.bus.close()

    def __enter__(self) -> VehiclePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
