"""Dataset shards: round trip, manifests and checksums, corrupted/truncated shards named in the error,
batch iteration, the fleet split, and collection from the synthetic scene and from the embedded world."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from flad_sim.dataset import (
    MANIFEST,
    CollectConfig,
    FleetDataset,
    Shard,
    ShardError,
    ShardWriter,
    assign_towns,
    collect,
    iter_batches,
    loader_throughput,
)
from flad_sim.schema import TEXT_FIELDS, sample_fields

SMALL_CAMS = {"rgb_front": (8, 8), "rgb_left": (4, 4), "rgb_right": (4, 4), "rgb_rear": (4, 4)}
SPECS = sample_fields(SMALL_CAMS, lidar_rays=16)


def make_sample(i: int, rng: np.random.Generator) -> dict:
    s = {k: (rng.integers(0, 255, spec.shape) if spec.dtype == "uint8" else rng.normal(size=spec.shape) * 10
             ).astype(spec.dtype) for k, spec in SPECS.items()}
    s["tl_state"] = np.int64(i % 4)
    s["instruction"] = f"turn left in {i} m — ünïcode"
    s["notice"] = "" if i % 3 else "red light ahead"
    return s


def write(path: Path, n: int, vid: str = "v000", seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    samples = [make_sample(i, rng) for i in range(n)]
    with ShardWriter(path, vid, n, SPECS, towns=["Town01"]) as w:
        for s in samples:
            w.append(s, "Town01")
    return samples


def test_round_trip(tmp_path):
    samples = write(tmp_path / "v000", 7)
    sh = Shard.open(tmp_path / "v000", verify=True)
    assert len(sh) == 7 and sh.vehicle_id == "v000" and sh.towns == ["Town01"]
    for i, s in enumerate(samples):
        got = sh[i]
        for k in SPECS:
            np.testing.assert_array_equal(got[k], s[k], err_msg=k)
            assert got[k].dtype == np.dtype(SPECS[k].dtype)
        for k in TEXT_FIELDS:
            assert got[k] == s[k]
    assert isinstance(sh.fields["lidar"], np.memmap)
    with pytest.raises(IndexError):
        sh[7]
    assert sh[-1]["instruction"] == samples[-1]["instruction"]


def test_manifest_checksums_match_files(tmp_path):
    write(tmp_path / "v000", 3)
    m = json.loads((tmp_path / "v000" / MANIFEST).read_text())
    assert m["count"] == 3 and set(m["fields"]) == set(SPECS)
    for name, info in m["files"].items():
        data = (tmp_path / "v000" / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info["sha256"] and len(data) == info["bytes"]
    assert m["files"]["rgb_front.npy"]["shape"] == [3, 8, 8, 3]


def test_truncated_file_names_the_file(tmp_path):
    write(tmp_path / "v000", 5)
    bad = tmp_path / "v000" / "lidar.npy"
    bad.write_bytes(bad.read_bytes()[:-10])
    with pytest.raises(ShardError, match=r"lidar\.npy") as ei:
        Shard.open(tmp_path / "v000")
    assert ei.value.path == bad


def test_corrupted_bytes_found_by_checksum(tmp_path):
    write(tmp_path / "v000", 5)
    bad = tmp_path / "v000" / "rgb_left.npy"
    data = bytearray(bad.read_bytes())
    data[-3] ^= 0xFF
    bad.write_bytes(bytes(data))
    Shard.open(tmp_path / "v000")                         # same size: the cheap open cannot tell
    with pytest.raises(ShardError, match=r"rgb_left\.npy.*sha256"):
        Shard.open(tmp_path / "v000", verify=True)
    with pytest.raises(ShardError, match=r"rgb_left\.npy"):
        Shard.open(tmp_path / "v000").verify()


def test_missing_file_and_broken_manifest(tmp_path):
    write(tmp_path / "v000", 2)
    (tmp_path / "v000" / "notice.utf8.npy").unlink()
    with pytest.raises(ShardError, match=r"notice\.utf8\.npy"):
        Shard.open(tmp_path / "v000")
    (tmp_path / "v000" / MANIFEST).write_text("{not json")
    with pytest.raises(ShardError, match=r"manifest\.json"):
        Shard.open(tmp_path / "v000")
    with pytest.raises(ShardError, match=r"manifest\.json"):
        Shard.open(tmp_path / "nowhere")


def test_header_tampering_detected(tmp_path):
    """A file whose .npy header claims another shape is caught even if its size is unchanged."""
    write(tmp_path / "v000", 4)
    p = tmp_path / "v000" / "speed.npy"
    np.save(p, np.zeros((2, 2), np.float32))              # 4 float32 again, but shape (2, 2)
    m = json.loads((tmp_path / "v000" / MANIFEST).read_text())
    m["files"]["speed.npy"]["bytes"] = p.stat().st_size
    (tmp_path / "v000" / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ShardError, match=r"speed\.npy"):
        Shard.open(tmp_path / "v000")


def test_failed_write_leaves_nothing(tmp_path):
    rng = np.random.default_rng(0)
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "v000", "v000", 3, SPECS) as w:
        w.append(make_sample(0, rng))
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_short_shard_is_truncated(tmp_path):
    rng = np.random.default_rng(0)
    with ShardWriter(tmp_path / "v", "v", 10, SPECS) as w:
        for i in range(4):
            w.append(make_sample(i, rng))
    sh = Shard.open(tmp_path / "v", verify=True)
    assert len(sh) == 4 and sh.fields["rgb_front"].shape[0] == 4


def test_iter_batches_cover_everything_once_and_deterministic(tmp_path):
    shards = []
    for k, n in enumerate((5, 0, 9)):
        write(tmp_path / f"v{k}", n, f"v{k}", seed=k)
        shards.append(Shard.open(tmp_path / f"v{k}"))
    seen = []
    for b in iter_batches(shards, 4, seed=1):
        assert b["rgb_front"].shape[1:] == (8, 8, 3) and isinstance(b["instruction"], list)
        assert len(b["instruction"]) == len(b["speed"])
        seen += b["speed"].tolist()
    allspeed = sorted(float(s.fields["speed"][i]) for s in shards for i in range(len(s)))
    assert sorted(seen) == allspeed
    a = [b["speed"].tolist() for b in iter_batches(shards, 4, seed=1)]
    assert a == [b["speed"].tolist() for b in iter_batches(shards, 4, seed=1)]
    assert a != [b["speed"].tolist() for b in iter_batches(shards, 4, seed=2)]
    sizes = [len(b["speed"]) for b in iter_batches(shards, 4, drop_last=True)]
    assert sizes == [4, 4, 4]
    ordered = list(iter_batches(shards[0], 2, shuffle=False, fields=["speed", "notice"]))
    assert set(ordered[0]) == {"speed", "notice"}
    np.testing.assert_array_equal(ordered[0]["speed"], shards[0].fields["speed"][:2])
    with pytest.raises(KeyError):
        next(iter_batches(shards, 2, fields=["nope"]))


def test_assign_towns_non_iid():
    plan = assign_towns(12, ["A", "B", "C"], 10)
    assert all(len(p) == 1 and sum(p.values()) == 10 for p in plan.values())
    assert sorted(next(iter(p)) for p in plan.values()) == ["A"] * 4 + ["B"] * 4 + ["C"] * 4
    skew = assign_towns(20, ["A", "B", "C"], 50, seed=3, dirichlet_alpha=0.1)
    assert all(sum(p.values()) == 50 for p in skew.values())
    assert skew == assign_towns(20, ["A", "B", "C"], 50, seed=3, dirichlet_alpha=0.1)
    iid = assign_towns(20, ["A", "B", "C"], 300, seed=3, dirichlet_alpha=100.0)
    assert all(len(p) == 3 for p in iid.values())


def _small_cfg(out: Path, **kw) -> CollectConfig:
    return CollectConfig(out=str(out), front_size=16, side_size=8, lidar_channels=4, lidar_azimuth_steps=32,
                         workers=1, **kw)


def test_collect_synthetic_fleet_and_open(tmp_path):
    cfg = _small_cfg(tmp_path / "fleet", vehicles=3, frames_per_vehicle=4, towns=["A", "B"])
    m = collect(cfg, source="synthetic", progress=False)
    assert m["total"] == 12 and m["town_counts"] == {"A": 8, "B": 4}
    ds = FleetDataset.open(tmp_path / "fleet", verify=True)
    assert sorted(ds.shards) == ["v000", "v001", "v002"] and len(ds) == 12
    assert [s.vehicle_id for s in ds.select(towns=["B"])] == ["v001"]
    assert [s.vehicle_id for s in ds.select(vehicles=["v002"])] == ["v002"]
    assert ds.shards["v000"][0]["rgb_front"].shape == (16, 16, 3)
    # a second collect replaces the first atomically
    collect(_small_cfg(tmp_path / "fleet", vehicles=1, frames_per_vehicle=2, towns=["A"]), source="synthetic",
            progress=False)
    assert len(FleetDataset.open(tmp_path / "fleet")) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["fleet"]
    r = loader_throughput(list(ds.shards.values()), 4, seconds=0.2)
    assert r["samples_per_s"] > 0


def test_fleet_open_names_the_bad_shard(tmp_path):
    collect(_small_cfg(tmp_path / "f", vehicles=2, frames_per_vehicle=2, towns=["A"]), source="synthetic",
            progress=False)
    bad = tmp_path / "f" / "vehicles" / "v001" / "bev.npy"
    bad.write_bytes(bad.read_bytes()[:50])
    with pytest.raises(ShardError, match=r"v001.bev\.npy"):
        FleetDataset.open(tmp_path / "f")


def test_collect_from_the_world(tmp_path):
    pytest.importorskip("flad_sim.world")
    cfg = _small_cfg(tmp_path / "w", vehicles=2, frames_per_vehicle=3, towns=["Town01", "Town03"], seed=5)
    collect(cfg, source="world", progress=False)
    ds = FleetDataset.open(tmp_path / "w", verify=True)
    a = ds.shards["v000"]
    assert a.towns == ["Town01"] and ds.shards["v001"].towns == ["Town03"]
    s = a[2]
    assert s["waypoints"].shape == (5, 2) and np.all(np.isfinite(s["waypoints"]))
    assert s["instruction"] and int(s["town"]) == 0 and int(ds.shards["v001"][0]["town"]) == 2
    # determinism: the same seed gives the same data
    collect(_small_cfg(tmp_path / "w2", vehicles=2, frames_per_vehicle=3, towns=["Town01", "Town03"], seed=5),
            source="world", progress=False)
    b = FleetDataset.open(tmp_path / "w2").shards["v000"]
    for k in a.fields:
        np.testing.assert_array_equal(a.fields[k], b.fields[k], err_msg=k)
