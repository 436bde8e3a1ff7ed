"""`flad run EXPERIMENT.yaml`: the whole FLAD loop over simulated time, as one command.

Per round: the fleet's positions -> at each edge, SWIFT (dwell prediction, Eqs. 1-2, mobility clustering,
client sampling, pipelines with preventive templates) -> the world simulated through the round (who leaves,
who crashes) -> FHDP training on pooled vehicle processes, departures handed over or recovered -> FedAvg at
the edge -> FedAvg at the cloud -> held-out evaluation -> an atomic checkpoint. After the rounds: CELLAdapt
on the final global encoder and a closed-loop evaluation of the driver on held-out towns, then the report.

Everything a run does is under `runs/<id>/` (config, metrics.jsonl, events.jsonl, fleet snapshots, logs,
TensorBoard events, checkpoint.pt, report.md + plots); `flad run --resume runs/<id>` continues after a crash
of any of its processes from the last completed round, and every accepted update is counted exactly once
(the checkpoint's ledger holds the updates of the committed rounds only; a round cut short is redone whole).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from rich.console import Console

from flad_core.atomic import atomic_write_bytes, atomic_write_json
from flad_core.bus import BusError
from flad_core.config import ConfigError, from_dict, to_dict
from flad_core.fleet import VehicleSpec
from flad_core.runs import RunDir, seed_everything
from flad_core.weights import to_bytes
from flad_edge.experiment.config import EdgeSpec, ExperimentConfig
from flad_edge.experiment.engine import EdgeHandle, EdgeLostError, LocalEngine
from flad_edge.experiment.planning import (
    EdgeRoundPlan,
    edge_of,
    place_edges,
    plan_edge_round,
    sample_clients,
    tracks_from_arrays,
)
from flad_edge.experiment.rounds import Departure, EdgeRoundResult, identity_for
from flad_edge.swift.model import Profile, load_profile

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
TRACE_EVERY_S = 2.0


def device_assignment(ids: list[str], mix: dict[str, float], seed: int) -> dict[str, str]:
    """Each vehicle's device, in the mix's shares (largest remainder), shuffled deterministically."""
    names = sorted(mix)
    total = sum(mix.values())
    quota = [len(ids) * mix[n] / total for n in names]
    counts = [int(q) for q in quota]
    for i in sorted(range(len(names)), key=lambda i: -(quota[i] - counts[i])):
        if sum(counts) >= len(ids):
            break
        counts[i] += 1
    pool = [n for n, c in zip(names, counts, strict=True) for _ in range(c)]
    order = np.random.default_rng([seed, 17]).permutation(len(ids))
    return {ids[int(k)]: pool[i] for i, k in enumerate(order)}


def plan_profile(encoder: str) -> Profile:
    """The SWIFT profile (per-layer FLOPs and memory) of the encoder whose size Eqs. 1, 2 and 6 use.

    Profiling builds the encoder and counts its FLOPs (seconds for the paper-size one, and its weights in
    memory), so the result is cached under ~/.cache/flad (FLAD_CACHE), keyed by the encoder's config."""
    import hashlib
    import os

    from flad_vehicle.encoder.config import get_config

    config = get_config(encoder)
    key = hashlib.sha1(f"{encoder}|{config!r}|{torch.__version__}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("FLAD_CACHE", Path.home() / ".cache" / "flad")) / f"swift_profile_{key}.json"
    if cache.exists():
        try:
            return load_profile(json.loads(cache.read_text()))
        except (ValueError, ConfigError):
            log.warning("ignoring a broken profile cache %s", cache)
    from flad_vehicle.encoder.model import VisionEncoder, batch_to_torch
    from flad_vehicle.encoder.profile import profile_model
    from flad_vehicle.encoder.synthetic import synthetic_batches

    batch = batch_to_torch(next(synthetic_batches(1, 2, seed=0)))
    raw = profile_model(VisionEncoder(config), batch, measure=False)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache, raw)
    except OSError as exc:
        log.warning("could not cache the profile at %s: %s", cache, exc)
    return load_profile(raw)


def make_engine(cfg: ExperimentConfig, run_path: Path) -> Any:
    """The engine `cfg.engine.name` names (`flad_edge.experiment.engine`); Ray is imported only for `ray`."""
    if cfg.engine.name == "ray":
        from flad_edge.experiment.ray_engine import RayEngine

        return RayEngine(cfg, run_path)
    return LocalEngine(cfg, run_path)


class Experiment:
    """One `flad run`: setup (data, fleet, sites), the rounds, the driver stage, the report."""

    def __init__(self, cfg: ExperimentConfig, run: RunDir, console: Console | None = None) -> None:
        self.cfg, self.run = cfg, run
        self.console = console or Console()
        self.engine = make_engine(cfg, run.path)     # where the edges, the cloud and the pool slots run
        self.sites: list[EdgeHandle] = []
        self.ledger: list[dict[str, Any]] = []
        self.next_round = 0
        self.global_state: dict[str, torch.Tensor] | None = None
        self.rng = np.random.default_rng([cfg.seed, 3])
        self.attempt = uuid.uuid4().hex[:6]      # tells apart the updates of a round redone after a crash
        self.telemetry: Any = None
        self.vehicle_towns: dict[str, str] = {}
        self.devices: dict[str, str] = {}
        self.edges: list[EdgeSpec] = []
        self.trained_at: dict[str, set[str]] = {}

    # -- setup --------------------------------------------------------------------------------------------
    def prepare_data(self) -> tuple[str, str]:
        """The fleet's shards (collected into the run unless `fleet.data` names a dataset) and held-out frames."""
        from flad_sim.dataset import CollectConfig, collect, is_fleet_dataset

        f = self.cfg.fleet
        data = Path(f.data) if f.data else self.run.path / "data"
        if f.data and not is_fleet_dataset(data):
            raise ConfigError("fleet.data", f"no fleet dataset at {data} (make one with `flad sim collect`)")
        if not is_fleet_dataset(data):
            self.console.print(f"collecting {f.frames_per_vehicle} frames for each of {f.vehicles} vehicles "
                               f"(one town each: {', '.join(f.towns)}) into {data}")
            collect(CollectConfig(out=str(data), vehicles=f.vehicles, frames_per_vehicle=f.frames_per_vehicle,
                                  towns=list(f.towns), dirichlet_alpha=f.dirichlet_alpha, seed=self.cfg.seed,
                                  workers=2))
        heldout = self.run.path / "heldout"
        if self.cfg.rounds.eval_frames and not is_fleet_dataset(heldout):
            towns = list(self.cfg.driver.eval_towns)
            # several drivers, a frame a second: the held-out set spans junctions, lights and turns (64 frames of
            # one route a quarter second apart can all show the same light state)
            drivers = max(8, len(towns))
            per = max(1, math.ceil(self.cfg.rounds.eval_frames / drivers))
            collect(CollectConfig(out=str(heldout), vehicles=drivers, frames_per_vehicle=per, towns=towns,
                                  seed=self.cfg.seed + 1000, workers=2, record_every=20))
        manifest = json.loads((data / "manifest.json").read_text())
        vehicles = manifest["vehicles"]
        if len(vehicles) < f.vehicles:
            raise ConfigError("fleet.vehicles", f"{f.vehicles} vehicles but the dataset at {data} has {len(vehicles)}")
        ids = sorted(vehicles)[:f.vehicles]
        self.vehicle_towns = {v: max(vehicles[v]["town_counts"], key=vehicles[v]["town_counts"].get) for v in ids}
        self.devices = device_assignment(ids, f.device_mix, self.cfg.seed)
        return str(data), str(heldout)

    def setup(self) -> None:
        from flad_sim.fleet_motion import FleetMotion

        seed_everything(self.cfg.seed)
        self.data_root, self.heldout_root = self.prepare_data()
        self.motion = FleetMotion(self.vehicle_towns, seed=self.cfg.seed, dt=self.cfg.fleet.dt_s,
                                  background_per_town=self.cfg.fleet.background_per_town, trace_every_s=TRACE_EVERY_S)
        self.edges = list(self.cfg.edges.placement) or place_edges(self.motion.tiles, self.cfg.edges.n,
                                                                   self.cfg.edges.coverage)
        self.plan_prof = plan_profile(self.cfg.swift.plan_encoder)
        self.profiles = {v: self.cfg.fleet.devices[d] for v, d in self.devices.items()}
        specs = [VehicleSpec(id=v, profile=self.devices[v], town=self.vehicle_towns[v]) for v in sorted(self.devices)]
        self.sites = self.engine.start(self.edges, specs, self.data_root)
        self.trained_at = {e.id: set() for e in self.edges}

    def restore(self, ckpt: dict[str, Any], why: str = "resume") -> None:
        """Back to the state after round `ckpt["round"]` (-1: after the warm-up, before round 0)."""
        self.next_round = int(ckpt["round"]) + 1
        self.ledger = list(ckpt["ledger"])
        self.global_state = ckpt["global_state"]
        self.motion.load_state_dict(ckpt["motion"])
        self.rng.bit_generator.state = ckpt["rng"]
        torch.set_rng_state(ckpt["torch_rng"])
        self.trained_at = {k: set(v) for k, v in ckpt.get("trained_at", {}).items()} or self.trained_at
        for site in self.sites:
            site.load_state(self.global_state)
            site.forget_round(self.next_round)     # a redone round's departures time on its own steps only
        self.event({"kind": why, "round": self.next_round, "sim_time_s": self.motion.time_s,
                    "detail": f"{why} after round {ckpt['round']}; {len(self.ledger)} committed updates"})

    # -- records ------------------------------------------------------------------------------------------
    def event(self, record: dict[str, Any]) -> None:
        with open(self.run.path / "events.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True, default=str) + "\n")

    def checkpoint(self, rnd: int) -> None:
        """Everything the next round needs, in one file replaced atomically."""
        buf = io.BytesIO()
        torch.save({"round": rnd, "global_state": self.global_state, "ledger": self.ledger,
                    "motion": self.motion.state_dict(), "rng": self.rng.bit_generator.state,
                    "torch_rng": torch.get_rng_state(), "sim_time_s": self.motion.time_s,
                    "trained_at": {k: sorted(v) for k, v in self.trained_at.items()}}, buf)
        atomic_write_bytes(self.run.path / CHECKPOINT, buf.getvalue())

    def snapshot(self, rnd: int, positions: dict[str, tuple[float, float]], serving: dict[str, str | None],
                 plans: list[EdgeRoundPlan]) -> None:
        role: dict[str, tuple[str, str | None]] = {}
        for p in plans:
            for v in p.in_coverage:
                role[v] = ("ineligible" if v in p.availability.ineligible else "idle", None)
            for c in p.clients:
                for m in c.members:
                    role[m] = (c.kind, c.id)
        vehicles = [{"id": v, "x": round(x, 1), "y": round(y, 1), "town": self.vehicle_towns[v],
                     "edge": serving.get(v), "client": role.get(v, ("outside", None))[1],
                     "role": role.get(v, ("outside", None))[0]} for v, (x, y) in sorted(positions.items())]
        out = self.run.path / "fleet" / f"round_{rnd:03d}.json"
        out.parent.mkdir(exist_ok=True)
        atomic_write_json(out, {"round": rnd, "sim_time_s": round(self.motion.time_s, 1),
                                "tiles": [dataclasses.asdict(t) for t in self.motion.tiles],
                                "edges": [dataclasses.asdict(e) for e in self.edges], "vehicles": vehicles})

    # -- one round ----------------------------------------------------------------------------------------
    def plan_round(self, rnd: int) -> tuple[list[EdgeRoundPlan], dict[str, Any], dict[str, str | None]]:
        sw = self.cfg.swift
        positions = self.motion.positions()
        serving = edge_of(positions, self.edges)
        tracks = tracks_from_arrays(*self.motion.trace_arrays())
        plans = []
        for e in self.edges:
            present = sorted(v for v, s in serving.items() if s == e.id)
            plans.append(plan_edge_round(
                e, tracks, present, self.profiles, self.plan_prof,
                samples_per_epoch=self.cfg.fleet.frames_per_vehicle, epochs=self.cfg.train.local_epochs,
                alpha=sw.alpha, alpha_p=sw.alpha_p, v2v_radius_m=sw.v2v_radius_m, cell_m=sw.cell_m, step_s=sw.step_s,
                patterns=sw.patterns, cluster_cap=sw.cluster_cap, horizon_s=self.cfg.rounds.round_s,
                seed=self.cfg.seed + rnd))
        sample_clients(plans, self.cfg.rounds.clients_per_round, self.cfg.pool.slots_per_edge, self.rng)
        return plans, positions, serving

    def simulate_round(self, rnd: int, plans: list[EdgeRoundPlan]) -> dict[str, list[Departure]]:
        """Drive the fleet through the round; who of each edge's training vehicles leaves or crashes, and when."""
        t0, span = self.motion.time_s, self.cfg.rounds.round_s
        self.motion.advance(t0 + span)
        tracks = tracks_from_arrays(*self.motion.trace_arrays(since_s=t0))
        by_edge = {e.id: e for e in self.edges}
        out: dict[str, list[Departure]] = {}
        for p in plans:
            e = by_edge[p.edge]
            deps = []
            for c in p.clients:
                for v in c.members:
                    arr = tracks.get(v)
                    crash_f = float(self.rng.random())
                    crashed = self.rng.random() < self.cfg.failures.p_crash
                    outside = np.flatnonzero((arr[:, 1] - e.x) ** 2 + (arr[:, 2] - e.y) ** 2 > e.radius_m ** 2) \
                        if arr is not None else np.array([], dtype=int)
                    if len(outside):
                        t_leave = float(arr[outside[0], 0])
                        f = (t_leave - t0) / span
                        if not crashed or f < crash_f:
                            deps.append(Departure(v, f, t_leave, p.dwell.get(v, math.inf) < span, "leave"))
                            continue
                    if crashed:
                        deps.append(Departure(v, crash_f, t0 + crash_f * span, False, "crash"))
            out[p.edge] = deps
        self.coverage_events(rnd, t0)
        return out

    def coverage_events(self, rnd: int, t0: float) -> None:
        """Every crossing of a coverage disc's edge during the round, at the trace sample where it happened."""
        ids, ts, xy = self.motion.trace_arrays(since_s=t0)
        if not len(ts):
            return
        for e in self.edges:
            inside = ((xy[..., 0] - e.x) ** 2 + (xy[..., 1] - e.y) ** 2) <= e.radius_m ** 2      # (T, V)
            prev = np.vstack([inside[:1], inside[:-1]])       # the first sample is the round's start
            for t_i, k in zip(*np.nonzero(inside != prev), strict=True):
                self.event({"round": rnd, "sim_time_s": round(float(ts[t_i]), 1),
                            "kind": "enter" if inside[t_i, k] else "leave", "vehicle": ids[k], "edge": e.id})

    def train_round(self, rnd: int, plans: list[EdgeRoundPlan], departures: dict[str, list[Departure]]
                    ) -> list[EdgeRoundResult]:
        identities = {v: identity_for(v, self.devices[v], self.vehicle_towns[v], self.cfg.seed)
                      for p in plans for c in p.clients for v in c.members}
        results: dict[str, EdgeRoundResult] = {}

        lost: list[EdgeLostError] = []

        def work(site: EdgeHandle, plan: EdgeRoundPlan) -> None:
            try:
                results[site.id] = site.train_round(rnd, plan.clients, identities, departures[site.id],
                                                    self.cfg.local_steps, self.attempt)
            except EdgeLostError as exc:
                lost.append(exc)
            except Exception as exc:
                log.exception("%s round %d failed", site.id, rnd)
                results[site.id] = EdgeRoundResult(site.id, error=f"{type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=work, args=(s, p), name=f"round-{s.id}", daemon=True)
                   for s, p in zip(self.sites, plans, strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if lost:            # the cloud would wait for that edge's upload: redo the round without it at once
            raise lost[0]
        return [results[s.id] for s in self.sites]

    def run_round(self, rnd: int) -> dict[str, Any]:
        t_round = time.perf_counter()
        t_sim = self.motion.time_s
        plans, positions, serving = self.plan_round(rnd)
        planning_s = time.perf_counter() - t_round
        self.snapshot(rnd, positions, serving, plans)
        t = time.perf_counter()
        departures = self.simulate_round(rnd, plans)
        motion_s = time.perf_counter() - t
        results = self.train_round(rnd, plans, departures)
        t = time.perf_counter()
        state = self.sites[0].download(rnd)
        if state is not None:
            self.global_state = {k: v.detach().clone() for k, v in state.items()}
        elif self.global_state is None:
            self.global_state = self.sites[0].state_dict()
        for site in self.sites:
            site.load_state(self.global_state)
        download_s = time.perf_counter() - t
        t = time.perf_counter()
        global_eval = self.evaluate_global()
        eval_s = time.perf_counter() - t
        record = self.round_record(rnd, t_sim, plans, results, departures, global_eval)
        self.commit(rnd, results)
        total = time.perf_counter() - t_round
        record["wall"] = self.wall_split(total, planning_s, motion_s, download_s, eval_s, results)
        self.run.log_metrics(record)
        if self.telemetry is not None:
            self.telemetry.round(record)
        return record

    @staticmethod
    def wall_split(total: float, planning_s: float, motion_s: float, download_s: float, eval_s: float,
                   results: list[EdgeRoundResult]) -> dict[str, float]:
        """Round wall time as planning / training / aggregation / overhead (+ the held-out eval, reported apart).

        Edges train concurrently, so their shares are the slowest edge's; pipeline planning (SWIFT pipelines and
        templates) counts as planning, taking on identities and releasing slots as overhead."""
        def slowest(key: str) -> float:
            return max((r.timings.get(key, 0.0) for r in results), default=0.0)

        planning = planning_s + slowest("pipelines_s")
        training = slowest("training_s")
        aggregation = slowest("upload_s") + download_s
        overhead = max(0.0, total - eval_s - planning - training - aggregation)
        return {"planning_s": round(planning, 3), "training_s": round(training, 3),
                "aggregation_s": round(aggregation, 3), "overhead_s": round(overhead, 3),
                "motion_s": round(motion_s, 3), "eval_s": round(eval_s, 3), "total_s": round(total, 3),
                "overhead_share": round(overhead / max(1e-9, total - eval_s), 4)}

    def evaluate_global(self) -> dict[str, Any] | None:
        if not self.cfg.rounds.eval_frames or self.global_state is None:
            return None
        from flad_edge.experiment.driver import evaluate_encoder

        ids = sorted(json.loads((Path(self.heldout_root) / "manifest.json").read_text())["vehicles"])
        return evaluate_encoder(self.global_state, self.heldout_root, ids, self.cfg.train.encoder,
                                batch_size=8)

    def round_record(self, rnd: int, t_sim: float, plans: list[EdgeRoundPlan], results: list[EdgeRoundResult],
                     departures: dict[str, list[Departure]], global_eval: dict[str, Any] | None) -> dict[str, Any]:
        edges: dict[str, Any] = {}
        losses = []
        for p, r in zip(plans, results, strict=True):
            s = r.summary or {}
            loss = s.get("train_loss")
            loss = loss if loss is not None and math.isfinite(loss) else None
            e = p.summary()
            e.update({"accepted": s.get("accepted", 0), "samples": r.samples, "moved_bytes": s.get("moved_bytes", 0),
                      "train_loss": loss, "recoveries": len(s.get("recoveries", [])),
                      "handovers": len(s.get("handovers", [])), "errors": s.get("errors", {}),
                      "error": r.error, "departures": r.departures_done,
                      "scheduled_departures": [dataclasses.asdict(d) for d in departures.get(p.edge, [])],
                      "per_client": s.get("per_client", {}), "timings": {k: round(v, 3) for k, v in r.timings.items()}})
            edges[p.edge] = e
            if loss is not None and s.get("accepted"):
                losses.append((loss, r.samples))
            for info in e["per_client"].values():
                if not math.isfinite(info.get("loss", 0.0)):
                    info["loss"] = None       # never reported (its last stage left): JSON has no NaN
            for d in r.departures_done:
                self.event({"round": rnd, "sim_time_s": d["sim_time_s"], "kind": "handover" if d["action"] ==
                            "handover" else ("departure_unpredicted" if d["cause"] == "leave" else "crash"),
                            "vehicle": d["vehicle"], "edge": p.edge, "client": d["client"],
                            "detail": f"at {100 * d['fraction']:.0f}% of the client's steps"})
            for rec in s.get("recoveries", []):
                self.event({"round": rnd, "sim_time_s": round(t_sim, 1), "kind": "recovery", "edge": p.edge,
                            "client": rec.get("client"), "vehicle": ",".join(rec.get("departed", [])),
                            "detail": rec.get("choice") or rec.get("reason", "")})
        samples = sum(r.samples for r in results)
        loss = sum(ls * n for ls, n in losses) / max(1, sum(n for _, n in losses)) if losses else None
        return {"event": "round", "round": rnd, "sim_time_s": round(t_sim, 1), "train_loss": loss,
                "global": global_eval, "samples": samples, "accepted": sum(e["accepted"] for e in edges.values()),
                "moved_bytes": sum(int(e["moved_bytes"]) for e in edges.values()), "edges": edges,
                "clients": sum(len(p.clients) for p in plans)}

    def commit(self, rnd: int, results: list[EdgeRoundResult]) -> None:
        """The round's accepted updates enter the ledger and the checkpoint together (exactly once)."""
        for r in results:
            for client, info in ((r.summary or {}).get("updates") or {}).items():
                self.ledger.append({"round": rnd, "edge": r.edge, "client": client, "update_id": info["update_id"],
                                    "samples": int(info["samples"])})
                self.trained_at[r.edge].update(client.split("+"))
        self.checkpoint(rnd)

    # -- the whole run --------------------------------------------------------------------------------------
    def rounds(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        total = self.cfg.rounds.rounds
        if self.next_round == 0 and self.motion.time_s < self.cfg.rounds.warmup_s:
            self.motion.advance(self.cfg.rounds.warmup_s)
        if self.next_round == 0:     # the state a redo or a resume of round 0 starts from
            self.global_state = self.sites[0].state_dict()
            self.checkpoint(-1)
        with Progress(TextColumn("[bold]FLAD rounds"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=self.console, transient=True) as progress:
            task = progress.add_task("rounds", total=total, completed=self.next_round)
            for rnd in range(self.next_round, total):
                rec = self.run_round_or_redo(rnd)
                g = rec.get("global") or {}
                loss = "n/a" if rec["train_loss"] is None else f"{rec['train_loss']:.3f}"
                progress.console.print(
                    f"round {rnd}: clients {rec['accepted']}/{rec['clients']}  samples {rec['samples']}  "
                    f"train loss {loss}  held-out TL acc {g.get('tl_acc', float('nan')):.2f} "
                    f"WP L1 {g.get('wp_l1', float('nan')):.2f} m  "
                    + "  ".join(f"{k}: {len(v['clusters'])} clusters, {len(v['clients'])} clients, "
                                f"{v['handovers']} handovers, {v['recoveries']} recoveries"
                                for k, v in rec["edges"].items())
                    + f"  {rec['wall']['total_s']:.0f} s")
                progress.advance(task)
                self.next_round = rnd + 1

    def run_round_or_redo(self, rnd: int, attempts: int = 3) -> dict[str, Any]:
        """A round; if the cloud process died during it (or, on a cluster, an edge's machine was lost), the
        engine starts what was lost again and the round is redone from the last checkpoint (its partial updates
        were never committed, so none counts twice)."""
        for attempt in range(attempts):
            try:
                return self.run_round(rnd)
            except (BusError, TimeoutError, RuntimeError) as exc:
                if attempt == attempts - 1:
                    raise
                sites = self.engine.recover()
                if sites is None:
                    raise
                log.error("round %d failed (%s); redoing it from the checkpoint", rnd, exc)
                self.sites = sites
                for site in self.sites:
                    try:
                        site.release()
                    except Exception:      # an edge started afresh has nothing placed
                        log.exception("%s: release before the redo failed", site.id)
                self.attempt = uuid.uuid4().hex[:6]
                self.restore(torch.load(self.run.path / CHECKPOINT, weights_only=False),
                             why=self.engine.last_restart)
        raise AssertionError("unreachable")

    def driver_stage(self) -> dict[str, Any] | None:
        if not self.cfg.driver.enabled or self.global_state is None:
            return None
        from flad_edge.experiment.driver import evaluate_driver, train_driver

        dcfg = self.cfg.driver
        out = self.run.path / "driver"
        self.console.print("CELLAdapt on the final global encoder, then a closed-loop evaluation on "
                           f"{', '.join(self.cfg.driver.eval_towns)}")
        edge_vehicles = {e: sorted(v) for e, v in self.trained_at.items() if v}
        trained = train_driver(self.global_state, self.data_root, edge_vehicles, dcfg, out, self.cfg.seed,
                               encoder=self.cfg.train.encoder,
                               heldout_root=self.heldout_root if self.cfg.rounds.eval_frames else None)
        return evaluate_driver(trained, dcfg, out, self.cfg.seed)

    def close(self) -> None:
        self.engine.close()
        if self.telemetry is not None:
            self.telemetry.close()


def run_experiment(cfg: ExperimentConfig, run: RunDir, console: Console, resume: bool = False) -> dict[str, Any]:
    """The whole run (see the module docstring); returns the summary also written to summary.json."""
    started = time.monotonic()
    exp = Experiment(cfg, run, console)
    try:
        exp.setup()
        ckpt_file = run.path / CHECKPOINT
        if resume and ckpt_file.exists():
            exp.restore(torch.load(ckpt_file, weights_only=False))
            console.print(f"resuming {run.id} at round {exp.next_round} of {cfg.rounds.rounds}")
        from flad_edge.experiment.telemetry import Telemetry

        exp.telemetry = Telemetry(run.path, purge_step=exp.next_round if resume else None)
        exp.rounds()
        if exp.global_state is not None:
            atomic_write_bytes(run.path / "global_encoder.safetensors", to_bytes(exp.global_state))
        driver = exp.driver_stage()
    finally:
        exp.close()
    summary = {"preset": cfg.name, "rounds": cfg.rounds.rounds, "vehicles": cfg.fleet.vehicles,
               "edges": [dataclasses.asdict(e) for e in exp.edges], "wall_s": round(time.monotonic() - started, 1),
               "updates_committed": len(exp.ledger), "driver": driver, "resumed": resume,
               "engine": exp.engine.describe()}
    prev = run.path / "summary.json"
    if resume and prev.exists():
        summary["wall_s_before_resume"] = json.loads(prev.read_text()).get("wall_s")
    atomic_write_json(prev, summary)
    from flad_edge.experiment.report import write_report

    report = write_report(run.path)
    console.print(f"report: {report}")
    return summary


def load_run_config(run_path: Path) -> ExperimentConfig:
    data = yaml.safe_load((run_path / "config.yaml").read_text())
    return from_dict(ExperimentConfig, data)


def write_config(run: RunDir, cfg: ExperimentConfig) -> None:
    (run.path / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
