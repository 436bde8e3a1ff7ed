"""Driving data for CELLAdapt: encoder features + instruction/notice texts + ground-truth waypoints.

Raw sensor data stays on the vehicle: the edge/cloud only ever see `FeatureSet`s, i.e. the vision
encoder's output tokens (what `EncodedFeatures` carries) with their labels. Extraction runs the encoder
once over the fleet shards; the result is cached as one `.npz` (+ texts in JSON) so training runs reuse it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flad_core.atomic import atomic_open, atomic_write_text

log = logging.getLogger(__name__)

#: end-of-instruction label horizon: a frame is labelled 1 when its navigation command changes within the next
#: this many frames (~1 s at the default 4 recorded frames per second): the instruction is being completed
EOI_HORIZON_FRAMES = 4
#: bump when the cached feature format changes, so stale caches are rebuilt rather than misread
CACHE_FORMAT = b"features-v3-target-point"


def end_of_instruction_labels(commands: Sequence[int] | np.ndarray, horizon: int = EOI_HORIZON_FRAMES
                              ) -> np.ndarray:
    """LMDrive's "instruction completed" flag from one shard's commands in recording order: 1.0 where one of
    the next `horizon` frames has another command (the current instruction ends there), else 0.0."""
    c = np.asarray(commands)
    out = np.zeros(len(c), np.float32)
    for h in range(1, min(horizon, len(c) - 1) + 1):
        out[:-h] = np.maximum(out[:-h], (c[h:] != c[:-h]).astype(np.float32))
    return out


@dataclass
class FeatureSet:
    """N samples: features [N,T,D] float32, waypoints [N,5,2] metres (ego frame), texts, town, vehicle,
    (where the data has navigation commands) the end-of-instruction labels [N] (0/1 float), and the route's
    target points [N,2] (ego frame, metres) that a navigation model reads."""

    features: Tensor
    waypoints: Tensor
    instructions: list[str]
    notices: list[str]
    towns: list[str]
    vehicles: list[str]
    encoder_waypoints: Tensor | None = None   # the encoder's own head on the same frames (a baseline)
    eoi: Tensor | None = None                 # end-of-instruction labels (`end_of_instruction_labels`)
    target_points: Tensor | None = None       # the route's next target point [N, 2]

    def __post_init__(self) -> None:
        n = len(self)
        for name in ("waypoints", "encoder_waypoints", "eoi", "target_points"):
            t = getattr(self, name)
            if t is not None and int(t.shape[0]) != n:
                raise ValueError(f"FeatureSet: {name} has {int(t.shape[0])} rows, features {n}")

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def subset(self, idx: Sequence[int] | np.ndarray) -> FeatureSet:
        idx = np.asarray(idx, np.int64)
        t = torch.from_numpy(idx)
        return FeatureSet(self.features[t], self.waypoints[t], [self.instructions[i] for i in idx],
                          [self.notices[i] for i in idx], [self.towns[i] for i in idx],
                          [self.vehicles[i] for i in idx],
                          self.encoder_waypoints[t] if self.encoder_waypoints is not None else None,
                          self.eoi[t] if self.eoi is not None else None,
                          self.target_points[t] if self.target_points is not None else None)

    def select(self, towns: Sequence[str] | None = None, vehicles: Sequence[str] | None = None,
               exclude_towns: Sequence[str] = ()) -> FeatureSet:
        keep = [i for i in range(len(self))
                if (towns is None or self.towns[i] in towns) and (vehicles is None or self.vehicles[i] in vehicles)
                and self.towns[i] not in exclude_towns]
        return self.subset(keep)

    def batches(self, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False
                ) -> Iterator[dict]:
        """Dicts with `features`, `waypoints` tensors and `instruction`, `notice` lists."""
        n = len(self)
        order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
        for b0 in range(0, n, batch_size):
            idx = order[b0:b0 + batch_size]
            if drop_last and len(idx) < batch_size:
                return
            t = torch.from_numpy(idx)
            batch = {"features": self.features[t], "waypoints": self.waypoints[t],
                     "instruction": [self.instructions[i] for i in idx], "notice": [self.notices[i] for i in idx]}
            if self.eoi is not None:
                batch["eoi"] = self.eoi[t]
            if self.target_points is not None:
                batch["target_point"] = self.target_points[t]
            yield batch

    def endless(self, batch_size: int, seed: int = 0) -> Iterator[dict]:
        epoch = 0
        while True:
            yield from self.batches(batch_size, shuffle=True, seed=seed + epoch, drop_last=len(self) >= batch_size)
            epoch += 1

    def save(self, path: str | Path) -> None:
        path = Path(path)
        with atomic_open(path, "wb") as fh:
            extra = {} if self.encoder_waypoints is None else {"encoder_waypoints": self.encoder_waypoints.numpy()}
            if self.eoi is not None:
                extra["eoi"] = self.eoi.numpy()
            if self.target_points is not None:
                extra["target_points"] = self.target_points.numpy()
            np.savez(fh, features=self.features.numpy(), waypoints=self.waypoints.numpy(), **extra)
        atomic_write_text(path.with_suffix(".json"), json.dumps(
            {"instructions": self.instructions, "notices": self.notices, "towns": self.towns,
             "vehicles": self.vehicles}))

    @classmethod
    def load(cls, path: str | Path) -> FeatureSet:
        path = Path(path)
        arr = np.load(path)
        meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        fs = cls(torch.from_numpy(arr["features"]), torch.from_numpy(arr["waypoints"]), meta["instructions"],
                 meta["notices"], meta["towns"], meta["vehicles"],
                 torch.from_numpy(arr["encoder_waypoints"]) if "encoder_waypoints" in arr else None,
                 torch.from_numpy(arr["eoi"]) if "eoi" in arr else None,
                 torch.from_numpy(arr["target_points"]) if "target_points" in arr else None)
        if not (len(fs.instructions) == len(fs.notices) == len(fs.towns) == len(fs) == len(fs.waypoints)):
            raise ValueError(f"{path}: inconsistent feature cache")
        return fs


def concat_feature_sets(sets: Sequence[FeatureSet]) -> FeatureSet:
    """One FeatureSet of all samples of `sets`, in order; an optional field is kept only where every set has it."""
    if not sets:
        raise ValueError("concat_feature_sets: no feature sets")

    def cat(name: str) -> Tensor | None:
        parts = [getattr(f, name) for f in sets]
        return None if any(p is None for p in parts) else torch.cat(parts)

    return FeatureSet(torch.cat([f.features for f in sets]), torch.cat([f.waypoints for f in sets]),
                      [x for f in sets for x in f.instructions], [x for f in sets for x in f.notices],
                      [x for f in sets for x in f.towns], [x for f in sets for x in f.vehicles],
                      cat("encoder_waypoints"), cat("eoi"), cat("target_points"))


@torch.no_grad()
def extract_features(encoder, root: str | Path, batch_size: int = 32) -> FeatureSet:
    """Runs `encoder.encode_features` over every shard of the fleet dataset at `root`, on the encoder's device;
    the features are kept on the CPU in fp32."""
    from flad_core.device import to_device
    from flad_sim.dataset import FleetDataset, iter_batches
    from flad_vehicle.encoder import batch_to_torch

    encoder.eval()
    dev = next(encoder.parameters()).device
    ds = FleetDataset.open(root)
    names = list(encoder.input_names)
    feats, wps, ewps, ins, nots, towns, vehs, eois, tps = [], [], [], [], [], [], [], [], []
    for shard in ds.select():
        town = shard.towns[0] if len(shard.towns) == 1 else "mixed"
        commands: list[np.ndarray] = []
        for b in iter_batches(shard, batch_size, shuffle=False,
                              fields=[*names, "waypoints", "instruction", "notice", "command", "target_point"]):
            commands.append(np.asarray(b["command"]).reshape(-1))
            out = encoder(to_device(batch_to_torch(b, tuple(names)), dev))
            f = out["features"].float().cpu()
            feats.append(f)
            ewps.append(out["pred.waypoints"].float().cpu())
            wps.append(torch.from_numpy(np.asarray(b["waypoints"], np.float32)))
            tps.append(torch.from_numpy(np.asarray(b["target_point"], np.float32).reshape(-1, 2)))
            ins += list(b["instruction"])
            nots += list(b["notice"])
            towns += [town] * len(f)
            vehs += [shard.vehicle_id] * len(f)
        eois.append(torch.from_numpy(end_of_instruction_labels(np.concatenate(commands))))
    return FeatureSet(torch.cat(feats), torch.cat(wps), ins, nots, towns, vehs, torch.cat(ewps), torch.cat(eois),
                      torch.cat(tps))


def cached_features(encoder, root: str | Path, checkpoint: str | Path, cache_dir: str | Path) -> FeatureSet:
    """`extract_features`, cached under `cache_dir` by (dataset manifest, encoder checkpoint) digest."""
    h = hashlib.sha1(CACHE_FORMAT)
    h.update((Path(root) / "manifest.json").read_bytes())
    h.update(Path(checkpoint).read_bytes() if checkpoint and Path(checkpoint).exists() else b"random")
    path = Path(cache_dir) / f"features-{h.hexdigest()[:12]}.npz"
    if path.exists():
        return FeatureSet.load(path)
    fs = extract_features(encoder, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    fs.save(path)
    log.info("cached %d feature samples at %s", len(fs), path)
    return fs


def synthetic_feature_set(n: int = 256, n_tokens: int = 31, d: int = 64, seed: int = 0) -> FeatureSet:
    """Learnable toy data for tests: waypoints are a fixed function of the features and the command."""
    from flad_sim.instructions import N_COMMANDS, instruction_text

    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, n_tokens, d, generator=g)
    cmd = torch.randint(0, N_COMMANDS, (n,), generator=g)
    speed = 1.0 + f[:, -5:, 0].mean(1).sigmoid() * 4.0
    t = torch.arange(1, 6, dtype=torch.float32) * 0.5
    lat = torch.tensor([1.0, -1.0, 0.0, 0.0, 0.6, -0.6])[cmd]
    wp = torch.stack([speed[:, None] * t, lat[:, None] * t ** 2], dim=-1)
    ins = [instruction_text(int(c), None, i) for i, c in enumerate(cmd)]
    eoi = (f[:, 0, 1] > 1.0).float()        # "completed" is visible in the features (~16 % positives)
    tp = torch.stack([torch.full((n,), 15.0), lat * 10.0], dim=1)     # the turn also shows in the target point
    return FeatureSet(f, wp.float(), ins, [""] * n, ["Town01" if i % 2 else "Town02" for i in range(n)],
                      [f"v{i % 4:03d}" for i in range(n)], eoi=eoi, target_points=tp)
