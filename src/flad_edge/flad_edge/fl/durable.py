"""Durable records of a role process: a state dict and its bookkeeping in one safetensors file, written atomically.

The edge's round checkpoint and the cloud's uploads are such files: tensors as safetensors (no pickle on
load), the bookkeeping (round, ledger, ...) as JSON in the header's metadata, so one atomic rename makes
both visible together and a crash leaves the old file or the new one, never a mix.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from flad_core import weights as wts
from flad_core.atomic import atomic_write_bytes

#: the metadata key holding the JSON bookkeeping
META_KEY = "flad"


def save_state(path: Path, state: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Write `state` and `meta` (JSON-able) to `path` atomically."""
    atomic_write_bytes(path, wts.to_bytes(state, {META_KEY: json.dumps(meta, sort_keys=True, default=str)}))


def read_metadata(data: bytes | memoryview) -> dict[str, str]:
    """The string metadata of a safetensors payload (its header's `__metadata__`), without loading tensors."""
    view = memoryview(data)
    if len(view) < 8:
        raise wts.WeightsError("not a safetensors payload (shorter than its header size)")
    size = int.from_bytes(view[:8], "little")
    if size > len(view) - 8:
        raise wts.WeightsError("not a safetensors payload (header runs past the end)")
    try:
        header = json.loads(bytes(view[8:8 + size]))
    except ValueError as exc:
        raise wts.WeightsError(f"not a safetensors payload ({exc})") from exc
    return dict(header.get("__metadata__") or {})


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state, meta) of a file `save_state` wrote; WeightsError if it is not one."""
    data = Path(path).read_bytes()
    raw = read_metadata(data).get(META_KEY)
    if raw is None:
        raise wts.WeightsError(f"{path}: no {META_KEY!r} metadata (not a FLAD record)")
    return wts.from_bytes(data, what=str(path)), json.loads(raw)
