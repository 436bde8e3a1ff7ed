"""Encoder checkpoints: safetensors weights + JSON metadata (format, config, step, checksum), written atomically.

Loading checks, in order, and names the file and the problem on failure (`CheckpointError`): the file
exists and is a complete safetensors file; it is a FLAD encoder checkpoint; the tensor checksum matches
(catches bit rot that keeps the header intact); the config matches the model it is loaded into; every
tensor is present with the right shape.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from flad_core.atomic import atomic_write_bytes
from flad_core.device import resolve_device
from flad_vehicle.encoder.config import EncoderConfig, get_config
from flad_vehicle.encoder.model import VisionEncoder

FORMAT = "flad-encoder-ckpt/1"


class CheckpointError(RuntimeError):
    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"checkpoint {path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(path: str | Path, model: VisionEncoder, step: int = 0, extra: dict[str, Any] | None = None
                    ) -> Path:
    """Writes `model`'s state (weights and buffers) with config and step metadata, atomically."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT, "config": json.dumps(model.cfg.to_dict()), "step": str(int(step)),
        "sha256": _digest(tensors), "saved_utc": _dt.datetime.now(_dt.UTC).isoformat(),
        "extra": json.dumps(extra or {}, sort_keys=True, default=str),
    }
    atomic_write_bytes(path, st_save(tensors, metadata=meta))
    return path


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and parsed metadata (`config` as an EncoderConfig, `step` int, `extra` dict), verified."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise CheckpointError(path, "file not found") from exc
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read ({exc})") from exc
    if len(data) < 8:
        raise CheckpointError(path, f"only {len(data)} bytes: empty or truncated, not a safetensors file")
    header_len = int.from_bytes(data[:8], "little")
    if 8 + header_len > len(data):
        raise CheckpointError(path, f"truncated: header claims {header_len} bytes, file has {len(data) - 8}")
    try:
        header = json.loads(data[8: 8 + header_len])
        tensors = st_load(data)
    except (SafetensorError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(path, f"not a valid safetensors file (truncated or corrupt): {exc}") from exc
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise CheckpointError(path, f"not a FLAD encoder checkpoint (format {meta.get('format')!r}, "
                                    f"expected {FORMAT!r})")
    if _digest(tensors) != meta.get("sha256"):
        raise CheckpointError(path, "tensor checksum mismatch: the weights are corrupted")
    try:
        cfg = get_config(json.loads(meta["config"]))
        parsed = {"format": meta["format"], "config": cfg, "step": int(meta["step"]),
                  "saved_utc": meta.get("saved_utc"), "extra": json.loads(meta.get("extra") or "{}")}
    except (KeyError, ValueError) as exc:
        raise CheckpointError(path, f"bad metadata: {exc}") from exc
    return tensors, parsed


def load_checkpoint(path: str | Path, model: VisionEncoder | None = None, device: str | torch.device | None = None
                    ) -> tuple[VisionEncoder, dict[str, Any]]:
    """Loads into `model` (checking its config matches) or into a new model built from the stored config;
    `device` (flad_core.device) moves the loaded model there (default: where `model` is, or the CPU)."""
    tensors, meta = read_checkpoint(path)
    cfg: EncoderConfig = meta["config"]
    if model is None:
        model = VisionEncoder(cfg)
    else:
        mine, theirs = model.cfg.to_dict(), cfg.to_dict()
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            show = ", ".join(f"{k}: checkpoint {theirs.get(k)!r} vs model {mine.get(k)!r}" for k in diff[:4])
            raise CheckpointError(path, f"config mismatch ({show})")
    state = model.state_dict()
    missing = sorted(set(state) - set(tensors))
    unexpected = sorted(set(tensors) - set(state))
    if missing or unexpected:
        raise CheckpointError(path, f"tensor names differ from the model: missing {missing[:5]}, "
                                    f"unexpected {unexpected[:5]}")
    for k, v in state.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise CheckpointError(path, f"tensor {k!r} has shape {list(tensors[k].shape)}, "
                                        f"model expects {list(v.shape)}")
    model.load_state_dict(tensors)
    if device is not None:
        model.to(resolve_device(device))
    return model, meta
