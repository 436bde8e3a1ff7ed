"""The AD-LLM / ADM as a closed-loop driver in one process (on-policy collection, benchmarks).

`adllm_agent` is named by import path ("flad_edge.celladapt.agents:adllm_agent") where a lower layer runs
it, e.g. `flad_sim.onpolicy` for DAgger. Through the edge's waypoint service the same model drives with
`flad_edge.celladapt.service.WaypointClient` as the waypoint source instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

_MODELS: dict[str, Any] = {}      # one copy per process of each saved model


def load_shared(model_dir: str) -> Any:
    from flad_edge.celladapt.model import ADLLM

    if model_dir not in _MODELS:
        _MODELS[model_dir] = ADLLM.from_pretrained(model_dir)
    return _MODELS[model_dir]


def model_source(model: Any) -> Any:
    """A `WaypointAgent` source: (features, instruction, notice, target point) -> waypoints [5, 2]."""
    def source(features: torch.Tensor, instruction: str, notice: str, target_point: np.ndarray) -> np.ndarray:
        tp = torch.as_tensor(np.asarray(target_point, np.float32)).reshape(1, 2)
        return model.predict(features[None], [instruction], [notice], tp)[0].numpy()

    return source


def adllm_agent(checkpoint: str, model_dir: str, plan_every: int = 10) -> Any:
    """Encoder (`checkpoint`) -> AD-LLM/ADM (`model_dir`, a `save_pretrained` folder) -> LMDrive PID."""
    from flad_vehicle.control.agent import WaypointAgent
    from flad_vehicle.control.learners import shared_encoder

    torch.set_num_threads(1)
    return WaypointAgent(shared_encoder(checkpoint), model_source(load_shared(model_dir)), plan_every=plan_every,
                         name="ad_llm")
