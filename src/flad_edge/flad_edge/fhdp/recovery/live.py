"""A live fleet for quick-recovery experiments: a recovering edge in this process, vehicles as OS processes.

Used by `flad chaos`, `flad bench recovery` and the recovery tests. The edge runs in the caller's process
(so callers read its recovery records directly); every vehicle is a real `flad_vehicle.fhdp.worker`
process on loopback ZeroMQ that can be killed, stopped, continued and restarted.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from flad_core.config import to_dict
from flad_core.fleet import FleetConfig, HeartbeatConfig, VehicleSpec, load_fleet, with_port_base
from flad_core.procs import ProcessGroup, free_port_base, python_module_cmd
from flad_core.roles import default_fleet_path
from flad_edge.fhdp.config import FhdpConfig
from flad_edge.fhdp.orchestrator import wait_for_vehicles
from flad_edge.fhdp.recovery.detection import last_registration
from flad_edge.fhdp.recovery.edge import RecoveringFhdpEdge
from flad_edge.fhdp.recovery.records import RecoveryConfig


def small_fleet(ids: list[str], port_base: int, profile: str | Sequence[str] = "jetson_nano",
                heartbeat_interval_s: float = 0.1, heartbeat_timeout_s: float = 1.0) -> FleetConfig:
    """The repository's fleet file with `ids` as its vehicles, renumbered from `port_base`; `profile` is one
    device profile for all of them or one per vehicle."""
    base = load_fleet(default_fleet_path())
    profiles = [profile] * len(ids) if isinstance(profile, str) else list(profile)
    if len(profiles) != len(ids):
        raise ValueError(f"{len(profiles)} device profiles for {len(ids)} vehicles ({ids})")
    vehicles = [VehicleSpec(id=v, profile=p, predicted_dwell_s=900, control=f"tcp://127.0.0.1:{7200 + 2 * i}",
                            data=f"tcp://127.0.0.1:{7201 + 2 * i}")
                for i, (v, p) in enumerate(zip(ids, profiles, strict=True))]
    fleet = dataclasses.replace(base, vehicles=vehicles, heartbeat=HeartbeatConfig(interval_s=heartbeat_interval_s,
                                                                                   timeout_s=heartbeat_timeout_s))
    return with_port_base(fleet, port_base)


class LiveFleet:
    """Edge (in process) + vehicle processes; helpers to hurt vehicles and to act on training progress."""

    def __init__(self, workdir: Path, ids: list[str], cfg: FhdpConfig | None = None,
                 rcfg: RecoveryConfig | None = None, heartbeat_timeout_s: float = 1.0,
                 profiles: str | Sequence[str] = "jetson_nano") -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ids = list(ids)
        self.fleet = small_fleet(ids, free_port_base(4 + 2 * len(ids) + 8), profiles,
                                 heartbeat_interval_s=min(0.1, heartbeat_timeout_s / 4),
                                 heartbeat_timeout_s=heartbeat_timeout_s)
        self.fleet_file = self.workdir / "fleet.yaml"
        self.fleet_file.write_text(yaml.safe_dump(to_dict(self.fleet), sort_keys=False))
        self.cfg = cfg or FhdpConfig(local_steps=6, batch_size=4, n_micro=2, time_scale=0.02, planner="exact",
                                     round_deadline_s=150)
        self.rcfg = rcfg or RecoveryConfig(backup_every=2, link_timeout_s=30.0)
        self.group = ProcessGroup(grace_s=5.0)
        self.edge = RecoveringFhdpEdge(self.fleet, self.cfg, self.rcfg)
        self.stopped: set[str] = set()
        try:
            for v in ids:
                self.start(v)
            wait_for_vehicles(self.edge.edge, ids, timeout_s=180)
        except BaseException:
            self.close()
            raise

    def start(self, vid: str) -> None:
        cmd = python_module_cmd("flad_vehicle.fhdp.worker", "--fleet", str(self.fleet_file), "--id", vid,
                                "--data", "synthetic", "--run-dir", str(self.workdir / "logs"))
        self.group.start(vid, cmd, env={"OMP_NUM_THREADS": "1"})

    def alive(self, vid: str) -> bool:
        proc = self.group.procs.get(vid)
        return proc is not None and proc.poll() is None

    def kill(self, vid: str, sig: int = signal.SIGKILL) -> float:
        """Send `sig` to the vehicle's process; returns when (wall clock)."""
        t = time.time()
        os.kill(self.group.procs[vid].pid, sig)
        if sig == signal.SIGSTOP:
            self.stopped.add(vid)
        elif sig == signal.SIGCONT:
            self.stopped.discard(vid)
        elif sig == signal.SIGKILL:
            self.group.procs[vid].wait(10)
        return t

    def restart(self, vid: str | list[str], timeout_s: float = 180.0) -> None:
        """Start the vehicle(s) again (returning vehicles) and wait until the edge sees them alive.

        Call it from the thread that owns the fleet: children get SIGTERM when the thread that started
        them ends (PR_SET_PDEATHSIG is per thread), so never from a short-lived helper thread."""
        vids = [vid] if isinstance(vid, str) else list(vid)
        for v in vids:
            proc = self.group.procs.get(v)
            if proc is not None and proc.poll() is None:
                if v in self.stopped:
                    os.kill(proc.pid, signal.SIGCONT)
                    self.stopped.discard(v)
                proc.kill()
                proc.wait(10)
        since = time.time()
        for v in vids:
            self.start(v)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            recs = {r.vehicle_id: r for r in self.edge.edge.snapshot()}
            if all(v in recs and recs[v].state == "alive" and last_registration(recs[v]) > since for v in vids):
                return
            time.sleep(0.05)
        raise TimeoutError(f"{vids} did not come back within {timeout_s:.0f} s")

    def progress(self, prefix: str, attempt: int | None = None) -> int:
        """Steps completed so far by pipelines whose id starts with `prefix` (and, given, is attempt `attempt`:
        0 the first run, 1 the first resumption...)."""
        hits = [v[0] for k, v in list(self.edge.progress.steps.items())
                if k.startswith(prefix) and (attempt is None or k.endswith(f"~{attempt}"))]
        return max(hits, default=0)

    def when(self, prefix: str, steps: int, action: Callable[[], object], timeout_s: float = 120.0,
             attempt: int | None = None) -> threading.Thread:
        """Run `action()` (in a thread) once a pipeline with id `prefix…` has completed `steps` steps."""
        result: dict = {}

        def watch() -> None:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if self.progress(prefix, attempt) >= steps:
                    result["value"] = action()
                    return
                time.sleep(0.002)

        t = threading.Thread(target=watch, daemon=True)
        t.result = result  # type: ignore[attr-defined]
        t.start()
        return t

    def close(self) -> None:
        for vid in list(self.stopped):
            if self.alive(vid):
                os.kill(self.group.procs[vid].pid, signal.SIGCONT)
        self.edge.close()
        self.group.stop()
