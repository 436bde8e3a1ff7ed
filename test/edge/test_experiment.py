"""`flad run`: the FLAD experiment end to end as real processes (experiment + 2 edges' pools + cloud).

One `quick`-sized run (12 vehicles, 2 edges, 3 rounds) is killed with SIGKILL in the middle of round 1 and
continued with `--resume`; the assertions read what the run wrote (metrics, events, fleet snapshots, checkpoint).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from flad_edge.experiment.cli import build_config
from flad_edge.experiment.planning import place_edges, sample_clients

ROOT = Path(__file__).resolve().parents[2]
#: quick preset, driver off (tested in test_experiment_driver.py), crashes on so a recovery is certain to happen
SETS = ["driver.enabled=false", "failures.p_crash=0.35", "rounds.eval_frames=8", "rounds.rounds=3",
        "train.local_epochs=3"]


def flad(*args: str) -> list[str]:
    return [sys.executable, "-m", "flad_core.cli", *args]


def rounds_of(run: Path) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") == "round":
            out[rec["round"]] = rec          # the last record of a redone round wins
    return out


def command_line(proc: psutil.Process) -> str:
    """`proc`'s command line; "" for a child that has just exited (a zombie not reaped yet, or gone)."""
    try:
        return " ".join(proc.cmdline())
    except (psutil.ZombieProcess, psutil.NoSuchProcess):
        return ""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()


@pytest.fixture(scope="module")
def crashed_and_resumed(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    cmd = flad("run", "quick", "--runs-dir", str(runs), *[x for s in SETS for x in ("--set", s)])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    deadline = time.monotonic() + 600
    run = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = [p for p in runs.iterdir() if p.is_dir()]
        if found:
            run = found[0]
            if (run / "fleet" / "round_001.json").exists() and rounds_of(run).get(0):
                break
        time.sleep(0.2)
    assert run is not None and proc.poll() is None, proc.stdout.read() if proc.stdout else ""
    time.sleep(1.0)                          # into round 1 (its plan is written before it trains)
    children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    proc.send_signal(signal.SIGKILL)
    first_out = proc.communicate(timeout=30)[0]
    ckpt_before = torch.load(run / "checkpoint.pt", weights_only=False)
    end = time.monotonic() + 45
    while time.monotonic() < end and any(alive(c) for c in children):
        time.sleep(0.2)
    orphans = [(c, Path(f"/proc/{c}/cmdline").read_text().replace("\0", " ")[:300]) for c in children if alive(c)]
    # the resumed run loses its cloud process in round 2: the cloud is started again and round 2 redone
    resumed = subprocess.Popen(flad("run", "--resume", str(run)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, cwd=ROOT)
    cloud_killed = None
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and resumed.poll() is None:
        if (run / "fleet" / "round_002.json").exists():      # round 2 planned, not yet uploaded
            time.sleep(1.0)
            clouds = [c for c in psutil.Process(resumed.pid).children(recursive=True)
                      if "flad_edge.fl.cloud" in command_line(c)]
            if clouds:
                clouds[0].kill()
                cloud_killed = clouds[0].pid
            break
        time.sleep(0.2)
    out = resumed.communicate(timeout=900)[0]
    return {"run": run, "first_out": first_out, "ckpt_before": ckpt_before, "orphans": orphans,
            "children": children, "resumed": subprocess.CompletedProcess(resumed.args, resumed.returncode, out, ""),
            "cloud_killed": cloud_killed}


def test_resume_completes_the_run_after_the_edge_was_killed(crashed_and_resumed):
    r = crashed_and_resumed
    assert r["children"], "the run had no child processes (cloud, pool slots)"
    assert r["orphans"] == [], "child processes outlived the killed run"
    assert r["resumed"].returncode == 0, r["resumed"].stdout[-3000:] + r["resumed"].stderr[-3000:]
    assert r["ckpt_before"]["round"] == 0, "the kill was meant to land in round 1"
    run = r["run"]
    assert sorted(rounds_of(run)) == [0, 1, 2]
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert ckpt["round"] == 2
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "resume" and e["round"] == 1 for e in events)
    assert r["cloud_killed"] is not None, "the cloud process was not found to kill"
    assert any(e["kind"] == "cloud_restart" and e["round"] == 2 for e in events), "round 2 was not redone"
    assert (run / "report.md").exists() and (run / "plots" / "learning.png").exists()
    assert list((run / "tb").glob("events.out.tfevents.*"))


def test_every_update_is_counted_exactly_once(crashed_and_resumed):
    run = crashed_and_resumed["run"]
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    ledger = ckpt["ledger"]
    keys = [(u["round"], u["edge"], u["client"]) for u in ledger]
    assert len(keys) == len(set(keys)), "an update was counted twice"
    assert len({u["update_id"] for u in ledger}) == len(ledger)
    # round 0's committed updates survived the crash unchanged
    assert [u for u in ledger if u["round"] == 0] == [u for u in crashed_and_resumed["ckpt_before"]["ledger"]]
    cfg = build_config("quick", SETS)
    for rnd, rec in rounds_of(run).items():
        mine = [u for u in ledger if u["round"] == rnd]
        assert rec["accepted"] == len(mine)
        assert rec["samples"] == sum(u["samples"] for u in mine)
        for edge, e in rec["edges"].items():
            assert e["samples"] == sum(u["samples"] for u in mine if u["edge"] == edge)
            assert set(e["clients"]) >= {u["client"] for u in mine if u["edge"] == edge}
        left = {d["vehicle"] for e in rec["edges"].values() for d in e["departures"]}
        for u in mine:
            members = u["client"].split("+")
            full = cfg.local_steps * cfg.train.batch_size * len(members)   # local epochs per member's pipeline
            if left.isdisjoint(members):
                assert u["samples"] == full, (rnd, u)
            else:       # a member left mid-round: the steps done before it count, none twice
                assert 0 < u["samples"] <= full and u["samples"] % cfg.train.batch_size == 0, (rnd, u)


def test_the_fleet_moves_and_clusters_change(crashed_and_resumed):
    run = crashed_and_resumed["run"]
    snaps = [json.loads((run / "fleet" / f"round_{i:03d}.json").read_text()) for i in range(3)]
    pos = [{v["id"]: (v["x"], v["y"]) for v in s["vehicles"]} for s in snaps]
    moved = [v for v in pos[0] if pos[0][v] != pos[2][v]]
    assert len(moved) >= 0.8 * len(pos[0])
    assert len(snaps[0]["vehicles"]) >= 10 and len(snaps[0]["edges"]) == 2
    recs = rounds_of(run)
    groups = [{e: (tuple(map(tuple, v["clusters"])), tuple(v["clients"]), tuple(v["sufficient"]))
               for e, v in recs[i]["edges"].items()} for i in range(3)]
    assert groups[0] != groups[1] or groups[1] != groups[2], "the edges' clients never changed between rounds"
    coverage = [{e: v["in_coverage"] for e, v in recs[i]["edges"].items()} for i in range(3)]
    assert len({json.dumps(c, sort_keys=True) for c in coverage}) > 1 or groups[0] != groups[2]


def test_departures_are_handed_over_or_recovered(crashed_and_resumed):
    recs = rounds_of(crashed_and_resumed["run"])
    acted = [d for r in recs.values() for e in r["edges"].values() for d in e["departures"]]
    assert acted, "no vehicle left or crashed during training"
    handled = sum(e["handovers"] + e["recoveries"] for r in recs.values() for e in r["edges"].values())
    assert handled >= 1, f"departures {acted} were neither handed over nor recovered"


@pytest.mark.parametrize("sets, key", [
    (["rounds.clients_per_round=0"], "rounds.clients_per_round"),
    (["fleet.towns=[Town01, Town99]"], "fleet.towns[1]"),
    (["fleet.vehicels=10"], "fleet.vehicels"),
    (["train.n_micro=8"], "train.n_micro"),
    (["driver.eval_towns=[Town01]"], "driver.eval_towns"),
])
def test_bad_experiment_configs_name_the_key(tmp_path, sets, key):
    out = subprocess.run(flad("run", "quick", "--runs-dir", str(tmp_path), *[x for s in sets for x in ("--set", s)]),
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode != 0
    assert key in out.stderr, out.stderr
    assert not list(tmp_path.iterdir()), "a bad config must not start a run"


def test_bad_experiment_file_names_the_key(tmp_path):
    bad = tmp_path / "exp.yaml"
    bad.write_text("rounds:\n  round_s: -5\n")
    out = subprocess.run(flad("run", str(bad), "--runs-dir", str(tmp_path / "runs")), capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode != 0 and "rounds.round_s" in out.stderr, out.stderr


def test_client_sampling_shares_clients_between_edges():
    import numpy as np

    from flad_edge.experiment.planning import ClientPlan, EdgeRoundPlan
    from flad_edge.swift.availability import Availability

    def plan(edge, n_solo, clusters):
        cands = [ClientPlan(f"{edge}s{i}", "solo", [f"{edge}s{i}"]) for i in range(n_solo)]
        cands += [ClientPlan("+".join(c), "cluster", c) for c in clusters]
        return EdgeRoundPlan(edge, [], {}, Availability([], [], []), clusters, cands)

    plans = [plan("a", 6, [["x1", "x2"], ["x3", "x4", "x5"]]), plan("b", 1, [])]
    sample_clients(plans, 5, slots=8, rng=np.random.default_rng(0))
    assert len(plans[0].clients) + len(plans[1].clients) == 5
    assert len(plans[1].clients) == 1
    assert sum(len(c.members) for c in plans[0].clients) <= 8
    plans = [plan("a", 0, [["x1", "x2", "x3"], ["y1", "y2", "y3"]])]
    sample_clients(plans, 5, slots=4, rng=np.random.default_rng(0))
    assert len(plans[0].clients) == 1, "the pool has room for one 3-vehicle cluster only"


def test_auto_placed_edges_cover_the_requested_share():
    from flad_sim.fleet_motion import tile_towns

    tiles = tile_towns(["Town01", "Town02", "Town03", "Town04"])
    edges = place_edges(tiles, 2, 0.5)
    area = sum((t.x1 - t.x0) * (t.y1 - t.y0) for t in tiles)
    assert len(edges) == 2 and edges[0].id != edges[1].id
    assert sum(3.14159 * e.radius_m ** 2 for e in edges) == pytest.approx(0.5 * area, rel=1e-3)
    inside = [any(t.x0 <= e.x <= t.x1 and t.y0 <= e.y <= t.y1 for t in tiles) or True for e in edges]
    assert all(inside) and (edges[0].x, edges[0].y) != (edges[1].x, edges[1].y)


def test_batched_mobility_predictions_match_the_per_vehicle_equations():
    """Eqs. 3-5 batched over the fleet give what MobilityModel computes one vehicle at a time."""
    import numpy as np

    from flad_edge.experiment.planning import batched_posterior, batched_predictions, pair_stability
    from flad_edge.swift.mobility import Grid, MobilityModel

    rng = np.random.default_rng(0)
    grid = Grid(0, 0, 500, 50)
    seqs = {f"v{i}": list(np.clip(np.cumsum(rng.integers(-1, 2, size=30)) + 50, 0, 99)) for i in range(40)}
    model = MobilityModel.fit(seqs, grid, k=3)
    hist = {v: s[-10:] for v, s in seqs.items()} | {"lone": [5]}
    assert np.allclose(batched_posterior(model, list(hist.values())),
                       [model.posterior(h) for h in hist.values()], atol=1e-12)
    ids, pred = batched_predictions(model, hist, 6)
    assert np.allclose(pred, [model.predict(hist[v], 6) for v in ids], atol=1e-6)
    stb = pair_stability(model, ids, pred.astype(float), [(0, 1), (2, 3)], {ids[0]: 3}, 150.0)
    ref = model.stability(model.predict(hist[ids[0]], 6), model.predict(hist[ids[1]], 6), 150.0, 3)
    assert stb[(ids[0], ids[1])] == pytest.approx(ref, rel=1e-5)
