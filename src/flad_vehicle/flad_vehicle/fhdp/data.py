"""Where a data-owning stage gets its batches: its own dataset shard, or seeded synthetic data."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path

import torch

from flad_vehicle.encoder.model import batch_to_torch
from flad_vehicle.encoder.synthetic import synthetic_batches


def vehicle_seed(vehicle_id: str, seed: int = 0) -> int:
    return (zlib.crc32(vehicle_id.encode()) + seed) % (2**31)


def vehicle_batches(data: str, vehicle_id: str, batch_size: int, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches of `vehicle_id`'s own data.

    `data` is a fleet dataset root (`flad sim collect` output: the vehicle's shard is used) or
    `synthetic` (schema-shaped synthetic data, seeded per vehicle so vehicles differ).
    """
    if data == "synthetic":
        epoch = 0
        while True:
            for batch in synthetic_batches(64, batch_size, seed=vehicle_seed(vehicle_id, seed) + epoch):
                yield batch_to_torch(batch)
            epoch += 1
    from flad_sim.dataset import FleetDataset, iter_batches

    fleet = FleetDataset.open(Path(data))
    if vehicle_id not in fleet.shards:
        raise KeyError(f"dataset {data} has no shard for vehicle {vehicle_id!r} (it has {sorted(fleet.shards)[:8]}...)")
    shard = fleet.shards[vehicle_id]
    epoch = 0
    while True:
        for batch in iter_batches(shard, batch_size, shuffle=True, seed=vehicle_seed(vehicle_id, seed) + epoch,
                                  drop_last=True):
            yield batch_to_torch(batch)
        epoch += 1
