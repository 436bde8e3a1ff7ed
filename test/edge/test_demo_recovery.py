"""`flad demo --recovery`: kill a cluster member mid-run; training goes on without it and the run succeeds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from flad_testing import free_port_base, processes_mentioning


def test_demo_survives_a_killed_cluster_member(tmp_path):
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "flad_core.cli", "demo", "--recovery", "--rounds", "3", "--data", "synthetic",
           "--runs-dir", str(runs), "--port-base", str(free_port_base(24))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        metrics = None
        while time.monotonic() < deadline:   # wait for round 0 to finish
            found = list(runs.glob("*/metrics.jsonl")) if runs.exists() else []
            if found and any('"round": 0' in line for line in found[0].read_text().splitlines()):
                metrics = found[0]
                break
            time.sleep(0.2)
        assert metrics is not None, "round 0 never finished"
        victims = [p for p in processes_mentioning(str(metrics.parent)) if _is_vehicle(p, "v003")]
        assert len(victims) == 1
        os.kill(victims[0], signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-2000:] + err[-2000:]
    assert "v003 was lost" in out
    rounds = [json.loads(x) for x in metrics.read_text().splitlines() if '"round"' in x]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["accepted"] == r["clients"] == 4 for r in rounds)
    # after the kill cluster1 trains on its surviving member's data only: fewer samples than round 0
    assert rounds[-1]["samples"] < rounds[0]["samples"]
    assert rounds[-1]["train_loss"] < rounds[0]["train_loss"]
    assert processes_mentioning(str(runs)) == []


def _is_vehicle(pid: int, vid: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"flad_vehicle.fhdp.worker" in cmdline and vid.encode() in cmdline
