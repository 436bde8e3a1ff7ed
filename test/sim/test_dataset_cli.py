"""`flad sim collect` / `flad sim inspect` / `flad bench sim` as a user runs them (subprocesses, tiny sizes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

FLAD = [sys.executable, "-m", "flad_core.cli"]


def run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*FLAD, *args], capture_output=True, text=True, timeout=timeout)


def test_collect_inspect_and_corruption(tmp_path):
    out = tmp_path / "fleet"
    r = run("sim", "collect", "--source", "synthetic", "--out", str(out), "--vehicles", "2", "--frames-per-vehicle",
            "3", "--towns", "A,B", "--workers", "1", "--front-size", "16", "--side-size", "8", "--lidar-channels", "4",
            "--lidar-azimuth-steps", "16", "--runs-dir", str(tmp_path / "runs"), "--no-progress")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["samples"] == 6 and summary["town_counts"] == {"A": 3, "B": 3}
    assert (tmp_path / "runs").is_dir() and any((tmp_path / "runs").iterdir())
    r = run("sim", "inspect", str(out), "--verify")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["samples"] == 6
    bad = out / "vehicles" / "v001" / "rgb_front.npy"
    bad.write_bytes(bad.read_bytes()[:-1])
    r = run("sim", "inspect", str(out))
    assert r.returncode == 1 and "v001/rgb_front.npy" in r.stderr


def test_collect_rejects_unknown_town(tmp_path):
    pytest.importorskip("flad_sim.world")
    r = run("sim", "collect", "--towns", "Atlantis", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "Atlantis" in r.stderr


def test_bench_sim_prints_one_json_object():
    pytest.importorskip("flad_sim.world")
    r = run("bench", "sim", "--json", "--seconds", "0.2", "--towns", "Town01", "--skip", "physics,loader",
            "--train-samples-per-s", "10")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["sensors"]["frames_per_s"] > 0 and out["sensors"]["config"]["lidar"]["rays"] == 16384
    assert out["train_samples_per_s"] == 10 and "pinned_cpu" in out["conditions"]


def test_collect_on_policy_from_the_command_line(tmp_path):
    small = ["--vehicles", "1", "--frames-per-vehicle", "6", "--towns", "Town02", "--workers", "1", "--record-every",
             "10", "--front-size", "16", "--side-size", "8", "--lidar-channels", "4", "--lidar-azimuth-steps", "16",
             "--runs-dir", str(tmp_path / "runs"), "--no-progress"]
    r = run("sim", "collect", "--noise", "--noise-steer", "0.5", "--out", str(tmp_path / "noise"), *small)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["samples"] == 6 and summary["source"] == "noise" and summary["onpolicy"]["noise_steer"] == 0.5
    r = run("sim", "collect", "--dagger-learner", "flad_sim.agent:RouteFollowerAgent", "--dagger-kwargs",
            '{"speed": 5.0}', "--beta", "0.5", "--out", str(tmp_path / "dagger"), *small)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["onpolicy"] == {
        "mode": "dagger", "labels": "expert plan from the visited state", "beta": 0.5, "segment_s": 2.0,
        "learner": "flad_sim.agent:RouteFollowerAgent", "learner_kwargs": {"speed": 5.0}}
    for bad, why in ((["--noise", "--dagger-learner", "a:b"], "exclude"), (["--dagger-learner", "nocolon"], "learner"),
                     (["--dagger-learner", "a:b", "--dagger-kwargs", "{oops"], "JSON"),
                     (["--dagger-learner", "a:b", "--beta", "2"], "beta")):
        r = run("sim", "collect", *bad, "--out", str(tmp_path / "bad"), *small)
        assert r.returncode == 2 and why in r.stderr, (bad, r.stderr)
