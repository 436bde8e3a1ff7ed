"""`flad bench pipeline --json`: FHDP pipeline throughput and stage-traffic codecs, side by side in one run.

Everything here is **emulated** (docs/architecture.md, "Emulated and real"): a 3-vehicle cluster (default: 2
Jetson Nano + 1 Jetson AGX, the paper's testbed) runs as 3 real processes on loopback ZeroMQ; each stretches
its measured compute to its profile's TFLOPS (`ComputeDilation`) and shapes every send to its profile's link
rate (`TokenBucket`), both slowed by one global `time_scale` so that even the fastest emulated device is
slower than this host's core (by default the AGX's dilation factor is 2). Emulated time = wall time /
time_scale.

Links: by default each vehicle has one radio that all its links and its inbox share (`--radio device`, half
duplex; `--radio link`: each link the full rate), at Table 1's 50/100 Mb/s (`--link-setting table1`) or the
paper's measured Table 2 throughput, 14/22 Mb/s (`--link-setting measured`).

One run measures, with the same encoder (same seed), the same data stream and the same profiles:
  (a) FHDP with SWIFT's partition (exact planner, bottleneck objective, SWIFT picks the first stage), plus the
      throughput of the cluster's essential pipelines in rotation (each member first, as FHDP trains);
  (b) standalone: the whole model on the AGX-profile process;
  (c) random partitions of the same cluster (random order and cuts, fixed seed; mean of several draws);
  (d) `torch.distributed.pipelining` (gloo) on SWIFT's partition (`bench_pipeline_torchpp`);
  (e) the ideal pipeline bound from the measured per-stage times of (a);
  (f) every member's data at once (the fan-in schedule, `flad_vehicle.fhdp.fanin`): SWIFT's fan-in plan from
      per-layer times measured on this host (`flad_edge.swift.fanin`), in fp32 and in the codec it predicts
      best, with its predicted step time (and the paper FLOP model's) next to the measured one; each source
      trains on its own data shard, so a step covers members x batch samples (`--only every-member`: just
      standalone, the rotation and this);
  (g) throughput under failures: the cluster as FL-worker processes under a recovering edge, with one vehicle
      SIGKILLed every 120/60/30 emulated s and recovered by quick recovery, beside a failure-free run, as a
      curve (`flad_bench.pipeline_failures`; `--only failures` runs just this; time_scale 1 there);
and bytes per sample and loss after N steps for each stage-traffic codec, in both modes: labels-forward (labels
ride to the last stage) and U-shaped (the data owner keeps heads, loss and labels; `flad_vehicle.fhdp.ushape`),
each on its own SWIFT partition; the int8 goal is judged on the mode with less traffic. `--only codecs` runs just
that sweep. `--noniid` adds the non-IID study (`bench_pipeline_noniid`; `--noniid-seeds` repeats it per seed).
Without running anything, the JSON also says what any partition could reach: `link_floor` (the bytes of the
cheapest cut, over the links alone) and `pipeline_floor` (every vehicle order and pair of cuts, FLOP-share
compute and per-link traffic; the best partition of any kind, and the best in which every member trains).

The encoder is the tiny config by default. At the emulated 50/100 Mb/s links the tiny encoder is link-bound (its
compute per sample is small next to the activations it sends), so SWIFT gives the Nanos almost nothing and
a pipeline cannot beat the AGX alone; `--encoder paper` (LMDrive-sized) has far more compute per sample (much
slower to run: ~1 s per sample on one host core), but the data owner must keep >= 28 % of its FLOPs before its
cheapest cut (358 KB a sample in fp32, about the raw sensor input), and the decoder alone is 39 %.
Labels always travel bit-exact: the codecs quantise activations and gradients only; fp16, bf16 and int8
also deflate the labels losslessly (fp32 is the raw baseline: nothing packed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flad_bench.pipeline_fleet import BenchFleet
from flad_bench.pipeline_worker import link_codec
from flad_core.device import DeviceError, device_info, resolve_device
from flad_edge.swift.bounds import CODECS, cut_traffic, ideal_step_s, link_floor, pipeline_floor
from flad_vehicle.fhdp.pipeline import Pipeline, PipelineError

log = logging.getLogger(__name__)

#: the codecs a bench run can sweep: tensorcodec's, and int4 with error feedback on every link ("int4ef", Optimus-CC /
#: EF-SGD style: what a send's quantisation missed is added to the next send of the same slot)
BENCH_CODECS = (*CODECS, "int4ef")


def codec_traffic(encoder: str, data: str, owner: str, codecs: Sequence[str]) -> list[dict[str, Any]]:
    """`cut_traffic` for bench codec names (int4ef moves int4's bytes)."""
    base = list(dict.fromkeys(link_codec(c)[0] for c in codecs))
    rows = cut_traffic(encoder, data, owner, base)
    for r in rows:
        for c in codecs:
            for part in ("forward", "backward"):
                r[part][c] = r[part][link_codec(c)[0]]
    return rows


DEFAULT_CLUSTER = (("n1", "jetson_nano"), ("n2", "jetson_nano"), ("agx", "jetson_agx"))
GOALS = {"every_member_vs_standalone": 0.75, "every_member_vs_rotation": 3.0, "prediction_rel_error_max": 0.15,
         "every_member_best_codec_vs_standalone": 1.0,
         "fhdp_vs_standalone": 0.75, "fhdp_vs_random": 1.4, "fhdp_vs_ideal": 0.9, "fhdp_vs_torch_pipelining": 1.0,
         "int8_byte_reduction": 3.5, "int8_loss_rel_diff_max": 0.02,
         "sub8_byte_reduction": 6.0, "sub8_loss_rel_diff_max": 0.02}


@dataclass
class BenchConfig:
    """What one bench run does (defaults: the full run; its codec sweep alone, 4 codecs x 3 modes, took ~8 min
    on a loaded 2-core host -- `--modes` trims it)."""

    encoder: str = "tiny"
    data: str = "data/fleet"            # fleet dataset root, or "synthetic"
    data_owner: str = "v000"            # whose shard feeds every configuration's first stage (same data for all)
    cluster: tuple[tuple[str, str], ...] = DEFAULT_CLUSTER
    batch_size: int = 4                 # the paper's batch size
    n_micro: int = 4                    # >= stages, as torch's Schedule1F1B requires
    schedule: str = "1f1b"
    steps: int = 3                      # timed steps per throughput configuration
    warmup: int = 1
    codec_steps: int = 8                # steps per codec run (loss after N steps)
    random_draws: int = 3
    random_steps: int = 1               # timed steps per random draw, no warm-up: bad partitions are very slow
    time_scale: float = 0.0             # 0: auto (the fastest device's dilation factor = agx_factor)
    agx_factor: float = 2.0
    rotation: bool = True
    every_member: bool = True           # the fan-in schedule: every member's data at once (flad_vehicle.fhdp.fanin)
    fanin_budget_s: float = 1200.0      # a fan-in codec run predicted to take longer (wall s) is skipped, and said so
    device: str = "cpu"                 # where every worker's stages run (flad_core.device)
    link_setting: str = "table1"        # flad_core.fleet.LINK_SETTINGS: table1 (50/100 Mb/s) or measured (14-22)
    radio: str = "device"               # device: all of a vehicle's links share its radio; link: each its own rate
    torch_pipelining: bool = True
    seed: int = 0
    base_port: int = 0                  # 0: pick free ports
    codecs: tuple[str, ...] = BENCH_CODECS
    modes: tuple[str, ...] = ("labels_forward", "u_shaped", "labels_forward_same_cuts")   # codec sweep (MODES)
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ pure logic


def random_partition(rng: random.Random, vehicles: Sequence[str], n_layers: int, min_first_end: int
                     ) -> Pipeline:
    """A random pipeline over all `vehicles`: random order, random cuts (first stage keeps the raw-input layers)."""
    k = len(vehicles)
    if n_layers - min_first_end < k - 1:
        raise ValueError(f"{n_layers} layers cannot be cut into {k} stages after layer {min_first_end}")
    order = list(vehicles)
    rng.shuffle(order)
    cuts = sorted(rng.sample(range(min_first_end, n_layers), k - 1)) if k > 1 else []
    bounds = [0, *cuts, n_layers]
    return Pipeline.of((order[i], bounds[i], bounds[i + 1]) for i in range(k))


def valid_partition(pipeline: Sequence[Sequence], n_layers: int, min_first_end: int) -> bool:
    """A pipeline over [0, n_layers) with non-empty contiguous stages, each vehicle once, whose first stage
    keeps the raw-input layers (ends at or after `min_first_end`)."""
    try:
        pipe = Pipeline.of(pipeline)
        pipe.owners(n_layers)
    except PipelineError:
        return False
    non_empty = all(e > s for _, s, e in pipe)
    return non_empty and (len(pipe) == 1 or pipe[0].end >= min_first_end)


def auto_time_scale(host_tflops: float, fastest_tflops: float, factor: float) -> float:
    """The time scale that makes the fastest emulated device `factor` x slower than one host core."""
    return factor * fastest_tflops / host_tflops


# ------------------------------------------------------------------------------------------------ planning


def layer_profile(encoder: str) -> dict:
    from flad_vehicle.encoder.config import get_config
    from flad_vehicle.encoder.model import VisionEncoder, batch_to_torch
    from flad_vehicle.encoder.profile import profile_model
    from flad_vehicle.encoder.synthetic import synthetic_batches

    batch = batch_to_torch(next(synthetic_batches(1, 2, seed=0)))
    return profile_model(VisionEncoder(get_config(encoder)), batch, measure=False)


def swift_pipeline(cfg: BenchConfig, profile: dict, first: str | None, u_shaped: bool = False
                   ) -> tuple[Pipeline, dict]:
    """SWIFT's pipeline for the cluster (exact planner, bottleneck objective), optionally with a fixed first stage.

    With `u_shaped`, SWIFT cuts the trunk of the U-shaped profile (`ushape.u_profile`: heads on the data owner)."""
    from flad_core.fleet import PAPER_PROFILES
    from flad_edge.swift import Cluster, Vehicle, plan
    from flad_edge.swift.model import load_profile

    vs = [Vehicle(v, PAPER_PROFILES[p].mem_bytes, PAPER_PROFILES[p].tflops, PAPER_PROFILES[p].link_mbps, 1.0)
          for v, p in cfg.cluster]
    if u_shaped:
        from flad_vehicle.encoder.config import get_config
        from flad_vehicle.encoder.model import VisionEncoder
        from flad_vehicle.encoder.partition import Partitioner
        from flad_vehicle.fhdp.ushape import u_profile

        profile = u_profile(profile, Partitioner(VisionEncoder(get_config(cfg.encoder))).graph)
    p = plan(Cluster(vs, n_batch=cfg.batch_size), load_profile(profile), "exact", first=first, objective="bottleneck")
    if not p.feasible:
        raise RuntimeError(f"SWIFT found no pipeline (first={first}): {p.reason}")
    return (Pipeline.from_plan(p.path, p.ranges),
            {"predicted_bottleneck_s": p.bottleneck_s, "predicted_path_s": p.t_path_s})


def measured_layer_seconds(encoder: str, batch_size: int, repeats: int = 3) -> list[float]:
    """Per-layer forward + backward seconds per sample on this host, on one thread like the bench workers."""
    import torch

    from flad_vehicle.encoder.config import get_config
    from flad_vehicle.encoder.model import VisionEncoder, batch_to_torch
    from flad_vehicle.encoder.profile import measure_layer_seconds
    from flad_vehicle.encoder.synthetic import synthetic_batches

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        batch = batch_to_torch(next(synthetic_batches(1, batch_size, seed=0)))
        return measure_layer_seconds(VisionEncoder(get_config(encoder)), batch, repeats=repeats)
    finally:
        torch.set_num_threads(threads)


def replica_sync_bytes(encoder: str, codecs: Sequence[str]) -> dict[str, list[float]]:
    """Per codec, the wire bytes of the gradients of layers [0, c) for every c (index c): what one replica
    reduction frame carries when the fan-in cut is c."""
    import torch

    from flad_core import tensorcodec
    from flad_vehicle.encoder.config import get_config
    from flad_vehicle.encoder.model import VisionEncoder

    model = VisionEncoder(get_config(encoder))
    out: dict[str, list[float]] = {}
    for codec in codecs:
        cum = [0.0]
        for _, layer in model.layer_list(True):
            grads = {f"p{i}": torch.randn_like(p) for i, p in enumerate(layer.parameters())}
            packed = tensorcodec.encode(grads, link_codec(codec)[0]) if grads else {}
            cum.append(cum[-1] + (tensorcodec.wire_bytes(packed) if grads else 0))
        out[codec] = cum
    return out


def plan_every_member(cfg: BenchConfig, profile: dict, host_tflops: float) -> dict[str, Any]:
    """SWIFT's fan-in plans from measured layer times (and, for comparison, from the paper's FLOP model): the
    best per codec, with the predicted step of each under both cost models."""
    from flad_core.fleet import PAPER_PROFILES, link_mbps
    from flad_edge.swift.fanin import Device, flop_layer_seconds, plan_fanin, predict

    devices = [Device(v, PAPER_PROFILES[p].tflops, link_mbps(p, cfg.link_setting)) for v, p in cfg.cluster]
    rows = codec_traffic(cfg.encoder, cfg.data, cfg.data_owner, cfg.codecs)
    traffic = {c: {r["cut_before"]: {"forward": r["forward"][c], "backward": r["backward"][c]} for r in rows}
               for c in cfg.codecs}
    replica_bytes = replica_sync_bytes(cfg.encoder, cfg.codecs)
    min_first = int(profile["min_first_stage_end"])
    measured_s = measured_layer_seconds(cfg.encoder, cfg.batch_size)
    flop_s, flop_ref = flop_layer_seconds([r["flops"] for r in profile["layers"]])
    common = (traffic, replica_bytes, min_first, cfg.batch_size, cfg.n_micro)
    by_measure = plan_fanin(devices, measured_s, host_tflops, *common, codecs=cfg.codecs)
    by_flops = plan_fanin(devices, flop_s, flop_ref, *common, codecs=cfg.codecs)
    by_id = {d.id: d for d in devices}

    def flop_prediction(c) -> float:
        return predict(by_id, flop_s, flop_ref, traffic[c.codec], replica_bytes[c.codec][c.trunk[0][1]], c.sources,
                       c.trunk, cfg.batch_size, cfg.n_micro)[0]

    best = {}
    for codec in cfg.codecs:
        cand = next((c for c in by_measure if c.codec == codec), None)
        if cand is not None:
            best[codec] = {**cand.to_json(), "flop_model_predicted_step_s": flop_prediction(cand)}
    flop_choice = by_flops[0] if by_flops else None
    return {"best_by_codec": best, "best_codec": by_measure[0].codec if by_measure else None,
            "flop_model_choice": flop_choice.to_json() if flop_choice else None,
            "layer_seconds_per_sample_host": measured_s, "link_setting": cfg.link_setting,
            "candidates": len(by_measure)}


def run_rotation(cfg: BenchConfig, fleet: BenchFleet, profile: dict) -> dict[str, Any]:
    """The cluster's essential pipelines in rotation (each member first, SWIFT's plan), as FHDP trains today:
    one step of each in turn, so throughput = members x batch / the sum of their step times."""
    pipes = []
    for v, _ in cfg.cluster:
        pipe, pred = swift_pipeline(cfg, profile, v)
        r = fleet.run(pipe, steps=cfg.steps)
        r.update(pred)
        pipes.append(r)
    return {"pipelines": pipes, "samples_per_s": cfg.batch_size * len(pipes) / sum(r["step_s"] for r in pipes)}


def run_every_member(cfg: BenchConfig, fleet: BenchFleet, profile: dict, host_tflops: float) -> dict[str, Any]:
    """The fan-in schedule on SWIFT's measured plan, per codec (fp32 and the best other codec)."""
    plans = plan_every_member(cfg, profile, host_tflops)
    runs: dict[str, Any] = {}
    failed: dict[str, str] = {}
    skipped: dict[str, str] = {}
    # the predicted best codec first: a link-bound fp32 plan can take long enough to be cut off
    order = sorted(plans["best_by_codec"], key=lambda c: c != plans["best_codec"])
    for codec in order:
        cand = plans["best_by_codec"][codec]
        if codec not in ("fp32", plans["best_codec"]):
            continue
        log.info("fan-in plan (%s): %s => %s, predicted %.3f emulated s a step", codec, cand["sources"], cand["trunk"],
                 cand["predicted_step_s"])
        wall_s = fanin_wall_seconds(cand["predicted_step_s"], cfg.steps + cfg.warmup, fleet.time_scale)
        if wall_s > cfg.fanin_budget_s:
            skipped[codec] = (f"predicted {wall_s:.0f} s of wall time ({cfg.steps + cfg.warmup} steps of "
                              f"{cand['predicted_step_s']:.3f} emulated s at time_scale {fleet.time_scale:.3g}) "
                              f"> --fanin-budget {cfg.fanin_budget_s:.0f} s")
            log.warning("fan-in run (%s) skipped: %s", codec, skipped[codec])
            continue
        try:
            r = fleet.run_fanin(cand["sources"], cand["trunk"], steps=cfg.steps, codec=codec)
        except (TimeoutError, RuntimeError) as exc:
            # reported, never faked; the workers may still be busy with it, so no further configuration runs
            log.error("fan-in run (%s) failed: %s", codec, exc)
            failed[codec] = f"{type(exc).__name__}: {exc}"
            break
        r["predicted_step_s"] = cand["predicted_step_s"]
        r["flop_model_predicted_step_s"] = cand["flop_model_predicted_step_s"]
        r["prediction_rel_error"] = abs(cand["predicted_step_s"] - r["step_s"]) / r["step_s"]
        r["flop_model_prediction_rel_error"] = abs(cand["flop_model_predicted_step_s"] - r["step_s"]) / r["step_s"]
        runs[codec] = r
    return {"plans": plans, "runs": runs, "failed": failed, "skipped": skipped}


def fanin_wall_seconds(predicted_step_s: float, steps: int, time_scale: float) -> float:
    """Wall seconds a fan-in run is predicted to take (emulated time = wall time / time_scale)."""
    return predicted_step_s * steps * time_scale


def every_member_goals(em: dict[str, Any], standalone_sps: float, rotation_sps: float | None, encoder: str
                       ) -> dict[str, Any]:
    runs = em["runs"]
    fp32 = runs.get("fp32", {})
    best = max(runs.values(), key=lambda r: r["samples_per_s"]) if runs else {}
    goals = {"every_member_vs_standalone": _goal(_ratio(fp32.get("samples_per_s"), standalone_sps),
                                                 GOALS["every_member_vs_standalone"]),
             "every_member_vs_rotation": _goal(_ratio(fp32.get("samples_per_s"), rotation_sps),
                                               GOALS["every_member_vs_rotation"]),
             "every_member_prediction_error": _goal(fp32.get("prediction_rel_error"),
                                                    GOALS["prediction_rel_error_max"], higher_is_better=False)}
    if encoder == "paper":
        goals["every_member_best_codec_vs_standalone"] = _goal(_ratio(best.get("samples_per_s"), standalone_sps),
                                                               GOALS["every_member_best_codec_vs_standalone"])
        goals["every_member_best_codec_vs_standalone"]["codec"] = best.get("codec")
    return goals


# ------------------------------------------------------------------------------------------------ the run


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _goal(value: float | None, target: float, higher_is_better: bool = True) -> dict[str, Any]:
    if value is None:
        return {"value": None, "target": target, "met": None}
    met = value >= target if higher_is_better else value <= target
    return {"value": round(value, 4), "target": target, "met": bool(met)}


# labels_forward / u_shaped: each on its own SWIFT partition (what FHDP would run); labels_forward_same_cuts: the
# labels-forward mode on the U-shaped plan's cuts (last stage: the rest of the trunk + the heads), which isolates
# the effect of the mode from that of the partition
MODES = ("labels_forward", "u_shaped", "labels_forward_same_cuts")


def codec_table(codec_runs: dict[str, dict]) -> dict[str, dict]:
    """Bytes per sample, final loss and the ratios to fp32 of one mode's codec runs."""
    fp32 = codec_runs.get("fp32")
    out = {}
    for codec, r in codec_runs.items():
        out[codec] = {"bytes_per_sample": r["bytes_per_sample"], "final_loss": r["final_loss"],
                      "losses": r["losses"], "samples_per_s": r["samples_per_s"], "stages": r["stages"],
                      "link_bytes_per_step": r["link_bytes_per_step"],
                      "byte_reduction_vs_fp32": _ratio(fp32["bytes_per_sample"], r["bytes_per_sample"]) if fp32
                      else None,
                      "loss_rel_diff_vs_fp32": (abs(r["final_loss"] - fp32["final_loss"]) / fp32["final_loss"])
                      if fp32 and fp32["final_loss"] else None}
    return out


def codec_modes(tables: dict[str, dict[str, dict]]) -> dict[str, Any]:
    """Both modes side by side, and the mode with less traffic (fewest int8 bytes per sample, else fp32)."""
    def traffic(mode: str) -> float:
        t = tables[mode]
        row = t.get("int8") or t.get("fp32") or next(iter(t.values()))
        return row["bytes_per_sample"]

    modes = [m for m in MODES if tables.get(m)]
    candidates = [m for m in modes if m != "labels_forward_same_cuts"]   # the diagnostic mode is no candidate
    best = min(candidates, key=traffic) if candidates else None
    return {"modes": {m: tables[m] for m in modes}, "less_traffic": best,
            "labels_forward_over_u_bytes": {c: _ratio(tables["labels_forward"][c]["bytes_per_sample"],
                                                      tables["u_shaped"][c]["bytes_per_sample"])
                                            for c in tables.get("u_shaped", {})
                                            if c in tables.get("labels_forward", {})},
            "same_cuts_labels_forward_over_u_bytes": {
                c: _ratio(tables["labels_forward_same_cuts"][c]["bytes_per_sample"],
                          tables["u_shaped"][c]["bytes_per_sample"])
                for c in tables.get("u_shaped", {}) if c in tables.get("labels_forward_same_cuts", {})},
            "note": "labels_forward: labels travel with the activations to the last stage (the loss there); "
                    "u_shaped: the data owner keeps heads, loss and labels, the last trunk stage returns its "
                    "features (turnaround hop). Each mode runs its own SWIFT partition. bytes_per_sample counts "
                    "every frame every stage sent (activations, gradients, turnaround, clip control)."}


def codec_goals(modes: dict[str, Any]) -> dict[str, Any]:
    """The int8 goals, measured on the mode with less traffic (and reported for each mode)."""
    best = modes["less_traffic"]
    row = modes["modes"].get(best, {}).get("int8", {}) if best else {}
    goals = {"int8_byte_reduction": _goal(row.get("byte_reduction_vs_fp32"), GOALS["int8_byte_reduction"]),
             "int8_loss_within_2pct": _goal(row.get("loss_rel_diff_vs_fp32"), GOALS["int8_loss_rel_diff_max"],
                                            higher_is_better=False)}
    for g in goals.values():
        g["mode"] = best
    # sub-8-bit (int4, with error feedback when it was swept), on the same mode
    sub8 = next((c for c in ("int4ef", "int4") if best and c in modes["modes"].get(best, {})), None)
    if sub8:
        row = modes["modes"][best][sub8]
        goals["sub8_byte_reduction"] = _goal(row.get("byte_reduction_vs_fp32"), GOALS["sub8_byte_reduction"])
        goals["sub8_loss_within_2pct"] = _goal(row.get("loss_rel_diff_vs_fp32"), GOALS["sub8_loss_rel_diff_max"],
                                               higher_is_better=False)
        goals["sub8_byte_reduction"]["codec"] = goals["sub8_loss_within_2pct"]["codec"] = sub8
        goals["sub8_byte_reduction"]["mode"] = goals["sub8_loss_within_2pct"]["mode"] = best
    for mode, table in modes["modes"].items():
        i8 = table.get("int8", {})
        goals[f"int8_byte_reduction_{mode}"] = _goal(i8.get("byte_reduction_vs_fp32"), GOALS["int8_byte_reduction"])
        goals[f"int8_loss_within_2pct_{mode}"] = _goal(i8.get("loss_rel_diff_vs_fp32"),
                                                       GOALS["int8_loss_rel_diff_max"], higher_is_better=False)
    return goals


def run_codec_sweep(cfg: BenchConfig, fleet: BenchFleet, profile: dict) -> dict[str, dict[str, dict]]:
    """One run per codec and mode (see MODES); returns {mode: {codec: run}}."""
    runs: dict[str, dict[str, dict]] = {}
    n_layers = len(profile["layers"])
    for mode in cfg.modes:
        u = mode == "u_shaped"
        pipe, pred = swift_pipeline(cfg, profile, None, u_shaped=mode != "labels_forward")
        if mode == "labels_forward_same_cuts":
            pipe = [*pipe[:-1], (pipe[-1][0], pipe[-1][1], n_layers)]
        runs[mode] = {}
        for codec in cfg.codecs:
            r = fleet.run(pipe, steps=max(cfg.codec_steps, cfg.steps), codec=codec, u_shaped=u)
            r.update(pred)
            runs[mode][codec] = r
    return runs


def conditions(cfg: BenchConfig, host_tflops: float, time_scale: float) -> dict[str, Any]:
    import torch

    from flad_core.fleet import PAPER_PROFILES, link_mbps

    return {
        "emulated": True,
        "note": "all throughputs are EMULATED samples/s: compute dilated to each profile's TFLOPS and links "
                "token-bucket shaped, both slowed by time_scale; emulated time = wall / time_scale",
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "loadavg": list(os.getloadavg()),
                 "python": platform.python_version(), "torch": torch.__version__,
                 "host_tflops_1thread": round(host_tflops, 4)},
        "time_scale": round(time_scale, 3),
        "profiles": {v: {"profile": p, **asdict(PAPER_PROFILES[p]), "link_mbps": link_mbps(p, cfg.link_setting),
                         "dilation_factor": round(host_tflops / PAPER_PROFILES[p].tflops * time_scale, 3)}
                     for v, p in cfg.cluster},
        "link_setting": cfg.link_setting,
        "radio": {"device": "one radio per vehicle: its links and its inbox share the rate (half duplex)",
                  "link": "every link at the full rate"}[cfg.radio],
        "encoder": cfg.encoder, "data": cfg.data, "data_owner": cfg.data_owner, "batch_size": cfg.batch_size,
        "n_micro": cfg.n_micro, "schedule": cfg.schedule, "steps": cfg.steps, "warmup": cfg.warmup,
        "codec_steps": cfg.codec_steps, "random_draws": cfg.random_draws, "random_steps": cfg.random_steps,
        "random_warmup": 0, "seed": cfg.seed,
        "threads_per_process": 1, "grad_clip": 5.0,
        "device": device_info(cfg.device),
        **({"device_note": "stages ran on a GPU; compute dilation still references the CPU host's measured TFLOPS, "
                           "so the emulated device speeds are not Table 1's"} if cfg.device != "cpu" else {}),
        **cfg.extra,
    }


def _setup(cfg: BenchConfig) -> tuple[float, float, float, dict]:
    """Start time, the host's calibrated TFLOPS, the emulation time scale and the encoder's layer profile."""
    from flad_core.emulation import host_tflops as calibrate
    from flad_core.fleet import PAPER_PROFILES

    t_start = time.monotonic()
    host = calibrate()
    fastest = max(PAPER_PROFILES[p].tflops for _, p in cfg.cluster)
    return t_start, host, cfg.time_scale or auto_time_scale(host, fastest, cfg.agx_factor), layer_profile(cfg.encoder)


def run_throughput(cfg: BenchConfig) -> dict[str, Any]:
    """Configurations (a)-(e) and the codec sweep; returns the JSON-ready figures."""
    from flad_core.fleet import PAPER_PROFILES, link_mbps

    t_start, host, ts, profile = _setup(cfg)
    n_layers = len(profile["layers"])
    min_first = int(profile["min_first_stage_end"])
    swift, swift_pred = swift_pipeline(cfg, profile, None)
    out: dict[str, Any] = {"conditions": conditions(cfg, host, ts), "layers": n_layers}
    fleet = BenchFleet(cfg, host, ts)
    try:
        agx = max(cfg.cluster, key=lambda x: PAPER_PROFILES[x[1]].tflops)[0]   # the AGX in the paper's testbed
        # (b) standalone first: the reference every ratio divides by
        standalone = fleet.run([(agx, 0, n_layers)], steps=cfg.steps, n_micro=1)
        standalone["device"] = agx
        # (a) + codecs: SWIFT's pipeline, one run per codec and mode (labels-forward fp32 is configuration (a))
        sweep = run_codec_sweep(cfg, fleet, profile)
        codec_runs = sweep.get("labels_forward", {})
        fhdp = dict(codec_runs.get("fp32") or fleet.run(swift, steps=cfg.steps))
        fhdp.update(swift_pred)
        # the essential pipelines FHDP rotates through (each member first)
        rotation = run_rotation(cfg, fleet, profile) if cfg.rotation else None
        # every member's data at once (the fan-in schedule), on SWIFT's plan from measured layer times
        every = run_every_member(cfg, fleet, profile, host) if cfg.every_member else None
        # (c) random partitions
        rng = random.Random(cfg.seed + 1234)
        draws = []
        for _ in range(cfg.random_draws):
            pipe = random_partition(rng, [v for v, _ in cfg.cluster], n_layers, min_first)
            draws.append(fleet.run(pipe, steps=cfg.random_steps, warmup=0))
        rand = {"draws": draws, "samples_per_s": sum(d["samples_per_s"] for d in draws) / len(draws)}
    finally:
        fleet.close()
    # (e) ideal bounds from (a)'s measured per-stage figures
    ideal_s = ideal_step_s(fhdp["stage_compute_s"], cfg.n_micro)
    rates = {v: link_mbps(p, cfg.link_setting) * 1e6 / 8 for v, p in cfg.cluster}
    link_s = [b / rates[fhdp["stages"][src][0]] for src, _, b in fhdp["link_bytes_per_step"]]
    bound_s = max([*fhdp["stage_compute_s"], *link_s])
    ideal = {"step_s": ideal_s, "samples_per_s": cfg.batch_size / ideal_s,
             "definition": "T_s = per-stage emulated compute per step of (a); t_s = T_s / M per micro-batch; "
                           "step = sum(t_s) + (M - 1) max(t_s); communication free",
             "link_aware_bound": {
                 "step_s": bound_s, "samples_per_s": cfg.batch_size / bound_s,
                 "link_step_s": link_s, "links": fhdp["link_bytes_per_step"],
                 "definition": "steady-state bound with every compute stage and every directed link (at the "
                               "sender's rate, as if it had the radio to itself; with --radio device a vehicle's "
                               "links share one, so the bound is optimistic) as its own resource: "
                               "step >= max over resources of its busy time per step (no fill/drain)"}}
    # (d) torch.distributed.pipelining on the same partition
    tpp: dict[str, Any] = {"skipped": True}
    if cfg.torch_pipelining:
        from flad_bench.pipeline_torchpp import run_torch_pipelining

        try:
            tpp = run_torch_pipelining(cfg, swift, host, ts)
        except Exception as exc:  # reported, never faked
            log.exception("torch.distributed.pipelining run failed")
            tpp = {"works": False, "error": f"{type(exc).__name__}: {exc}"}
    codecs = codec_table(codec_runs)
    modes = codec_modes({mode: codec_table(r) for mode, r in sweep.items()})
    traffic = codec_traffic(cfg.encoder, cfg.data, cfg.data_owner, cfg.codecs)
    floor = link_floor(cfg.cluster, cfg.codecs, traffic, standalone["samples_per_s"])
    a = fhdp["samples_per_s"]
    goals = {
        "fhdp_vs_standalone": _goal(_ratio(a, standalone["samples_per_s"]), GOALS["fhdp_vs_standalone"]),
        "fhdp_vs_random": _goal(_ratio(a, rand["samples_per_s"]), GOALS["fhdp_vs_random"]),
        "fhdp_vs_ideal": _goal(_ratio(a, ideal["samples_per_s"]), GOALS["fhdp_vs_ideal"]),
        "fhdp_vs_link_aware_bound": _goal(_ratio(a, ideal["link_aware_bound"]["samples_per_s"]),
                                          GOALS["fhdp_vs_ideal"]),
        "fhdp_vs_torch_pipelining": _goal(_ratio(a, tpp.get("samples_per_s")), GOALS["fhdp_vs_torch_pipelining"]),
        **codec_goals(modes),
    }
    if every:
        goals.update(every_member_goals(every, standalone["samples_per_s"],
                                        rotation["samples_per_s"] if rotation else None, cfg.encoder))
    if rotation:
        goals["rotation_vs_standalone"] = _goal(_ratio(rotation["samples_per_s"], standalone["samples_per_s"]),
                                                GOALS["fhdp_vs_standalone"])
    out.update({
        "throughput_samples_per_s_emulated": {
            "fhdp_swift": a, "standalone_agx": standalone["samples_per_s"], "random_mean": rand["samples_per_s"],
            "torch_pipelining": tpp.get("samples_per_s"), "ideal_bound": ideal["samples_per_s"],
            "fhdp_rotation": rotation["samples_per_s"] if rotation else None,
            "every_member": {c: r["samples_per_s"] for c, r in every["runs"].items()} if every else None},
        "every_member": every,
        "fhdp_swift": fhdp, "standalone": standalone, "random": rand, "torch_pipelining": tpp, "ideal": ideal,
        "rotation": rotation, "codecs": codecs, "codec_modes": modes, "link_floor": floor,
        "pipeline_floor": pipeline_floor(cfg.cluster, cfg.codecs, traffic, profile, standalone["samples_per_s"]),
        "goals": goals,
        "bench_seconds": round(time.monotonic() - t_start, 1),
    })
    out["conditions"]["loadavg_end"] = list(os.getloadavg())
    return out


def run_floor_only(cfg: BenchConfig) -> dict[str, Any]:
    """`--only floor`: the standalone run and the links' floor (`link_floor`) -- whether pipelining this encoder
    over this cluster's links can pay at all, in about a minute even for the paper-size encoder."""
    from flad_core.fleet import PAPER_PROFILES

    t_start, host, ts, profile = _setup(cfg)
    n_layers = len(profile["layers"])
    swift, swift_pred = swift_pipeline(cfg, profile, None)
    fleet = BenchFleet(cfg, host, ts)
    try:
        agx = max(cfg.cluster, key=lambda x: PAPER_PROFILES[x[1]].tflops)[0]
        standalone = fleet.run([(agx, 0, n_layers)], steps=cfg.steps, n_micro=1)
    finally:
        fleet.close()
    traffic = codec_traffic(cfg.encoder, cfg.data, cfg.data_owner, cfg.codecs)
    swift_cuts = {e for _, _, e in swift[:-1]}
    out: dict[str, Any] = {"conditions": conditions(cfg, host, ts), "layers": n_layers, "only": "floor",
                           "standalone_samples_per_s": standalone["samples_per_s"],
                           "swift_partition": swift.to_json(), **swift_pred,
                           "swift_cut_traffic": [r for r in traffic if r["cut_before"] in swift_cuts],
                           "link_floor": link_floor(cfg.cluster, cfg.codecs, traffic, standalone["samples_per_s"]),
                           "pipeline_floor": pipeline_floor(cfg.cluster, cfg.codecs, traffic, profile,
                                                            standalone["samples_per_s"]),
                           "bench_seconds": round(time.monotonic() - t_start, 1)}
    out["conditions"]["loadavg_end"] = list(os.getloadavg())
    return out


def run_every_member_only(cfg: BenchConfig) -> dict[str, Any]:
    """`--only every-member`: standalone, the rotation over essential pipelines (unless --no-rotation) and the
    fan-in schedule with every member's data, on one emulated cluster and link setting."""
    from flad_core.fleet import PAPER_PROFILES

    t_start, host, ts, profile = _setup(cfg)
    n_layers = len(profile["layers"])
    out: dict[str, Any] = {"conditions": conditions(cfg, host, ts), "layers": n_layers, "only": "every-member"}
    fleet = BenchFleet(cfg, host, ts)
    try:
        agx = max(cfg.cluster, key=lambda x: PAPER_PROFILES[x[1]].tflops)[0]
        standalone = fleet.run([(agx, 0, n_layers)], steps=cfg.steps, n_micro=1)
        standalone["device"] = agx
        rotation = run_rotation(cfg, fleet, profile) if cfg.rotation else None
        every = run_every_member(cfg, fleet, profile, host)
    finally:
        fleet.close()
    out.update({"standalone": standalone, "rotation": rotation, "every_member": every,
                "throughput_samples_per_s_emulated": {
                    "standalone_agx": standalone["samples_per_s"],
                    "fhdp_rotation": rotation["samples_per_s"] if rotation else None,
                    "every_member": {c: r["samples_per_s"] for c, r in every["runs"].items()}},
                "goals": every_member_goals(every, standalone["samples_per_s"],
                                            rotation["samples_per_s"] if rotation else None, cfg.encoder),
                "bench_seconds": round(time.monotonic() - t_start, 1)})
    out["conditions"]["loadavg_end"] = list(os.getloadavg())
    return out


def run_codecs_only(cfg: BenchConfig) -> dict[str, Any]:
    """Only the stage-traffic codec sweep, in both modes (`--only codecs`): bytes and losses are not timing
    figures, so unlike the throughput ratios they do not depend on how loaded the host is."""
    t_start, host, ts, profile = _setup(cfg)
    out: dict[str, Any] = {"conditions": conditions(cfg, host, ts), "layers": len(profile["layers"]),
                           "only": "codecs"}
    fleet = BenchFleet(cfg, host, ts)
    try:
        sweep = run_codec_sweep(cfg, fleet, profile)
    finally:
        fleet.close()
    codecs = codec_table(sweep.get("labels_forward", {}))
    modes = codec_modes({mode: codec_table(r) for mode, r in sweep.items()})
    out.update({"codecs": codecs, "codec_modes": modes, "goals": codec_goals(modes),
                "bench_seconds": round(time.monotonic() - t_start, 1)})
    out["conditions"]["loadavg_end"] = list(os.getloadavg())
    return out


def build_config(args: argparse.Namespace) -> BenchConfig:
    cfg = BenchConfig()
    if args.quick:
        # smoke run: the AGX is not slowed below the host (factor 0.05), so figures are host-bound and meaningless
        cfg = BenchConfig(batch_size=6, n_micro=3, steps=1, warmup=1, codec_steps=2, random_draws=1,
                          rotation=False, agx_factor=0.05, codecs=("fp32", "int8"))
        if getattr(args, "only", None) != "codecs":     # the sweep alone keeps every mode: the modes are its point
            cfg.modes = ("labels_forward", "u_shaped")
        cfg.extra["quick"] = "smoke run: numbers are not meaningful"
    if args.codecs:
        cfg.codecs = tuple(args.codecs)
    if args.modes:
        cfg.modes = tuple(args.modes)
    for name in ("steps", "time_scale", "agx_factor", "batch_size", "n_micro", "codec_steps", "random_draws",
                 "random_steps", "seed", "fanin_budget_s",
                 "data", "schedule", "encoder"):
        v = getattr(args, name, None)
        if v is not None:
            setattr(cfg, name, v)
    if args.no_torch_pipelining:
        cfg.torch_pipelining = False
    if args.no_rotation:
        cfg.rotation = False
    if args.no_every_member:
        cfg.every_member = False
    cfg.link_setting, cfg.radio = args.link_setting, args.radio
    cfg.device = str(resolve_device(args.device))
    if cfg.data != "synthetic" and not (Path(cfg.data) / "manifest.json").exists():
        log.warning("no fleet dataset at %s: using synthetic data (make one with `flad sim collect --out %s`)",
                    cfg.data, cfg.data)
        cfg.data = "synthetic"
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flad bench pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object (always on; kept for the CLI)")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run (seconds-minutes, numbers meaningless)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per throughput configuration")
    parser.add_argument("--codec-steps", type=int, default=None, help="steps per codec run (loss after N steps)")
    parser.add_argument("--device", default="cpu", metavar="auto|cpu|cuda[:N]",
                        help="where every emulated vehicle's stages run (default cpu: the emulation's compute "
                             "dilation is calibrated against this host's CPU)")
    parser.add_argument("--fanin-budget", dest="fanin_budget_s", type=float, default=None, metavar="SECONDS",
                        help="skip (and report) a fan-in codec run whose predicted wall time exceeds SECONDS "
                             "(default 1200; a link-bound fp32 plan of the paper encoder needs hours)")
    parser.add_argument("--time-scale", type=float, default=None, help="emulation time scale (default: auto)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--n-micro", type=int, default=None)
    parser.add_argument("--schedule", choices=("gpipe", "1f1b"), default=None)
    parser.add_argument("--random-draws", type=int, default=None)
    parser.add_argument("--random-steps", type=int, default=None, help="timed steps per random draw (no warm-up)")
    parser.add_argument("--seed", type=int, default=None, help="seed of every configuration (and of the non-IID study)")
    parser.add_argument("--encoder", default=None,
                        help="encoder config: tiny (default) or paper (LMDrive-sized, ~1 s per sample on one core: "
                             "a full run takes tens of minutes; the tiny encoder is link-bound at Table 1's rates)")
    parser.add_argument("--data", default=None, help="fleet dataset root or 'synthetic' (default data/fleet)")
    parser.add_argument("--codecs", nargs="+", choices=BENCH_CODECS, default=None,
                        help=f"codecs to sweep (default: {' '.join(BENCH_CODECS)}; int4ef = int4 with error feedback)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=None,
                        help="stage-traffic modes of the codec sweep (default: all three)")
    parser.add_argument("--only", choices=("codecs", "floor", "every-member", "failures"), default=None,
                        help="run only one part: `codecs` = the codec sweep in both modes (no throughput runs); "
                             "`floor` = standalone + the bytes every cut moves and the bound the links alone set; "
                             "`every-member` = standalone, the rotation and the fan-in schedule; `failures` = "
                             "throughput while vehicles fail at a fixed rate (quick recovery), as a curve")
    parser.add_argument("--failure-intervals", type=float, nargs="+", default=None, metavar="SECONDS",
                        help="the failure curve's settings: one failure per SECONDS emulated seconds (default: "
                             "120 60 30; --quick: 10), each beside a failure-free run")
    parser.add_argument("--failure-duration", type=float, default=None, metavar="SECONDS",
                        help="training time per failure-curve setting (default 360; --quick: 20)")
    parser.add_argument("--no-failures", action="store_true",
                        help="skip the failure curve in the full run (it takes about 4 x --failure-duration)")
    parser.add_argument("--no-every-member", action="store_true",
                        help="skip the fan-in schedule (every member's data at once)")
    parser.add_argument("--link-setting", choices=("table1", "measured"), default="table1",
                        help="emulated link rates: table1 = 50 Mb/s Nano, 100 Mb/s AGX; measured = the paper's "
                             "Table 2 throughput, 14 Mb/s Nano, 22 Mb/s AGX")
    parser.add_argument("--radio", choices=("device", "link"), default="device",
                        help="device (default): all of a vehicle's links and its inbox share one radio (half "
                             "duplex); link: every link gets the full rate (the earlier emulation)")
    parser.add_argument("--agx-factor", type=float, default=None,
                        help="with the auto time scale: how much slower than one host core the fastest device runs")
    parser.add_argument("--no-torch-pipelining", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true", help="progress on stderr")
    parser.add_argument("--no-rotation", action="store_true")
    parser.add_argument("--noniid", action="store_true", help="also run the non-IID study (FHDP vs HDP vs central)")
    parser.add_argument("--noniid-only", action="store_true", help="only the non-IID study")
    parser.add_argument("--noniid-rounds", type=int, default=None)
    parser.add_argument("--noniid-steps", type=int, default=None, help="local steps per pipeline per round")
    parser.add_argument("--noniid-seeds", type=int, nargs="+", default=None, metavar="SEED",
                        help="run the non-IID study once per seed and add a summary (mean, sd, paired FHDP - HDP "
                             "differences); default: the one --seed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s")
    noniid = args.noniid or args.noniid_only
    if noniid and args.data and args.data != "synthetic" and not (Path(args.data) / "manifest.json").exists():
        print(f"flad bench pipeline: no fleet dataset at {args.data} for the non-IID study (make one with "
              f"`flad sim collect --out {args.data}`, or leave out --data to collect the default one)",
              file=sys.stderr)
        return 2
    try:
        cfg = build_config(args)
    except DeviceError as exc:
        print(f"flad bench pipeline: {exc}", file=sys.stderr)
        return 2
    out: dict[str, Any] = {"bench": "pipeline"}
    if args.quick:
        out["quick"] = "smoke run: numbers are not meaningful"
    code = 0
    if args.only == "codecs":
        out.update(run_codecs_only(cfg))
    elif args.only == "floor":
        out.update(run_floor_only(cfg))
    elif args.only == "every-member":
        out.update(run_every_member_only(cfg))
    elif args.only == "failures":
        out["failures"] = run_failures(args, cfg)
        out["goals"] = dict(out["failures"]["goals"])
    elif not args.noniid_only:
        out.update(run_throughput(cfg))
        if not (args.no_failures or args.quick):    # the --quick smoke run leaves it to `--only failures --quick`
            out["failures"] = run_failures(args, cfg)
            out["goals"].update(out["failures"]["goals"])
    if noniid:
        out["noniid"], failed = run_noniid_study(args)
        code = 1 if failed else code
    print(json.dumps(out, default=_json_default))
    return code


def run_failures(args: argparse.Namespace, cfg: BenchConfig) -> dict[str, Any]:
    """The throughput-under-failures curve (flad_bench.pipeline_failures) on this bench's cluster and encoder."""
    from flad_bench.pipeline_failures import FailureCurveConfig, run_failure_curve

    fc = FailureCurveConfig(cluster=cfg.cluster, encoder=cfg.encoder, seed=cfg.seed, batch_size=cfg.batch_size)
    if args.quick:
        fc = FailureCurveConfig(cluster=cfg.cluster, encoder=cfg.encoder, seed=cfg.seed, intervals_s=(10.0,),
                                duration_s=20.0, local_steps=4, cycles=1, extra={"quick": "smoke run: numbers are not "
                                                                                 "meaningful"})
    if args.failure_intervals:
        fc.intervals_s = tuple(args.failure_intervals)
    if args.failure_duration is not None:
        fc.duration_s = args.failure_duration
    fc.__post_init__()        # the CLI's values are checked like the defaults
    return run_failure_curve(fc)


def run_noniid_study(args: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    """The non-IID study, once per seed (summarised when several); and whether any seed failed.

    Without --data it runs on `data/fleet`, collected on demand if missing (with --quick: a small fleet
    collected into a temporary folder, dropped afterwards)."""
    from flad_bench.fleetdata import ensure_fleet
    from flad_bench.pipeline_noniid import NoniidConfig, run_noniid, summarize_seeds
    from flad_sim.dataset import is_fleet_dataset

    ncfg = NoniidConfig(quick=args.quick)
    if args.noniid_rounds is not None:
        ncfg.rounds = args.noniid_rounds
    if args.noniid_steps is not None:
        ncfg.local_steps = args.noniid_steps
    if args.data and args.data != "synthetic":
        ncfg.data = args.data      # e.g. data/fleet-200 for 200 samples per vehicle
    seeds = args.noniid_seeds or [args.seed if args.seed is not None else ncfg.seed]
    per_seed: dict[int, dict[str, Any]] = {}
    failed = False
    with contextlib.ExitStack() as stack:
        if args.quick and not is_fleet_dataset(ncfg.data):
            ncfg.data = str(Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flad-noniid-"))) / "fleet")
            collected = ensure_fleet(ncfg.data, "flad bench pipeline --noniid --quick", vehicles=6, frames=16)
        else:
            collected = ensure_fleet(ncfg.data, "flad bench pipeline --noniid")
        for seed in seeds:   # the seed sets the initial weights and data order of all three configurations
            try:
                ncfg.seed = seed
                per_seed[seed] = run_noniid(ncfg)
            except Exception as exc:
                log.exception("non-IID study failed (seed %d)", seed)
                per_seed[seed] = {"error": f"{type(exc).__name__}: {exc}"}
                failed = True
    if len(seeds) == 1:
        study = per_seed[seeds[0]]
    else:
        study = {"per_seed": per_seed}
        try:
            study["summary"] = summarize_seeds(per_seed)
        except ValueError as exc:
            study["summary"] = {"error": str(exc)}
    if collected:
        study["data_collected"] = {**collected, "root": None if args.quick else collected["root"]}
    return study, failed


def _json_default(o: Any) -> Any:
    if isinstance(o, tuple):
        return list(o)
    return str(o)


if __name__ == "__main__":
    raise SystemExit(main())
