"""A missing or unusable input anywhere in the `flad` CLI is one line naming it (and, where one exists, the
command that makes it) and exit 2 -- never a traceback, and never after minutes of work or a run folder made.

Most cases call `flad_core.cli.main(argv)` in this process (fast); a few run `flad` as a subprocess, as a
user does, from an empty working directory (a fresh clone has no data/ and no runs/).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from flad_core.cli import bench_argv, main

GB = 1e9


def _flad(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    """(exit code, the command's own stderr lines) of an in-process `flad ARGV`."""
    try:
        rc = main(list(argv))
    except SystemExit as exc:      # argparse's own errors
        rc = int(exc.code or 0)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, "\n".join(ln for ln in err.splitlines() if ln.startswith("flad "))


def _one_line(text: str, *needles: str) -> None:
    assert len(text.splitlines()) == 1, text
    for needle in needles:
        assert needle in text, (needle, text)


@pytest.fixture
def fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty working directory, as in a fresh clone; runs/ would appear here."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FLAD_RUNS_DIR", raising=False)
    monkeypatch.setenv("FLAD_SWIFT_POLICY_DIR", str(tmp_path / "policy"))
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield tmp_path
    # main() adds a stderr handler bound to this test's captured stream: drop it with the stream
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def not_a_folder(tmp_path: Path) -> Path:
    """A path whose parent is a regular file: no folder can be made there (also as root)."""
    f = tmp_path / "a_file"
    f.write_text("x")
    return f / "sub"


@pytest.fixture
def swift_files(tmp_path: Path) -> tuple[Path, Path]:
    from flad_core.config import to_dict
    from flad_edge.swift.model import synthetic_profile

    cluster = {"vehicles": [
        {"id": "nano1", "mem_bytes": 4 * GB, "tflops": 0.472, "link_mbps": 20, "stability": 0.9},
        {"id": "agx1", "mem_bytes": 16 * GB, "tflops": 3.85, "link_mbps": 100, "stability": 0.2}],
        "mu": 0.5, "nu": 1.3, "n_batch": 100}
    profile = {"layers": [to_dict(la) for la in synthetic_profile(5.55, n_layers=8, seed=0).layers]}
    c, p = tmp_path / "cluster.json", tmp_path / "profile.json"
    c.write_text(json.dumps(cluster))
    p.write_text(json.dumps(profile))
    return c, p


def test_bench_argv_drops_the_separator_and_keeps_json():
    assert bench_argv(["--json", "--", "--quick"], False) == ["--json", "--quick"]     # flad bench X --json -- ..
    assert bench_argv(["--quick"], True) == ["--json", "--quick"]                      # flad bench --json X -- ..
    assert bench_argv(["--", "--json"], True) == ["--json"]
    assert bench_argv([], False) == []


def test_unwritable_output_paths_are_one_line(capsys, fresh, not_a_folder):
    # the safety net in flad_core.cli: an OSError naming a path is the user's input, not a bug
    rc, err = _flad(capsys, "keys", "generate", "--out", str(not_a_folder), "a")
    assert rc == 2
    _one_line(err, "flad keys generate:", "a_file")
    rc, err = _flad(capsys, "sim", "show", "--out", str(not_a_folder), "--town", "synthetic", "--warmup", "0")
    assert rc == 2
    _one_line(err, "flad sim show:", "a_file")


def test_edge_swift_inputs(capsys, fresh, not_a_folder, swift_files):
    cluster, profile = swift_files
    foreign = fresh / "foreign.safetensors"
    foreign.write_text("not a policy")
    for cmd in ("plan", "templates"):
        rc, err = _flad(capsys, "edge", cmd, "--cluster", str(cluster), "--profile", str(profile), "--policy",
                        str(foreign))
        assert rc == 2
        _one_line(err, f"flad edge {cmd}:", "not a usable DQN policy", "flad edge train-policy")
        assert foreign.read_text() == "not a policy"          # never overwritten by a retrained policy
    # a bad output path fails before the work, not after it
    rc, err = _flad(capsys, "edge", "templates", "--cluster", str(cluster), "--profile", str(profile), "--method",
                    "exact", "--out", str(not_a_folder / "t.json"))
    assert rc == 2
    _one_line(err, "--out", "a_file")
    rc, err = _flad(capsys, "edge", "train-policy", "--episodes", "100000", "--out", str(not_a_folder / "p.st"))
    assert rc == 2
    _one_line(err, "flad edge train-policy:", "cannot create its folder")


def test_llm_commands_name_what_makes_their_inputs(capsys, fresh):
    rc, err = _flad(capsys, "llm", "train", "--encoder", "enc.safetensors")
    assert rc == 2
    _one_line(err, "no fleet dataset at data/fleet", "flad sim collect --out data/fleet")
    (fresh / "data" / "fleet").mkdir(parents=True)
    (fresh / "data" / "fleet" / "manifest.json").write_text("{}")
    rc, err = _flad(capsys, "llm", "train", "--encoder", "enc.safetensors")
    assert rc == 2
    _one_line(err, "enc.safetensors", "file not found", "flad vehicle train")
    rc, err = _flad(capsys, "llm", "serve", "--model", "nope")
    assert rc == 2
    _one_line(err, "flad llm serve:", "celladapt.json", "flad llm train")
    assert not (fresh / "runs").exists()


def test_sim_unknown_towns(capsys, fresh):
    rc, err = _flad(capsys, "sim", "show", "--town", "Atlantis")
    assert rc == 2
    _one_line(err, "Atlantis", "Town01")
    rc, err = _flad(capsys, "sim", "bridge", "--town", "Atlantis", "--ticks", "1")
    assert rc == 2
    _one_line(err, "Atlantis")
    assert not err.startswith('flad sim bridge: "')          # the message, not a KeyError's repr


def test_demo_checks_config_and_data_before_starting_anything(capsys, fresh):
    rc, err = _flad(capsys, "demo", "--config", "nope.yaml")
    assert rc == 2
    _one_line(err, "flad demo:", "nope.yaml")
    rc, err = _flad(capsys, "demo", "--data", "nope")
    assert rc == 2
    _one_line(err, "no fleet dataset at nope", "flad sim collect --out nope", "--data synthetic")
    assert not (fresh / "runs").exists()


def test_closed_loop_checks_inputs_before_starting_the_nodes(capsys, fresh):
    for argv, needles in ((["--town", "Atlantis"], ("Atlantis", "Town01")),
                          (["--source", "encoder_head", "--encoder-checkpoint", "nope.safetensors"],
                           ("nope.safetensors", "flad vehicle train")),
                          (["--source", "edge", "--model-dir", "nope"], ("celladapt.json", "flad llm train"))):
        rc, err = _flad(capsys, "edge", "closed-loop", *argv)
        assert rc == 2, argv
        _one_line(err, "flad edge closed-loop:", *needles)
    assert not (fresh / "runs").exists()


def test_replay_checks_checkpoint_and_adm_before_a_run_folder(capsys, fresh):
    rc, _ = _flad(capsys, "bag", "record", "--seconds", "0.3", "--front-size", "32", "--side-size", "0",
                  "--lidar-channels", "8", "--lidar-azimuth-steps", "64", "--out", "bag", "--no-progress",
                  "--runs-dir", "bag-runs")
    assert rc == 0
    runs = fresh / "runs"
    rc, err = _flad(capsys, "eval", "replay", "bag", "--checkpoint", "nope.safetensors", "--runs-dir", str(runs))
    assert rc == 2
    _one_line(err, "nope.safetensors", "flad vehicle train")
    assert not runs.exists()


@pytest.mark.parametrize(("argv", "needles"), [
    (["llm", "--", "--data", "nope"], ("no fleet dataset at nope", "flad sim collect --out nope")),
    (["llm", "--", "--encoder", "nope.safetensors"], ("nope.safetensors", "flad vehicle train")),
    (["llm", "--", "--service-only", "nope"], ("celladapt.json", "flad llm train")),
    (["sim", "--", "--data", "nope"], ("no fleet dataset at nope", "flad sim collect --out nope")),
    (["sim", "--", "--towns", "Atlantis"], ("Atlantis",)),
    (["swift", "--", "--real-profile", "nope.json"], ("nope.json", "flad vehicle profile")),
    (["swift", "--", "--sizes", "three"], ("--sizes",)),
    (["pipeline", "--", "--noniid-only", "--data", "nope"], ("no fleet dataset at nope", "flad sim collect")),
    (["bus", "--", "--frames", "0"], ("--frames",)),
])
def test_bench_bad_inputs_are_one_line(capsys, fresh, argv, needles):
    rc, err = _flad(capsys, "bench", *argv)
    assert rc == 2
    _one_line(err, f"flad bench {argv[0]}:", *needles)
    assert not (fresh / "runs").exists()


def test_bench_llm_from_a_fresh_clone_names_missing_inputs_as_a_user_sees_it(tmp_path):
    """The issue's report, as a subprocess: a missing --data is one line on stderr, nothing on stdout."""
    r = subprocess.run([sys.executable, "-m", "flad_core.cli", "bench", "llm", "--json", "--", "--data",
                        "data/fleet-x"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("flad bench llm: no fleet dataset at data/fleet-x")


@pytest.mark.parametrize("argv", [
    ["vehicle", "train", "--synthetic", "--steps", "1", "--device", "gpu"],
    ["vehicle", "profile", "--device", "gpu", "--out", "p.json"],
    ["run", "quick", "--device", "gpu"],
    ["bench", "encoder", "--", "--quick", "--device", "gpu"],
    ["bench", "pipeline", "--", "--quick", "--device", "gpu"],
    ["bench", "llm", "--", "--quick", "--device", "gpu"],
])
def test_a_bad_device_is_one_line(capsys, fresh, argv):
    rc, err = _flad(capsys, *argv)
    assert rc == 2
    _one_line(err, "'gpu'")
    assert not (fresh / "runs").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the answer on a host without CUDA")
@pytest.mark.parametrize("argv", [
    ["vehicle", "train", "--synthetic", "--steps", "1", "--device", "cuda"],
    ["run", "quick", "--device", "cuda:0"],
    ["bench", "encoder", "--", "--quick", "--device", "cuda"],
])
def test_cuda_on_a_cpu_host_is_one_line_not_a_cpu_run(capsys, fresh, argv):
    rc, err = _flad(capsys, *argv)
    assert rc == 2
    _one_line(err, "sees no CUDA device")
    assert not (fresh / "runs").exists()
