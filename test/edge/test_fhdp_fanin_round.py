"""An FL round of a cluster on the fan-in schedule (`cluster_schedule: fanin`), over real vehicle processes.

The FHDP edge runs in this process with one 3-vehicle cluster; the vehicles are `flad_vehicle.fhdp.worker`
processes on loopback ZeroMQ. The edge plans the fan-in (SWIFT, `swift.fanin.plan_from_profile`), sends one
assignment a round; each member fetches its replica of the raw-input layers and its trunk range from the edge,
trains on its own data, and the edge gathers the model (the replicated layers from the hub). One step of the
round must equal one single-process step on the union of the three members' first batches, and every member's
data must be counted: members x batch samples per step.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import subprocess
import sys

import pytest
import torch
import yaml
from _fhdp_audit import LABELS, RAW_SENSORS, audits, sent_digests

from flad_core.config import to_dict
from flad_core.fleet import load_fleet, with_port_base
from flad_edge.fhdp.client import FanInClient
from flad_edge.fhdp.config import FhdpConfig
from flad_edge.fhdp.orchestrator import FhdpEdge, wait_for_vehicles
from flad_vehicle.fhdp.data import vehicle_batches
from flad_vehicle.fhdp.links import tensor_digest

from flad_testing import REPO, free_port_base, reference_step

IDS = ("v000", "v001", "v002")
BATCH = 4


@pytest.fixture(scope="module")
def fanin_edge(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fanin-round")
    base = load_fleet(REPO / "launch" / "fleet.yaml")
    fleet = with_port_base(dataclasses.replace(base, vehicles=[v for v in base.vehicles if v.id in IDS]),
                           free_port_base(24))
    path = tmp / "fleet.yaml"
    path.write_text(yaml.safe_dump(to_dict(fleet), sort_keys=False))
    fleet = load_fleet(path)
    cfg = FhdpConfig(rounds=2, local_steps=1, batch_size=BATCH, n_micro=2, time_scale=1e-4, round_deadline_s=240.0,
                     clusters=[list(IDS)], seed=5, cluster_schedule="fanin")
    cfg.validate()
    fhdp = FhdpEdge(fleet, cfg)
    procs = [subprocess.Popen([sys.executable, "-m", "flad_vehicle.fhdp.worker", "--fleet", str(path), "--id", v,
                               "--data", "synthetic", "--run-dir", str(tmp), "--log-level", "WARNING"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for v in IDS]
    try:
        wait_for_vehicles(fhdp.edge, list(IDS), timeout_s=180)
        yield fhdp, fleet, tmp
    finally:
        fhdp.close()
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def test_a_fanin_round_trains_every_members_data_in_one_step_equal_to_one_process(fanin_edge):
    fhdp, fleet, _ = fanin_edge
    (client,) = fhdp.clients()
    assert isinstance(client, FanInClient)
    plan = client.fanin
    assert set(plan.sources) == set(IDS) and plan.trunk[-1].end == len(fhdp.layers)
    assert plan.cut >= fhdp.part.graph.min_first_end          # no raw sensor tensor crosses the cut
    before = copy.deepcopy(fhdp.model)
    summary = fhdp.run_round(0, [client])
    assert summary["errors"] == {} and summary["accepted"] == 1
    assert summary["samples"] == len(IDS) * BATCH               # every member's batch in the one step
    assert summary["per_client"][client.id]["pipelines"] == 1 and summary["steps_dropped"] == 0
    # every member said where it trained (auto: the CPU here, CUDA on a GPU host) and in which precision
    devices = summary["per_client"][client.id]["devices"]
    assert set(devices) == set(IDS) and {d.split()[1] for d in devices.values()} == {"fp32"}
    # the same step in one process, on the union of the members' first batches (each member's own stream)
    batches = [next(vehicle_batches("synthetic", v, BATCH, seed=fleet.seed)) for v in plan.sources]
    union = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    ref_loss, _, ref_grads = reference_step(before, union, clip=5.0)
    assert summary["train_loss"] == pytest.approx(ref_loss, rel=1e-4)
    for (name, p_ref), (_, p_fl) in zip(before.named_parameters(), fhdp.model.named_parameters(), strict=True):
        g = ref_grads.get(name)
        # Adam moves a weight whose true gradient is ~0 by up to lr on rounding noise (test_fhdp_fanin)
        noise = (g.abs() < 1e-2 * g.abs().max()) if g is not None else torch.ones_like(p_ref, dtype=torch.bool)
        atol = torch.where(noise, torch.tensor(2 * 7.5e-4), torch.tensor(1e-6))
        assert torch.all((p_ref - p_fl).abs() <= atol + 1e-4 * p_ref.abs()), name


def test_a_second_fanin_round_starts_from_the_gathered_model_and_counts_once(fanin_edge):
    fhdp, _, _ = fanin_edge
    (client,) = fhdp.clients()
    start = {k: v.clone() for k, v in fhdp.model.state_dict().items()}
    summary = fhdp.run_round(1, [client])
    assert summary["errors"] == {} and summary["accepted"] == 1 and summary["samples"] == len(IDS) * BATCH
    moved = [k for k, v in fhdp.model.state_dict().items() if v.is_floating_point() and not torch.equal(v, start[k])]
    assert moved, "the round changed nothing"


def test_no_raw_sensor_tensor_left_a_vehicle(fanin_edge):
    """The audit of every frame and layer payload the members sent in the two rounds: no raw sensor tensor by name,
    and by content no micro-batch slice of any member's raw sensor batches (the labels do travel, labels-forward,
    which shows the content check finds a tensor that leaves)."""
    fhdp, fleet, tmp = fanin_edge
    records = audits(tmp)
    assert set(records) == set(IDS)
    assert sum(rec.get("kind") == 0 for recs in records.values() for rec in recs) > 0   # activations were sent
    assert not {n for recs in records.values() for rec in recs for n in rec["names"]} & set(RAW_SENSORS)
    sent = sent_digests(records)

    def digests(names):
        out = set()
        for v in IDS:
            for batch in itertools.islice(vehicle_batches("synthetic", v, BATCH, seed=fleet.seed), 2):
                for name in names:
                    out.update(tensor_digest(c) for c in torch.tensor_split(batch[name], fhdp.cfg.n_micro))
        return out

    assert not digests(RAW_SENSORS) & sent
    assert digests(LABELS) & sent


def test_fanin_is_refused_where_it_cannot_run():
    with pytest.raises(ValueError, match="cluster_schedule must be one of"):
        FhdpConfig(cluster_schedule="ring").validate()
    with pytest.raises(ValueError, match="u_shaped"):
        FhdpConfig(cluster_schedule="fanin", u_shaped=True).validate()
    with pytest.raises(ValueError, match="rotate: false"):
        FhdpConfig(cluster_schedule="fanin", rotate=False).validate()
