"""A pooled FHDP worker: one slot of a virtual-vehicle pool, which takes on a vehicle's identity per round.

An experiment has 50-1,000 vehicles, but only a handful train in any round; one idle torch process per
vehicle would not fit a laptop. Like a federated-learning simulation engine (a client app instantiated per
round with one node's partition), a fixed pool of these processes ("slots", `flad_edge.experiment.pool`)
plays whichever vehicles the round needs. A slot is an `FhdpVehicle` -- the very same training code as the
one-process-per-vehicle path -- started under its slot id from a fleet file whose `vehicles` are the slots
(their control and data addresses). It registers with the edge as itself, and only then serves
`vehicle/adopt` (`flad_msgs/VehicleIdentity` -> Ack), so an answer to adopt means the slot is up:

* adopt a vehicle: wait until no job runs, drop everything of the previous identity (queued jobs, batch
  streams, buffered frames, layer ownership: a fresh round fetches every layer from the edge anyway), take
  the vehicle's id, device profile (what the compute/link/memory emulation is built from), town, dwell,
  data root and seed, say goodbye as the previous identity, register with the edge as the vehicle and
  heartbeat as it. The Ack comes once the edge admitted the vehicle.
* release (empty `vehicle_id`): the same, back to the slot's own identity: the edge records the vehicle as
  departed (it said goodbye) and sees the slot again.

The slot's own control and data addresses never change, so the edge reaches "the vehicle" at its slot's.
Nor does its CURVE key: the bus endpoint, the stage inbox and the outbound stage links all use the slot id's
key pair whoever the slot plays, and peers name a stage's key by the slot whose inbox address it has
(`worker.stage_key_names`), so the slot ids' public keys are the ones to allow-list.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from pathlib import Path

from flad_core import codec
from flad_core.bus import BusError
from flad_core.config import ConfigError
from flad_core.fleet import GB, DeviceProfile, FleetConfig, VehicleSpec
from flad_core.procs import install_stop_handlers
from flad_core.protocol import SERVICE_ADOPT
from flad_core.roles import add_role_args, fleet_from_args, setup_role_logging
from flad_vehicle.fhdp.poison import Poison
from flad_vehicle.fhdp.worker import FhdpVehicle, add_device_arg, add_poison_arg, run_until_stopped

log = logging.getLogger("flad_vehicle.fhdp.pool_worker")  # not __name__: this also runs as __main__

#: how long an adoption waits for a job of the previous identity to end once told to stop
SETTLE_TIMEOUT_S = 60.0
#: how long an adoption retries registering the new identity while the edge does not answer
REGISTER_TIMEOUT_S = 10.0


class AdoptionError(RuntimeError):
    """The slot could not take on (or give up) an identity; the Ack carries this text."""


class PooledVehicle(FhdpVehicle):
    """One slot of a vehicle pool: an `FhdpVehicle` that also serves `vehicle/adopt` (module docstring)."""

    def __init__(self, fleet: FleetConfig, slot_id: str, data: str = "synthetic", encoder: str = "tiny",
                 seed: int = 0, threads: int = 1, audit_dir: Path | None = None, poison: Poison | str | None = None,
                 device: str | None = None) -> None:
        # poison: ATTACK EMULATION (poison.py); it stays with the slot, whichever vehicle the slot plays. So does
        # `device` (the slot's hardware; None: the slot's fleet entry's `device`)
        super().__init__(fleet, slot_id, data=data, encoder=encoder, seed=seed, threads=threads,
                         audit_dir=audit_dir, poison=poison, device=device)
        # the slot's own identity: what it is while idle, and where its sockets are whoever it plays
        self.slot = self.spec
        self.slot_profile = self.profile
        self.slot_data = data
        self.slot_seed = seed

    @property
    def vehicle_id(self) -> str | None:
        """The vehicle this slot plays now, None while idle."""
        return None if self.spec is self.slot else self.spec.id

    def run(self) -> int:
        """Register as the slot, then serve adopt, heartbeat (as whoever it plays) and train until stopped."""
        self.agent.register()
        # served only from now on: an answer to adopt tells the pool this slot is registered and ready
        self.bus.serve(SERVICE_ADOPT, "flad_msgs/msg/VehicleIdentity", "flad_msgs/msg/Ack", self._on_adopt,
                       address=self.slot.control)
        hb = threading.Thread(target=self.agent.heartbeat_loop, name="heartbeat", daemon=True)
        hb.start()
        try:
            self.work_loop()
        finally:
            hb.join(timeout=5)
        return 0

    # -- adopt (bus thread) ---------------------------------------------------------------------------------
    def _on_adopt(self, msg):
        """Take on `msg`'s identity (or the slot's own for an empty id); reply once the edge admitted it.

        Runs on the bus thread, which is also the only thread that queues jobs: while it works here no new
        job can arrive, so once the running one (if any) ended, the work thread stays idle."""
        if self.agent.stop.is_set():
            return codec.new("flad_msgs/msg/Ack", ok=False, message=f"{self.slot.id} is stopping")
        try:
            text = self._adopt(msg) if msg.vehicle_id else self._release()
        except AdoptionError as exc:
            log.error("%s: %s", self.slot.id, exc)
            return codec.new("flad_msgs/msg/Ack", ok=False, message=str(exc))
        return codec.new("flad_msgs/msg/Ack", ok=True, message=text)

    def _adopt(self, msg) -> str:
        spec, profile = self._identity(msg)
        previous = self.spec.id
        self._settle()
        try:
            self._become(spec, profile, msg.data_root or self.slot_data, msg.seed)
        except BusError as exc:
            # the edge refused (or did not answer for) the vehicle: idle as the slot rather than as nobody
            try:
                self._become(self.slot, self.slot_profile, self.slot_data, self.slot_seed)
            except BusError as again:
                log.error("%s: could not re-register as itself either: %s", self.slot.id, again)
            raise AdoptionError(f"{self.slot.id} could not register as {spec.id}: {exc}") from exc
        log.info("%s: now plays %s (was %s): profile %s, dwell %.0f s, data %s, seed %d", self.slot.id, spec.id,
                 previous, spec.profile, spec.predicted_dwell_s, self.data, msg.seed)
        return f"{self.slot.id} plays {spec.id}"

    def _release(self) -> str:
        if self.vehicle_id is None:
            return f"{self.slot.id} idle"
        previous = self.spec.id
        self._settle()
        try:
            self._become(self.slot, self.slot_profile, self.slot_data, self.slot_seed)
        except BusError as exc:
            raise AdoptionError(f"{self.slot.id} released {previous} but could not re-register: {exc}") from exc
        log.info("%s: released %s, idle", self.slot.id, previous)
        return f"{self.slot.id} released {previous}"

    def _identity(self, msg) -> tuple[VehicleSpec, DeviceProfile]:
        """The vehicle's spec (at this slot's addresses) and device profile, from a VehicleIdentity."""
        spec = VehicleSpec(id=msg.vehicle_id, profile=msg.profile_name or msg.device.name, town=msg.town,
                           predicted_dwell_s=float(msg.predicted_dwell_s), control=self.slot.control,
                           data=self.slot.data)
        try:
            spec.validate()
            if msg.device.mem_bytes or msg.device.tflops or msg.device.link_mbps:
                profile = DeviceProfile(mem_gb=msg.device.mem_bytes / GB, tflops=msg.device.tflops,
                                        link_mbps=msg.device.link_mbps)
                profile.validate()
            else:
                known = self.fleet.all_profiles()
                if spec.profile not in known:
                    raise AdoptionError(f"{spec.id}: no device figures and unknown profile {spec.profile!r} "
                                        f"(known: {', '.join(sorted(known))})")
                profile = known[spec.profile]
        except ConfigError as exc:
            raise AdoptionError(f"bad identity for {msg.vehicle_id!r}: {exc}") from exc
        if not spec.profile:
            raise AdoptionError(f"{spec.id}: the identity names no profile")
        return spec, profile

    def _settle(self) -> None:
        """Drop queued jobs; stop the running one, if any, and wait until it has ended.

        A job still running at adoption belongs to the identity being dropped; it is told to stop (as an
        edge abort would: this handler holds the bus thread that would deliver one) rather than waited out,
        which could take a full link timeout."""
        with self._jobs_ready:
            dropped = [(k, m.pipeline_id) for k, m in self._jobs]
            self._jobs.clear()
            if dropped:
                log.warning("%s: dropped queued jobs of %s: %s", self.slot.id, self.spec.id, dropped)
            if self._running is not None:
                log.warning("%s: %s still runs %s; stopping it", self.slot.id, self.spec.id, self._running)
                self._aborted.add(self._running)
                self._abort.set()
            deadline = time.monotonic() + SETTLE_TIMEOUT_S
            while self._running is not None:
                if time.monotonic() >= deadline:
                    raise AdoptionError(f"{self.slot.id}: job {self._running} of {self.spec.id} did not end within "
                                        f"{SETTLE_TIMEOUT_S:.0f} s")
                self._jobs_ready.wait(0.05)

    def _become(self, spec: VehicleSpec, profile: DeviceProfile, data: str, seed: int) -> None:
        """Switch every identity-dependent part, say goodbye as the old identity and register as the new one.

        The agent's identity lock is held throughout, so no heartbeat goes out between the goodbye and the
        registration (none as the old id after its goodbye, none as the new one before the edge admits it)."""
        with self.agent.identity_lock:
            self.take_identity(spec, profile, data, seed)
            self.agent.adopt(spec, profile)
            self.agent.register(deadline_s=REGISTER_TIMEOUT_S)


STOP_GRACE_S = 5.0


def _exit_when_orphaned(parent: int) -> None:
    """A slot belongs to its pool's process: once that is gone (re-parented), there is no one to train for or
    say goodbye to, so the slot exits at once -- also while it is still starting up."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            log.warning("the pool's process %d is gone: exiting", parent)
            logging.shutdown()
            os._exit(0)


def _exit_after_stop(stop: threading.Event, grace_s: float) -> None:
    stop.wait()
    time.sleep(grace_s)
    log.warning("still shutting down %.0f s after the stop request: exiting now", grace_s)
    logging.shutdown()
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="flad-fhdp-pool-worker",
        description="Run one slot of a virtual-vehicle pool: an FHDP vehicle process that registers as the slot, "
                    "then takes on whichever vehicle's identity (id, device profile, data shard, dwell) the edge "
                    "sends on vehicle/adopt, for as long as the edge wants (flad_edge.experiment.pool starts these).")
    parser.add_argument("--slot", required=True,
                        help="slot id: a vehicle entry of the fleet file (its control and data addresses)")
    parser.add_argument("--data", default="synthetic",
                        help="fleet dataset root or 'synthetic', used when an identity names no data root")
    parser.add_argument("--encoder", default="tiny", help="encoder config (tiny or paper); must match the edge's")
    parser.add_argument("--seed", type=int, default=0, help="seed while idle (an identity brings its own)")
    add_device_arg(parser)
    add_poison_arg(parser)
    add_role_args(parser)
    args = parser.parse_args(argv)
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), name="orphan-watch", daemon=True).start()
    setup_role_logging(args, args.slot)
    fleet = fleet_from_args(args)
    worker = PooledVehicle(fleet, args.slot, data=args.data, encoder=args.encoder, seed=args.seed,
                           audit_dir=args.run_dir, poison=args.poison, device=args.device)
    install_stop_handlers(worker.agent.stop)
    # a slot is disposable: once told to stop (its pool, or the kernel when the experiment process died), it
    # gets a short grace to say goodbye and is then gone, even if a peer or the edge it waits on is dead
    threading.Thread(target=_exit_after_stop, args=(worker.agent.stop, STOP_GRACE_S), name="stop-deadline",
                     daemon=True).start()
    return run_until_stopped(worker)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["AdoptionError", "PooledVehicle", "main"]
