"""The edge and the cloud may crash: nothing is lost, nothing is counted twice (real processes on loopback).

One fixed-fleet `flad demo` (a cloud, an edge, three vehicles: one alone, a cluster of two) loses its edge to
SIGKILL in round 1 and then its cloud to SIGKILL in round 2. The demo's supervisor restarts both; the edge
resumes after its last checkpointed round, the cloud reloads its aggregated rounds, the vehicles notice the
dead edge within seconds and register again by themselves, and the run completes every round with the sample
accounting of a clean run. Then a cloud process on its own: restarted on its state folder, it serves the
rounds it had, finishes a round from an upload it had stored, and acks a re-upload as "already counted".
Last, the restart policy itself (`flad_core.procs.Supervisor`, `flad launch`'s `_supervise`) on plain processes.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from flad_core import weights as wts
from flad_core.bus import ZmqBus
from flad_core.fleet import load_fleet, with_port_base
from flad_core.procs import ProcessGroup, Supervisor, python_module_cmd
from flad_edge.fhdp.checkpoint import EdgeCheckpoint
from flad_edge.fl.cloud import download, upload
from flad_edge.launch.run import _supervise, restart_supervisor
from flad_vehicle.launch.spec import LaunchPlan, NodeSpec

from flad_testing import free_port_base, processes_mentioning

ROUNDS, STEPS, BATCH = 3, 3, 2
VEHICLES = ["v000", "v002", "v003"]          # v000 trains alone; v002 + v003 are one cluster (two pipelines)
#: a clean run's accounting: (1 solo pipeline + 2 cluster pipelines) x steps x batch, per round
SAMPLES = {"v000": 1 * STEPS * BATCH, "cluster1": 2 * STEPS * BATCH}


def _fleet_yaml(path: Path) -> Path:
    repo_fleet = yaml.safe_load((Path(__file__).resolve().parents[2] / "launch" / "fleet.yaml").read_text())
    repo_fleet["vehicles"] = [v for v in repo_fleet["vehicles"] if v["id"] in VEHICLES]
    path.write_text(yaml.safe_dump(repo_fleet, sort_keys=False))
    return path


def _fhdp_yaml(path: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "rounds": ROUNDS, "local_steps": STEPS, "batch_size": BATCH, "n_micro": 1, "schedule": "1f1b",
        "time_scale": 0.02, "round_deadline_s": 120, "quorum": 1, "planner": "exact", "encoder": "tiny",
        "seed": 7, "clusters": [["v002", "v003"]]}))
    return path


def _metrics(run: Path) -> list[dict]:
    file = run / "metrics.jsonl"
    return [json.loads(x) for x in file.read_text().splitlines() if x] if file.exists() else []


def _committed(run: Path) -> set[int]:
    return {m["committed_round"] for m in _metrics(run) if m.get("event") == "round_committed"}


def _pid_of(run: Path, module: str) -> int:
    for pid in processes_mentioning(str(run)):
        try:
            if module in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode():
                return pid
        except OSError:
            continue
    raise AssertionError(f"no live {module} process of {run}")


def _wait(cond, timeout: float, proc: subprocess.Popen, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        assert proc.poll() is None, f"the demo ended (exit {proc.returncode}) before {what}"
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _log_times(path: Path, pattern: str) -> list[float]:
    """Wall-clock times of the log lines matching `pattern` (the role log format starts with asctime)."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if re.search(pattern, line):
            stamp = dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            out.append(stamp.timestamp())
    return out


@pytest.fixture(scope="module")
def crashed_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crash")
    runs = tmp / "runs"
    cmd = [sys.executable, "-m", "flad_core.cli", "demo", "--fleet", str(_fleet_yaml(tmp / "fleet.yaml")),
           "--config", str(_fhdp_yaml(tmp / "fhdp.yaml")), "--data", "synthetic", "--runs-dir", str(runs),
           "--port-base", str(free_port_base(24))]
    with open(tmp / "out.txt", "w") as out, open(tmp / "err.txt", "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
    try:
        _wait(lambda: runs.exists() and any(runs.iterdir()), 60, proc, "the run folder")
        (run,) = list(runs.iterdir())
        _wait(lambda: 0 in _committed(run), 240, proc, "round 0 to commit")
        edge_kill = time.time()
        os.kill(_pid_of(run, "flad_edge.fhdp.run"), signal.SIGKILL)          # lands in round 1
        _wait(lambda: 1 in _committed(run), 240, proc, "round 1 to commit after the edge restarted")
        cloud_before = json.loads((run / "cloud_state" / "rounds.json").read_text())["rounds"]
        cloud_kill = time.time()
        os.kill(_pid_of(run, "flad_edge.fl.cloud"), signal.SIGKILL)          # lands in round 2
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return {"run": run, "code": proc.returncode, "out": (tmp / "out.txt").read_text(),
            "err": (tmp / "err.txt").read_text(), "edge_kill": edge_kill, "cloud_kill": cloud_kill,
            "cloud_before": cloud_before, "runs": runs}


def test_the_run_completes_after_the_edge_and_the_cloud_were_killed(crashed_run):
    r = crashed_run
    assert r["code"] == 0, r["out"][-3000:] + r["err"][-3000:]
    done = [m for m in _metrics(r["run"]) if m.get("event") == "demo_done"][-1]
    assert done["restarts"] == {"edge": 1, "cloud": 1}
    assert [c["exit"] for c in done["crashes"]] == ["killed by signal 9 (SIGKILL)"] * 2
    assert "restarted after a crash: edge 1x, cloud 1x" in r["out"]
    resumed = [m for m in _metrics(r["run"]) if m.get("event") == "edge_resume"]
    assert [m["next_round"] for m in resumed] == [1], "the restarted edge did not resume after round 0"
    # the launcher noticed each death within a poll or two, and said which process and how it died
    for name, killed in (("edge", r["edge_kill"]), ("cloud", r["cloud_kill"])):
        seen = [t for t in _log_times(r["run"] / "log.txt", rf"{name} \(pid \d+\) died: killed by signal 9 \(SIGKILL\)"
                                      ) if t >= killed - 1]
        assert seen and seen[0] - killed < 3.0, (name, seen, killed)
    for _ in range(100):
        if not processes_mentioning(str(r["runs"])):
            break
        time.sleep(0.1)
    assert processes_mentioning(str(r["runs"])) == []


def test_every_round_counts_every_client_exactly_once(crashed_run):
    run = crashed_run["run"]
    saved = EdgeCheckpoint(run, "edge-0").load()
    assert saved is not None and saved.round == ROUNDS - 1 and saved.resumes == 1
    keys = [(e["round"], e["client"]) for e in saved.ledger]
    assert len(keys) == len(set(keys)), "a (round, client) was counted twice"
    assert sorted(keys) == sorted((rnd, c) for rnd in range(ROUNDS) for c in SAMPLES)
    assert len({e["update_id"] for e in saved.ledger}) == len(saved.ledger)
    for e in saved.ledger:
        assert e["samples"] == SAMPLES[e["client"]], e
    assert [s["round"] for s in saved.summaries] == list(range(ROUNDS))
    assert all(s["samples"] == sum(SAMPLES.values()) and s["cloud"] for s in saved.summaries)
    assert not (run / "edge_pending.safetensors").exists()
    # the model after the run is the committed one, which is the cloud's last global model
    final = wts.from_bytes((run / "global_encoder.safetensors").read_bytes())
    cloud_last = wts.from_bytes((run / "cloud_state" / f"global-r{ROUNDS - 1:06d}.safetensors").read_bytes())
    for k, v in saved.model.items():
        assert torch.equal(v, final[k]) and torch.equal(v, cloud_last[k]), k


def test_the_cloud_kept_its_rounds_and_counted_each_edge_round_once(crashed_run):
    run = crashed_run["run"]
    rounds = json.loads((run / "cloud_state" / "rounds.json").read_text())["rounds"]
    assert sorted(map(int, rounds)) == list(range(ROUNDS))
    for rnd, entry in rounds.items():
        assert entry["counted"] == [{"edge": "edge-0", "update_id": f"edge-0-r{rnd}",
                                     "samples": sum(SAMPLES.values())}], entry
        assert entry["samples"] == sum(SAMPLES.values())
    # what the cloud had aggregated before it was killed survived unchanged, and the new process reloaded it
    for rnd, entry in crashed_run["cloud_before"].items():
        assert rounds[rnd]["sha256"] == entry["sha256"]
    assert re.search(r"restored from .*cloud_state: [12] aggregated round\(s\)", (run / "cloud.log").read_text())
    assert list((run / "cloud_state" / "uploads").iterdir()) == []


def test_vehicles_notice_the_dead_edge_and_register_again(crashed_run):
    run, killed = crashed_run["run"], crashed_run["edge_kill"]
    hub = load_fleet(run / "fleet.yaml").bus.hub_sub
    for v in VEHICLES:
        log = run / f"vehicle-{v}.log"
        gone = _log_times(log, rf"{v}: edge edge-0 at {re.escape(hub)} is gone since")
        assert gone, f"{v} never logged the dead edge"
        assert -1.0 < gone[0] - killed < 5.0, (v, gone[0] - killed)
        assert _log_times(log, rf"{v}: registered again with edge-0 after")
    # the restarted edge's registry learned about every vehicle again (admitted twice: before and after)
    edge_log = (run / "edge.log").read_text()
    for v in VEHICLES:
        assert edge_log.count(f"admitted {v} ") >= 2, v


def _cloud(fleet_file: Path, run_dir: Path, port_base: int, *edges: str) -> subprocess.Popen:
    return subprocess.Popen(python_module_cmd("flad_edge.fl.cloud", "--fleet", str(fleet_file), "--run-dir",
                                              str(run_dir), "--port-base", str(port_base), "--edges", *edges),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_a_restarted_cloud_serves_its_rounds_and_never_counts_one_twice(tmp_path):
    fleet_file, base = _fleet_yaml(tmp_path / "fleet.yaml"), free_port_base(24)
    fleet = with_port_base(load_fleet(fleet_file), base)
    state = {"w": torch.arange(4, dtype=torch.float32), "b": torch.ones(2)}
    e0, e1 = ZmqBus("edge-0", fleet.bus), ZmqBus("edge-1", fleet.bus)
    cloud = _cloud(fleet_file, tmp_path, base, "edge-0", "edge-1")
    try:
        for bus, edge, n in ((e0, "edge-0", 3), (e1, "edge-1", 1)):
            upload(bus, {k: v * n for k, v in state.items()}, sender=edge, rnd=0, samples=n,
                   update_id=f"{edge}-r0", retry_s=60, try_timeout_s=5)
        first = download(e0, 0, "edge-0", timeout_s=60, retry=True, try_timeout_s=5)
        # round 1: only edge-0 has uploaded when the cloud dies; its upload must survive the crash
        assert upload(e0, state, sender="edge-0", rnd=1, samples=2, update_id="edge-0-r1") == "accepted"
        cloud.send_signal(signal.SIGKILL)
        cloud.wait(10)
        cloud = _cloud(fleet_file, tmp_path, base, "edge-0", "edge-1")
        ack = upload(e0, {k: v * 3 for k, v in state.items()}, sender="edge-0", rnd=0, samples=3,
                     update_id="edge-0-r0", retry_s=60, try_timeout_s=5)
        assert ack.startswith("already counted"), ack
        assert upload(e1, state, sender="edge-1", rnd=0, samples=1, update_id="edge-1-r0-again").startswith(
            "already counted")
        again = download(e0, 0, "edge-0", timeout_s=60, retry=True, try_timeout_s=5)
        assert all(torch.equal(first[k], again[k]) for k in first)
        assert torch.allclose(first["w"], state["w"] * (3 * 3 + 1 * 1) / 4)
        assert upload(e1, {k: -v for k, v in state.items()}, sender="edge-1", rnd=1, samples=2,
                      update_id="edge-1-r1") == "accepted"
        second = download(e1, 1, "edge-1", timeout_s=60)
        assert torch.allclose(second["w"], torch.zeros(4))     # edge-0's stored upload and edge-1's, averaged
    finally:
        cloud.send_signal(signal.SIGTERM)
        cloud.wait(15)
        e0.close()
        e1.close()
    rounds = json.loads((tmp_path / "cloud_state" / "rounds.json").read_text())["rounds"]
    assert {k: sorted(c["edge"] for c in v["counted"]) for k, v in rounds.items()} == {
        "0": ["edge-0", "edge-1"], "1": ["edge-0", "edge-1"]}
    assert [c["update_id"] for c in rounds["0"]["counted"]] == ["edge-0-r0", "edge-1-r0"]


def test_supervisor_restarts_crashed_children_a_bounded_number_of_times(tmp_path):
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    with ProcessGroup(grace_s=2) as group:
        group.start("svc", sleep)
        group.start("job", [sys.executable, "-c", "import time; time.sleep(0.5)"])
        sup = Supervisor(group, services=["svc"], jobs=["job"], max_restarts=1)
        first = group.procs["svc"].pid
        os.kill(first, signal.SIGKILL)
        group.procs["svc"].wait(5)
        assert sup.check() == {}
        assert sup.restarts == {"svc": 1} and group.procs["svc"].pid != first and group.procs["svc"].poll() is None
        group.procs["job"].wait(10)
        assert sup.check() == {"job": 0}                       # a job that finished is not restarted
        os.kill(group.procs["svc"].pid, signal.SIGKILL)
        group.procs["svc"].wait(5)
        assert sup.check() == {"job": 0, "svc": -9}             # the second crash is one too many
        assert sup.check() == {"job": 0, "svc": -9} and sup.restarts == {"svc": 1}
        assert [e["restarted"] for e in sup.events] == [True, False]


def test_flad_launch_restarts_a_crashed_cloud_node_and_ends_with_the_orchestrator(tmp_path):
    plan = LaunchPlan("fleet", [NodeSpec("cloud_node", "cloud"), NodeSpec("orchestrator_node", "orchestrator")])
    with ProcessGroup(grace_s=2) as group:
        group.start("/cloud", [sys.executable, "-c", "import time; time.sleep(60)"])
        group.start("/orchestrator", [sys.executable, "-c", "import time; time.sleep(2.5)"])
        sup = restart_supervisor(group, plan, max_restarts=2)
        assert sup.services == ["/cloud"] and sup.jobs == ["/orchestrator"]
        os.kill(group.procs["/cloud"].pid, signal.SIGKILL)
        t0 = time.monotonic()
        assert _supervise(group, plan, timeout=30, sup=sup, poll_s=0.05) == 0     # the orchestrator finished
        assert time.monotonic() - t0 < 10
        assert sup.restarts == {"/cloud": 1} and group.procs["/cloud"].poll() is None


class _StubEdge:
    """What `CommittedRounds` drives: a model, a version, a bus, and a round that 'trains' (adds one)."""

    def __init__(self, fleet, bus) -> None:
        self.fleet, self.bus = fleet, bus
        self.cfg = type("Cfg", (), {"rounds": 3})()
        torch.manual_seed(0)
        self.model = torch.nn.Linear(3, 2)
        self.version = 0
        self.trained: list[int] = []

    def run_round(self, rnd: int, clients) -> dict:
        self.trained.append(rnd)
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(1.0)
        self.version += 1
        return {"round": rnd, "samples": 10, "train_loss": 1.0, "accepted": 2, "clients": 2,
                "updates": {"a": {"update_id": f"a-r{rnd}-{time.time_ns()}", "samples": 6},
                            "b": {"update_id": f"b-r{rnd}-{time.time_ns()}", "samples": 4}}}


def test_an_edge_killed_in_its_cloud_tier_finishes_that_round_without_training_it_again(tmp_path, monkeypatch):
    from flad_core.runs import RunDir
    from flad_edge.fhdp import run as edge_run
    from flad_edge.fl.cloud import CloudServer

    fleet = with_port_base(load_fleet(_fleet_yaml(tmp_path / "fleet.yaml")), free_port_base(24))
    cloud = CloudServer(fleet, ["edge-0"], state_dir=tmp_path / "cloud_state")
    bus = ZmqBus("edge-0", fleet.bus)
    run = RunDir(tmp_path)
    try:
        first = edge_run.CommittedRounds(_StubEdge(fleet, bus), run, use_cloud=True)
        assert first.resume() is None
        first.run_round(0, [])

        def dies(*_a, **_k):
            raise KeyboardInterrupt("the edge process dies after its upload, before the global model came back")

        with monkeypatch.context() as m:
            m.setattr(edge_run, "download", dies)
            with pytest.raises(KeyboardInterrupt):
                first.run_round(1, [])
        pending = EdgeCheckpoint(tmp_path, "edge-0").load_pending(1)
        assert pending is not None, "the edge aggregate of round 1 was not kept for its cloud tier"
        round1_ids = sorted(u["update_id"] for u in pending.summary["updates"].values())

        second_edge = _StubEdge(fleet, bus)
        second = edge_run.CommittedRounds(second_edge, run, use_cloud=True)
        assert "round 1 was trained, finishing its cloud tier" in second.resume()
        second.run_round(1, [])
        assert second_edge.trained == [], "round 1 was trained again"

        with monkeypatch.context() as m:      # killed while training round 2: redone whole
            m.setattr(second_edge, "run_round", dies)
            with pytest.raises(KeyboardInterrupt):
                second.run_round(2, [])
        third_edge = _StubEdge(fleet, bus)
        third = edge_run.CommittedRounds(third_edge, run, use_cloud=True)
        assert "round 2 starts over" in third.resume()
        third.run_round(2, [])
        assert third_edge.trained == [2]
    finally:
        bus.close()
        cloud.close()
    saved = EdgeCheckpoint(tmp_path, "edge-0").load()
    assert saved.round == 2 and saved.resumes == 2
    assert sorted((e["round"], e["client"]) for e in saved.ledger) == [(r, c) for r in range(3) for c in "ab"]
    assert sum(e["samples"] for e in saved.ledger) == 30
    assert sorted(e["update_id"] for e in saved.ledger if e["round"] == 1) == round1_ids   # the first attempt's
    rounds = json.loads((tmp_path / "cloud_state" / "rounds.json").read_text())["rounds"]
    assert {k: [c["update_id"] for c in v["counted"]] for k, v in rounds.items()} == {
        "0": ["edge-0-r0"], "1": ["edge-0-r1"], "2": ["edge-0-r2"]}
    # the checkpointed model is the cloud's global model of round 2
    cloud_last = wts.from_bytes((tmp_path / "cloud_state" / "global-r000002.safetensors").read_bytes())
    assert all(torch.equal(v, cloud_last[k]) for k, v in saved.model.items())
