"""The AD-LLM: a LLaMA-architecture causal LM + an instruction-aware visual adapter + a waypoint head.

Input sequence (fixed length, so batched and single inference give the same positions):

    [BOS] instruction [SEP] notice [PAD]...   ← `max_text_tokens` text slots (pads masked out)
    v_1 ... v_Q                               ← visual tokens: the adapter's queries over encoder features
    n                                         ← navigation token: the route's target point (`navigation`)
    w_1 ... w_5                               ← learned waypoint queries; the head reads their hidden states

The adapter (after LMDrive's Q-Former) lets Q learned queries self-attend together with the instruction
embeddings (so what it extracts depends on the instruction) and cross-attend to the encoder's feature
tokens. The waypoint head maps each w_i's hidden state to (x, y) metres in the ego frame; the end flag
(LMDrive's "instruction completed") is a logit on the last hidden state. The LLM is any local
`from_pretrained` checkpoint; tiny configs are built randomly initialised for tests and CPU runs.

The navigation token is what a driver needs besides the instruction text: the next route target point
(ego frame, the same one the vision encoder's waypoint head gets). LMDrive gives its LLM only the
instruction sequence; with `navigation=False` this model does the same. A request without a target point
gets the token of "no target point" (a flag input set to 0), so such a model still answers.

Devices: `build` and `from_pretrained` take a `device` (flad_core.device: cpu, cuda[:N], meta, auto) and a
`dtype` (`SERVE_DTYPES`: fp32 for training, half for serving on a GPU); `place` moves a built model.
`forward` takes its inputs from wherever they are; `predict` hands back CPU float32 whatever the model runs
in, since its callers (the waypoint service, agents, replay) put the answer on the wire or into numpy.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flad_core.atomic import atomic_write_text
from flad_core.config import from_dict, to_dict
from flad_core.device import DeviceError, half_dtype, resolve_device

log = logging.getLogger(__name__)

CONFIG_FILE = "celladapt.json"
HEADS_FILE = "adapter_heads.safetensors"
LLM_DIR = "llm"
LORA_DIR = "lora"
TOKENIZER_DIR = "tokenizer"

#: what a model can be loaded as: auto (half on CUDA, fp32 elsewhere), fp32, half (`half_dtype`: fp16 on CUDA,
#: bf16 on the CPU), or bf16 / fp16 by name
SERVE_DTYPES = ("auto", "fp32", "half", "bf16", "fp16")


def resolve_dtype(spec: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """The torch dtype of `spec` on `device`. `auto` is half only on CUDA, so a CPU run keeps fp32 results."""
    if isinstance(spec, torch.dtype):
        return spec
    text = (spec or "fp32").strip().lower()
    dev = torch.device(device)
    if text == "auto":
        return torch.float16 if dev.type == "cuda" else torch.float32
    named = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if text == "half":
        return half_dtype(dev)
    if text not in named:
        raise DeviceError(f"dtype {spec!r}: choose one of {', '.join(SERVE_DTYPES)}")
    return named[text]


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


@dataclass
class AdapterConfig:
    """Visual adapter (Q-Former-style) sizes."""

    d_feature: int = 64          # encoder feature width (tiny encoder: 64)
    n_feature_tokens: int = 31   # encoder feature tokens (pooled BEV + traffic light + waypoints)
    d_model: int = 64
    n_queries: int = 4           # visual tokens handed to the LLM
    n_layers: int = 1
    n_heads: int = 4
    ffn_mult: int = 2
    instruction_aware: bool = True


@dataclass
class ADLLMConfig:
    """An AD-LLM: `llm_path` (a local checkpoint) or `llm` (LlamaConfig fields, randomly initialised)."""

    name: str = "ad-llm"
    llm_path: str = ""
    llm: dict[str, Any] = field(default_factory=dict)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    n_waypoints: int = 5
    max_text_tokens: int = 24
    wp_scale: float = 5.0        # head outputs are multiplied by this (metres): keeps the init small
    navigation: bool = True      # a navigation token from the route's target point (module docstring)
    seed: int = 0


def tiny_llama(hidden: int, layers: int, heads: int, kv_heads: int | None = None, intermediate: int | None = None
               ) -> dict[str, Any]:
    """LlamaConfig fields for a small randomly-initialised model (vocab set from the tokenizer)."""
    return {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads or heads, "intermediate_size": intermediate or hidden * 8 // 3,
            "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}


def general_config() -> ADLLMConfig:
    """The cloud's 'general LLM' at tiny scale (stand-in when no real checkpoint is given)."""
    return ADLLMConfig(name="general", llm=tiny_llama(320, 8, 8, 4), adapter=AdapterConfig(d_model=128))


def teacher_config() -> ADLLMConfig:
    """The AD-LLM at the edge (tiny CPU scale; LLaMA-7B in the paper)."""
    return ADLLMConfig(name="ad-llm", llm=tiny_llama(256, 6, 8, 4), adapter=AdapterConfig(d_model=128))


def student_config() -> ADLLMConfig:
    """The ADM: fewer and narrower layers than the AD-LLM (LLaMA-3B in the paper)."""
    return ADLLMConfig(name="adm", llm=tiny_llama(64, 1, 4, 2), adapter=AdapterConfig(d_model=64, n_queries=2))


PRESETS = {"general": general_config, "teacher": teacher_config, "student": student_config}


class QFormerLayer(nn.Module):
    """Pre-LN: self-attention over [queries; instruction], cross-attention to features, FFN."""

    def __init__(self, d: int, heads: int, ffn_mult: int) -> None:
        super().__init__()
        self.ln_self = nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln_cross = nn.LayerNorm(d)
        self.ln_mem = nn.LayerNorm(d)
        self.cross_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln_ffn = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, d * ffn_mult), nn.GELU(), nn.Linear(d * ffn_mult, d))

    def forward(self, q: Tensor, mem: Tensor, text: Tensor | None, text_pad: Tensor | None) -> Tensor:
        Q = q.shape[1]
        x = self.ln_self(q)
        if text is not None:
            kv = torch.cat([x, text], dim=1)
            pad = torch.cat([torch.zeros(q.shape[:2], dtype=torch.bool, device=q.device), text_pad], dim=1)
            q = q + self.self_attn(x, kv, kv, key_padding_mask=pad, need_weights=False)[0][:, :Q]
        else:
            q = q + self.self_attn(x, x, x, need_weights=False)[0]
        m = self.ln_mem(mem)
        q = q + self.cross_attn(self.ln_cross(q), m, m, need_weights=False)[0]
        return q + self.ffn(self.ln_ffn(q))


class VisualAdapter(nn.Module):
    """Encoder features [B, N, d_feature] (+ instruction embeddings) → `n_queries` LLM tokens [B, Q, H]."""

    def __init__(self, cfg: AdapterConfig, llm_hidden: int) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.feat_norm = nn.LayerNorm(cfg.d_feature)
        self.feat_proj = nn.Linear(cfg.d_feature, d)
        self.feat_pos = nn.Parameter(torch.randn(cfg.n_feature_tokens, d) * 0.02)
        self.queries = nn.Parameter(torch.randn(cfg.n_queries, d) * 0.02)
        self.text_proj = nn.Linear(llm_hidden, d) if cfg.instruction_aware else None
        self.layers = nn.ModuleList(QFormerLayer(d, cfg.n_heads, cfg.ffn_mult) for _ in range(cfg.n_layers))
        self.out_norm = nn.LayerNorm(d)
        self.out_proj = nn.Linear(d, llm_hidden)

    def forward(self, features: Tensor, text_emb: Tensor | None = None, text_mask: Tensor | None = None) -> Tensor:
        B, N, D = features.shape
        if (self.cfg.n_feature_tokens, self.cfg.d_feature) != (N, D):
            raise ValueError(f"features have shape {list(features.shape)}; the adapter expects "
                             f"[B, {self.cfg.n_feature_tokens}, {self.cfg.d_feature}]")
        mem = self.feat_proj(self.feat_norm(features)) + self.feat_pos
        text = pad = None
        if self.text_proj is not None and text_emb is not None:
            text = self.text_proj(text_emb)
            pad = ~text_mask.bool() if text_mask is not None else torch.zeros(text.shape[:2], dtype=torch.bool,
                                                                               device=text.device)
        q = self.queries.unsqueeze(0).expand(B, -1, -1)
        for layer in self.layers:
            q = layer(q, mem, text, pad)
        return self.out_proj(self.out_norm(q))


class ADLLM(nn.Module):
    """LLaMA causal LM + visual adapter + waypoint head + end-of-instruction flag. See the module docstring."""

    def __init__(self, cfg: ADLLMConfig, llm: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.llm = llm
        self.tokenizer = tokenizer
        H = int(self._base().config.hidden_size)
        self.hidden_size = H
        self.adapter = VisualAdapter(cfg.adapter, H)
        self.wp_queries = nn.Parameter(torch.randn(cfg.n_waypoints, H) * 0.02)
        self.wp_head = nn.Sequential(nn.Linear(H, H), nn.GELU(), nn.Linear(H, 2))
        self.end_head = nn.Linear(H, 1)
        self.nav_embed = (nn.Sequential(nn.Linear(3, H), nn.GELU(), nn.Linear(H, H)) if cfg.navigation else None)

    # ---------------------------------------------------------------------------------------- building

    @classmethod
    def build(cls, cfg: ADLLMConfig | str, tokenizer: Any = None, device: str | torch.device = "cpu",
              dtype: str | torch.dtype = "fp32") -> ADLLM:
        """From a preset name or config: loads `llm_path` (offline) or builds a random tiny LLaMA, on `device` in
        `dtype`. Weights are drawn on the CPU and then moved, so a seed gives the same model on every device;
        on `meta` a random model is built there directly (structure only, no memory)."""
        if isinstance(cfg, str):
            cfg = PRESETS[cfg]()
        dev = resolve_device(device)
        torch.manual_seed(cfg.seed)
        if dev.type == "meta" and not cfg.llm_path:
            with torch.device("meta"):
                return cls._build(cfg, tokenizer).place(dev, dtype)
        return cls._build(cfg, tokenizer).place(dev, dtype)

    @classmethod
    def _build(cls, cfg: ADLLMConfig, tokenizer: Any) -> ADLLM:
        if cfg.llm_path:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            llm = AutoModelForCausalLM.from_pretrained(cfg.llm_path, dtype=torch.float32, local_files_only=True)
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(cfg.llm_path, local_files_only=True)
        else:
            from transformers import LlamaConfig, LlamaForCausalLM

            from flad_edge.celladapt.tokenizer import build_tokenizer

            tokenizer = tokenizer or build_tokenizer()
            lc = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **cfg.llm)
            llm = LlamaForCausalLM(lc)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        llm.config.use_cache = False
        model = cls(cfg, llm, tokenizer)
        model.eval()
        return model

    def place(self, device: str | torch.device = "cpu", dtype: str | torch.dtype = "fp32") -> ADLLM:
        """Moves the model to `device` in `dtype` (`resolve_dtype`), in place; returns it. Floating buffers (the
        rotary frequencies) stay fp32, as transformers keeps them in a half-precision model: rounding them to
        half would shift every position's angle."""
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        if dev == self.device and dt == self.dtype:
            return self
        keep = {n: b for n, b in self.named_buffers() if b.is_floating_point() and b.dtype == torch.float32}
        self.to(device=dev, dtype=dt)
        if dt != torch.float32:
            for name, buf in keep.items():
                owner, _, leaf = name.rpartition(".")
                self.get_submodule(owner)._buffers[leaf] = buf.to(dev)
        return self

    @property
    def device(self) -> torch.device:
        """Where the weights are (every parameter lives on one device)."""
        return self.wp_queries.device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (fp32 unless placed in half precision for serving)."""
        return self.wp_queries.dtype

    def _base(self) -> nn.Module:
        """The underlying transformers model (unwrapping a peft wrapper)."""
        m = self.llm
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    @property
    def is_lora(self) -> bool:
        return hasattr(self.llm, "peft_config")

    # ---------------------------------------------------------------------------------------- running

    def encode_text(self, instructions: Sequence[str], notices: Sequence[str] | None = None) -> tuple[Tensor, Tensor]:
        """Token ids and mask [B, max_text_tokens]: `[BOS] instruction [SEP] notice`, right-padded/truncated."""
        notices = notices if notices is not None else [""] * len(instructions)
        if len(notices) != len(instructions):
            raise ValueError("instructions and notices differ in length")
        # instructions come from a small template set: cache each (instruction, notice) row (saves ~1 ms/request)
        cache = self.__dict__.setdefault("_text_cache", {})
        rows = [cache.get(k) for k in zip(instructions, notices, strict=True)]
        if all(r is not None for r in rows):
            return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
        ids, mask = self._tokenize(instructions, notices)
        if len(cache) < 50_000:
            for k, i, m in zip(zip(instructions, notices, strict=True), ids, mask, strict=True):
                cache[k] = (i, m)
        return ids, mask

    def _tokenize(self, instructions: Sequence[str], notices: Sequence[str]) -> tuple[Tensor, Tensor]:
        tok = self.tokenizer
        sep = tok.sep_token or tok.eos_token or ""
        texts = [f"{i} {sep} {n}".strip() if n else i for i, n in zip(instructions, notices, strict=True)]
        enc = tok(texts, padding="max_length", truncation=True, max_length=self.cfg.max_text_tokens,
                  return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        if tok.bos_token_id is not None and not bool((ids[:, 0] == tok.bos_token_id).all()):
            # checkpoints whose tokenizer adds no BOS: put one in front so no row is fully masked
            ids = torch.cat([torch.full_like(ids[:, :1], tok.bos_token_id), ids[:, :-1]], dim=1)
            mask = torch.cat([torch.ones_like(mask[:, :1]), mask[:, :-1]], dim=1)
        mask[:, 0] = 1
        return ids, mask

    def navigation_token(self, target_points: Tensor | None, batch: int, like: Tensor) -> Tensor | None:
        """[B, 1, H] from target points [B, 2] (metres, ego frame); None (or NaN rows): the 'no target' token."""
        if self.nav_embed is None:
            return None
        if target_points is None:
            nav = torch.zeros(batch, 3, dtype=like.dtype, device=like.device)
        else:
            tp = torch.as_tensor(target_points, dtype=like.dtype, device=like.device).reshape(batch, 2)
            have = torch.isfinite(tp).all(dim=1, keepdim=True)
            nav = torch.cat([torch.where(have, tp, torch.zeros_like(tp)) / 20.0, have.to(like.dtype)], dim=1)
        return self.nav_embed(nav).unsqueeze(1)

    def forward(self, features: Tensor, input_ids: Tensor, text_mask: Tensor, target_points: Tensor | None = None
                ) -> dict[str, Tensor]:
        """features [B,N,d_feature], input_ids/text_mask [B,T], target_points [B,2] (optional) → waypoints
        [B,5,2] m, end_logit [B]."""
        base = self._base()
        emb_layer = base.get_input_embeddings()
        dev = emb_layer.weight.device
        input_ids, text_mask = input_ids.to(dev), text_mask.to(dev)
        text_emb = emb_layer(input_ids)
        vis = self.adapter(features.to(device=dev, dtype=text_emb.dtype), text_emb, text_mask)
        B = features.shape[0]
        wq = self.wp_queries.unsqueeze(0).expand(B, -1, -1).to(text_emb.dtype)
        nav = self.navigation_token(target_points, B, text_emb)
        tokens = [vis] if nav is None else [vis, nav]
        seq = torch.cat([text_emb, *tokens, wq], dim=1)
        extra = sum(t.shape[1] for t in tokens) + wq.shape[1]
        mask = torch.cat([text_mask.to(torch.long),
                          torch.ones(B, extra, dtype=torch.long, device=seq.device)], dim=1)
        h = base.get_decoder()(inputs_embeds=seq, attention_mask=mask, use_cache=False).last_hidden_state
        hw = h[:, -self.cfg.n_waypoints:]
        wp = self.wp_head(hw) * self.cfg.wp_scale
        return {"waypoints": wp, "end_logit": self.end_head(h[:, -1]).squeeze(-1), "hidden": h}

    @torch.no_grad()
    def predict(self, features: Tensor, instructions: Sequence[str], notices: Sequence[str] | None = None,
                target_points: Tensor | None = None) -> Tensor:
        """Waypoints [B,5,2] for features [B,N,d], one instruction (and notice) per sample and, for a
        navigation model, the route's target points [B,2] (None: none known). Inputs may be on any device;
        the answer is CPU float32 (a no-op for a CPU fp32 model)."""
        ids, mask = self.encode_text(instructions, notices)
        return self.forward(features, ids, mask, target_points)["waypoints"].float().cpu()

    # ---------------------------------------------------------------------------------------- parameters

    def head_state_dict(self) -> dict[str, Tensor]:
        """Adapter, waypoint queries and heads (everything that is not the LLM)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("llm.")}

    def parameter_counts(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        llm = sum(p.numel() for p in self.llm.parameters())
        return {"total": total, "llm": llm, "adapter_and_heads": total - llm, "trainable": trainable}

    # ---------------------------------------------------------------------------------------- persistence

    def save_pretrained(self, directory: str | Path) -> Path:
        """`llm/` (transformers format; the un-merged base when LoRA is kept), `lora/` (peft adapter, if any),
        `adapter_heads.safetensors`, `tokenizer/`, `celladapt.json`. Exactly reloadable by `from_pretrained`."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        if self.is_lora:
            self.llm.save_pretrained(d / LORA_DIR)
            base = copy.deepcopy(self.llm).unload()
            base.save_pretrained(d / LLM_DIR)
        else:
            self.llm.save_pretrained(d / LLM_DIR)
        self.tokenizer.save_pretrained(d / TOKENIZER_DIR)
        tmp = d / (HEADS_FILE + ".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.head_state_dict().items()}, str(tmp))
        tmp.replace(d / HEADS_FILE)
        cfg = to_dict(self.cfg)
        cfg["llm_path"] = ""     # the saved copy is self-contained
        atomic_write_text(d / CONFIG_FILE, json.dumps({"config": cfg, "lora": self.is_lora}, indent=2))
        return d

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype = "fp32") -> ADLLM:
        """Loads what `save_pretrained` wrote, offline, onto `device` in `dtype` (read on the CPU, then moved)."""
        dev = resolve_device(device)
        resolve_dtype(dtype, dev)         # a bad dtype fails before the checkpoint is read
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        d = Path(directory)
        meta = json.loads((d / CONFIG_FILE).read_text(encoding="utf-8"))
        meta["config"].setdefault("navigation", False)     # saved before the navigation token existed
        cfg = from_dict(ADLLMConfig, meta["config"], "celladapt")
        tokenizer = AutoTokenizer.from_pretrained(d / TOKENIZER_DIR, local_files_only=True)
        llm = AutoModelForCausalLM.from_pretrained(d / LLM_DIR, dtype=torch.float32, local_files_only=True)
        if meta.get("lora"):
            from peft import PeftModel

            llm = PeftModel.from_pretrained(llm, d / LORA_DIR, is_trainable=False)
        llm.config.use_cache = False
        model = cls(cfg, llm, tokenizer)
        missing, unexpected = model.load_state_dict(load_file(str(d / HEADS_FILE)), strict=False)
        bad = [k for k in missing if not k.startswith("llm.")] + list(unexpected)
        if bad:
            raise ValueError(f"{d / HEADS_FILE}: tensor names differ from the model: {bad[:5]}")
        model.eval()
        return model.place(dev, dtype)
