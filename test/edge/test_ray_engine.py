"""`flad run --engine ray` on a real two-node Ray cluster on this host (Ray's own `cluster_utils.Cluster`: a head
and a second raylet, each a separate node with its own worker processes).

* The same seeded run on the local engine and on the Ray engine: the same round accounting and ledger and the
  same global model, with actors (edges, cloud, slots) placed on both nodes.
* A node removed in the middle of a run (its raylet and every worker on it killed): the run completes; what was
  on the node (slots, and an edge or the cloud if Ray put one there) comes back on the surviving node.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from flad_core.config import ConfigError
from flad_edge.experiment.cli import build_config, main_run, run_args

ray_cluster_utils = pytest.importorskip("ray.cluster_utils")

ROOT = Path(__file__).resolve().parents[2]
#: quick preset, smaller: 2 slots per edge (clusters of 2), no driver stage (its own tests), few held-out frames
SETS = ["driver.enabled=false", "rounds.eval_frames=8", "pool.slots_per_edge=2", "swift.cluster_cap=2",
        # logical CPU shares small enough that one node of the test cluster can hold every actor
        "engine.slot_cpus=0.5", "engine.edge_cpus=0.5", "engine.cloud_cpus=0.5"]
NODE_CPUS = 4      # logical: the run's 7 actors reserve 3.5; either node can hold them all


def flad_run(runs: Path, *extra: str, rounds: int = 2, data: Path | None = None) -> list[str]:
    """`flad run quick` with SETS; `data`: a fleet dataset of an earlier run (the same shards, not collected again)."""
    cmd = [sys.executable, "-m", "flad_core.cli", "run", "quick", "--runs-dir", str(runs), *extra]
    for s in [*SETS, f"rounds.rounds={rounds}", *([f"fleet.data={data}"] if data else [])]:
        cmd += ["--set", s]
    return cmd


def finished(runs: Path, proc: subprocess.Popen | subprocess.CompletedProcess, out: str) -> Path:
    assert proc.returncode == 0, out[-4000:]
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    return run


def rounds_of(run: Path) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") == "round":
            out[rec["round"]] = rec
    return out


def accounting(run: Path) -> dict[int, dict]:
    """What each round counted, per edge: clients, accepted updates, samples, departures acted out."""
    return {rnd: {"accepted": r["accepted"], "samples": r["samples"], "clients": r["clients"],
                  "edges": {e: {"clients": v["clients"], "accepted": v["accepted"], "samples": v["samples"],
                                "clusters": v["clusters"], "departures": [(d["vehicle"], d["action"])
                                                                         for d in v["departures"]]}
                            for e, v in r["edges"].items()}}
            for rnd, r in rounds_of(run).items()}


@pytest.fixture
def fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty working directory; the root logger's handlers as they were (a run adds its own)."""
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield tmp_path
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize(("sets", "key"), [(["engine.name=spark"], "engine.name"),
                                           (["engine.slot_cpus=-1"], "engine.slot_cpus"),
                                           (["engine.address=10.0.0.1:6379"], "engine.address")])
def test_bad_engine_settings_name_the_key(sets, key):
    with pytest.raises(ConfigError) as err:
        build_config("quick", sets)
    assert key in str(err.value)


def test_the_local_engine_does_not_import_ray():
    code = ("import sys, flad_edge.experiment.run, flad_edge.experiment.cli; "
            "sys.exit(int(any(m == 'ray' or m.startswith('ray.') for m in sys.modules)))")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_actor_shares_follow_the_config(tmp_path):
    from flad_edge.experiment.ray_engine import RayEngine

    quick = build_config("quick", [])      # 2 edges x 5 slots
    cpu = RayEngine(build_config("quick", ["engine.slot_cpus=0.25", "train.device=cpu"]), tmp_path).slot_options()
    assert cpu == {"num_cpus": 0.25, "scheduling_strategy": "SPREAD"}
    gpu = RayEngine(build_config("quick", ["train.device=cuda"]), tmp_path).slot_options()
    assert gpu["num_gpus"] == pytest.approx(1 / (quick.edges.n * quick.pool.slots_per_edge))   # all on one GPU
    own = RayEngine(build_config("quick", ["train.device=cuda:0", "engine.slot_gpus=0.5"]), tmp_path).slot_options()
    assert own["num_gpus"] == 0.5
    engine = RayEngine(build_config("quick", ["engine.edge_cpus=2", "engine.cloud_cpus=0.5"]), tmp_path)
    assert engine.needed_cpus() == 0.5 + quick.edges.n * (2 + quick.pool.slots_per_edge * 1.0)


def test_address_goes_with_the_ray_engine(fresh, capsys):
    assert main_run(run_args(["quick", "--engine", "local", "--address", "10.0.0.1:6379"])) == 2
    assert "--address names a Ray cluster" in capsys.readouterr().err
    assert not (fresh / "runs").exists()


def test_resume_takes_no_engine(fresh, capsys):
    run = fresh / "runs" / "r"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"name": "x"}))
    assert main_run(run_args(["--resume", str(run), "--engine", "ray"])) == 2
    assert "--engine" in capsys.readouterr().err
    assert main_run(run_args(["--resume", str(run), "--address", "10.0.0.1:6379"])) == 2
    assert "ran on local" in capsys.readouterr().err


@pytest.fixture(scope="module")
def cluster():
    c = ray_cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": NODE_CPUS,
                                                                        "include_dashboard": False})
    c.add_node(num_cpus=NODE_CPUS)
    c.wait_for_nodes()
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def both_engines(cluster, tmp_path_factory):
    runs: dict[str, Path] = {}
    for engine in ("local", "ray"):
        where = tmp_path_factory.mktemp(engine)
        extra = ["--address", cluster.address] if engine == "ray" else []
        data = runs["local"] / "data" if runs else None
        proc = subprocess.run(flad_run(where, *extra, rounds=1, data=data), capture_output=True, text=True,
                              cwd=ROOT, timeout=600)
        runs[engine] = finished(where, proc, proc.stdout + proc.stderr)
    return runs


def test_ray_run_matches_the_local_run(both_engines):
    local, ray_run = both_engines["local"], both_engines["ray"]
    assert sorted(rounds_of(ray_run)) == [0]
    assert accounting(ray_run) == accounting(local)
    ledger = [torch.load(r / "checkpoint.pt", weights_only=False)["ledger"] for r in (local, ray_run)]
    strip = [[(u["round"], u["edge"], u["client"], u["samples"]) for u in led] for led in ledger]
    assert strip[0] == strip[1] and strip[0], "the two engines committed different updates"
    a, b = (load_file(r / "global_encoder.safetensors") for r in (local, ray_run))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_ray_run_places_actors_on_both_nodes(both_engines, cluster):
    summary = json.loads((both_engines["ray"] / "summary.json").read_text())
    engine = summary["engine"]
    assert engine["engine"] == "ray"
    nodes = {n.node_id for n in [cluster.head_node, *cluster.worker_nodes]}
    assert set(engine["nodes_used"]) == nodes
    by_actor = {p["actor"]: p for p in engine["placements"]}
    assert {"cloud", "edge-0", "edge-1"} <= set(by_actor)
    slots = [p for p in engine["placements"] if "/slot" in p["actor"]]
    assert len(slots) == 4 and {p["node"] for p in slots} == nodes
    # each edge's hub listens on its node's address, not on loopback
    for edge in ("edge-0", "edge-1"):
        fleet = (both_engines["ray"] / "fleets" / f"{edge}.yaml").read_text()
        assert f"tcp://{by_actor[edge]['ip']}:" in fleet
    assert json.loads((both_engines["local"] / "summary.json").read_text())["engine"] == {"engine": "local"}


def test_a_node_lost_mid_run_does_not_stop_it(cluster, both_engines, tmp_path):
    cluster.add_node(num_cpus=NODE_CPUS)
    cluster.wait_for_nodes()
    workers = {n.node_id: n for n in cluster.worker_nodes}     # the nodes that can be lost (not the head)
    runs = tmp_path / "runs"
    runs.mkdir()
    # one round: the node is lost in it, the round is redone or recovered, and the run must still finish
    proc = subprocess.Popen(flad_run(runs, "--address", cluster.address, rounds=1,
                                     data=both_engines["local"] / "data"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if list(runs.glob("*/fleet/round_000.json")):     # round 0 planned: its training starts now
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[0][-4000:]
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    # lose the node of the cloud if it is not the head (the cloud and then every edge start again), else an edge's
    where = {p["actor"]: p["node"] for p in json.loads((run / "engine.json").read_text())["placements"]}
    target = next((where[a] for a in ("cloud", "edge-0", "edge-1") if where.get(a) in workers), next(iter(workers)))
    time.sleep(1.0)
    lost_at = time.time()
    cluster.remove_node(workers[target], allow_graceful=False)
    out = proc.communicate(timeout=600)[0]
    finished(runs, proc, out)
    assert sorted(rounds_of(run)) == [0]
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    keys = [(u["round"], u["edge"], u["client"]) for u in ckpt["ledger"]]
    assert keys and len(keys) == len(set(keys)), "an update was counted twice"
    for rnd, rec in rounds_of(run).items():
        assert rec["accepted"] == sum(1 for k in keys if k[0] == rnd)
    engine = json.loads((run / "summary.json").read_text())["engine"]
    placed = engine["placements"]
    on_lost = {p["actor"] for p in placed if p["node"] == target}
    assert on_lost, "Ray put nothing on the node that was removed (SPREAD should have)"
    # whatever ran there came back elsewhere: every actor's latest placement is on a surviving node
    latest = {p["actor"]: p for p in sorted(placed, key=lambda p: p["t"])}
    assert all(p["node"] != target for p in latest.values()), latest
    assert any(p["t"] > lost_at for p in placed), "nothing was started again after the node was lost"
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    if "cloud" in on_lost:
        assert any(e["kind"] == "cloud_restart" and e["round"] == 0 for e in events), "round 0 was not redone"
        assert [r["cloud"] for r in engine["restarts"]] == [True]
    elif on_lost & {"edge-0", "edge-1"}:
        assert any(e["kind"] == "edge_restart" and e["round"] == 0 for e in events), "round 0 was not redone"
        assert [sorted(r["edges"]) for r in engine["restarts"]] == [sorted(on_lost & {"edge-0", "edge-1"})]
    # no process of the lost node outlived it (a slot's process dies with its actor)
    leftovers = subprocess.run(["pgrep", "-f", f"pool_worker.*{run}"], capture_output=True, text=True).stdout
    assert leftovers.strip() == ""
