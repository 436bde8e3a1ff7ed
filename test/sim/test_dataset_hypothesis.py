"""Property tests for the shard manifest parser: any mutation of a valid manifest, or arbitrary bytes,
either opens as a consistent shard or raises ShardError naming a file of the shard -- never anything else."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flad_sim.dataset import MANIFEST, Shard, ShardError, ShardWriter
from flad_sim.schema import sample_fields

SPECS = sample_fields({"rgb_front": (4, 4)}, lidar_rays=8)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**12) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
    max_leaves=6)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("shard") / "v000"
    rng = np.random.default_rng(0)
    with ShardWriter(d, "v000", 3, SPECS, towns=["Town01"]) as w:
        for i in range(3):
            s = {k: np.full(spec.shape, i, dtype=spec.dtype) for k, spec in SPECS.items()}
            s["instruction"] = f"go {rng.integers(100)}"
            s["notice"] = ""
            w.append(s, "Town01")
    return d


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _check(work: Path) -> None:
    try:
        sh = Shard.open(work)
    except ShardError as exc:
        assert str(exc.path).startswith(str(work))
        return
    # if it opened, it must be self-consistent
    for i in range(len(sh)):
        sh[i]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_manifest_never_crashes(shard_dir, tmp_path_factory, data):
    m = json.loads((shard_dir / MANIFEST).read_text())
    paths = list(_paths(m))
    path = data.draw(st.sampled_from(paths[1:]))
    value = data.draw(json_values)
    node = m
    for k in path[:-1]:
        node = node[k]
    if data.draw(st.booleans()) and isinstance(node, dict):
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value
    work = tmp_path_factory.mktemp("mut") / "v000"
    shutil.copytree(shard_dir, work)
    (work / MANIFEST).write_text(json.dumps(m))
    _check(work)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=200))
def test_garbage_manifest_is_a_shard_error(shard_dir, tmp_path_factory, blob):
    work = tmp_path_factory.mktemp("garbage") / "v000"
    shutil.copytree(shard_dir, work)
    (work / MANIFEST).write_bytes(blob)
    with pytest.raises(ShardError, match=r"manifest\.json"):
        Shard.open(work)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["rgb_front.npy", "lidar.npy", "instruction.offsets.npy", "instruction.utf8.npy"]),
       cut=st.integers(0, 400))
def test_truncation_anywhere_names_the_file(shard_dir, tmp_path_factory, name, cut):
    work = tmp_path_factory.mktemp("cut") / "v000"
    shutil.copytree(shard_dir, work)
    p = work / name
    data = p.read_bytes()
    p.write_bytes(data[:min(cut, len(data) - 1)])
    with pytest.raises(ShardError, match=name.replace(".", r"\.")):
        Shard.open(work)
