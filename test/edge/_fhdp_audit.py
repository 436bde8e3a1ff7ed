"""Audit helpers for the FHDP process tests: what a vehicle sent, and digests of what must never leave it."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import torch

from flad_core.fleet import load_fleet
from flad_vehicle.encoder.model import LABEL_INPUTS
from flad_vehicle.fhdp.data import vehicle_batches
from flad_vehicle.fhdp.links import tensor_digest

RAW_SENSORS = ("rgb_front", "rgb_left", "rgb_right", "rgb_rear", "lidar")
LABELS = tuple(LABEL_INPUTS)


def audits(run: Path) -> dict[str, list[dict]]:
    """Every audit record (tensor frames and layer payloads) each vehicle process wrote, by vehicle id."""
    return {p.stem.removeprefix("audit-"): [json.loads(x) for x in p.read_text().splitlines()]
            for p in sorted(run.glob("audit-*.jsonl"))}


def owner_digests(run: Path, names: tuple[str, ...], batch_size: int, n_micro: int, n_batches: int) -> set[str]:
    """Digests of every micro-batch slice of `names` in the first `n_batches` batches each vehicle trains on.

    A pipeline's data owner restarts its batch stream per pipeline (`FhdpVehicle._batches_for`) and splits each
    batch into `n_micro` slices (`torch.tensor_split`), so these are exactly the tensors it would hand to a
    link if it sent them."""
    fleet = load_fleet(run / "fleet.yaml")
    out: set[str] = set()
    for v in fleet.vehicles:
        for batch in islice(vehicle_batches(str(run / "data"), v.id, batch_size, seed=fleet.seed), n_batches):
            for name in names:
                out.update(tensor_digest(c) for c in torch.tensor_split(batch[name], n_micro))
    return out


def sent_digests(records: dict[str, list[dict]]) -> set[str]:
    return {d for recs in records.values() for rec in recs for d in rec.get("digests", ())}
