"""A poisoned vehicle as a real process: its cluster's update is rejected, the round completes from the others.

Four `flad_vehicle.fhdp.worker` processes on loopback: v0 and v1 train alone, v2 and v3 form a cluster (one FL
client). v3 runs with `--poison scale:100` (the attack emulation: it multiplies the weights it hands the edge at
the gather by 100). The edge's screening (norm rule: 3 updates) rejects the cluster's update with its reason;
the round aggregates the two honest solo vehicles only, and the global model stays finite and close.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
import yaml

from flad_core.config import to_dict
from flad_core.procs import ProcessGroup, free_port_base, python_module_cmd
from flad_edge.fhdp.config import FhdpConfig
from flad_edge.fhdp.orchestrator import FhdpEdge, wait_for_vehicles
from flad_edge.fhdp.recovery.live import small_fleet

IDS = ["v0", "v1", "v2", "v3"]
STEPS, BATCH = 2, 4


@pytest.fixture
def fleet_with_attacker(tmp_path):
    fleet = small_fleet(IDS, free_port_base(4 + 2 * len(IDS) + 8))
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(to_dict(fleet), sort_keys=False))
    cfg = FhdpConfig(rounds=1, local_steps=STEPS, batch_size=BATCH, n_micro=2, time_scale=0.02, planner="exact",
                     clusters=[["v2", "v3"]], round_deadline_s=45)
    edge = FhdpEdge(fleet, cfg)
    group = ProcessGroup(grace_s=5.0)
    try:
        for v in IDS:
            extra = ["--poison", "scale:100"] if v == "v3" else []
            group.start(v, python_module_cmd("flad_vehicle.fhdp.worker", "--fleet", str(path), "--id", v,
                                             "--data", "synthetic", "--run-dir", str(tmp_path / "logs"), *extra),
                        env={"OMP_NUM_THREADS": "1"})
        wait_for_vehicles(edge.edge, IDS, timeout_s=90)
        yield edge, tmp_path / "logs"
    finally:
        edge.close()
        group.stop()


def test_a_vehicle_poisoning_its_cluster_is_rejected_and_the_round_completes(fleet_with_attacker):
    edge, logs = fleet_with_attacker
    t0 = time.monotonic()
    before = {k: v.detach().clone() for k, v in edge.model.state_dict().items()}
    clients = edge.clients()
    assert sorted(c.id for c in clients) == ["cluster1", "v0", "v1"]
    summary = edge.run_round(0, clients)
    assert summary["errors"] == {}
    # the cluster delivered (it trained, and was counted as having answered), but its update was rejected
    assert list(summary["rejected"]) == ["cluster1"] and "moved the model" in summary["rejected"]["cluster1"]
    assert summary["accepted"] == 2 and summary["missing"] == [] and set(summary["updates"]) == {"v0", "v1"}
    assert summary["samples"] == 2 * STEPS * BATCH          # the two solo vehicles' samples only
    assert summary["per_client"]["cluster1"]["pipelines"] == 2
    # the global model moved by a round of honest training, not by x100
    after = edge.model.state_dict()
    moved = math.sqrt(sum(float((after[k] - before[k]).double().pow(2).sum()) for k in before))
    size = math.sqrt(sum(float(v.double().pow(2).sum()) for v in before.values()))
    assert all(bool(torch.isfinite(v).all()) for v in after.values())
    assert 0 < moved < 0.1 * size
    assert time.monotonic() - t0 < 60
    # the attacker says so in its log, at WARNING
    text = "".join(p.read_text(errors="replace") for p in logs.rglob("*v3*") if p.is_file())
    assert "ATTACK EMULATION" in text
