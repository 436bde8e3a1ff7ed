"""`flad chaos` across every tier: vehicles, the edge and the cloud crash while a fixed fleet trains.

The fleet is the fixed-fleet topology of `flad demo --fixed-fleet` (launch/fleet.yaml: two AGX vehicles that
train alone, two clusters of a Nano and an NX) plus one more AGX vehicle that is poisoned (`--poison`, default
`scale:100`: the weights the edge gathers from it are scaled). The cloud, the edge (`flad_edge.fhdp.run --cloud
--recovery`) and every vehicle are separate OS processes on loopback; a `Supervisor` starts the edge or the
cloud again when it dies. While the edge trains, one seeded event fires every --interval seconds:

  kill     SIGKILL a vehicle; it is started again after --outage s and registers again by itself
  stop     SIGSTOP a vehicle for --outage s (a frozen vehicle: its heartbeats stop), then SIGCONT
  cutoff   SIGSTOP for twice the heartbeat timeout, then SIGCONT (a short outage: it comes back by itself)
  edge     SIGKILL the edge process (--edge-kills times, spread over the run); restarted at once, it resumes
           after its last checkpointed round and the vehicles register again
  cloud    SIGKILL the cloud process, once; restarted, it reloads the rounds it aggregated

The vehicle events take turns (kill, stop, cutoff) on a vehicle drawn at random, at most --max-down down at
once; the poisoned vehicle counts as one event for the whole run. Then the same fleet, seed and data train once
more with no events and no poisoned vehicle: the reference. The verdict reads the run's own records -- the
edge's checkpoint ledger, the cloud's counted uploads, the round summaries -- and checks: no update counted
twice, no poisoned update accepted, no round missing from the ledger (an interrupted round is redone, not
lost), and the final global model's loss on held-out frames within --loss-tolerance of the reference's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from flad_core.config import load_yaml, to_dict
from flad_core.fleet import FleetConfig, HeartbeatConfig, VehicleSpec, load_fleet, with_port_base
from flad_core.procs import ProcessGroup, Supervisor, describe_exit, free_port_base, python_module_cmd
from flad_core.roles import default_fleet_path
from flad_edge.fhdp.config import FhdpConfig

log = logging.getLogger(__name__)

VEHICLE_EVENTS = ("kill", "stop", "cutoff")
POISONED_ID = "v006"
POLL_S = 0.1
#: the fixed fleet's FHDP config (as `flad demo --fixed-fleet` uses it)
DEFAULT_FHDP_CONFIG = Path(__file__).resolve().parents[5] / "launch" / "fhdp.yaml"


def chaos_fleet(port_base: int, poisoned: bool, heartbeat_timeout_s: float) -> FleetConfig:
    """launch/fleet.yaml's six vehicles (+ the poisoned AGX), renumbered from `port_base`."""
    base = load_fleet(default_fleet_path())
    vehicles = list(base.vehicles)
    if poisoned:
        vehicles.append(VehicleSpec(id=POISONED_ID, profile="jetson_agx", town="Town07", predicted_dwell_s=900,
                                    control="tcp://127.0.0.1:7212", data="tcp://127.0.0.1:7213"))
    fleet = dataclasses.replace(base, vehicles=vehicles, heartbeat=HeartbeatConfig(
        interval_s=min(0.25, heartbeat_timeout_s / 4), timeout_s=heartbeat_timeout_s))
    return with_port_base(fleet, port_base)


def prepare_data(workdir: Path, vehicles: int, frames: int, seed: int) -> tuple[Path, Path]:
    """Training frames (one shard per vehicle, v000...) and held-out frames from other seeds, collected once."""
    from flad_sim.dataset import CollectConfig, collect, is_fleet_dataset

    train, heldout = workdir / "data", workdir / "heldout"
    if not is_fleet_dataset(train):
        collect(CollectConfig(out=str(train), vehicles=vehicles, frames_per_vehicle=frames, seed=seed, workers=2),
                progress=False)
    if not is_fleet_dataset(heldout):
        collect(CollectConfig(out=str(heldout), vehicles=2, frames_per_vehicle=max(32, frames), seed=seed + 1000,
                              workers=2), progress=False)
    return train, heldout


def heldout_loss(model_file: Path, heldout: Path, encoder: str) -> dict[str, float]:
    """Open-loop metrics (loss included) of a saved global encoder on the held-out frames."""
    from flad_core import weights as wts
    from flad_sim.dataset import FleetDataset, iter_batches
    from flad_vehicle.encoder.config import get_config
    from flad_vehicle.encoder.model import VisionEncoder
    from flad_vehicle.encoder.train import evaluate

    model = VisionEncoder(get_config(encoder))
    model.load_state_dict(wts.from_bytes(model_file.read_bytes(), what=str(model_file)))
    shards = list(FleetDataset.open(heldout).shards.values())
    return evaluate(model, iter_batches(shards, 16, shuffle=False))


@dataclasses.dataclass
class Down:
    """A vehicle hurt by an event, and when it comes back."""

    vehicle: str
    kind: str
    until: float


class FleetRun:
    """One run of the fixed fleet (cloud + edge + vehicles as processes), with or without chaos."""

    def __init__(self, workdir: Path, fleet: FleetConfig, cfg: FhdpConfig, data: Path, poison: str | None,
                 max_restarts: int) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.fleet = fleet
        self.fleet_file = workdir / "fleet.yaml"
        self.fleet_file.write_text(yaml.safe_dump(to_dict(fleet), sort_keys=False))
        self.cfg_file = workdir / "fhdp.yaml"
        self.cfg_file.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        self.data = data
        self.poison = poison
        self.group = ProcessGroup(grace_s=5.0)
        self.sup = Supervisor(self.group, services=["cloud"], jobs=["edge"], max_restarts=max_restarts)
        self.down: dict[str, Down] = {}
        self.events: list[dict[str, Any]] = []
        self.t0 = time.monotonic()

    def common(self) -> list[str]:
        return ["--fleet", str(self.fleet_file), "--run-dir", str(self.workdir)]

    def start_vehicle(self, vid: str) -> None:
        extra = ["--poison", self.poison] if vid == POISONED_ID and self.poison else []
        self.group.start(vid, python_module_cmd("flad_vehicle.fhdp.worker", *self.common(), "--id", vid,
                                                "--data", str(self.data), *extra),
                         log_path=self.workdir / f"{vid}.stderr", env={"OMP_NUM_THREADS": "1"})

    def start(self) -> None:
        env = {"OMP_NUM_THREADS": "1"}
        self.group.start("cloud", python_module_cmd("flad_edge.fl.cloud", *self.common()),
                         log_path=self.workdir / "cloud.stderr", env=env)
        self.group.start("edge", python_module_cmd("flad_edge.fhdp.run", *self.common(), "--config",
                                                   str(self.cfg_file), "--cloud", "--recovery"),
                         log_path=self.workdir / "edge.stderr", env=env)
        for v in self.fleet.vehicles:
            self.start_vehicle(v.id)

    def pid(self, name: str) -> int:
        return self.group.procs[name].pid

    def alive(self, name: str) -> bool:
        proc = self.group.procs.get(name)
        return proc is not None and proc.poll() is None

    # -- events -----------------------------------------------------------------------------------------
    def hurt_vehicle(self, kind: str, vid: str, outage_s: float) -> dict[str, Any]:
        now = time.monotonic()
        if kind == "kill":
            self.group.procs[vid].kill()
            self.group.procs[vid].wait(10)
        else:
            os.kill(self.pid(vid), signal.SIGSTOP)
        self.down[vid] = Down(vid, kind, now + outage_s)
        return {"vehicle": vid, "outage_s": round(outage_s, 2)}

    def kill_role(self, name: str) -> dict[str, Any]:
        """SIGKILL the edge or the cloud; the supervisor restarts it at its next check."""
        pid = self.pid(name)
        os.kill(pid, signal.SIGKILL)
        self.group.procs[name].wait(10)
        return {"pid": pid}

    def bring_back(self, force: bool = False) -> None:
        """Vehicles whose outage is over come back: killed ones start again, stopped ones continue."""
        now = time.monotonic()
        for vid, d in list(self.down.items()):
            if not force and now < d.until:
                continue
            if d.kind == "kill":
                self.start_vehicle(vid)
            elif self.alive(vid):
                os.kill(self.pid(vid), signal.SIGCONT)
            log.info("%s is back after its %s (pid %d)", vid, d.kind, self.pid(vid))
            del self.down[vid]

    def record(self, kind: str, **detail: Any) -> None:
        self.events.append({"n": len(self.events), "kind": kind, "t_s": round(time.monotonic() - self.t0, 2),
                            **detail})

    def close(self) -> dict[str, int]:
        self.bring_back(force=True)
        return self.group.stop()


def edge_kill_slots(n_events: int, edge_kills: int, rng: random.Random) -> set[int]:
    """Event indices of the edge kills, one in each of `edge_kills` equal spans (never the first two events)."""
    if edge_kills <= 0:
        return set()
    span = max(1, (n_events - 2) // edge_kills)
    return {2 + i * span + rng.randrange(span) for i in range(edge_kills)}


def next_event(run: FleetRun, n: int, plan: dict[str, Any], rng: random.Random, args: argparse.Namespace) -> None:
    """Fire event number `n` of the plan."""
    if n in plan["edge"] and run.alive("edge"):
        run.record("edge", **run.kill_role("edge"))
        return
    if n == plan["cloud"] and run.alive("cloud"):
        run.record("cloud", **run.kill_role("cloud"))
        return
    healthy = [v.id for v in run.fleet.vehicles if v.id != POISONED_ID and v.id not in run.down and run.alive(v.id)]
    if not healthy or len(run.down) >= args.max_down:
        run.record("skipped", reason=f"{len(run.down)} vehicle(s) already down")
        return
    kind = VEHICLE_EVENTS[sum(e["kind"] in VEHICLE_EVENTS for e in run.events) % len(VEHICLE_EVENTS)]
    outage = 2 * run.fleet.heartbeat.timeout_s if kind == "cutoff" else args.outage
    run.record(kind, **run.hurt_vehicle(kind, rng.choice(healthy), outage))


def drive(run: FleetRun, args: argparse.Namespace, chaos: bool, rng: random.Random) -> int | None:
    """Start the fleet and, with `chaos`, fire events until the edge has finished; the edge's final exit code."""
    plan = {"edge": edge_kill_slots(args.target_events, args.edge_kills, rng) if chaos else set(),
            "cloud": args.target_events // 2 if chaos and args.cloud_kill else -1}
    run.start()
    deadline = time.monotonic() + args.timeout
    next_at = time.monotonic() + args.first_event_s
    n = 0
    while time.monotonic() < deadline:
        ended = run.sup.check()
        if "edge" in ended:
            return ended["edge"]
        if "cloud" in ended:
            log.error("the cloud is down for good (%s)", describe_exit(ended["cloud"]))
            return 1
        run.bring_back()
        if chaos and time.monotonic() >= next_at:
            next_event(run, n, plan, rng, args)
            n += 1
            next_at = time.monotonic() + args.interval
        time.sleep(POLL_S)
    log.error("the edge did not finish within %.0f s", args.timeout)
    return None


def read_records(run_dir: Path, edge_id: str) -> dict[str, Any]:
    """The edge's committed ledger and round summaries, and what the cloud counted, from their own files."""
    from flad_edge.fhdp.checkpoint import EdgeCheckpoint

    state = EdgeCheckpoint(run_dir, edge_id).load()
    rounds_file = run_dir / "cloud_state" / "rounds.json"
    cloud_rounds = json.loads(rounds_file.read_text())["rounds"] if rounds_file.exists() else {}
    counted = [{"round": int(r), **c} for r, entry in cloud_rounds.items() for c in entry.get("counted", [])]
    return {"ledger": list(state.ledger) if state else [], "summaries": list(state.summaries) if state else [],
            "resumes": state.resumes if state else 0, "last_round": state.round if state else -1,
            "cloud_counted": counted}


def audit(records: dict[str, Any], rounds: int, poisoned: str | None) -> dict[str, Any]:
    """Counted twice, poisoned accepted, rounds lost: from the records alone."""
    ledger = records["ledger"]
    pairs = Counter((e["round"], e["client"]) for e in ledger)
    ids = Counter(e["update_id"] for e in ledger)
    cloud = Counter((c["edge"], c["round"]) for c in records["cloud_counted"])
    twice = ([f"round {r} client {c} x{k}" for (r, c), k in pairs.items() if k > 1]
             + [f"update {u} x{k}" for u, k in ids.items() if k > 1]
             + [f"cloud: edge {e} round {r} x{k}" for (e, r), k in cloud.items() if k > 1])
    poisoned_accepted = [e for e in ledger if poisoned and poisoned in e["client"].split("+")]
    rejected = [{"round": s["round"], "client": client, "reason": reason} for s in records["summaries"]
                for client, reason in (s.get("rejected") or {}).items()]
    committed = sorted({e["round"] for e in ledger})
    lost = [r for r in range(rounds) if r not in committed]
    return {"updates_counted_twice": len(twice), "counted_twice": twice,
            "poisoned_updates_accepted": len(poisoned_accepted),
            "poisoned_updates_rejected": sum(1 for r in rejected if poisoned and poisoned in r["client"].split("+")),
            "rejected": rejected, "rounds_committed": len(committed), "rounds_lost": lost,
            "samples_committed": sum(int(e["samples"]) for e in ledger),
            "cloud_rounds_counted": len(cloud)}


def one_run(name: str, args: argparse.Namespace, cfg: FhdpConfig, data: Path, chaos: bool) -> dict[str, Any]:
    """A fleet run in `<workdir>/<name>`: its events, restarts, records and audit."""
    workdir = Path(args.workdir) / name
    fleet = chaos_fleet(free_port_base(40), poisoned=chaos and bool(args.poison),
                        heartbeat_timeout_s=args.heartbeat_timeout)
    run = FleetRun(workdir, fleet, cfg, data, args.poison if chaos else None,
                   max_restarts=args.edge_kills + 2 if chaos else 0)
    rng = random.Random(args.seed)
    t0 = time.monotonic()
    try:
        code = drive(run, args, chaos, rng)
    finally:
        codes = run.close()
    records = read_records(workdir, fleet.edge.id)
    out = {"exit": code, "exit_codes": codes, "seconds": round(time.monotonic() - t0, 1), "events": run.events,
           "restarts": dict(run.sup.restarts), "crashes": run.sup.events, "edge_resumes": records["resumes"],
           "audit": audit(records, cfg.rounds, POISONED_ID if chaos and args.poison else None),
           "train_loss": [s.get("train_loss") for s in records["summaries"]]}
    model = workdir / "global_encoder.safetensors"
    out["heldout"] = heldout_loss(model, Path(args.workdir) / "heldout", cfg.encoder) if model.exists() else None
    return out


def verdict(chaos: dict[str, Any], reference: dict[str, Any] | None, args: argparse.Namespace) -> dict[str, Any]:
    """The goals of a fleet chaos run, each with its measurement."""
    a = chaos["audit"]
    kinds = Counter(e["kind"] for e in chaos["events"] if e["kind"] != "skipped")
    n_events = sum(kinds.values()) + (1 if args.poison else 0)
    loss = (chaos.get("heldout") or {}).get("loss")
    ref = ((reference or {}).get("heldout") or {}).get("loss")
    ratio = loss / ref if loss is not None and ref else None
    goals = {
        "events_at_least_50": {"value": n_events, "met": n_events >= 50},
        "updates_counted_twice_zero": {"value": a["updates_counted_twice"], "met": a["updates_counted_twice"] == 0},
        "poisoned_accepted_zero": {"value": a["poisoned_updates_accepted"], "met": a["poisoned_updates_accepted"] == 0},
        "rounds_lost_zero": {"value": a["rounds_lost"], "met": not a["rounds_lost"]},
        "final_loss_within_tolerance": {"value": None if ratio is None else round(ratio, 4),
                                        "tolerance": args.loss_tolerance,
                                        "met": ratio is not None and ratio <= 1 + args.loss_tolerance},
        "run_completed": {"value": describe_exit(chaos["exit"]), "met": chaos["exit"] == 0},
    }
    return {"events_by_kind": dict(kinds, poisoned_vehicle=1 if args.poison else 0), "events_total": n_events,
            "goals": goals, "ok": all(g["met"] for g in goals.values())}


def run_fleet_chaos(args: argparse.Namespace) -> dict[str, Any]:
    """The chaos run and the event-free reference (see the module docstring); one JSON-able result."""
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = load_yaml(FhdpConfig, DEFAULT_FHDP_CONFIG)
    # the round deadline is what keeps a client stuck behind a hurt member from holding a round (quorum 1)
    cfg = dataclasses.replace(cfg, rounds=args.rounds, local_steps=args.steps, seed=args.seed,
                              round_deadline_s=args.round_deadline)
    cfg.validate()
    t0 = time.monotonic()
    data, _ = prepare_data(workdir, vehicles=7, frames=args.frames, seed=args.seed)
    chaos = one_run("chaos", args, cfg, data, chaos=True)
    reference = one_run("reference", args, cfg, data, chaos=False) if args.reference else None
    return {"scope": "fleet", **verdict(chaos, reference, args), "seconds": round(time.monotonic() - t0, 1),
            "conditions": {"fleet": "launch/fleet.yaml (2 AGX alone, clusters [v002, v003], [v004, v005])"
                                    + (f" + {POISONED_ID} (AGX, --poison {args.poison})" if args.poison else ""),
                           "rounds": args.rounds, "steps_per_pipeline": args.steps, "seed": args.seed,
                           "interval_s": args.interval,
                           "round_deadline_s": args.round_deadline, "outage_s": args.outage,
                           "edge_kills": args.edge_kills,
                           "cloud_kill": args.cloud_kill, "heartbeat_timeout_s": args.heartbeat_timeout,
                           "edge_aggregation": to_dict(cfg.aggregation), "frames_per_vehicle": args.frames,
                           "cpus": os.cpu_count(), "loadavg_start": list(os.getloadavg()),
                           "device_figures": f"emulated (time_scale {cfg.time_scale})",
                           "cutoff": "emulated by SIGSTOP/SIGCONT (no network namespace)"},
            "chaos": chaos, "reference": reference}
