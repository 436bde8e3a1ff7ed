"""Model weights on the wire: safetensors bytes, chunked and checksummed.

Used for FL uploads/downloads, edge backups and partition moves. safetensors is the format because
it is a flat, validated, pickle-free container that every tool reads; we add chunking (so no single
message is huge) and a SHA-256 over the whole payload, and validate names, shapes and finiteness
on arrival.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from flad_core import codec

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024


class WeightsError(ValueError):
    """A weight payload is corrupted, incomplete, or does not fit the model it is meant for."""


def to_bytes(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """safetensors bytes of a state dict (tensors made contiguous and moved to CPU)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    # safetensors 0.8 writes invalid JSON for an empty state with an empty metadata dict: pass None
    return st_save(tensors, metadata=dict(metadata) if metadata else None)


def from_bytes(data: bytes, *, expect: Mapping[str, torch.Tensor] | None = None, finite: bool = True,
               what: str = "weights") -> dict[str, torch.Tensor]:
    """Parse safetensors bytes; with `expect`, names, shapes and dtypes must match it exactly."""
    try:
        state = st_load(bytes(data))
    except (SafetensorError, ValueError, RuntimeError, KeyError, TypeError, OverflowError) as exc:
        # KeyError: a dtype safetensors parses but has no torch mapping for (F4, F6_E2M3, F8_E8M0, ...)
        raise WeightsError(f"{what}: not a valid safetensors payload ({type(exc).__name__}: {exc})") from exc
    if expect is not None:
        missing, extra = sorted(set(expect) - set(state)), sorted(set(state) - set(expect))
        if missing or extra:
            raise WeightsError(f"{what}: tensor names differ (missing {missing[:5]}, unexpected {extra[:5]})")
        for name, ref in expect.items():
            got = state[name]
            if got.shape != ref.shape or got.dtype != ref.dtype:
                raise WeightsError(f"{what}: {name} is {got.dtype} {list(got.shape)}, "
                                   f"expected {ref.dtype} {list(ref.shape)}")
    if finite:
        for name, t in state.items():
            if (t.is_floating_point() or t.is_complex()) and not _all_finite(t):
                raise WeightsError(f"{what}: {name} contains NaN or inf")
    return state


def _all_finite(t: torch.Tensor) -> bool:
    try:
        return bool(torch.isfinite(t).all())
    except (RuntimeError, NotImplementedError):     # float8 types have no isfinite: check them as float32
        return bool(torch.isfinite(t.float()).all())


def chunk_messages(payload: bytes, *, sender: str, model_version: str = "", update_id: str = "", round: int = 0,
                   num_samples: int = 0, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[Any]:
    """Split a payload into flad_msgs/WeightChunk messages."""
    digest = hashlib.sha256(payload).hexdigest()
    n = max(1, math.ceil(len(payload) / chunk_bytes))
    view = memoryview(payload)
    return [codec.new("flad_msgs/msg/WeightChunk", header=codec.header(), sender=sender, model_version=model_version,
                      update_id=update_id, round=round, num_samples=num_samples, chunk_index=i, num_chunks=n,
                      total_bytes=len(payload), sha256=digest,
                      data=_as_uint8(view[i * chunk_bytes:(i + 1) * chunk_bytes]))
            for i in range(n)]


def _as_uint8(view: memoryview):
    import numpy as np

    return np.frombuffer(view, dtype=np.uint8)


class ChunkAssembler:
    """Collect WeightChunk messages of one transfer; `payload()` verifies completeness and the hash."""

    def __init__(self, max_bytes: int = 2 * 1024**3) -> None:
        self.max_bytes = max_bytes
        self.parts: dict[int, bytes] = {}
        self.first: Any = None

    def add(self, chunk: Any) -> bool:
        """Add a chunk; True once all chunks are present. Raises WeightsError on inconsistency."""
        if self.first is None:
            if chunk.total_bytes > self.max_bytes:
                raise WeightsError(f"transfer of {chunk.total_bytes} bytes exceeds the {self.max_bytes}-byte limit")
            if chunk.num_chunks == 0 or chunk.chunk_index >= chunk.num_chunks:
                raise WeightsError(f"bad chunk index {chunk.chunk_index} of {chunk.num_chunks}")
            self.first = chunk
        for field in ("update_id", "sha256", "num_chunks", "total_bytes", "sender"):
            if getattr(chunk, field) != getattr(self.first, field):
                raise WeightsError(f"chunk {chunk.chunk_index} disagrees on {field}")
        if chunk.chunk_index >= chunk.num_chunks:
            raise WeightsError(f"bad chunk index {chunk.chunk_index} of {chunk.num_chunks}")
        self.parts[chunk.chunk_index] = bytes(chunk.data)
        return len(self.parts) == self.first.num_chunks

    def payload(self) -> bytes:
        if self.first is None or len(self.parts) != self.first.num_chunks:
            have = 0 if self.first is None else len(self.parts)
            total = "?" if self.first is None else self.first.num_chunks
            raise WeightsError(f"incomplete transfer: {have} of {total} chunks")
        data = b"".join(self.parts[i] for i in range(self.first.num_chunks))
        if len(data) != self.first.total_bytes:
            raise WeightsError(f"transfer has {len(data)} bytes, header says {self.first.total_bytes}")
        if hashlib.sha256(data).hexdigest() != self.first.sha256:
            raise WeightsError("transfer checksum mismatch (corrupted chunk)")
        return data


def join_chunks(chunks: Iterable[Any]) -> bytes:
    asm = ChunkAssembler()
    for c in chunks:
        asm.add(c)
    return asm.payload()
