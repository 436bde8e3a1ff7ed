"""Learned drivers built from saved models, by import path: the policies `flad_sim.onpolicy` runs for DAgger.

`flad_sim` cannot import the models (dependencies point down: vehicle -> sim), so on-policy collection names
its learner as "module:function" plus keyword arguments; these are such functions (the AD-LLM's is
`flad_edge.celladapt.agents.adllm_agent`). Each returns a fresh `WaypointAgent` (sensors -> encoder ->
waypoints -> LMDrive PID) that reads only what a vehicle has.
"""

from __future__ import annotations

from typing import Any

import torch

_ENCODERS: dict[tuple[str, str], Any] = {}   # one copy per process of each checkpoint and device, shared by agents


def shared_encoder(checkpoint: str, device: str = "auto") -> Any:
    """The encoder of `checkpoint` on `device` (flad_core.device), loaded once per process."""
    from flad_core.device import resolve_device
    from flad_vehicle.encoder.checkpoint import load_checkpoint

    dev = resolve_device(device)
    key = (checkpoint, str(dev))
    if key not in _ENCODERS:
        _ENCODERS[key] = load_checkpoint(checkpoint, device=dev)[0].eval()
    return _ENCODERS[key]


def encoder_head_agent(checkpoint: str, plan_every: int = 10, device: str = "auto") -> Any:
    """The encoder's own waypoint head drives (it reads the route's target point)."""
    from flad_vehicle.control.agent import WaypointAgent

    torch.set_num_threads(1)
    return WaypointAgent(shared_encoder(checkpoint, device), None, plan_every=plan_every, name="encoder_head")
