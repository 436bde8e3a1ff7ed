"""Non-IID study of `flad bench pipeline --noniid`: FHDP vs traditional HDP vs centralised training.

Town-split data (one town per vehicle, `flad sim collect`): a 3-vehicle cluster (2 Jetson Nano + 1 AGX
profiles) whose members drive Town01, Town02 and Town03; the model is scored on held-out towns
(Town04-Town06) that no configuration trains on.

* FHDP: the real multi-process path -- this process runs the edge (`flad_edge.fhdp.run.run_training`, one
  cluster = one FL client, FedAvg per round), the vehicles are `flad_vehicle.fhdp.worker` processes on
  loopback ZeroMQ; the cluster rotates over its essential pipelines, so every member's data trains.
* FHDP fan-in: the same path with `FhdpConfig.cluster_schedule = "fanin"`: every member's data in every step,
  local_steps steps of members x batch_size per round (the rotation's samples in a third of its steps).
* HDP: the same path with `FhdpConfig.rotate = False`: only the first pipeline runs (only v000's data,
  Town01), for members x local_steps steps per round.
* Centralised: one process, whole model, the cluster's pooled data (all three towns, shuffled).

Fairness: the same initial weights (seed), optimizer (AdamW with the paper's two learning rates, weight decay
0.05, global-norm clip 5, constant LR), batch size, and the same number of optimizer steps and samples
(rounds x members x local_steps steps of `batch_size`). Emulation does not matter for accuracy: time_scale is
tiny, so no dilation or shaping slows the run.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CLUSTER = (("v000", "jetson_nano"), ("v001", "jetson_nano"), ("v002", "jetson_agx"))


@dataclass
class NoniidConfig:
    data: str = "data/fleet"
    rounds: int = 3
    local_steps: int = 10           # per essential pipeline per round (FHDP); HDP runs members x this
    batch_size: int = 8
    n_micro: int = 2
    holdout_towns: tuple[str, ...] = ("Town04", "Town05", "Town06")
    eval_samples: int = 480
    seed: int = 7
    quick: bool = False

    def __post_init__(self) -> None:
        if self.quick:
            self.rounds, self.local_steps, self.eval_samples = 1, 2, 64

    @property
    def total_steps(self) -> int:
        return self.rounds * len(CLUSTER) * self.local_steps


def _fleet(cfg: NoniidConfig):
    from flad_core.fleet import VehicleSpec, load_fleet, with_port_base
    from flad_core.procs import free_port_base
    from flad_core.roles import default_fleet_path

    base = load_fleet(default_fleet_path())
    vehicles = [VehicleSpec(id=v, profile=p, control=f"tcp://127.0.0.1:{7200 + 2 * i}",
                            data=f"tcp://127.0.0.1:{7201 + 2 * i}") for i, (v, p) in enumerate(CLUSTER)]
    fleet = dataclasses.replace(base, vehicles=vehicles, seed=cfg.seed)
    return with_port_base(fleet, free_port_base(40))


def train_pipelined(cfg: NoniidConfig, rotate: bool, workdir: Path, schedule: str = "rotation"):
    """FHDP (rotate; the rotation or, with `schedule="fanin"`, the fan-in schedule) or HDP (no rotation) over real
    vehicle processes; returns (model, round summaries)."""
    import yaml
    from rich.console import Console

    from flad_core.config import to_dict
    from flad_core.procs import ProcessGroup, python_module_cmd
    from flad_core.runs import RunDir
    from flad_core.weights import from_bytes
    from flad_edge.fhdp.config import FhdpConfig
    from flad_edge.fhdp.run import run_training
    from flad_vehicle.encoder.config import get_config
    from flad_vehicle.encoder.model import VisionEncoder

    fleet = _fleet(cfg)
    name = ("fhdp" if schedule == "rotation" else f"fhdp-{schedule}") if rotate else "hdp"
    run = RunDir.create(f"noniid-{name}", None, root=workdir)
    fleet_file = run.path / "fleet.yaml"
    fleet_file.write_text(yaml.safe_dump(to_dict(fleet), sort_keys=False))
    fcfg = FhdpConfig(rounds=cfg.rounds, local_steps=cfg.local_steps, batch_size=cfg.batch_size, n_micro=cfg.n_micro,
                      time_scale=1e-4, clusters=[[v for v, _ in CLUSTER]], seed=cfg.seed, rotate=rotate,
                      round_deadline_s=400.0, cluster_schedule=schedule)
    console = Console(file=io.StringIO(), width=120)
    with ProcessGroup(grace_s=5.0) as group:
        for v, _ in CLUSTER:
            group.start(v, python_module_cmd("flad_vehicle.fhdp.worker", "--fleet", str(fleet_file), "--id", v,
                                             "--data", cfg.data, "--run-dir", str(run.path), "--log-level", "WARNING"),
                        log_path=run.path / f"vehicle-{v}.stderr")
        summaries = run_training(fleet, fcfg, run, console)
        for v, _ in CLUSTER:
            group.wait(v, timeout=20)
    model = VisionEncoder(get_config("tiny"))
    state = from_bytes((run.path / "global_encoder.safetensors").read_bytes())
    model.load_state_dict(state)
    return model, summaries


def train_central(cfg: NoniidConfig, train_shards: list, steps: int):
    """The whole model in this process on the cluster's pooled data, same optimizer and budget."""
    import torch

    from flad_sim.dataset import iter_batches
    from flad_vehicle.encoder.config import get_config
    from flad_vehicle.encoder.model import VisionEncoder, batch_to_torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(cfg.seed)
        model = VisionEncoder(get_config("tiny"))
        model.train()
        opt = torch.optim.AdamW(model.param_groups(7.5e-4, 3e-4, 0.05), eps=1e-8)
        losses = []

        def batches():
            for epoch in itertools.count():
                yield from iter_batches(train_shards, cfg.batch_size, shuffle=True, seed=cfg.seed + epoch,
                                        drop_last=True)

        it = batches()
        for _ in range(steps):
            b = batch_to_torch(next(it))
            out = model.forward_train(b)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            losses.append(float(out["loss"].detach()))
    finally:
        torch.set_num_threads(threads)
    return model, losses


def run_noniid(cfg: NoniidConfig) -> dict[str, Any]:
    from flad_sim.dataset import FleetDataset, iter_batches
    from flad_vehicle.encoder.config import get_config
    from flad_vehicle.encoder.model import VisionEncoder
    from flad_vehicle.encoder.train import baseline_metrics, evaluate

    t0 = time.monotonic()
    ds = FleetDataset.open(cfg.data)
    members = [v for v, _ in CLUSTER]
    train_shards = [ds.shards[v] for v in members]
    eval_shards = [s for s in ds.shards.values() if set(s.towns) and set(s.towns) <= set(cfg.holdout_towns)]
    if not eval_shards:
        raise ValueError(f"no held-out shards for towns {cfg.holdout_towns} in {cfg.data}")

    def eval_batches():
        n = max(1, cfg.eval_samples // 32)
        return itertools.islice(iter_batches(eval_shards, 32, shuffle=True, seed=123), n)

    import torch

    results: dict[str, Any] = {}
    torch.manual_seed(cfg.seed)
    results["initial"] = evaluate(VisionEncoder(get_config("tiny")), eval_batches())
    base = baseline_metrics(iter_batches(train_shards, 32, shuffle=False), eval_batches())
    results["majority_baseline"] = {k: base[k] for k in ("tl_accuracy", "wp_l1", "samples", "majority_class")}
    timings = {}
    with tempfile.TemporaryDirectory(prefix="flad-noniid-") as tmp:
        for name, rotate, schedule in (("fhdp", True, "rotation"), ("fhdp_fanin", True, "fanin"),
                                       ("hdp", False, "rotation")):
            ts = time.monotonic()
            model, summaries = train_pipelined(cfg, rotate, Path(tmp), schedule)
            timings[name] = round(time.monotonic() - ts, 1)
            results[name] = {**evaluate(model, eval_batches()),
                             "samples_trained": sum(s["samples"] for s in summaries),
                             "train_loss_per_round": [round(s["train_loss"], 4) for s in summaries]}
    ts = time.monotonic()
    model, losses = train_central(cfg, train_shards, cfg.total_steps)
    timings["central"] = round(time.monotonic() - ts, 1)
    results["central"] = {**evaluate(model, eval_batches()), "samples_trained": cfg.total_steps * cfg.batch_size,
                          "train_loss_last10": sum(losses[-10:]) / len(losses[-10:])}
    return {
        "setup": {"cluster": [{"vehicle": v, "profile": p, "towns": ds.shards[v].towns, "samples": len(ds.shards[v])}
                              for v, p in CLUSTER],
                  "holdout_towns": list(cfg.holdout_towns), "eval_samples": results["initial"]["samples"],
                  "rounds": cfg.rounds, "local_steps_per_pipeline": cfg.local_steps, "batch_size": cfg.batch_size,
                  "n_micro": cfg.n_micro, "optimizer_steps_each": cfg.total_steps,
                  "samples_each": cfg.total_steps * cfg.batch_size, "seed": cfg.seed,
                  "fhdp_hdp_path": "real: edge in this process (run_training), 3 vehicle worker processes, ZeroMQ",
                  "hdp": "FhdpConfig.rotate=False: only the first pipeline (v000 = Town01 data) runs, "
                         "members x local_steps steps per round",
                  "fhdp_fanin": "FHDP with cluster_schedule fanin on the same real path: every member's data "
                                "in every step (each member's replica of the raw-input layers on its own town, "
                                "SWIFT's trunk), local_steps steps of members x batch_size a round: the same "
                                "samples as FHDP in a third of the optimizer steps",
                  "central": "one process, whole model, pooled Town01-03 data, same optimizer and step budget"},
        "results": results,
        "metrics": {k: {"tl_accuracy": results[k]["tl_accuracy"], "wp_l1": results[k]["wp_l1"]}
                    for k in ("fhdp", "fhdp_fanin", "hdp", "central", "initial", "majority_baseline")},
        "seconds": timings, "total_seconds": round(time.monotonic() - t0, 1),
    }


def summarize_seeds(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Across seeds: mean, sd, min and max of each configuration's held-out metrics, and the paired
    (same seed, same initial weights) differences FHDP - HDP and FHDP - centralised; lower is better for
    `wp_l1` and `loss`, higher for `tl_accuracy`."""
    import statistics

    ok = {seed: r for seed, r in per_seed.items() if "results" in r}
    if not ok:
        raise ValueError("no seed of the non-IID study finished")
    metrics = ("tl_accuracy", "wp_l1", "loss")

    def stats(values: list[float]) -> dict[str, float]:
        return {"mean": round(statistics.fmean(values), 4),
                "sd": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
                "min": round(min(values), 4), "max": round(max(values), 4)}

    out: dict[str, Any] = {"seeds": sorted(ok), "failed_seeds": sorted(set(per_seed) - set(ok))}
    names = [n for n in ("fhdp", "fhdp_fanin", "hdp", "central") if all(n in r["results"] for r in ok.values())]
    for name in names:
        out[name] = {m: stats([r["results"][name][m] for r in ok.values()]) for m in metrics}
    out["majority_tl"] = stats([r["results"]["majority_baseline"]["tl_accuracy"] for r in ok.values()])
    for mine in [n for n in ("fhdp", "fhdp_fanin") if n in names]:
        for other in ("hdp", "central"):
            diffs = {m: [r["results"][mine][m] - r["results"][other][m] for r in ok.values()] for m in metrics}
            better = {"tl_accuracy": sum(d > 0 for d in diffs["tl_accuracy"]),
                      "wp_l1": sum(d < 0 for d in diffs["wp_l1"]), "loss": sum(d < 0 for d in diffs["loss"])}
            out[f"{mine}_minus_{other}"] = {m: {**stats(diffs[m]), "fhdp_better_in": f"{better[m]}/{len(ok)}"}
                                            for m in metrics}
    if "fhdp_fanin" in names:
        tl_hdp = [r["results"]["fhdp_fanin"]["tl_accuracy"] - r["results"]["hdp"]["tl_accuracy"] for r in ok.values()]
        tl_central = out["fhdp_fanin_minus_central"]["tl_accuracy"]["mean"]
        out["goals"] = {
            "fanin_tl_ge_hdp_every_seed": {"value": [round(d, 4) for d in tl_hdp], "met": all(d >= 0 for d in tl_hdp)},
            "fanin_tl_within_3_points_of_central": {"value": tl_central, "target": -0.03,
                                                   "met": tl_central >= -0.03}}
    return out

