"""Shared helpers for the encoder tests (small synthetic batches, single-threaded torch)."""

from __future__ import annotations

import torch

from flad_vehicle.encoder import VisionEncoder, batch_to_torch
from flad_vehicle.encoder.synthetic import synthetic_batches

torch.set_num_threads(1)


def tiny_batch(batch_size: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    return batch_to_torch(next(synthetic_batches(1, batch_size, seed=seed)))


def tiny_model(seed: int = 0, **overrides) -> VisionEncoder:
    torch.manual_seed(seed)
    return VisionEncoder({"name": "tiny", **overrides})
