"""An FL round with a client that never answers closes at its deadline, over real processes.

The FHDP edge runs in this process; three vehicle processes (`flad_vehicle.fhdp.worker`, each a
resource-sufficient one-stage client) train on loopback. One of them is SIGSTOPped right after it
registered, so it cannot even take its assignment. The round must close at its deadline with the quorum
of the two others, count nothing from the stopped client, and aggregate exactly the FedAvg of the two
updates (fetched back from the vehicles themselves). The stopped client is then resumed (SIGCONT): its
long-pending assignment goes through and it trains and answers for the closed round -- that late update
is refused and changes nothing. In the next round it is counted once, like every other client.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from flad_core.config import to_dict
from flad_core.fleet import load_fleet, with_port_base
from flad_core.protocol import SERVICE_LAYERS
from flad_edge.fhdp.config import FhdpConfig
from flad_edge.fhdp.orchestrator import FhdpEdge, wait_for_vehicles
from flad_edge.fl.aggregation import fedavg
from flad_vehicle.fhdp.worker import fetch_layers

from flad_testing import REPO, free_port_base

IDS = ("v000", "v001", "v002")
STOPPED = "v002"
STEPS, BATCH = 1, 2
DEADLINE_S = 20.0   # the two answering clients train 1 step of 2 samples each: seconds, even on a loaded host


def _state(proc_pid: int) -> str:
    """The process state letter from /proc (T: stopped)."""
    stat = Path(f"/proc/{proc_pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


def _client_states(fhdp: FhdpEdge, fleet, ids) -> dict[str, dict[str, torch.Tensor]]:
    """Each client's current weights, fetched from the vehicle that holds them (what it delivered)."""
    out = {}
    for v in ids:
        payload, _ = fetch_layers(fhdp.bus, fleet.vehicle(v).control, SERVICE_LAYERS, fhdp.layers, "test")
        out[v] = {k[2:]: t for k, t in payload.items() if k.startswith("p/")}
    return out


def _assert_is_fedavg(model: torch.nn.Module, states: dict[str, dict[str, torch.Tensor]]) -> None:
    expected = fedavg(list(states.values()), [STEPS * BATCH] * len(states))   # equal samples per client
    params = dict(model.named_parameters())
    assert set(expected) == set(params)
    for k, t in expected.items():
        assert torch.allclose(params[k].detach(), t, rtol=1e-6, atol=1e-7), k


@pytest.fixture
def fleet_procs(tmp_path):
    base = load_fleet(REPO / "launch" / "fleet.yaml")
    fleet = with_port_base(dataclasses.replace(base, vehicles=[v for v in base.vehicles if v.id in IDS]),
                           free_port_base(24))
    # the edge's requests wait long enough for the stopped vehicle to be resumed and take them late
    fleet = dataclasses.replace(fleet, bus=dataclasses.replace(fleet.bus, request_timeout_s=240.0))
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(to_dict(fleet), sort_keys=False))
    fleet = load_fleet(path)
    cfg = FhdpConfig(rounds=2, local_steps=STEPS, batch_size=BATCH, n_micro=1, round_deadline_s=DEADLINE_S,
                     quorum=2, clusters=[], seed=3)
    fhdp = FhdpEdge(fleet, cfg)
    procs = {v: subprocess.Popen([sys.executable, "-m", "flad_vehicle.fhdp.worker", "--fleet", str(path), "--id", v,
                                  "--data", "synthetic", "--run-dir", str(tmp_path), "--log-level", "WARNING"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for v in IDS}
    try:
        yield fleet, fhdp, procs
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
        try:
            fhdp.edge.stop_fleet()
        finally:
            fhdp.edge.close()
        for p in procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)


def test_round_closes_at_deadline_without_a_stopped_client_and_refuses_its_late_update(fleet_procs):
    fleet, fhdp, procs = fleet_procs
    wait_for_vehicles(fhdp.edge, list(IDS))
    os.kill(procs[STOPPED].pid, signal.SIGSTOP)          # registered, then silent
    clients = fhdp.clients()
    assert sorted(c.id for c in clients) == sorted(IDS)   # every vehicle is its own client

    summary = fhdp.run_round(0, clients)
    # the round closed without the stopped client: it is still stopped now, and nothing of it was counted
    assert _state(procs[STOPPED].pid) == "T"
    assert summary["accepted"] == 2 and summary["missing"] == [STOPPED]
    assert summary["samples"] == 2 * STEPS * BATCH
    assert set(summary["per_client"]) == {"v000", "v001"}
    collector = fhdp.collectors[0]
    assert collector.can_close() and not collector.complete()
    # the aggregate is exactly the FedAvg of the two answering clients' updates
    _assert_is_fedavg(fhdp.model, _client_states(fhdp, fleet, ["v000", "v001"]))
    after_round0 = {k: v.detach().clone() for k, v in fhdp.model.named_parameters()}

    # resumed, the straggler takes its pending assignment, trains and answers for round 0: refused as late
    os.kill(procs[STOPPED].pid, signal.SIGCONT)
    deadline = time.monotonic() + 240
    while not any(c == STOPPED for c, _ in collector.refused) and time.monotonic() < deadline:
        time.sleep(0.2)
    late = [(c, r) for c, r in collector.refused if c == STOPPED]
    assert late == [(STOPPED, "late: the round closed at its deadline")]
    assert sorted(collector.updates) == ["v000", "v001"]
    for k, v in fhdp.model.named_parameters():   # the late update changed nothing
        assert torch.equal(v.detach(), after_round0[k]), k

    # next round: everyone answers, the resumed client counted exactly once, the aggregate is their FedAvg
    summary = fhdp.run_round(1, clients)
    assert summary["accepted"] == 3 and summary["missing"] == [] and not summary["errors"]
    assert summary["samples"] == 3 * STEPS * BATCH
    assert sorted(fhdp.collectors[1].updates) == sorted(IDS) and fhdp.collectors[1].refused == []
    _assert_is_fedavg(fhdp.model, _client_states(fhdp, fleet, list(IDS)))
    assert sorted(fhdp.collectors[0].updates) == ["v000", "v001"]   # round 0 stays as it closed
