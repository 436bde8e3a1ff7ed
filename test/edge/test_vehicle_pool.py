"""Virtual vehicles: two slot processes take on vehicles' identities, train real FHDP rounds as them, change
identity between rounds, come back after a SIGKILL, and refuse more vehicles than they have slots.

Real processes on loopback ZeroMQ, a real EdgeServer, real torch. The tests share one pool (starting slot
processes is the slow part) and run in order, each from the state the previous one left.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from flad_core.procs import free_port_base
from flad_edge.experiment.pool import Identity, PoolError, VehiclePool
from flad_edge.fhdp.config import FhdpConfig
from flad_edge.fhdp.orchestrator import FhdpEdge
from flad_edge.fhdp.recovery.live import small_fleet
from flad_edge.fl.aggregation import Update
from flad_edge.fl.edge_server import EdgeServer
from flad_vehicle.fhdp import pool_worker

from flad_testing import processes_mentioning

STEPS, BATCH = 2, 4
SLOTS = ["slot00", "slot01"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pool")
    # a fleet that lists no vehicles admits every id: the slots and whichever vehicles they play
    fleet = small_fleet([], free_port_base(8))
    edge = EdgeServer(fleet)
    pool = VehiclePool(fleet, 2, workdir, "synthetic")
    try:
        pool.start(timeout_s=120)
        yield pool, edge
    finally:
        pool.close()
        edge.close()
        for _ in range(50):
            if not processes_mentioning(str(workdir)):
                break
            time.sleep(0.1)
        assert processes_mentioning(str(workdir)) == []


def records(edge):
    return {r.vehicle_id: r for r in edge.snapshot()}


def train_round(pool, edge, ids):
    """One real FHDP round of a 2-member cluster over the vehicles `ids` (two pipelines, one per data owner)."""
    fhdp = FhdpEdge(pool.fleet_for(ids), FhdpConfig(local_steps=STEPS, batch_size=BATCH, n_micro=2, time_scale=0.02,
                                                   round_deadline_s=60), edge=edge)
    client = fhdp.cluster_client(ids, "c1")
    assert {p.first for p in client.pipelines} == set(ids)
    return fhdp.cluster_client(ids, "c1").train(0, fhdp.global_store)


def test_slots_start_registered_and_free(setup):
    pool, edge = setup
    assert pool.free_slots() == SLOTS and set(pool.pids()) == set(SLOTS)
    recs = records(edge)
    assert all(recs[s].state in ("registered", "alive") for s in SLOTS)    # admitted (alive from the next beat)
    assert [v.id for v in pool.slot_fleet().vehicles] == SLOTS


def test_assigned_vehicles_are_alive_at_the_edge_with_their_profile_and_dwell(setup):
    pool, edge = setup
    mapping = pool.assign([Identity("va", "jetson_agx", "Town01", 321.0, seed=1),
                           Identity("vb", "jetson_nano", "Town02", 123.5, seed=2)], edge)
    assert sorted(mapping.values()) == SLOTS and pool.slot_of("va") == mapping["va"] and pool.free_slots() == []
    recs = records(edge)
    assert (recs["va"].state, recs["va"].profile, recs["va"].dwell_s, recs["va"].tflops) == ("alive", "jetson_agx",
                                                                                              321.0, 3.85)
    assert (recs["vb"].state, recs["vb"].profile, recs["vb"].dwell_s) == ("alive", "jetson_nano", 123.5)
    assert all(recs[s].state == "departed" for s in SLOTS)      # the slots said goodbye as themselves
    fleet = pool.fleet_for(["va", "vb"])
    slot_addr = {v.id: (v.control, v.data) for v in pool.slot_fleet().vehicles}
    assert [(v.id, v.profile, v.town, (v.control, v.data)) for v in fleet.vehicles] == [
        ("va", "jetson_agx", "Town01", slot_addr[mapping["va"]]),
        ("vb", "jetson_nano", "Town02", slot_addr[mapping["vb"]])]


def test_a_real_fhdp_round_trains_on_the_adopted_vehicles(setup):
    pool, edge = setup
    update = train_round(pool, edge, ["va", "vb"])
    assert isinstance(update, Update), update
    assert update.num_samples == 2 * STEPS * BATCH
    assert {p.first for p in update.metrics.pipelines} == {"va", "vb"}
    assert all(r.state == "alive" for v, r in records(edge).items() if v in ("va", "vb"))
    # the slots sent their activations and layers as the vehicles they played
    assert all((pool.workdir / f"audit-{v}.jsonl").stat().st_size > 0 for v in ("va", "vb"))


def test_release_and_reassign_changes_identity(setup):
    pool, edge = setup
    pids = pool.pids()
    pool.release()
    assert pool.free_slots() == SLOTS and pool.slot_of("va") is None
    mapping = pool.assign([Identity("vc", "jetson_nano", "Town03", 50.0), Identity("vd", "jetson_agx", "Town04", 75.0)],
                          edge)
    assert sorted(mapping.values()) == SLOTS and pool.pids() == pids          # same processes, new vehicles
    recs = records(edge)
    assert recs["vc"].state == recs["vd"].state == "alive"
    assert recs["va"].state == recs["vb"].state == "departed"
    # the old ids go stale: nobody heartbeats as them any more
    seen = {v: recs[v].heartbeats for v in ("va", "vb")}
    update = train_round(pool, edge, ["vc", "vd"])
    assert isinstance(update, Update), update
    assert update.num_samples == 2 * STEPS * BATCH
    recs = records(edge)
    assert {v: recs[v].heartbeats for v in ("va", "vb")} == seen
    assert recs["vc"].heartbeats > 1 and recs["vd"].heartbeats > 1


def test_kill_respawns_the_slot_and_frees_it(setup):
    pool, edge = setup
    sid = pool.slot_of("vc")
    old = pool.pids()[sid]
    assert pool.kill("vc") == old
    assert pool.slot_of("vc") is None and pool.slot_of("vd") is not None
    deadline = time.monotonic() + 60
    while sid not in pool.free_slots():
        assert time.monotonic() < deadline, "the killed slot did not come back"
        time.sleep(0.1)
    assert pool.pids()[sid] != old
    time.sleep(edge.fleet.heartbeat.timeout_s)
    assert "vc" in edge.check_liveness() or records(edge)["vc"].state == "lost"   # no goodbye: a loss
    assert pool.assign([Identity("ve", "jetson_nx", "Town05", 90.0)], edge) == {"ve": sid}
    assert records(edge)["ve"].state == "alive"


def test_more_vehicles_than_free_slots_fails_clearly(setup):
    pool, edge = setup
    with pytest.raises(PoolError, match=r"cannot place 1 vehicle\(s\): only 0 of the 2 slots are free"):
        pool.assign([Identity("vf", "jetson_nano", "Town01", 10.0)], edge)
    pool.release(["ve"])
    with pytest.raises(PoolError, match=r"cannot place 2 vehicle\(s\): only 1 of the 2 slots are free"):
        pool.assign([Identity("vf", "jetson_nano", "Town01", 10.0), Identity("vg", "jetson_nano", "Town01", 10.0)],
                    edge)
    assert len(pool.free_slots()) == 1 and "vf" not in records(edge)     # nothing was placed
    with pytest.raises(PoolError, match="already placed"):
        pool.assign([Identity("vd", "jetson_nano", "Town01", 10.0)], edge)
    # the slot itself refuses an identity it cannot take (a malformed id), stays idle and free
    with pytest.raises(PoolError, match=r"did not adopt 9bad: bad identity"):
        pool.assign([Identity("9bad", "jetson_nano", "Town01", 10.0)], edge)
    assert len(pool.free_slots()) == 1 and "9bad" not in records(edge)


def test_a_slot_that_exits_on_its_own_comes_back(setup):
    pool, edge = setup
    (sid,) = pool.free_slots()
    old = pool.pids()[sid]
    os.kill(old, signal.SIGTERM)          # what the edge's STOP broadcast does to every vehicle process
    deadline = time.monotonic() + 60
    while sid not in pool.free_slots() or pool.pids().get(sid) in (None, old):
        assert time.monotonic() < deadline, "the slot did not come back"
        time.sleep(0.1)
    assert pool.slot_of("vd") is not None
    assert records(edge)[sid].state in ("registered", "alive")             # re-admitted as itself


def test_worker_help_explains_the_slot(capsys):
    with pytest.raises(SystemExit) as done:
        pool_worker.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--slot" in out and "vehicle/adopt" in out and "--fleet" in out and "--run-dir" in out
