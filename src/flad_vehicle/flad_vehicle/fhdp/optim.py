"""Per-stage optimizers that together behave exactly like the whole model's optimizer.

AdamW updates each parameter from its own gradient and state, so splitting the parameter groups by
stage (keeping each group's learning rate and weight decay) and stepping each stage's optimizer is
the same update as one optimizer over the whole model, once gradients are globally clipped.
"""

from __future__ import annotations

import torch
from torch import nn


def stage_param_groups(stage: nn.Module, model_groups: list[dict]) -> list[dict]:
    """The model's parameter groups restricted to `stage`'s parameters (empty groups dropped)."""
    own = {id(p) for p in stage.parameters()}
    groups = []
    for g in model_groups:
        params = [p for p in g["params"] if id(p) in own]
        if params:
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": params})
    covered = sum(len(g["params"]) for g in groups)
    if covered != len(own):
        raise ValueError(f"{len(own) - covered} stage parameter(s) belong to no model parameter group")
    return groups


def stage_adamw(stage: nn.Module, model, lr: float = 7.5e-4, backbone_lr: float = 3e-4,
                weight_decay: float = 0.05) -> torch.optim.AdamW:
    """AdamW over `stage` with the paper's two learning rates (as `VisionEncoder.param_groups`)."""
    return torch.optim.AdamW(stage_param_groups(stage, model.param_groups(lr, backbone_lr, weight_decay)), eps=1e-8)
