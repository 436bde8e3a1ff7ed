"""CELLAdapt training: supervised waypoint L1, LoRA fine-tuning at the edge, and teacher → student distillation.

The paper (§5.2): the cloud distils a general LLM into the AD-LLM; the edge LoRA-fine-tunes the AD-LLM on
its own vehicles' features (region-specific) and distils it into a compact ADM with an L1 loss between
teacher and student waypoints. Here the student loss is `alpha · L1(student, teacher) + (1 − alpha) ·
L1(student, ground truth)`; alpha = 1 is the paper's pure distillation.

`FitConfig.device` says where a phase trains (flad_core.device; `auto`: CUDA when present) and `precision`
whether it autocasts (bf16, or fp16 with a gradient scaler). `fit` moves the student and the teacher there for
the phase, keeps the optimizer state and every batch there, and hands the models back where it found them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

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
)
from flad_edge.celladapt.data import FeatureSet
from flad_edge.celladapt.model import ADLLM

log = logging.getLogger(__name__)


@dataclass
class FitConfig:
    """One training phase (supervised, LoRA or distillation)."""

    steps: int = 200
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    warmup_steps: int = 10
    alpha: float = 0.5           # distillation: weight of L1 to the teacher (1 - alpha: to ground truth)
    eoi_weight: float = 0.1      # end-of-instruction flag: weight of its BCE (ground truth; 0 = untrained)
    seconds: float = 0.0         # time budget; 0 = steps only
    seed: int = 0
    log_every: int = 20
    device: str = "auto"         # where the phase trains: auto | cpu | cuda[:N] (flad_core.device)
    precision: str = "fp32"      # fp32 | bf16 | fp16 autocast (fp16 with a gradient scaler)


@dataclass
class LoraSettings:
    """peft LoRA on the LLM's attention projections."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


def waypoint_l1(pred: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error over waypoints and coordinates (metres)."""
    return (pred - target).abs().mean()


def distill_loss(student_wp: Tensor, teacher_wp: Tensor, gt_wp: Tensor | None = None, alpha: float = 1.0
                 ) -> Tensor:
    """L1 between student and (detached) teacher waypoints, plus (1 − alpha) · L1 to the ground truth."""
    loss = alpha * waypoint_l1(student_wp, teacher_wp.detach())
    if gt_wp is not None and alpha < 1.0:
        loss = loss + (1.0 - alpha) * waypoint_l1(student_wp, gt_wp)
    return loss


def batch_to(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device` (texts stay as they are; tensors already there are not copied)."""
    return {k: v.to(device, non_blocking=device.type == "cuda") if isinstance(v, Tensor) else v
            for k, v in batch.items()}


def _forward(model: ADLLM, batch: dict) -> dict[str, Tensor]:
    ids, mask = model.encode_text(batch["instruction"], batch.get("notice"))
    return model(batch["features"], ids, mask, batch.get("target_point"))


def eoi_loss(end_logit: Tensor, eoi: Tensor, pos_weight: float = 1.0) -> Tensor:
    """BCE of the end-of-instruction flag; `pos_weight` offsets how rare completions are."""
    return torch.nn.functional.binary_cross_entropy_with_logits(
        end_logit, eoi.to(end_logit.dtype),
        pos_weight=torch.tensor(pos_weight, dtype=end_logit.dtype, device=end_logit.device))


def train_step(model: ADLLM, batch: dict, opt: torch.optim.Optimizer, grad_clip: float = 1.0,
               teacher: ADLLM | None = None, alpha: float = 1.0, eoi_weight: float = 0.0,
               eoi_pos_weight: float = 1.0, precision: str = "fp32",
               scaler: torch.amp.GradScaler | None = None) -> dict[str, float]:
    """One optimiser step: waypoint L1 to ground truth, or (with `teacher`) the distillation loss; plus
    `eoi_weight` x the end-of-instruction BCE (to ground truth) when the batch has `eoi` labels. The batch goes
    to the model's device; the forward passes autocast to `precision` and the losses are taken in fp32."""
    model.train()
    dev = model.device
    batch = batch_to(batch, dev)
    with autocast(dev, precision):
        out = _forward(model, batch)
        t_wp = None
        if teacher is not None:
            with torch.no_grad():
                t_wp = _forward(teacher, batch)["waypoints"]
    wp = out["waypoints"].float()
    gt = batch["waypoints"]
    loss = distill_loss(wp, t_wp.float(), gt, alpha) if t_wp is not None else waypoint_l1(wp, gt)
    rec: dict[str, float] = {}
    if eoi_weight > 0 and batch.get("eoi") is not None and model.end_head.weight.requires_grad:
        e = eoi_loss(out["end_logit"].float(), batch["eoi"], eoi_pos_weight)
        loss = loss + eoi_weight * e
        rec["eoi_bce"] = float(e.detach())
    opt.zero_grad(set_to_none=True)
    params = [p for p in model.parameters() if p.requires_grad]
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)          # clip the true gradients (a no-op unless the scaler is enabled)
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
        opt.step()
    return {"loss": loss.item(), "l1_gt": float(waypoint_l1(wp.detach(), gt)), "grad_norm": gnorm, **rec}


def make_optimizer(model: ADLLM, cfg: FitConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def fit(model: ADLLM, data: FeatureSet, cfg: FitConfig, teacher: ADLLM | None = None,
        on_log: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Trains `model` for `cfg.steps` (or `cfg.seconds`); warm-up then cosine learning rate. The phase runs on
    `cfg.device` (student, teacher, optimizer state, batches); the models go back to where they were after."""
    check_precision(cfg.precision)
    dev = resolve_device(cfg.device)
    info = log_device("CELLAdapt training", dev)
    torch.manual_seed(cfg.seed)
    homes = [(m, m.device) for m in (model, teacher) if m is not None]
    for m, _ in homes:
        m.to(dev)
    if teacher is not None:
        teacher.eval()
    opt = make_optimizer(model, cfg)
    scaler = grad_scaler(dev, cfg.precision)
    reset_peak_memory(dev)
    it = data.endless(cfg.batch_size, seed=cfg.seed)
    pos_weight = 1.0
    if data.eoi is not None and len(data):
        p = float(data.eoi.mean())      # completions are rare: weigh positives by the negative/positive ratio
        pos_weight = min(max((1 - p) / p, 1.0), 20.0) if p > 0 else 1.0
    t0 = time.perf_counter()
    losses: list[float] = []
    step = 0
    for step in range(1, cfg.steps + 1):
        if cfg.seconds and time.perf_counter() - t0 > cfg.seconds:
            step -= 1
            break
        if step <= cfg.warmup_steps:
            f = step / max(1, cfg.warmup_steps)
        else:
            frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
            f = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))
        for g in opt.param_groups:
            g["lr"] = cfg.lr * f
        rec = train_step(model, next(it), opt, cfg.grad_clip, teacher, cfg.alpha, cfg.eoi_weight, pos_weight,
                         cfg.precision, scaler)
        losses.append(rec["loss"])
        if on_log is not None and (step % cfg.log_every == 0 or step == 1):
            on_log({"step": step, **rec, "lr": cfg.lr * f, "elapsed_s": round(time.perf_counter() - t0, 2)})
    model.eval()
    wall = round(time.perf_counter() - t0, 2)
    peak = peak_memory_bytes(dev)
    for m, home in homes:
        m.to(home)
    return {"steps": step, "wall_s": wall, "first_loss": losses[0] if losses else None,
            "last_loss_mean10": sum(losses[-10:]) / max(1, len(losses[-10:])), "device": info,
            "precision": cfg.precision, "peak_device_memory_bytes": peak}


#: a sample counts as "moving" for the progress ratio when its ground-truth last waypoint is this far (m)
MOVING_M = 2.0


def waypoint_metrics(pred: Tensor, gt: Tensor) -> dict[str, float | None]:
    """Open-loop L1 / ADE / FDE (metres; docs/architecture.md, "Evaluation definitions") and the progress ratio:
    mean distance of the last predicted waypoint over the ground truth's, on moving samples (< 1: the model
    plans too slowly, which in closed loop means route timeouts rather than a visible L1 error)."""
    d = (pred - gt).norm(dim=-1)
    n = max(len(gt), 1)
    moving = gt[:, -1].norm(dim=-1) > MOVING_M
    ratio = (float(pred[moving, -1].norm(dim=-1).mean() / gt[moving, -1].norm(dim=-1).mean())
             if bool(moving.any()) else None)
    return {"samples": len(gt), "wp_l1": float((pred - gt).abs().mean(dim=(1, 2)).sum()) / n,
            "wp_ade": float(d.mean(dim=1).sum()) / n, "wp_fde": float(d[:, -1].sum()) / n,
            "progress_ratio": ratio}


def eoi_metrics(end_logit: Tensor, eoi: Tensor) -> dict[str, float | None]:
    """The end-of-instruction flag at logit 0: positive rate, accuracy, balanced accuracy, precision, recall, F1."""
    pred, true = end_logit > 0, eoi > 0.5
    tp, fp = int((pred & true).sum()), int((pred & ~true).sum())
    fn, tn = int((~pred & true).sum()), int((~pred & ~true).sum())
    prec = tp / (tp + fp) if tp + fp else None
    rec = tp / (tp + fn) if tp + fn else None
    spec = tn / (tn + fp) if tn + fp else None
    return {"positive_rate": (tp + fn) / max(len(true), 1), "accuracy": (tp + tn) / max(len(true), 1),
            "balanced_accuracy": (rec + spec) / 2 if rec is not None and spec is not None else None,
            "precision": prec, "recall": rec,
            "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None}


@torch.no_grad()
def evaluate(model: ADLLM, data: FeatureSet | Iterable[dict], batch_size: int = 64) -> dict[str, Any]:
    """`waypoint_metrics` of the model's waypoints over a feature set (+ `eoi_metrics` where it has labels),
    run on the model's device; the metrics are taken on the CPU in fp32."""
    model.eval()
    dev = model.device
    batches = data.batches(batch_size, shuffle=False) if isinstance(data, FeatureSet) else data
    preds, gts, logits, eois = [], [], [], []
    for b in batches:
        out = _forward(model, batch_to(b, dev))
        preds.append(out["waypoints"].float().cpu())
        gts.append(b["waypoints"].cpu())
        if b.get("eoi") is not None:
            logits.append(out["end_logit"].float().cpu())
            eois.append(b["eoi"].cpu())
    if not preds:
        return {"samples": 0, "wp_l1": 0.0, "wp_ade": 0.0, "wp_fde": 0.0, "progress_ratio": None}
    res: dict[str, Any] = waypoint_metrics(torch.cat(preds), torch.cat(gts))
    if eois and len(eois) == len(preds):
        res["eoi"] = eoi_metrics(torch.cat(logits), torch.cat(eois))
    return res


def apply_lora(model: ADLLM, settings: LoraSettings | None = None) -> ADLLM:
    """Wraps the LLM with peft LoRA and freezes everything else: only `lora_` weights train."""
    from peft import LoraConfig, get_peft_model

    s = settings or LoraSettings()
    if model.is_lora:
        raise ValueError("model already has a LoRA adapter")
    lc = LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=list(s.targets), bias="none")
    dev = model.device
    model.llm = get_peft_model(model.llm, lc).to(dev)     # the new LoRA weights beside the weights they adapt
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name
    return model


def merge_lora(model: ADLLM) -> ADLLM:
    """Folds the LoRA weights into the LLM (a plain transformers model again); all parameters trainable."""
    if model.is_lora:
        model.llm = model.llm.merge_and_unload()
    for p in model.parameters():
        p.requires_grad = True
    return model


def trainable_fraction(model: ADLLM) -> float:
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / max(total, 1)
