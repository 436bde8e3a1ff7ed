"""Per-vehicle dataset shards for a fleet: writer, verifying loader, fast batch iterator, and collection.

Layout (root defaults to `data/fleet`):

    root/manifest.json                 fleet: vehicles -> towns, counts per town, sensor config, seed
    root/vehicles/<vid>/manifest.json  shard: count, towns, per-file dtype/shape/bytes/sha256
    root/vehicles/<vid>/<field>.npy    one memory-mappable array per numeric field, first axis = sample
    root/vehicles/<vid>/<text>.offsets.npy, <text>.utf8.npy   text fields: int64 offsets + UTF-8 bytes

Why this shape: raw sensor data never leaves its vehicle, so each vehicle owns exactly one folder that can
be shipped to (or generated on) that vehicle alone. Plain .npy files open with `mmap_mode='r'`, so a
batch is a fancy-index copy out of the page cache -- the loader is never the training bottleneck.
Every shard and the whole fleet are written into a temporary folder and renamed into place, so a crash
leaves the old data or the new data, never a torn mix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flad_core.atomic import atomic_write_json, fsync_dir
from flad_sim.schema import TEXT_FIELDS, FieldSpec, sample_fields

log = logging.getLogger(__name__)

FORMAT = "flad-shard/1"
FLEET_FORMAT = "flad-fleet/1"
MANIFEST = "manifest.json"
DEFAULT_ROOT = Path("data/fleet")


class ShardError(RuntimeError):
    """A shard on disk does not match its manifest (missing, truncated or corrupted file).

    `path` is the offending file."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


# --------------------------------------------------------------------------------------------------
# writing


def _sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def replace_dir(tmp: Path, final: Path) -> None:
    """Atomically put directory `tmp` at `final` (an existing `final` is moved aside, then deleted)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}-{time.monotonic_ns()}"
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class ShardWriter:
    """Writes one vehicle's shard: numeric fields into pre-allocated .npy memmaps, text into lists.

    Use as a context manager; on clean exit the shard is finalised (checksums, manifest) and renamed
    into `path`. `capacity` is the most samples it will hold; fewer are fine (files are truncated)."""

    def __init__(self, path: Path | str, vehicle_id: str, capacity: int, specs: dict[str, FieldSpec],
                 towns: list[str] | None = None, meta: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.vehicle_id = vehicle_id
        self.capacity = int(capacity)
        self.specs = dict(specs)
        self.towns = list(towns or [])
        self.meta = dict(meta or {})
        self.count = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        self._arrays = {k: np.lib.format.open_memmap(self._tmp / f"{k}.npy", mode="w+", dtype=np.dtype(s.dtype),
                                                     shape=(max(self.capacity, 1), *s.shape))
                        for k, s in self.specs.items()}
        self._text: dict[str, list[str]] = {k: [] for k in TEXT_FIELDS}
        self._town_counts: dict[str, int] = {}

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def append(self, sample: dict[str, Any], town: str | None = None) -> None:
        if self.count >= self.capacity:
            raise ValueError(f"shard {self.vehicle_id}: capacity {self.capacity} exceeded")
        for k, s in self.specs.items():
            if k not in sample:
                raise KeyError(f"sample is missing field {k!r}")
            v = np.asarray(sample[k])
            if v.shape != s.shape:
                raise ValueError(f"field {k!r}: expected shape {s.shape}, got {v.shape}")
            self._arrays[k][self.count] = v
        for k in TEXT_FIELDS:
            self._text[k].append(str(sample.get(k, "")))
        if town is not None:
            self._town_counts[town] = self._town_counts.get(town, 0) + 1
            if town not in self.towns:
                self.towns.append(town)
        self.count += 1

    def abort(self) -> None:
        self._arrays.clear()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def close(self) -> dict[str, Any]:
        """Finalise: truncate to `count`, write text, checksum everything, write the manifest, rename."""
        n = self.count
        files: dict[str, Any] = {}
        for arr in self._arrays.values():
            arr.flush()
        self._arrays.clear()
        for k, s in self.specs.items():
            p = self._tmp / f"{k}.npy"
            if n != max(self.capacity, 1):      # rewrite with the real length (rare: a drive ended early)
                data = np.load(p, mmap_mode="r")[:n].copy()
                np.save(p, data)
            files[f"{k}.npy"] = {"field": k, "dtype": np.dtype(s.dtype).str, "shape": [n, *s.shape]}
        for k, texts in self._text.items():
            enc = [t.encode("utf-8") for t in texts]
            offsets = np.zeros(n + 1, np.int64)
            if n:
                offsets[1:] = np.cumsum([len(b) for b in enc])
            blob = np.frombuffer(b"".join(enc), dtype=np.uint8)
            np.save(self._tmp / f"{k}.offsets.npy", offsets)
            np.save(self._tmp / f"{k}.utf8.npy", blob)
            files[f"{k}.offsets.npy"] = {"field": k, "dtype": "<i8", "shape": [n + 1], "text": "offsets"}
            files[f"{k}.utf8.npy"] = {"field": k, "dtype": "|u1", "shape": [int(blob.size)], "text": "utf8"}
        for name, info in files.items():
            p = self._tmp / name
            with open(p, "rb+") as fh:
                os.fsync(fh.fileno())
            info["bytes"] = p.stat().st_size
            info["sha256"] = _sha256_file(p)
        manifest = {
            "format": FORMAT, "vehicle_id": self.vehicle_id, "count": n, "towns": self.towns,
            "town_counts": self._town_counts, "fields": {k: {"dtype": np.dtype(s.dtype).str, "shape": list(s.shape),
                                                             "doc": s.doc} for k, s in self.specs.items()},
            "text_fields": list(TEXT_FIELDS), "files": files, "meta": self.meta,
        }
        atomic_write_json(self._tmp / MANIFEST, manifest)
        replace_dir(self._tmp, self.path)
        return manifest


def is_fleet_dataset(root: Path | str) -> bool:
    """Whether `root` holds a `flad sim collect` output (its fleet manifest)."""
    return (Path(root) / MANIFEST).is_file()


def write_shard(path: Path | str, vehicle_id: str, samples: Iterable[dict[str, Any]], specs: dict[str, FieldSpec],
                capacity: int, towns: list[str] | None = None) -> dict[str, Any]:
    """Convenience: write an iterable of samples (each may carry a `_town` key) as one shard."""
    with ShardWriter(path, vehicle_id, capacity, specs, towns) as w:
        for s in samples:
            w.append(s, s.get("_town"))
    return json.loads((Path(path) / MANIFEST).read_text())


# --------------------------------------------------------------------------------------------------
# reading


def _expected_npy_bytes(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> int:
    """Size a .npy file of this dtype/shape must have, from its own header length."""
    with open(path, "rb") as fh:
        try:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                np.lib.format.read_array_header_1_0(fh)
            else:
                np.lib.format.read_array_header_2_0(fh)
        except ValueError as exc:
            raise ShardError(path, f"not a valid .npy file ({exc})") from exc
        header = fh.tell()
    return header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def _parse_shard_manifest(path: Path) -> dict[str, Any]:
    """Load and structurally check a shard manifest; ShardError naming the file on any defect."""
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ShardError(path, "manifest is missing (not a shard, or an interrupted write)") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardError(path, f"manifest is not valid JSON ({exc})") from exc
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ShardError(path, f"not a {FORMAT} manifest")
    try:
        count = m["count"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"bad count {count!r}")
        if not isinstance(m["vehicle_id"], str) or not isinstance(m["towns"], list):
            raise ValueError("bad vehicle_id/towns")
        for name, info in m["files"].items():
            if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
                raise ValueError(f"bad file name {name!r}")
            np.dtype(info["dtype"])
            shape = info["shape"]
            if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                      for d in shape):
                raise ValueError(f"bad shape for {name}: {shape!r}")
            if not isinstance(info["sha256"], str) or not isinstance(info["bytes"], int):
                raise ValueError(f"bad checksum/bytes for {name}")
        for k, spec in m["fields"].items():
            f = m["files"].get(f"{k}.npy")
            if f is None or f["shape"][:1] != [count] or f["shape"][1:] != list(spec["shape"]):
                raise ValueError(f"field {k!r} does not match its file entry")
        for k in m.get("text_fields", []):
            off = m["files"].get(f"{k}.offsets.npy")
            if off is None or off["shape"] != [count + 1] or f"{k}.utf8.npy" not in m["files"]:
                raise ValueError(f"text field {k!r} does not match its file entries")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ShardError(path, f"malformed manifest ({exc!r})") from exc
    return m


class Shard:
    """One vehicle's data: memory-mapped numeric fields and lazily decoded text fields."""

    def __init__(self, path: Path, manifest: dict[str, Any], fields: dict[str, np.ndarray],
                 text: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        self.path = path
        self.manifest = manifest
        self.vehicle_id: str = manifest["vehicle_id"]
        self.towns: list[str] = list(manifest["towns"])
        self.fields: dict[str, np.ndarray] = fields
        self._text = text
        self._n = int(manifest["count"])

    @classmethod
    def open(cls, path: Path | str, verify: bool = False) -> Shard:
        """Open a shard. Always checks every file's existence, size, dtype and shape against the manifest;
        `verify=True` also checks sha256 of every file (reads everything). Raises ShardError naming the
        bad file."""
        path = Path(path)
        m = _parse_shard_manifest(path / MANIFEST)
        arrays: dict[str, np.ndarray] = {}
        for name, info in m["files"].items():
            p = path / name
            if not p.is_file():
                raise ShardError(p, "file listed in the manifest is missing")
            size = p.stat().st_size
            if size != info["bytes"]:
                raise ShardError(p, f"size {size} bytes, manifest says {info['bytes']} (truncated or corrupted)")
            dtype = np.dtype(info["dtype"])
            shape = tuple(info["shape"])
            if _expected_npy_bytes(p, dtype, shape) != size:
                raise ShardError(p, "file size does not match the dtype/shape in the manifest")
            if verify:
                digest = _sha256_file(p)
                if digest != info["sha256"]:
                    raise ShardError(p, f"sha256 mismatch (corrupted): {digest} != manifest {info['sha256']}")
            try:
                empty = int(np.prod(shape, dtype=np.int64)) == 0     # an empty file cannot be mmapped
                arr = np.load(p, mmap_mode=None if empty else "r", allow_pickle=False)
            except (ValueError, OSError) as exc:
                raise ShardError(p, f"cannot be loaded ({exc})") from exc
            if arr.dtype != dtype or arr.shape != shape:
                raise ShardError(p, f"holds {arr.dtype}{list(arr.shape)}, manifest says {dtype}{list(shape)}")
            arrays[name] = arr
        fields = {k: arrays[f"{k}.npy"] for k in m["fields"]}
        text = {k: (arrays[f"{k}.offsets.npy"], arrays[f"{k}.utf8.npy"]) for k in m.get("text_fields", [])}
        for k, (off, blob) in text.items():
            if m["count"] and (off[0] != 0 or off[-1] != blob.shape[0] or np.any(np.diff(off) < 0)):
                raise ShardError(path / f"{k}.offsets.npy", "text offsets are inconsistent with the text bytes")
        return cls(path, m, fields, text)

    def __len__(self) -> int:
        return self._n

    @property
    def text_fields(self) -> list[str]:
        return list(self._text)

    def text(self, name: str, i: int) -> str:
        off, blob = self._text[name]
        return bytes(blob[int(off[i]):int(off[i + 1])]).decode("utf-8")

    def texts(self, name: str, idx: np.ndarray) -> list[str]:
        off, blob = self._text[name]
        return [bytes(blob[int(off[i]):int(off[i + 1])]).decode("utf-8") for i in idx]

    def __getitem__(self, i: int) -> dict[str, np.ndarray | str]:
        i = int(i)
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"sample {i} out of range for shard {self.vehicle_id} ({self._n} samples)")
        out: dict[str, np.ndarray | str] = {k: np.array(a[i]) for k, a in self.fields.items()}
        out.update({k: self.text(k, i) for k in self._text})
        return out

    def verify(self) -> None:
        """Full checksum verification of every file (ShardError on the first mismatch)."""
        for name, info in self.manifest["files"].items():
            p = self.path / name
            if _sha256_file(p) != info["sha256"]:
                raise ShardError(p, "sha256 mismatch (corrupted)")

    def __repr__(self) -> str:
        return f"Shard({self.vehicle_id!r}, {self._n} samples, towns={self.towns})"


class FleetDataset:
    """All vehicles' shards under one root, as written by `flad sim collect`."""

    def __init__(self, root: Path, manifest: dict[str, Any], shards: dict[str, Shard]) -> None:
        self.root = root
        self.manifest = manifest
        self.shards = shards

    @classmethod
    def open(cls, root: Path | str = DEFAULT_ROOT, verify: bool = False) -> FleetDataset:
        root = Path(root)
        mpath = root / MANIFEST
        try:
            m = json.loads(mpath.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ShardError(mpath, "fleet manifest is missing (run `flad sim collect` first?)") from exc
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ShardError(mpath, f"fleet manifest is not valid JSON ({exc})") from exc
        if not isinstance(m, dict) or m.get("format") != FLEET_FORMAT or not isinstance(m.get("vehicles"), dict):
            raise ShardError(mpath, f"not a {FLEET_FORMAT} manifest")
        shards = {}
        for vid, info in m["vehicles"].items():
            ok = isinstance(info, dict) and isinstance(info.get("path"), str) and isinstance(info.get("count"), int)
            if not ok:
                raise ShardError(mpath, f"bad entry for vehicle {vid!r}: {info!r}")
            sh = Shard.open(root / info["path"], verify=verify)
            if sh.vehicle_id != vid or len(sh) != info["count"]:
                raise ShardError(root / info["path"] / MANIFEST,
                                 f"shard says {sh.vehicle_id}/{len(sh)} samples, fleet manifest {vid}/{info['count']}")
            shards[vid] = sh
        return cls(root, m, shards)

    def select(self, towns: Iterable[str] | None = None, vehicles: Iterable[str] | None = None) -> list[Shard]:
        """Shards of the given vehicles and/or that contain any of the given towns (None = all)."""
        ts = set(towns) if towns is not None else None
        vs = set(vehicles) if vehicles is not None else None
        return [s for vid, s in sorted(self.shards.items())
                if (vs is None or vid in vs) and (ts is None or ts & set(s.towns))]

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards.values())


def iter_batches(shards: Shard | list[Shard], batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, fields: list[str] | None = None
                 ) -> Iterator[dict[str, np.ndarray | list[str]]]:
    """Batches over one or several shards: numeric fields stacked as arrays [B, ...], text as lists.

    Shuffling is global across shards and deterministic in `seed`; within a batch, samples are read in
    (shard, index) order so each read is a sorted fancy index into a memmap (sequential-ish IO)."""
    if isinstance(shards, Shard):
        shards = [shards]
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    shards = [s for s in shards if len(s)]
    if not shards:
        return
    names = fields if fields is not None else list(shards[0].fields) + shards[0].text_fields
    for s in shards:
        missing = [n for n in names if n not in s.fields and n not in s.text_fields]
        if missing:
            raise KeyError(f"shard {s.vehicle_id} has no field(s) {missing}")
    sizes = np.array([len(s) for s in shards], np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    total = int(starts[-1])
    order = np.random.default_rng(seed).permutation(total) if shuffle else np.arange(total)
    for b0 in range(0, total, batch_size):
        gidx = order[b0:b0 + batch_size]
        if len(gidx) < batch_size and drop_last:
            return
        if shuffle:
            gidx = np.sort(gidx)
        sid = np.searchsorted(starts, gidx, side="right") - 1
        out: dict[str, Any] = {}
        bounds = np.searchsorted(sid, np.arange(len(shards) + 1))
        parts = [(shards[k], gidx[bounds[k]:bounds[k + 1]] - starts[k]) for k in range(len(shards))
                 if bounds[k + 1] > bounds[k]]
        for n in names:
            if n in shards[0].fields:
                if len(parts) == 1:
                    sh, li = parts[0]
                    out[n] = _take(sh.fields[n], li)
                else:
                    out[n] = np.concatenate([_take(sh.fields[n], li) for sh, li in parts])
            else:
                out[n] = [t for sh, li in parts for t in sh.texts(n, li)]
        yield out


def _take(arr: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Copy rows `idx` (sorted) out of a memmap; contiguous runs become one slice copy."""
    if idx.size and idx[-1] - idx[0] + 1 == idx.size:
        return np.array(arr[int(idx[0]):int(idx[-1]) + 1])
    return arr[idx]


# --------------------------------------------------------------------------------------------------
# fleet split


def assign_towns(n_vehicles: int, towns: list[str], frames_per_vehicle: int, seed: int = 0,
                 dirichlet_alpha: float | None = None) -> dict[str, dict[str, int]]:
    """vehicle id -> {town: frames}. Without alpha each vehicle drives ONE town (round-robin, so towns are
    balanced across the fleet and data is non-IID by town, as in the paper's split by CARLA town). With
    alpha, each vehicle's frames are spread over towns by a Dirichlet(alpha) draw: small alpha -> nearly
    one town per vehicle, large alpha -> close to IID."""
    if n_vehicles < 1 or not towns:
        raise ValueError("need at least one vehicle and one town")
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, int]] = {}
    width = max(3, len(str(n_vehicles - 1)))
    for v in range(n_vehicles):
        vid = f"v{v:0{width}d}"
        if dirichlet_alpha is None or dirichlet_alpha <= 0:
            out[vid] = {towns[v % len(towns)]: frames_per_vehicle}
        else:
            p = rng.dirichlet(np.full(len(towns), float(dirichlet_alpha)))
            counts = rng.multinomial(frames_per_vehicle, p)
            out[vid] = {t: int(c) for t, c in zip(towns, counts, strict=True) if c > 0}
    return out


# --------------------------------------------------------------------------------------------------
# collection (driving the embedded world)


@dataclass
class CollectConfig:
    """`flad sim collect` settings (see its --help)."""

    out: str = str(DEFAULT_ROOT)
    vehicles: int = 50
    frames_per_vehicle: int = 60
    towns: list[str] = field(default_factory=list)   # empty = all towns of the world
    dirichlet_alpha: float | None = None
    seed: int = 0
    workers: int = 2
    record_every: int = 5          # world ticks (20 Hz) between recorded frames: 4 samples per simulated s
    max_route_frames: int = 400    # start a new route after this many frames even if not finished
    front_size: int = 128
    side_size: int = 64
    lidar_channels: int = 32
    lidar_azimuth_steps: int = 512

    def validate(self) -> None:
        if self.vehicles < 1 or self.frames_per_vehicle < 1:
            raise ValueError("vehicles and frames_per_vehicle must be >= 1")
        if self.workers < 1 or self.record_every < 1:
            raise ValueError("workers and record_every must be >= 1")
        if self.dirichlet_alpha is not None and self.dirichlet_alpha <= 0:
            raise ValueError("dirichlet_alpha must be > 0")

    def rig_config(self):
        from flad_sim.sensors import LidarConfig, RigConfig, default_cameras

        sizes = {"rgb_front": (self.front_size, self.front_size), "rgb_left": (self.side_size, self.side_size),
                 "rgb_right": (self.side_size, self.side_size), "rgb_rear": (self.side_size, self.side_size)}
        return RigConfig(cameras=default_cameras(sizes),
                         lidar=LidarConfig(channels=self.lidar_channels, azimuth_steps=self.lidar_azimuth_steps),
                         seed=self.seed)


SampleSource = Callable[[str, int, int, "CollectConfig"], Iterator[dict[str, Any]]]


def _vehicle_seed(seed: int, vid: str, town: str) -> int:
    h = hashlib.sha256(f"{seed}:{vid}:{town}".encode()).digest()
    return int.from_bytes(h[:4], "little")


def _collect_vehicle(args: tuple) -> tuple[str, dict[str, Any], float]:
    """Worker: drive one vehicle through its towns and write its shard into `tmp_root`."""
    cfg_dict, vid, plan, tmp_root, source_name = args
    from flad_core.config import from_dict

    cfg = from_dict(CollectConfig, cfg_dict)
    t0 = time.perf_counter()
    rig_cfg = cfg.rig_config()
    specs = sample_fields(rig_cfg.camera_sizes, rig_cfg.lidar.rays)
    source = _sources()[source_name] if isinstance(source_name, str) else source_name
    total = sum(plan.values())
    meta = {"seed": cfg.seed, "record_every": cfg.record_every, "source": _source_name(source_name)}
    if hasattr(source, "cfg") and hasattr(source.cfg, "describe"):
        meta["onpolicy"] = source.cfg.describe()
    with ShardWriter(Path(tmp_root) / "vehicles" / vid, vid, total, specs, towns=list(plan), meta=meta) as w:
        for town, n in plan.items():
            for s in source(town, n, _vehicle_seed(cfg.seed, vid, town), cfg):
                w.append(s, town)
    return vid, {"count": w.count, "towns": w.towns, "town_counts": w._town_counts}, time.perf_counter() - t0


def _sources() -> dict[str, Callable[..., Iterator[dict[str, Any]]]]:
    return {"world": world_samples, "synthetic": synthetic_samples}


def _source_name(source: str | SampleSource) -> str:
    return source if isinstance(source, str) else str(getattr(source, "name", type(source).__name__))


def collect(cfg: CollectConfig, source: str | SampleSource = "world", progress: bool = True) -> dict[str, Any]:
    """Collect a fleet dataset into `cfg.out` (atomically); returns the fleet manifest.

    `source`: "world" (the expert's drives), "synthetic", or a picklable sample source such as
    `flad_sim.onpolicy.OnPolicySource` (DAgger / noise-injection frames)."""
    cfg.validate()
    towns = list(cfg.towns) or available_towns()
    plan = assign_towns(cfg.vehicles, towns, cfg.frames_per_vehicle, cfg.seed, cfg.dirichlet_alpha)
    root = Path(cfg.out)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    cfg_dict = asdict(cfg)
    jobs = [(cfg_dict, vid, p, str(tmp), source) for vid, p in plan.items()]
    t0 = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    per_vehicle_s: dict[str, float] = {}
    try:
        from tqdm import tqdm

        bar = tqdm(total=cfg.vehicles * cfg.frames_per_vehicle, unit="frame", desc="collect", disable=not progress,
                   smoothing=0.1)
        if cfg.workers == 1:
            it: Iterable = map(_collect_vehicle, jobs)
            pool = None
        else:
            import multiprocessing as mp

            pool = mp.get_context("spawn").Pool(cfg.workers)
            it = pool.imap_unordered(_collect_vehicle, jobs)
        try:
            for vid, info, secs in it:
                results[vid] = info
                per_vehicle_s[vid] = secs
                bar.update(info["count"])
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
            bar.close()
        elapsed = time.perf_counter() - t0
        rig = cfg.rig_config()
        town_counts: dict[str, int] = {}
        for info in results.values():
            for t, c in info["town_counts"].items():
                town_counts[t] = town_counts.get(t, 0) + c
        manifest = {
            "format": FLEET_FORMAT, "source": _source_name(source), "config": cfg_dict, "towns": towns,
            "camera_sizes": {k: list(v) for k, v in rig.camera_sizes.items()}, "lidar_rays": rig.lidar.rays,
            "vehicles": {vid: {"path": f"vehicles/{vid}", "towns": results[vid]["towns"],
                               "count": results[vid]["count"], "town_counts": results[vid]["town_counts"]}
                         for vid in sorted(results)},
            "town_counts": town_counts, "total": sum(r["count"] for r in results.values()),
            "collect_seconds": round(elapsed, 2),
        }
        if hasattr(source, "cfg") and hasattr(source.cfg, "describe"):
            manifest["onpolicy"] = source.cfg.describe()
        atomic_write_json(tmp / MANIFEST, manifest)
        replace_dir(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("collected %d samples from %d vehicles in %.1f s into %s", manifest["total"], len(results), elapsed, root)
    return manifest


# ---- sample sources -------------------------------------------------------------------------------


def available_towns() -> list[str]:
    """Town names of the embedded world (falls back to ['synthetic'] when the world is not installed)."""
    try:
        from flad_sim import towns as T
    except ImportError:
        return ["synthetic"]
    for name in ("TOWN_NAMES", "TOWNS", "town_names", "list_towns"):
        v = getattr(T, name, None)
        if callable(v):
            v = v()
        if v:
            return list(v.keys()) if isinstance(v, dict) else list(v)
    return ["synthetic"]


def synthetic_samples(town: str, n: int, seed: int, cfg: CollectConfig) -> Iterator[dict[str, Any]]:
    """Samples from the hand-built crossroads (ego creeping forward); for tests and when no world exists.
    Labels are geometric placeholders: straight-ahead waypoints at the current speed."""
    from flad_sim.crossroads import synthetic_scene
    from flad_sim.sensors import SensorRig

    rig = SensorRig(cfg.rig_config())
    sv = synthetic_scene(seed % 5)
    specs = sample_fields(rig.camera_sizes, rig.lidar_rays)
    rng = np.random.default_rng(seed)
    speed = float(rng.uniform(2, 8))
    for i in range(n):
        sv.ego.y = -60.0 + (i * cfg.record_every * 0.05 * speed) % 50.0
        sv.time_s = i * cfg.record_every * 0.05
        obs = rig.observe(sv, {"x": sv.ego.x, "y": sv.ego.y, "speed": speed, "yaw_rate": 0.0})
        s: dict[str, Any] = {k: obs[k] for k in specs if k in obs}
        s["waypoints"] = np.stack([np.arange(1, 6) * 0.5 * speed, np.zeros(5)], axis=1).astype(np.float32)
        s["tl_state"] = np.int64(1)
        s["target_point"] = np.array([30.0, 0.0], np.float32)
        s["command"] = np.int64(3)
        s["town"] = np.int64(0)
        s["instruction"] = "Go straight at the next intersection."
        s["notice"] = "Red light ahead." if i % 2 else ""
        yield s


def world_samples(town: str, n: int, seed: int, cfg: CollectConfig) -> Iterator[dict[str, Any]]:
    """Samples from the embedded world: an expert drives seeded routes in `town` (a fresh World per route,
    as the leaderboard does); a frame is recorded every `record_every` ticks with the full sensor rig and the
    world's labels. Waypoints are the expert's actual future poses, so a frame is yielded 2.5 s after it was
    rendered; frames without a full future at the end of an unfinished route are dropped."""
    from flad_sim.labels import WaypointLabeler
    from flad_sim.sensors import SensorRig

    rig = SensorRig(cfg.rig_config())
    specs = sample_fields(rig.camera_sizes, rig.lidar_rays)
    drive = ExpertDrive(town, seed)
    made = 0
    while made < n:
        wl = WaypointLabeler(dt=drive.world.dt)
        pending = 0
        recorded = 0
        tick = 0
        while not drive.finished and recorded < cfg.max_route_frames and made + pending < n + 1:
            item = None
            if tick % cfg.record_every == 0 and made + pending < n:
                item = _frame(drive, rig, specs)
                pending += 1
                recorded += 1
            for it, wp in wl.push(drive.pose(), item):
                if it is not None:
                    pending -= 1
                    it["waypoints"] = wp
                    yield it
                    made += 1
            if made >= n:
                return
            drive.step()
            tick += 1
        for it, wp in wl.flush(pad=drive.completed):
            if it is not None and made < n:
                it["waypoints"] = wp
                yield it
                made += 1
        if made < n:
            drive.new_route()


def _frame(drive: ExpertDrive, rig: Any, specs: dict[str, FieldSpec]) -> dict[str, Any]:
    """One sample (all but waypoints) of the drive's current state."""
    obs = rig.observe(drive.scene_view())
    return sample_from(obs, drive.labels(), specs)


def sample_from(obs: dict[str, Any], labels: dict[str, Any], specs: dict[str, FieldSpec],
                waypoints: np.ndarray | None = None) -> dict[str, Any]:
    """One sample of `specs` from a rendered frame (`obs`) and the world's labels; `waypoints` when known
    (else the sample has none yet: recorded trajectories fill them 2.5 s later)."""
    s: dict[str, Any] = {}
    for k, spec in specs.items():
        v = (waypoints if k == "waypoints" else obs[k] if k in obs else labels.get(k))
        if v is None:
            if k == "waypoints":
                continue
            raise KeyError(f"world labels are missing field {k!r}")
        s[k] = np.asarray(v, dtype=spec.dtype).reshape(spec.shape)
    for k in TEXT_FIELDS:
        s[k] = str(labels.get(k, ""))
    return s


class ExpertDrive:
    """The world engineer's World + expert + labels, driving seeded random routes in one town.

    One fresh World per route (seeded by the drive's seed and the route index); `finished` turns true when
    the leaderboard scorer ends the route (completed, blocked, timeout, deviation)."""

    def __init__(self, town: str, seed: int, min_length: float = 150.0, max_length: float = 400.0) -> None:
        self.town_name = town
        self.seed = int(seed)
        self.min_length = min_length
        self.max_length = max_length
        self.route_index = -1
        self._rng = np.random.default_rng([self.seed, 4242])
        self.new_route()

    def new_route(self) -> None:
        from flad_sim.agent import RouteInfo
        from flad_sim.expert import ExpertAgent
        from flad_sim.labels import LabelMaker
        from flad_sim.metrics import RouteScorer
        from flad_sim.route import random_route
        from flad_sim.world import World

        self.route_index += 1
        self.world = World(self.town_name, seed=(self.seed * 7919 + self.route_index) % (2**31))
        rid = f"{self.town_name}/{self.seed}/{self.route_index}"
        self.route = random_route(self.world.town, self._rng, self.min_length, self.max_length, route_id=rid)
        self.ego_id = self.world.spawn_ego(self.route)
        self.expert = ExpertAgent(self.world)
        self.expert.reset(RouteInfo(self.route, self.world.town.name, self.ego_id, rid, self.world))
        self.scorer = RouteScorer(self.route, self.world.town)
        self.labeler = LabelMaker(self.world, self.ego_id, self.route)

    @property
    def finished(self) -> bool:
        from flad_sim.metrics import STATUS_RUNNING

        return self.scorer.status != STATUS_RUNNING

    @property
    def completed(self) -> bool:
        from flad_sim.metrics import STATUS_COMPLETED

        return self.scorer.status == STATUS_COMPLETED

    def step(self) -> None:
        w, ego = self.world, self.ego_id
        control = self.expert.run_step(None)
        w.step({ego: control})
        e = w.egos[ego]
        self.scorer.update(w.time_s, e.center(), e.yaw, e.v, w.events(ego))

    def advance(self, ticks: int) -> None:
        for _ in range(ticks):
            if self.finished:
                self.new_route()
            self.step()

    def pose(self) -> tuple[float, float, float]:
        e = self.world.egos[self.ego_id]
        return (e.x, e.y, e.yaw)

    def scene_view(self):
        return self.world.scene_view(self.ego_id)

    def ego_state(self):
        return self.world.ego_state(self.ego_id)

    def labels(self) -> dict[str, Any]:
        return self.labeler.current(self.scorer.progress)

    def route_xy(self) -> np.ndarray:
        return np.asarray(self.route.points)


def loader_throughput(shards: list[Shard], batch_size: int = 32, seconds: float = 3.0,
                      fields: list[str] | None = None) -> dict[str, float]:
    """Samples/s that `iter_batches` streams (shuffled, all fields) for about `seconds`, page cache warm.

    Training reads every shard once per epoch, so after the first epoch the data is in the page cache;
    that steady state is the figure. The first, cold pass (disk-bound) is timed and reported too.
    """
    cold_n = 0
    t_cold = time.perf_counter()
    for b in iter_batches(shards, batch_size, shuffle=False, fields=fields):
        cold_n += len(next(iter(b.values())))
    cold_s = time.perf_counter() - t_cold
    n = 0
    batches = 0
    t0 = time.perf_counter()
    epoch = 0
    while time.perf_counter() - t0 < seconds:
        for b in iter_batches(shards, batch_size, shuffle=True, seed=epoch, fields=fields):
            n += len(next(iter(b.values())))
            batches += 1
            if time.perf_counter() - t0 >= seconds:
                break
        epoch += 1
    dt = time.perf_counter() - t0
    sample_bytes = sum(a[0].nbytes for a in shards[0].fields.values()) if shards and len(shards[0]) else 0
    return {"samples_per_s": n / dt, "cold_first_pass_samples_per_s": cold_n / cold_s if cold_s > 0 else 0.0,
            "batches_per_s": batches / dt, "batch_size": batch_size,
            "mb_per_s": n * sample_bytes / dt / 1e6, "sample_bytes": sample_bytes,
            "seconds": math.floor(dt * 100) / 100}
