"""The AD-LLM / ADM as a closed-loop driver in one process (on-policy collection, benchmarks).

`adllm_agent` is named by import path ("flad_edge.celladapt.agents:adllm_agent") where a lower layer runs
it, e.g. `flad_sim.onpolicy` for DAgger. Through the edge's waypoint service the same model drives with
`flad_edge.celladapt.service.WaypointClient` as the waypoint source instead. The encoder and the model run on
one `device` (flad_core.device; `auto`: CUDA when present); the PID gets numpy waypoints either way.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from flad_core.device import log_device, resolve_device

_MODELS: dict[tuple[str, str], Any] = {}      # one copy per process of each saved model and device


def load_shared(model_dir: str, device: str | torch.device = "auto") -> Any:
    """The model saved in `model_dir` on `device`, loaded once per process."""
    from flad_edge.celladapt.model import ADLLM

    dev = resolve_device(device)
    key = (model_dir, str(dev))
    if key not in _MODELS:
        _MODELS[key] = ADLLM.from_pretrained(model_dir, device=dev)
        log_device(f"AD-LLM agent model {model_dir}", dev)
    return _MODELS[key]


def model_source(model: Any) -> Any:
    """A `WaypointAgent` source: (features, instruction, notice, target point) -> waypoints [5, 2]."""
    def source(features: torch.Tensor, instruction: str, notice: str, target_point: np.ndarray) -> np.ndarray:
        tp = torch.as_tensor(np.asarray(target_point, np.float32)).reshape(1, 2)
        return model.predict(features[None], [instruction], [notice], tp)[0].numpy()   # CPU float32

    return source


def adllm_agent(checkpoint: str, model_dir: str, plan_every: int = 10, device: str = "auto") -> Any:
    """Encoder (`checkpoint`) -> AD-LLM/ADM (`model_dir`, a `save_pretrained` folder) -> LMDrive PID, the two
    models on `device`."""
    from flad_vehicle.control.agent import WaypointAgent
    from flad_vehicle.control.learners import shared_encoder

    torch.set_num_threads(1)
    dev = resolve_device(device)
    return WaypointAgent(shared_encoder(checkpoint, str(dev)), model_source(load_shared(model_dir, dev)),
                         plan_every=plan_every, name="ad_llm")
