"""Standalone multi-task training and evaluation of the encoder on embedded-world shards (or synthetic data).

AdamW with two parameter groups as in the paper (7.5e-4 general, 3e-4 for the RGB/LiDAR backbones),
weight decay 0.05 and gradient clipping 5 (LMDrive's pretraining settings), linear warm-up then cosine
decay over the step or time budget, whichever ends first. Runs are recorded under `runs/<id>/`.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flad_core.device import (
    autocast,
    check_precision,
    grad_scaler,
    log_device,
    peak_memory_bytes,
    reset_peak_memory,
    resolve_device,
    synchronize,
    to_device,
)
from flad_core.runs import RunDir, seed_everything
from flad_vehicle.encoder.checkpoint import load_checkpoint, save_checkpoint
from flad_vehicle.encoder.config import get_config
from flad_vehicle.encoder.model import LABEL_INPUTS, VisionEncoder, batch_to_torch
from flad_vehicle.encoder.synthetic import synthetic_batches

log = logging.getLogger(__name__)

DEFAULT_DATA = "data/fleet"


@dataclass
class TrainConfig:
    """`flad vehicle train` settings."""

    encoder: str = "tiny"
    data: str = DEFAULT_DATA
    synthetic: bool = False               # use schema-shaped synthetic data instead of shards
    holdout_towns: list[str] = field(default_factory=list)   # empty: the last town of the fleet is held out
    batch_size: int = 8
    steps: int = 300
    minutes: float = 0.0                  # time budget; 0 = only `steps`
    lr: float = 7.5e-4
    backbone_lr: float = 3e-4
    weight_decay: float = 0.05
    grad_clip: float = 5.0
    warmup_steps: int = 20
    min_lr_frac: float = 0.1
    seed: int = 0
    threads: int = 1
    log_every: int = 10
    ckpt_every: int = 0                   # 0: only at the end
    eval_batches: int = 0                 # 0: the whole held-out split
    eval_batch_size: int = 16
    synthetic_eval_samples: int = 256
    progress: bool = True
    resume: str = ""                      # checkpoint to start from
    augment: bool = True                  # photometric camera augmentation (towns differ in weather/lighting)
    device: str = "auto"                  # auto | cpu | cuda[:N] (flad_core.device)
    precision: str = "fp32"               # fp32 | bf16 | fp16 autocast (fp16 with a gradient scaler)

    def validate(self) -> None:
        if self.batch_size < 1 or self.steps < 1 or self.threads < 1:
            raise ValueError("batch_size, steps and threads must be >= 1")
        check_precision(self.precision)


# ------------------------------------------------------------------------------------------------ data


def needed_fields(model: VisionEncoder) -> list[str]:
    return [*model.input_names, *LABEL_INPUTS]


class DataSource:
    """Train/eval batch streams from `data/fleet` shards split by town, or from the synthetic generator."""

    def __init__(self, cfg: TrainConfig, fields: list[str]) -> None:
        self.cfg = cfg
        self.fields = fields
        self.kind = "synthetic" if cfg.synthetic else "fleet"
        self.train_towns: list[str] = []
        self.holdout_towns: list[str] = []
        self.train_shards: list = []
        self.eval_shards: list = []
        if not cfg.synthetic:
            self._open_fleet()

    def _open_fleet(self) -> None:
        from flad_sim.dataset import FleetDataset

        ds = FleetDataset.open(self.cfg.data)
        towns = sorted({t for s in ds.shards.values() for t in s.towns})
        hold = list(self.cfg.holdout_towns) or (towns[-1:] if len(towns) > 1 else [])
        unknown = [t for t in hold if t not in towns]
        if unknown:
            raise ValueError(f"held-out town(s) {unknown} not in the dataset (towns: {towns})")
        self.holdout_towns = hold
        self.train_towns = [t for t in towns if t not in hold]
        for s in ds.select():
            st = set(s.towns)
            if st and st <= set(hold):
                self.eval_shards.append(s)
            elif not st & set(hold):
                self.train_shards.append(s)
            else:
                log.warning("shard %s mixes held-out and training towns %s; left out of both", s.vehicle_id, s.towns)
        if not self.train_shards:
            raise ValueError(f"no training shards in {self.cfg.data} (towns {towns}, held out {hold})")
        self.n_train = sum(len(s) for s in self.train_shards)
        if self.n_train < self.cfg.batch_size:
            raise ValueError(f"only {self.n_train} training samples in {self.cfg.data}, fewer than one batch "
                             f"({self.cfg.batch_size})")
        self.n_eval = sum(len(s) for s in self.eval_shards)
        log.info("data %s: %d training samples (towns %s), %d held-out samples (towns %s)", self.cfg.data,
                 self.n_train, self.train_towns, self.n_eval, hold)

    def train_batches(self) -> Iterator[dict]:
        """Endless numpy batches; a new shuffle per epoch (seed + epoch)."""
        cfg = self.cfg
        if cfg.synthetic:
            yield from synthetic_batches(10**9, cfg.batch_size, seed=cfg.seed + 1)
            return
        from flad_sim.dataset import iter_batches

        for epoch in itertools.count():
            yield from iter_batches(self.train_shards, cfg.batch_size, shuffle=True, seed=cfg.seed + epoch,
                                    drop_last=True, fields=self.fields)

    def train_epoch(self, max_batches: int = 200) -> Iterator[dict]:
        """One unshuffled pass over the training split (synthetic: `max_batches` batches), e.g. for baselines."""
        if self.cfg.synthetic:
            return itertools.islice(self.train_batches(), max_batches)
        from flad_sim.dataset import iter_batches

        return iter_batches(self.train_shards, self.cfg.eval_batch_size, shuffle=False, fields=self.fields)

    def eval_batches(self, limit: int = 0) -> Iterator[dict]:
        cfg = self.cfg
        if cfg.synthetic:
            n = max(1, cfg.synthetic_eval_samples // cfg.eval_batch_size)
            it: Iterable = synthetic_batches(n, cfg.eval_batch_size, seed=cfg.seed + 10_000)
        else:
            from flad_sim.dataset import iter_batches

            it = iter_batches(self.eval_shards, cfg.eval_batch_size, shuffle=False, fields=self.fields)
        return itertools.islice(it, limit) if limit else iter(it)

    def describe(self) -> dict[str, Any]:
        if self.cfg.synthetic:
            return {"kind": "synthetic"}
        return {"kind": "fleet", "root": self.cfg.data, "train_towns": self.train_towns,
                "holdout_towns": self.holdout_towns, "train_samples": self.n_train, "eval_samples": self.n_eval}


# ------------------------------------------------------------------------------------------------ augmentation


def augment_cameras(batch: dict[str, Tensor], gen: torch.Generator, cameras: Iterable[str]) -> dict[str, Tensor]:
    """Per-sample photometric jitter, the same for all cameras of a sample: channel gains (colour cast,
    brightness), contrast, a grey fog blend and sensor noise. Towns differ by weather and lighting, so this
    is what lets the traffic-light head transfer to a held-out town. Geometry is untouched (labels stay valid)."""
    out = dict(batch)
    cams = [c for c in cameras if c in batch]
    B = batch[cams[0]].shape[0]
    gain = 0.55 + 0.9 * torch.rand(B, 1, 1, 3, generator=gen)
    bright = 0.5 + torch.rand(B, 1, 1, 1, generator=gen)
    contrast = 0.6 + 0.8 * torch.rand(B, 1, 1, 1, generator=gen)
    fog = 0.5 * torch.rand(B, 1, 1, 1, generator=gen) * (torch.rand(B, 1, 1, 1, generator=gen) < 0.5)
    noise = 12.0 * torch.rand(B, 1, 1, 1, generator=gen)
    for c in cams:
        x = batch[c].float()
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * contrast + mean
        x = x * gain * bright
        x = x * (1 - fog) + 190.0 * fog
        x = x + noise * torch.randn(x.shape, generator=gen)
        out[c] = x.clamp(0, 255).round().to(torch.uint8)
    return out


# ------------------------------------------------------------------------------------------------ metrics


class Metrics:
    """Accumulates open-loop metrics (docs/architecture.md, "Evaluation definitions"): traffic-light accuracy,
    waypoint L1 / ADE / FDE, BEV IoU."""

    def __init__(self) -> None:
        self.n = 0
        self.tl_correct = 0
        self.l1 = 0.0
        self.ade = 0.0
        self.fde = 0.0
        self.inter = 0
        self.union = 0
        self.loss = 0.0

    def add(self, tl_pred: Tensor, wp_pred: Tensor, bev_pred: Tensor | None, batch: dict[str, Tensor],
            loss: float | None = None) -> None:
        B = int(tl_pred.shape[0])
        wp = batch["waypoints"].float()
        self.n += B
        self.tl_correct += int((tl_pred == batch["tl_state"].long().reshape(-1)).sum())
        self.l1 += float((wp_pred - wp).abs().mean(dim=(1, 2)).sum())
        dist = (wp_pred - wp).norm(dim=-1)
        self.ade += float(dist.mean(dim=1).sum())
        self.fde += float(dist[:, -1].sum())
        if bev_pred is not None:
            gt = batch["bev"] > 0
            self.inter += int((bev_pred & gt).sum())
            self.union += int((bev_pred | gt).sum())
        if loss is not None:
            self.loss += loss * B

    def result(self) -> dict[str, float]:
        n = max(self.n, 1)
        out = {"samples": self.n, "tl_accuracy": self.tl_correct / n, "wp_l1": self.l1 / n, "wp_ade": self.ade / n,
               "wp_fde": self.fde / n, "bev_iou": (self.inter / self.union) if self.union else 0.0}
        if self.loss:
            out["loss"] = self.loss / n
        return out


@torch.no_grad()
def evaluate(model: VisionEncoder, batches: Iterable[dict]) -> dict[str, float]:
    """Open-loop metrics of `model` over numpy or torch batches."""
    was = model.training
    model.eval()
    m = Metrics()
    names = tuple(needed_fields(model))
    dev = model.device
    for b in batches:
        tb = batch_to_torch(b, names)
        out = {k: v.float().cpu() for k, v in model.forward_train(to_device(tb, dev)).items()}
        m.add(out["pred.tl"].argmax(-1), out["pred.waypoints"], out["pred.bev"] > 0, tb, float(out["loss"]))
    model.train(was)
    return m.result()


def baseline_metrics(train: Iterable[dict], evaluation: Iterable[dict]) -> dict[str, Any]:
    """Majority-class traffic light and constant (training-mean) waypoints, scored on `evaluation`."""
    counts = np.zeros(4, np.int64)
    wp_sum, n = np.zeros((5, 2), np.float64), 0
    for b in train:
        counts += np.bincount(np.asarray(b["tl_state"]).reshape(-1), minlength=4)[:4]
        wp_sum += np.asarray(b["waypoints"], np.float64).sum(axis=0)
        n += len(b["tl_state"])
    majority = int(counts.argmax())
    mean_wp = torch.from_numpy((wp_sum / max(n, 1)).astype(np.float32))
    m = Metrics()
    for b in evaluation:
        tb = batch_to_torch(b, ("tl_state", "waypoints", "bev"))
        B = tb["tl_state"].shape[0]
        m.add(torch.full((B,), majority), mean_wp.expand(B, -1, -1), torch.zeros_like(tb["bev"], dtype=torch.bool), tb)
    res = m.result()
    res.update({"majority_class": majority, "train_tl_counts": counts.tolist(), "mean_waypoints": mean_wp.tolist()})
    return res


# ------------------------------------------------------------------------------------------------ training


def make_optimizer(model: VisionEncoder, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.param_groups(cfg.lr, cfg.backbone_lr, cfg.weight_decay), eps=1e-8)


def lr_factor(step: int, cfg: TrainConfig, elapsed_s: float) -> float:
    """Linear warm-up, then cosine to `min_lr_frac` over the step or time budget (whichever is further)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.minutes > 0:
        frac = max(frac, elapsed_s / (cfg.minutes * 60.0))
    frac = min(1.0, frac)
    return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac))


def train(cfg: TrainConfig, run: RunDir | None = None, checkpoint: str | Path | None = None,
          source: DataSource | None = None, on_step: Callable[[int, dict], None] | None = None
          ) -> dict[str, Any]:
    """Trains until `cfg.steps` or `cfg.minutes`; returns figures (throughput, losses, eval, checkpoint path)."""
    cfg.validate()
    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    dev = resolve_device(cfg.device)
    info = log_device("encoder training", dev)
    if cfg.resume:
        model, meta = load_checkpoint(cfg.resume, device=dev)
        start_step = meta["step"]
    else:
        model, start_step = VisionEncoder(get_config(cfg.encoder), device=dev), 0
    model.train()
    scaler = grad_scaler(dev, cfg.precision)
    reset_peak_memory(dev)
    source = source or DataSource(cfg, needed_fields(model))
    opt = make_optimizer(model, cfg)
    base_lrs = [g["lr"] for g in opt.param_groups]
    names = tuple(needed_fields(model))
    ckpt_path = Path(checkpoint) if checkpoint else (run.path / "encoder.safetensors" if run else None)
    from tqdm import tqdm

    total = None if (cfg.minutes and cfg.steps >= 10**6) else cfg.steps
    budget = " or ".join(([f"{cfg.steps} steps"] if total else []) + ([f"{cfg.minutes:g} min"] if cfg.minutes else []))
    bar = tqdm(total=total, desc=f"train {model.cfg.name} ({budget})", unit="step", disable=not cfg.progress)
    t0 = time.perf_counter()
    losses: list[float] = []
    step = start_step
    samples = 0
    train_time = 0.0
    it = source.train_batches()
    gen = torch.Generator().manual_seed(cfg.seed + 12345)
    for i in range(cfg.steps):
        elapsed = time.perf_counter() - t0
        if cfg.minutes and elapsed >= cfg.minutes * 60:
            break
        b = next(it)
        ts = time.perf_counter()
        tb = batch_to_torch(b, names)
        if cfg.augment:   # on the host, with the seeded CPU generator: the same noise on every device
            tb = augment_cameras(tb, gen, model.cfg.cameras)
        tb = to_device(tb, dev)
        f = lr_factor(i, cfg, elapsed)
        for g, lr in zip(opt.param_groups, base_lrs, strict=True):
            g["lr"] = lr * f
        with autocast(dev, cfg.precision):
            out = model.forward_train(tb)
        opt.zero_grad(set_to_none=True)
        scaler.scale(out["loss"]).backward()
        scaler.unscale_(opt)      # clip the true gradients (a no-op unless fp16)
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        scaler.step(opt)
        scaler.update()
        synchronize(dev)          # the step's time includes its queued GPU work
        train_time += time.perf_counter() - ts
        step += 1
        samples += len(tb["speed"])
        rec = {"step": step, "loss": out["loss"].item(), "loss_bev": out["loss.bev"].item(),
               "loss_tl": out["loss.tl"].item(), "loss_wp": out["loss.wp"].item(), "grad_norm": gnorm,
               "lr": opt.param_groups[1]["lr"], "elapsed_s": round(time.perf_counter() - t0, 3)}
        losses.append(rec["loss"])
        if run is not None and (step % cfg.log_every == 0 or i == 0):
            run.log_metrics(rec)
        if on_step is not None:
            on_step(step, rec)
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", tl=f"{rec['loss_tl']:.3f}", wp=f"{rec['loss_wp']:.3f}")
        if ckpt_path and cfg.ckpt_every and step % cfg.ckpt_every == 0:
            save_checkpoint(ckpt_path, model, step, {"train": _cfg_dict(cfg)})
    bar.close()
    wall = time.perf_counter() - t0
    result: dict[str, Any] = {
        "steps": step - start_step, "final_step": step, "samples": samples, "wall_s": round(wall, 2),
        "train_samples_per_s": round(samples / train_time, 2) if train_time else 0.0,
        "first_loss": losses[0] if losses else None,
        "last_loss_mean10": float(np.mean(losses[-10:])) if losses else None,
        "data": source.describe(), "threads": cfg.threads, "batch_size": cfg.batch_size,
        "device": info, "precision": cfg.precision, "peak_device_memory_bytes": peak_memory_bytes(dev),
    }
    if ckpt_path:
        save_checkpoint(ckpt_path, model, step, {"train": _cfg_dict(cfg)})
        result["checkpoint"] = str(ckpt_path)
    result["model"] = model
    return result


def _cfg_dict(cfg: TrainConfig) -> dict[str, Any]:
    from flad_core.config import to_dict

    return to_dict(cfg)
