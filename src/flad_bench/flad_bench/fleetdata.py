"""Fleet datasets for the benchmarks: found where they are, or collected on demand with one log line.

A benchmark run from a fresh clone has no `data/`: those that need a dataset either collect one here (a
progress bar on stderr, and one log line saying what is collected, where, and which `flad sim collect`
command makes the same) or say in one line which command makes it (`collect_command`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def collect_command(root: str | Path, vehicles: int | None = None, frames: int | None = None) -> str:
    """The `flad sim collect` command line that makes the dataset at `root` (None: that command's default)."""
    words = ["flad sim collect"]
    if vehicles is not None:
        words.append(f"--vehicles {vehicles}")
    if frames is not None:
        words.append(f"--frames-per-vehicle {frames}")
    return " ".join([*words, f"--out {root}"])


def ensure_fleet(root: str | Path, who: str, vehicles: int | None = None, frames: int | None = None,
                 workers: int = 2, seed: int = 0, progress: bool = True) -> dict[str, Any] | None:
    """Collect an embedded-world fleet dataset into `root` unless one is there; None if it was there.

    `vehicles` / `frames` default to `flad sim collect`'s own (50 x 60, one town per vehicle, every town);
    returns what was collected and how long it took, for the benchmark's JSON."""
    from flad_sim.dataset import CollectConfig, collect, is_fleet_dataset

    if is_fleet_dataset(root):
        return None

    cfg = CollectConfig(out=str(root), seed=seed, workers=workers)
    if vehicles is not None:
        cfg.vehicles = vehicles
    if frames is not None:
        cfg.frames_per_vehicle = frames
    log.warning("%s: no fleet dataset at %s: collecting one now (%d vehicles x %d frames, the same as `%s`)",
                who, root, cfg.vehicles, cfg.frames_per_vehicle,
                collect_command(root, vehicles, frames))
    t0 = time.perf_counter()
    manifest = collect(cfg, progress=progress)
    return {"root": str(root), "vehicles": cfg.vehicles, "frames_per_vehicle": cfg.frames_per_vehicle,
            "samples": manifest["total"], "seconds": round(time.perf_counter() - t0, 1), "source": "world"}
