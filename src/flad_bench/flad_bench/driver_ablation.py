"""`flad bench llm --ablation`: which of target point / instructions / noise injection / DAgger moves the LLM
driver's driving score, and by how much.

Every variant is a CELLAdapt model of one architecture (`--ablation-model`: the ADM's `student` preset by
default, the AD-LLM's `teacher` preset on request) trained from scratch on ground-truth waypoints with the same
budget (steps, batch, seed) on the features of the same encoder, then driven in process on the same seeded
held-out routes:

  instructions_only     LMDrive's inputs: instruction + notice text, no target point (`navigation=False`)
  target_point          instruction + notice + the route's target point (the default model)
  target_point_no_text  target point only; instruction and notice replaced by one fixed text
  plus_noise            target_point, trained also on noise-injection frames (`flad_sim.onpolicy`, mode noise)
  plus_dagger           target_point, trained also on DAgger frames: `target_point` drives in the training towns,
                        the expert labels the states it visits (one DAgger iteration, beta 0)

On-policy frames are collected in the training towns only (never the held-out ones), labelled with the expert's
plan from the visited state.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

VARIANTS = ("instructions_only", "target_point", "target_point_no_text", "plus_noise", "plus_dagger")
FIXED_TEXT = "drive"

_W: dict[str, Any] = {}


def _blank_text(data: Any) -> Any:
    from dataclasses import replace

    return replace(data, instructions=[FIXED_TEXT] * len(data), notices=[""] * len(data))


def _train_variant(name: str, data: Any, steps: int, batch: int, out: Path, navigation: bool = True,
                   preset: str = "student") -> dict[str, Any]:
    from flad_edge.celladapt.model import ADLLM, PRESETS
    from flad_edge.celladapt.train import FitConfig, fit

    cfg = PRESETS[preset]()
    cfg.navigation = navigation
    cfg.name = f"{preset}-{name}"
    model = ADLLM.build(cfg)
    t0 = time.perf_counter()
    r = fit(model, data, FitConfig(steps=steps, batch_size=batch, lr=1e-3, seed=0))
    model.save_pretrained(out)
    return {"model_dir": str(out), "preset": preset, "frames": len(data), "steps": r["steps"], "batch_size": batch,
            "minutes": round((time.perf_counter() - t0) / 60, 2), "last_loss": round(r["last_loss_mean10"], 4)}


def _collect(out: Path, op: Any, towns: list[str], frames: int, workers: int) -> dict[str, Any]:
    from flad_sim.dataset import CollectConfig, collect, is_fleet_dataset
    from flad_sim.onpolicy import OnPolicySource

    if is_fleet_dataset(out):
        return {"root": str(out), "reused": True}
    vehicles = max(len(towns), 2 * workers)
    cfg = CollectConfig(out=str(out), vehicles=vehicles, frames_per_vehicle=max(1, frames // vehicles), towns=towns,
                        workers=workers, record_every=10, seed=11)
    t0 = time.perf_counter()
    m = collect(cfg, source=OnPolicySource(op), progress=False)
    return {"root": str(out), "frames": m["total"], "seconds": round(time.perf_counter() - t0, 1),
            "onpolicy": m.get("onpolicy")}


def _make_variant_agent(name: str, world: Any, plan_every: int, encoder_ckpt: str, dirs: dict[str, str]) -> Any:
    from flad_edge.celladapt.agents import adllm_agent

    agent = adllm_agent(encoder_ckpt, dirs[name], plan_every)
    if name == "target_point_no_text":       # trained without the text: driven without it
        inner = agent.source

        def source(f: torch.Tensor, instruction: str, notice: str, tp: np.ndarray) -> np.ndarray:
            return inner(f, FIXED_TEXT, "", tp)

        agent.source = source
    return agent, False


def _worker(job: tuple, encoder_ckpt: str, dirs: dict[str, str], plan_every: int, lo: float, hi: float,
            per_town: int, bag_dir: str) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING)
    from flad_bench.driving import run_route

    return run_route(job, lambda a, w: _make_variant_agent(a, w, plan_every, encoder_ckpt, dirs), bag_dir, False,
                     plan_every, lo, hi, per_town)


def run_ablation(args: Any, run_path: Path, encoder_ckpt: str, data: Any, train_towns: list[str],
                 held_out_towns: list[str], drive_towns: list[str], cache_dir: str) -> dict[str, Any]:
    """Trains the variants, collects the on-policy frames, drives every variant; returns the table."""
    from flad_bench.driving import evaluate_agents
    from flad_edge.celladapt.data import cached_features, concat_feature_sets
    from flad_sim.onpolicy import OnPolicyConfig
    from flad_vehicle.control.learners import shared_encoder

    root = run_path / "ablation"
    steps, batch = args.ablation_steps, args.ablation_batch
    train_variant = partial(_train_variant, steps=steps, batch=batch, preset=args.ablation_model)
    train = data.select(exclude_towns=held_out_towns)
    encoder = shared_encoder(encoder_ckpt)
    out: dict[str, Any] = {"model": args.ablation_model, "variants": {}, "data": {"expert_frames": len(train)}}
    v = out["variants"]
    v["instructions_only"] = train_variant("instructions_only", train, out=root / "instructions_only",
                                           navigation=False)
    v["target_point"] = train_variant("target_point", train, out=root / "target_point")
    v["target_point_no_text"] = train_variant("target_point_no_text", _blank_text(train),
                                              out=root / "target_point_no_text")
    noise_dir = Path(args.ablation_data) / "noise" if args.ablation_data else root / "data" / "noise"
    out["data"]["noise"] = _collect(noise_dir, OnPolicyConfig(mode="noise"), train_towns, args.onpolicy_frames,
                                    args.workers)
    noise = cached_features(encoder, noise_dir, encoder_ckpt, cache_dir)
    v["plus_noise"] = train_variant("plus_noise", concat_feature_sets([train, noise]), out=root / "plus_noise")
    dagger_dir = root / "data" / "dagger"
    op = OnPolicyConfig(mode="dagger", learner="flad_edge.celladapt.agents:adllm_agent", beta=0.0,
                        learner_kwargs={"checkpoint": str(Path(encoder_ckpt).resolve()),
                                        "model_dir": str(Path(v["target_point"]["model_dir"]).resolve()),
                                        "plan_every": args.plan_every})
    out["data"]["dagger"] = _collect(dagger_dir, op, train_towns, args.onpolicy_frames, args.workers)
    dagger = cached_features(encoder, dagger_dir, encoder_ckpt, cache_dir)
    v["plus_dagger"] = train_variant("plus_dagger", concat_feature_sets([train, dagger]), out=root / "plus_dagger")
    dirs = {k: str(Path(x["model_dir"]).resolve()) for k, x in v.items()}
    worker = partial(_worker, encoder_ckpt=str(Path(encoder_ckpt).resolve()), dirs=dirs, plan_every=args.plan_every,
                     lo=args.route_min_m, hi=args.route_max_m, per_town=args.ablation_routes_per_town,
                     bag_dir="" if args.no_bags else str(root / "routes"))
    cl = evaluate_agents(worker, VARIANTS, drive_towns, args.ablation_routes_per_town, args.route_min_m,
                         args.route_max_m, args.workers)
    base = cl["agents"]["instructions_only"]["ds"]
    ref = cl["agents"]["target_point"]["ds"]
    table = []
    for name in VARIANTS:
        a = cl["agents"][name]
        table.append({"variant": name, "ds": a["ds"], "ds_ci95": a["ds_ci95"], "rc": a["rc"], "is": a["is"],
                      "route_deviations": a["statuses"].get("route_deviation", 0), "n_routes": a["n_routes"],
                      "ds_minus_instructions_only": round(a["ds"] - base, 2),
                      "ds_minus_target_point": round(a["ds"] - ref, 2)})
    out["table"] = table
    out["closed_loop"] = cl
    return out
