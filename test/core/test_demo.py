"""`flad demo --control-plane-only`: real processes, a table, clean exit, nothing left behind.

The training demo (the default) is tested in test/edge/test_fhdp_processes.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from flad_testing import processes_mentioning


def demo_cmd(runs_dir, port_base, *extra):
    return [sys.executable, "-m", "flad_core.cli", "demo", "--control-plane-only", "--runs-dir", str(runs_dir),
            "--port-base", str(port_base), *extra]


def wait_gone(marker: str, timeout: float = 10.0) -> list[int]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        left = processes_mentioning(marker)
        if not left:
            return []
        time.sleep(0.1)
    return processes_mentioning(marker)


def only_run(runs_dir):
    (run,) = list(runs_dir.iterdir())
    return run


def test_demo_runs_and_exits_cleanly(tmp_path, port_base):
    runs = tmp_path / "runs"
    out = subprocess.run(demo_cmd(runs, port_base, "--duration", "1.5", "--vehicles", "3"), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    for vid in ("v1", "v2", "v3"):
        assert vid in out.stdout
    assert "departed" in out.stdout
    run = only_run(runs)
    summary = json.loads((run / "edge_summary.json").read_text())
    assert sorted(v["vehicle_id"] for v in summary["vehicles"]) == ["v1", "v2", "v3"]
    assert all(v["heartbeats"] >= 2 and v["status_reports"] >= 1 and v["state"] == "departed"
               for v in summary["vehicles"])
    assert (run / "config.yaml").exists() and (run / "metrics.jsonl").exists() and (run / "edge.log").exists()
    assert wait_gone(str(runs)) == []


def test_demo_with_curve(tmp_path, port_base):
    runs = tmp_path / "runs"
    out = subprocess.run(demo_cmd(runs, port_base, "--duration", "1", "--curve"), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "CURVE" in out.stdout
    summary = json.loads((only_run(runs) / "edge_summary.json").read_text())
    assert all(v["heartbeats"] >= 1 for v in summary["vehicles"]) and len(summary["vehicles"]) == 6


def _start_and_wait_until_serving(runs, port_base):
    proc = subprocess.Popen(demo_cmd(runs, port_base, "--duration", "60"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    end = time.monotonic() + 60
    while time.monotonic() < end:
        logs = list(runs.glob("*/edge.log")) if runs.exists() else []
        if logs and "serving for" in logs[0].read_text():
            return proc
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("demo never came up")


def test_ctrl_c_stops_everything(tmp_path, port_base):
    runs = tmp_path / "runs"
    proc = _start_and_wait_until_serving(runs, port_base)
    os.killpg(proc.pid, signal.SIGINT)   # what a terminal's Ctrl-C does: the whole foreground group
    _, err = proc.communicate(timeout=30)
    assert proc.returncode in (0, 130), err
    assert wait_gone(str(runs)) == []


def test_killed_launcher_leaves_no_orphans(tmp_path, port_base):
    runs = tmp_path / "runs"
    proc = _start_and_wait_until_serving(runs, port_base)
    assert len(processes_mentioning(str(runs))) >= 3   # edge + 2 vehicles (the launcher's cmdline has no run dir)
    proc.kill()                                          # SIGKILL: no chance to clean up
    proc.wait()
    assert wait_gone(str(runs), timeout=15) == []        # the kernel's parent-death signal stopped them


def test_the_experiment_demo_is_a_flad_run_command_line(tmp_path):
    """`flad demo` (no fixed-fleet option) runs `flad run quick` shortened: its arguments parse as that command
    line, so `main_run` reads every option it knows (a hand-built namespace once lacked `device`)."""
    from flad_core.cli import build_parser
    from flad_edge.demo import DEMO_SETS, experiment_demo_argv
    from flad_edge.experiment.cli import build_config, main_run, run_args

    demo = build_parser().parse_args(["demo", "--rounds", "1", "--runs-dir", str(tmp_path), "--device", "cpu"])
    ns = run_args(experiment_demo_argv(demo))
    assert ns.func is main_run and ns.experiment == "quick" and ns.device == "cpu" and ns.precision is None
    assert ns.set == [*DEMO_SETS, "rounds.rounds=1"] and ns.runs_dir == tmp_path
    cfg = build_config(ns.experiment, ns.set)
    assert cfg.rounds.rounds == 1 and cfg.driver.general_steps == 10
