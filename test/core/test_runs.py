"""Run records and atomic writes: nothing torn, everything a run did is on disk."""

from __future__ import annotations

import json
import os
import re

import pytest
import yaml

from flad_core.atomic import atomic_open, atomic_write_json
from flad_core.fleet import load_fleet
from flad_core.roles import default_fleet_path
from flad_core.runs import RunDir


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "ckpt.json"
    atomic_write_json(target, {"step": 1})
    atomic_write_json(target, {"step": 2})
    assert json.loads(target.read_text()) == {"step": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.json"]


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_open(target) as fh:
        fh.write(b"half of the new")
        raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]


def test_run_dir_records_config_meta_metrics(tmp_path):
    fleet = load_fleet(default_fleet_path())
    run = RunDir.create("unit", fleet, root=tmp_path, log=False)
    assert re.fullmatch(r"\d{8}T\d{9}-unit-[0-9a-f]{6}", run.id)
    cfg = yaml.safe_load((run.path / "config.yaml").read_text())
    assert cfg["seed"] == fleet.seed and cfg["vehicles"][0]["id"] == fleet.vehicles[0].id
    meta = json.loads((run.path / "meta.json").read_text())
    assert meta["kind"] == "unit" and meta["python"]
    run.log_metrics({"step": 1, "loss": 0.5})
    run.log_metrics({"step": 2, "loss": 0.25})
    assert [m["loss"] for m in run.read_metrics()] == [0.5, 0.25]
    with pytest.raises(FileExistsError):
        RunDir.create("unit", fleet, root=tmp_path, run_id=run.id, log=False)
    assert os.access(run.path / "metrics.jsonl", os.R_OK)
