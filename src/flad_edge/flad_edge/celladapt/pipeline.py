"""The whole CELLAdapt chain on embedded-world features, as one reproducible run.

cloud: general LLM (tiny random LLaMA, or SmolLM2-135M offline) trained on driving features → distilled into
the AD-LLM (L1 on waypoints, + L1 to ground truth); edge: LoRA fine-tuning of the AD-LLM on its own
region's vehicles, merged, then distilled into the ADM (teacher L1 + ground-truth L1). Held-out towns are
never trained on. Models are saved with `save_pretrained` under the run directory. Every model is built on
`PipelineConfig.device` and every phase trains there (in `precision`); the result records which device ran.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flad_core.device import check_precision, log_device, resolve_device
from flad_edge.celladapt.data import FeatureSet
from flad_edge.celladapt.model import ADLLM, AdapterConfig, ADLLMConfig, general_config, student_config, teacher_config
from flad_edge.celladapt.train import FitConfig, LoraSettings, apply_lora, evaluate, fit, merge_lora, trainable_fraction

log = logging.getLogger(__name__)


@dataclass
class PipelineConfig:
    """Which towns play which role, and how long each phase trains."""

    holdout_towns: list[str] = field(default_factory=lambda: ["Town05", "Town06"])
    cloud_towns: list[str] = field(default_factory=lambda: ["Town01", "Town02", "Town03"])
    edge_towns: list[str] = field(default_factory=lambda: ["Town04"])
    general: str = "tiny"              # tiny | smollm2 | a local checkpoint path
    general_steps: int = 300
    distill_steps: int = 300           # general → AD-LLM (cloud)
    lora_steps: int = 150
    adm_steps: int = 400               # AD-LLM → ADM (edge)
    batch_size: int = 32
    lr: float = 1e-3
    lora_lr: float = 2e-3
    alpha: float = 0.5
    seed: int = 0
    device: str = "auto"               # auto | cpu | cuda[:N] (flad_core.device)
    precision: str = "fp32"            # fp32 | bf16 | fp16 autocast while training


def _general(cfg: PipelineConfig, device: str | torch.device = "cpu") -> ADLLM:
    """The cloud's general LLM (tiny random, SmolLM2 or a local checkpoint) on `device`."""
    if cfg.general == "tiny":
        return ADLLM.build(general_config(), device=device)
    if cfg.general == "smollm2":
        from flad_edge.celladapt.smollm import ensure_smollm2

        path = str(ensure_smollm2())
    else:
        path = cfg.general
    return ADLLM.build(ADLLMConfig(name="general", llm_path=path, adapter=AdapterConfig(d_model=128)), device=device)


def run_pipeline(data: FeatureSet, cfg: PipelineConfig, out_dir: Path | None = None,
                 on_log: Any = None) -> dict[str, Any]:
    """Trains general → AD-LLM → (LoRA) → ADM on `cfg.device`; returns models, open-loop metrics, phase
    timings and `device` (`device_info`)."""
    check_precision(cfg.precision)
    dev = resolve_device(cfg.device)
    info = log_device("CELLAdapt pipeline", dev)
    torch.manual_seed(cfg.seed)
    held = data.select(towns=cfg.holdout_towns)
    cloud = data.select(towns=cfg.cloud_towns)
    edge = data.select(towns=cfg.edge_towns)
    train_all = data.select(exclude_towns=cfg.holdout_towns)
    res: dict[str, Any] = {"samples": {"cloud": len(cloud), "edge": len(edge), "held_out": len(held)}, "phases": {},
                           "device": info, "precision": cfg.precision}

    def phase(name: str, model: ADLLM, d: FeatureSet, steps: int, lr: float, teacher: ADLLM | None = None,
              alpha: float = 0.5) -> None:
        t0 = time.perf_counter()
        fc = FitConfig(steps=steps, batch_size=cfg.batch_size, lr=lr, alpha=alpha, seed=cfg.seed, device=str(dev),
                       precision=cfg.precision)
        r = fit(model, d, fc, teacher=teacher,
                on_log=(lambda rec: on_log({"phase": name, **rec})) if on_log else None)
        r["wall_s"] = round(time.perf_counter() - t0, 1)
        res["phases"][name] = r
        log.info("%s: %s", name, r)

    general = _general(cfg, dev)
    phase("general_on_driving_data", general, cloud, cfg.general_steps, cfg.lr)
    ad_llm = ADLLM.build(teacher_config(), device=dev)
    phase("cloud_distill_general_to_ad_llm", ad_llm, cloud, cfg.distill_steps, cfg.lr, teacher=general,
          alpha=cfg.alpha)
    res["ad_llm_before_lora_edge_l1"] = evaluate(ad_llm, edge)["wp_l1"]
    res["ad_llm_before_lora_held_out"] = evaluate(ad_llm, held)
    apply_lora(ad_llm, LoraSettings())
    res["lora_trainable_fraction"] = trainable_fraction(ad_llm)
    res["lora_trainable_params"] = ad_llm.parameter_counts()["trainable"]
    phase("edge_lora_finetune", ad_llm, edge, cfg.lora_steps, cfg.lora_lr)
    res["ad_llm_after_lora_edge_l1"] = evaluate(ad_llm, edge)["wp_l1"]
    if out_dir is not None:
        ad_llm.save_pretrained(out_dir / "ad_llm_lora")
    merge_lora(ad_llm)
    adm = ADLLM.build(student_config(), device=dev)
    phase("edge_distill_ad_llm_to_adm", adm, train_all, cfg.adm_steps, cfg.lr, teacher=ad_llm, alpha=cfg.alpha)
    for m in (general, ad_llm, adm):
        m.eval()
        for p in m.parameters():
            p.requires_grad = False
    if out_dir is not None:
        ad_llm.save_pretrained(out_dir / "ad_llm")
        adm.save_pretrained(out_dir / "adm")
    res["models"] = {"general": general, "ad_llm": ad_llm, "adm": adm}
    return res
