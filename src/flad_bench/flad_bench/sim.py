"""`flad bench sim --json`: sensor frames/s on one core, physics ticks/s, loader samples/s (beside training).

Figures, all measured in this one run:
- `sensors`: full frames/s (4 cameras + LiDAR + BEV label) on ONE core (the process pins itself to one CPU,
  like `taskset -c N`), over scenes recorded from an expert drive in real towns (rendering only is timed).
- `physics`: world ticks/s with 50 actors (30 NPC vehicles + 20 pedestrians) and no sensors
  (`flad_bench.sim_world.bench_physics`).
- `loader`: `iter_batches` samples/s (shuffled, all fields, batch 32) over world-collected shards at the
  default sensor sizes (page cache warm).
- `train_samples_per_s`: the encoder's training speed, the figure the loader must beat by >= 5x. Slot for
  the encoder team: pass `--train-samples-per-s X`, or `--measure-train` to call
  `flad_bench.encoder.tiny_train_throughput` (imports torch). Null when neither is given.
The machine may be shared: `cpu` figures (per CPU-second of this process) are less sensitive to that.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def _pin_one_core() -> int | None:
    """Pin this process to one CPU it may use (the first); returns it, or None where unsupported."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[0]})
        return cpus[0]
    except (AttributeError, OSError):
        return None


def record_scenes(towns: list[str], per_town: int = 8, seed: int = 0, every: int = 10, warmup: int = 60) -> list:
    """SceneViews from an expert drive in each town (captured, not rendered)."""
    from flad_sim.dataset import ExpertDrive

    out = []
    for town in towns:
        d = ExpertDrive(town, seed)
        d.advance(warmup)
        for _ in range(per_town):
            d.advance(every)
            out.append(d.scene_view())
    return out


def bench_sensors(scenes: list, seconds: float = 3.0, rig_config: Any = None) -> dict[str, Any]:
    """Full frames/s of `SensorRig.observe` over the scenes, plus a per-sensor breakdown in ms."""
    from flad_sim.sensors import SensorRig, bev_occupancy

    rig = SensorRig(rig_config)
    for sv in scenes[:2]:
        rig.observe(sv)                                  # warm caches
    n = 0
    c0, t0 = time.process_time(), time.perf_counter()
    while True:
        for sv in scenes:
            rig.observe(sv)
        n += len(scenes)
        if time.perf_counter() - t0 >= seconds:
            break
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    parts = {}
    for name, fn in (("cameras", rig.render_cameras), ("lidar", rig.lidar), ("bev", bev_occupancy)):
        s0 = time.perf_counter()
        for sv in scenes:
            fn(sv)
        parts[f"{name}_ms"] = round((time.perf_counter() - s0) / len(scenes) * 1e3, 3)
    cfg = rig.config
    return {
        "frames_per_s": round(n / wall, 1), "frames_per_cpu_s": round(n / max(cpu, 1e-9), 1), "frames": n,
        "wall_s": round(wall, 2), **parts,
        "boxes_per_scene_mean": round(float(np.mean([len(sv.boxes) for sv in scenes])), 1),
        "config": {"cameras": {c.name: [c.height, c.width, c.fov_deg] for c in cfg.cameras},
                   "camera_pixels": sum(c.height * c.width for c in cfg.cameras),
                   "lidar": {"channels": cfg.lidar.channels, "azimuth_steps": cfg.lidar.azimuth_steps,
                             "rays": cfg.lidar.rays, "range_m": cfg.lidar.range_m}},
    }


def bench_loader(data: str | None, seconds: float = 3.0, batch_size: int = 32, seed: int = 0) -> dict[str, Any]:
    """Loader samples/s over `data` (a fleet root) or over a small world-collected fleet made for the purpose."""
    from flad_sim.dataset import CollectConfig, FleetDataset, collect, is_fleet_dataset, loader_throughput

    tmp = None
    note: dict[str, Any] = {}
    root = Path(data) if data else None
    if root is None or not is_fleet_dataset(root):
        tmp = tempfile.TemporaryDirectory(prefix="flad-bench-sim-")
        root = Path(tmp.name) / "fleet"
        t0 = time.perf_counter()
        cfg = CollectConfig(out=str(root), vehicles=2, frames_per_vehicle=64, towns=["Town01", "Town02"],
                            seed=seed, workers=1)
        collect(cfg, progress=False)
        note["collected"] = {"vehicles": 2, "frames_per_vehicle": 64, "seconds": round(time.perf_counter() - t0, 2),
                             "source": "world"}
    try:
        ds = FleetDataset.open(root)
        shards = list(ds.shards.values())
        r = loader_throughput(shards, batch_size, seconds=seconds)
        r.update({"samples": len(ds), "root": None if tmp else str(root), **note})
        return {k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()}
    finally:
        if tmp is not None:
            tmp.cleanup()


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, str | None]:
    """The arguments, with the --quick defaults filled in, and what is wrong with them (None: nothing)."""
    p = argparse.ArgumentParser(prog="flad bench sim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object (the only output mode)")
    p.add_argument("--seconds", type=float, default=None, help="timing window per figure (default: 3.0)")
    p.add_argument("--towns", default=None, help="towns for the sensor scenes (default: Town01,Town02,Town06)")
    p.add_argument("--data", default=None, help="fleet root for the loader figure (default: collect a small one)")
    p.add_argument("--train-samples-per-s", type=float, default=None,
                   help="the encoder's training samples/s, to report the loader/training ratio")
    p.add_argument("--measure-train", action="store_true",
                   help="measure the tiny encoder's training samples/s (flad_bench.encoder, needs torch)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: sensors,physics,loader")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run in seconds (0.5 s windows, Town01 scenes only): numbers are noisy")
    args = p.parse_args([a for a in (sys.argv[1:] if argv is None else argv) if a != "--"])
    if args.seconds is None:
        args.seconds = 0.5 if args.quick else 3.0
    if args.towns is None:
        args.towns = "Town01" if args.quick else "Town01,Town02,Town06"
    from flad_sim.towns import TOWNS

    unknown = [t for t in args.towns.split(",") if t and t not in TOWNS]
    if args.seconds <= 0:
        return args, "--seconds must be > 0"
    if unknown:
        return args, f"unknown town(s) {unknown}; towns: {', '.join(TOWNS)}"
    if args.data and not (Path(args.data) / "manifest.json").exists():
        return args, (f"no fleet dataset at {args.data} (make one with `flad sim collect --out {args.data}`, "
                      "or leave out --data to collect a small one for the loader figure)")
    return args, None


def main(argv: list[str] | None = None) -> int:
    args, error = _parse(argv)
    if error:
        print(f"flad bench sim: {error}", file=sys.stderr)
        return 2
    skip = {s for s in args.skip.split(",") if s}
    logging.getLogger("flad_sim").setLevel(logging.WARNING)
    cpu = _pin_one_core()
    out: dict[str, Any] = {"benchmark": "sim"}
    if args.quick:
        out["quick"] = "smoke run: numbers are not meaningful"
    if "sensors" not in skip:
        towns = [t for t in args.towns.split(",") if t]
        out["sensors"] = bench_sensors(record_scenes(towns), args.seconds)
        out["sensors"]["towns"] = towns
    if "physics" not in skip:
        try:
            from flad_bench.sim_world import bench_physics
        except ImportError as exc:
            out["physics"] = {"error": f"flad_bench.sim_world not available: {exc}"}
        else:
            out["physics"] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in
                              bench_physics(args.seconds, n_vehicles=30, n_pedestrians=20).items()}
    if "loader" not in skip:
        out["loader"] = bench_loader(args.data, args.seconds)
    train = args.train_samples_per_s
    train_note = "given by --train-samples-per-s" if train is not None else None
    if train is None and args.measure_train:
        try:
            from flad_bench.encoder import tiny_train_throughput

            train = float(tiny_train_throughput(threads=1)["samples_per_s"])
            train_note = "flad_bench.encoder.tiny_train_throughput (tiny encoder, 1 thread, CPU)"
        except Exception as exc:           # the encoder is another team's; its absence is not our failure
            train_note = f"not measured: {type(exc).__name__}: {exc}"
    out["train_samples_per_s"] = train
    out["train_note"] = train_note or "not measured (pass --train-samples-per-s or --measure-train)"
    if train and "loader" in out:
        out["loader_over_train"] = round(out["loader"]["samples_per_s"] / train, 1)
    goals = {}
    if "sensors" in out:        # wall clock, and per CPU-second of this process (less sensitive to a shared host)
        goals["frames_per_s>=50"] = out["sensors"]["frames_per_s"] >= 50
        goals["frames_per_cpu_s>=50"] = out["sensors"]["frames_per_cpu_s"] >= 50
    if "ticks_per_s" in out.get("physics", {}):
        goals["ticks_per_s>=1000"] = out["physics"]["ticks_per_s"] >= 1000
        if "ticks_per_cpu_s" in out["physics"]:
            goals["ticks_per_cpu_s>=1000"] = out["physics"]["ticks_per_cpu_s"] >= 1000
    if "loader_over_train" in out:
        goals["loader>=5x_train"] = out["loader_over_train"] >= 5
    out["goals_met"] = goals
    out["conditions"] = {"host": platform.node(), "pinned_cpu": cpu, "cpus": os.cpu_count(),
                         "load_avg": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
                         "numpy": np.__version__, "note": "one process pinned to one core; shared host, noisy"}
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
