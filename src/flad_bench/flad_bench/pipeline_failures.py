"""Throughput under failures (`flad bench pipeline --only failures`): the cluster trains while its vehicles fail
at a fixed rate, each failure recovered by FLAD's quick-recovery path, as a curve over the failure interval.

The cluster is `flad bench pipeline`'s (2 Jetson Nano + 1 AGX, emulated), here as real vehicle processes (the
FL worker, `flad_vehicle.fhdp.worker`) under a recovering edge in this process (`RecoveringFhdpEdge`, loopback
ZeroMQ): every round the edge rotates through the cluster's essential pipelines, so every member's data is used.

One setting = train for `duration_s`, round after round, in `cycles` segments: the settings take turns (one
segment each, the order reversed every other cycle) so that a change in the host's load weighs on all alike. With a
failure interval T a random live member is SIGKILLed at T/2, 3T/2, 5T/2, ... of the setting's own training time
(so it has duration/T failures; the schedule goes on across its segments), detected by its dropped
connection and recovered in the running round (abort, pre-generated template, layer moves, the departed
member's layers from the edge backup). The killed vehicle's process is started again at once and re-admitted at
the next round (a vehicle that rejoins the cluster). Throughput = samples of the rounds' accepted updates (net of
the steps recovery threw away) / the setting's time (each segment from its start to the end of its last round, the
first to end after the segment's share of `duration_s`); the failure-free setting is the same loop with no kills.

The clock: failure intervals and throughput are in emulated seconds. The curve runs at time_scale 1, where the
emulated clock is the wall clock: links run at their real rates (Table 1), detection, re-planning and process
restarts take the time they take; compute is dilated to each profile's TFLOPS where the host is fast enough and is
host-bound where it is not (the conditions give each profile's dilation factor: below 1 means the host is the
slower, so every step, failure-free or not, takes longer than on the real device).
"""

from __future__ import annotations

import logging
import math
import os
import platform
import random
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_INTERVALS_S = (120.0, 60.0, 30.0)
GOAL_RATIO_AT_60S = 0.8


@dataclass
class FailureCurveConfig:
    """What one failure-curve run does (defaults: the full run, about 4 x 6 minutes)."""

    cluster: tuple[tuple[str, str], ...] = (("n1", "jetson_nano"), ("n2", "jetson_nano"), ("agx", "jetson_agx"))
    intervals_s: tuple[float, ...] = DEFAULT_INTERVALS_S
    duration_s: float = 360.0          # training time per setting, over all its segments
    cycles: int = 4                    # segments per setting: the settings take turns, one segment each
    local_steps: int = 20              # steps per pipeline per round
    batch_size: int = 4
    n_micro: int = 2
    backup_every: int = 2              # the quick-recovery backup interval (steps)
    heartbeat_timeout_s: float = 1.0   # detection fallback; a killed process is seen by its dropped connection
    encoder: str = "tiny"
    time_scale: float = 1.0
    seed: int = 0
    workdir: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.duration_s <= 0 or self.local_steps < 1 or self.batch_size < 1 or self.cycles < 1:
            raise ValueError(f"duration_s, local_steps, batch_size and cycles must be positive (got "
                             f"{self.duration_s}, {self.local_steps}, {self.batch_size}, {self.cycles})")
        bad = [t for t in self.intervals_s if not t > 0]
        if bad:
            raise ValueError(f"failure intervals must be > 0 s, got {bad}")


def failure_times(interval_s: float, horizon_s: float) -> list[float]:
    """Offsets (s from the start) of the failures with one per `interval_s`: T/2, 3T/2, ... below `horizon_s`."""
    out, t = [], interval_s / 2
    while t < horizon_s:
        out.append(t)
        t += interval_s
    return out


def _bring_back(live, ids: list[str]) -> None:
    """Every vehicle process is up (from this thread: see LiveFleet.restart) before a setting starts."""
    dead = [v for v in ids if not live.alive(v)]
    if dead:
        live.restart(dead)


def run_setting(live, client, ids: list[str], interval_s: float | None, duration_s: float, rnd0: int,
                rng: random.Random, offset_s: float = 0.0) -> dict[str, Any]:
    """Train for `duration_s` (rounds from `rnd0`) with a failure every `interval_s` (None: none). `offset_s`: how
    long this setting has already trained in earlier segments, so its failure schedule goes on where it was."""
    _bring_back(live, ids)
    rounds: list[dict[str, Any]] = []
    errors: list[str] = []
    done = threading.Event()
    t0 = time.time()

    def train() -> None:
        rnd = rnd0
        try:
            while time.time() - t0 < duration_s:
                try:
                    s = live.edge.run_round(rnd, [client])
                    rounds.append({"round": rnd, "samples": int(s["samples"]), "accepted": s["accepted"],
                                   "train_loss": s["train_loss"], "t_end": time.time() - t0,
                                   "recoveries": s["recoveries"], "errors": s["errors"]})
                except Exception as exc:   # a round lost to a failure counts as 0 samples; training goes on
                    log.warning("round %d failed: %s", rnd, exc)
                    errors.append(f"round {rnd}: {type(exc).__name__}: {exc}")
                    rounds.append({"round": rnd, "samples": 0, "accepted": 0, "train_loss": None,
                                   "t_end": time.time() - t0, "recoveries": [], "errors": {"round": str(exc)}})
                rnd += 1
        finally:
            done.set()

    trainer = threading.Thread(target=train, name="failure-curve-rounds", daemon=True)
    trainer.start()
    kills: list[dict[str, Any]] = []
    # the kills go on past duration_s while the last round runs, so the rate holds to the end
    schedule = [t - offset_s for t in failure_times(interval_s, offset_s + 10 * duration_s) if t >= offset_s] \
        if interval_s else []
    while not done.wait(0.02):
        if schedule and time.time() - t0 >= schedule[0]:
            schedule.pop(0)
            alive = [v for v in ids if live.alive(v)]
            if len(alive) < 2:        # never the last survivor: the cluster would have nobody to recover onto
                kills.append({"at_s": round(time.time() - t0 + offset_s, 2), "skipped": "fewer than 2 members alive"})
                continue
            victim = rng.choice(alive)
            t_kill = live.kill(victim)
            live.restart(victim)      # the vehicle comes back; it rejoins training at the next round
            kills.append({"at_s": round(t_kill - t0 + offset_s, 2), "vehicle": victim,
                          "restarted_after_s": round(time.time() - t_kill, 2)})
    trainer.join()
    t_end = rounds[-1]["t_end"] if rounds else time.time() - t0
    samples = sum(r["samples"] for r in rounds)
    recoveries = [rec for r in rounds for rec in r["recoveries"]]
    return {
        "interval_s": interval_s, "failures": len([k for k in kills if "vehicle" in k]),
        "seconds": round(t_end, 2), "rounds": len(rounds), "samples": samples,
        "samples_per_s": samples / t_end if t_end > 0 else None,
        "recoveries": len(recoveries),
        "steps_lost": sum(rec.get("steps_lost", 0) or 0 for rec in recoveries),
        # a recovery that ended its pipeline (the data owner left) never resumes: no time to count
        "recovery_s_p50": _median([rec["recovery_s"] for rec in recoveries
                                   if rec.get("recovery_s") is not None and math.isfinite(rec["recovery_s"])]),
        "rounds_failed": len(errors), "errors": errors[:5], "kills": kills,
        "round_samples": [r["samples"] for r in rounds],
        "round_seconds": [round(r["t_end"] - start, 2)
                          for start, r in zip([0.0, *(r["t_end"] for r in rounds[:-1])], rounds, strict=True)],
        "final_train_loss": next((r["train_loss"] for r in reversed(rounds) if r["train_loss"] is not None), None),
    }


def merge_segments(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One setting's figures from its segments (`run_setting` rows, in order)."""
    seconds = sum(r["seconds"] for r in rows)
    samples = sum(r["samples"] for r in rows)
    p50 = [r["recovery_s_p50"] for r in rows if r["recovery_s_p50"] is not None]
    return {"interval_s": rows[0]["interval_s"], "segments": len(rows),
            "failures": sum(r["failures"] for r in rows), "seconds": round(seconds, 2),
            "rounds": sum(r["rounds"] for r in rows), "samples": samples,
            "samples_per_s": samples / seconds if seconds > 0 else None,
            "recoveries": sum(r["recoveries"] for r in rows), "steps_lost": sum(r["steps_lost"] for r in rows),
            "recovery_s_p50_of_segments": _median(p50), "rounds_failed": sum(r["rounds_failed"] for r in rows),
            "errors": [e for r in rows for e in r["errors"]][:5], "kills": [k for r in rows for k in r["kills"]],
            "round_samples": [n for r in rows for n in r["round_samples"]],
            "round_seconds": [x for r in rows for x in r.get("round_seconds", [])],
            "segment_samples_per_s": [r["samples_per_s"] for r in rows],
            "final_train_loss": rows[-1]["final_train_loss"]}


def _median(xs: list[float]) -> float | None:
    xs = sorted(xs)
    if not xs:
        return None
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def run_failure_curve(cfg: FailureCurveConfig) -> dict[str, Any]:
    """The failure-free run, then one run per failure interval, on one live cluster; the JSON-ready curve."""
    from flad_core.emulation import host_tflops as calibrate
    from flad_core.fleet import PAPER_PROFILES
    from flad_edge.fhdp.config import FhdpConfig
    from flad_edge.fhdp.recovery.live import LiveFleet
    from flad_edge.fhdp.recovery.records import RecoveryConfig

    t_start = time.monotonic()
    host = calibrate()
    load_before = list(os.getloadavg())
    ids = [v for v, _ in cfg.cluster]
    workdir = Path(cfg.workdir) if cfg.workdir else Path(tempfile.mkdtemp(prefix="flad-bench-failures-"))
    fcfg = FhdpConfig(local_steps=cfg.local_steps, batch_size=cfg.batch_size, n_micro=cfg.n_micro,
                      time_scale=cfg.time_scale, planner="exact", round_deadline_s=max(300.0, 4 * cfg.duration_s),
                      encoder=cfg.encoder, seed=cfg.seed)
    rcfg = RecoveryConfig(backup_every=cfg.backup_every, link_timeout_s=30.0)
    rng = random.Random(cfg.seed)
    settings: list[dict[str, Any]] = []
    live = LiveFleet(workdir / "fleet", ids, fcfg, rcfg, heartbeat_timeout_s=cfg.heartbeat_timeout_s,
                     profiles=[p for _, p in cfg.cluster])
    try:
        client = live.edge.cluster_client(ids, "c1")
        templates_ready = live.edge.templates["c1"].wait(120)
        live.edge.run_round(0, [client])          # warm-up: layers deployed, processes warm (not timed)
        rnd = 1
        order: list[float | None] = [None, *cfg.intervals_s]
        segments: dict[float | None, list[dict[str, Any]]] = {s: [] for s in order}
        # the settings take turns in short segments (the order reversed every other cycle), so a change in the
        # host's load over the run weighs on every setting alike
        for cycle in range(cfg.cycles):
            for interval in order if cycle % 2 == 0 else order[::-1]:
                done = segments[interval]
                row = run_setting(live, client, ids, interval, cfg.duration_s / cfg.cycles, rnd, rng,
                                  offset_s=sum(r["seconds"] for r in done))
                rnd += row["rounds"]
                done.append(row)
                log.info("cycle %d, failure interval %s s: %.2f samples/s, %d failures, %d recoveries", cycle,
                         interval, row["samples_per_s"] or 0.0, row["failures"], row["recoveries"])
        settings = [merge_segments(segments[s]) for s in order]
    finally:
        live.close()
    base = settings[0]["samples_per_s"]
    curve = [{"interval_s": s["interval_s"], "failures_per_min": 60.0 / s["interval_s"] if s["interval_s"] else 0.0,
              "samples_per_s": s["samples_per_s"],
              "vs_failure_free": (s["samples_per_s"] / base) if base and s["samples_per_s"] is not None else None}
             for s in settings]
    at60 = next((c["vs_failure_free"] for c in curve if c["interval_s"] == 60.0), None)
    goals = {"failure_60s_vs_failure_free": {"value": at60, "target": GOAL_RATIO_AT_60S,
                                             "met": at60 is not None and at60 >= GOAL_RATIO_AT_60S}}
    conditions = {
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "loadavg_before": load_before,
                 "loadavg_after": list(os.getloadavg()), "python": platform.python_version(),
                 "host_tflops_1thread": round(host, 4)},
        "clock": "emulated seconds = wall seconds (time_scale 1): links at their real rates; detection, re-planning "
                 "and restarts take real time; compute host-bound where a profile's dilation factor is below 1",
        "time_scale": cfg.time_scale,
        "profiles": {v: {"profile": p, "tflops": PAPER_PROFILES[p].tflops, "link_mbps": PAPER_PROFILES[p].link_mbps,
                         "dilation_factor": round(host / PAPER_PROFILES[p].tflops * cfg.time_scale, 3)}
                     for v, p in cfg.cluster},
        "schedule": "rotation over the cluster's essential pipelines (the FL worker's schedule; the fan-in schedule "
                    "is not yet in the FL worker)",
        "failure": "SIGKILL of a random live member at T/2 + kT; detected by its dropped connection (heartbeat "
                   f"timeout {cfg.heartbeat_timeout_s} s as the fallback); the process restarts at once and rejoins "
                   "at the next round",
        "templates_pregenerated": templates_ready,
        **{k: v for k, v in asdict(cfg).items() if k not in ("cluster", "workdir", "extra")}, **cfg.extra,
    }
    return {"conditions": conditions, "curve": curve, "settings": settings, "goals": goals,
            "bench_seconds": round(time.monotonic() - t_start, 1)}
