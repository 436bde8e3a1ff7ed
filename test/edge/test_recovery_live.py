"""Quick recovery with real vehicle processes on loopback (paper §4.2): a 3-vehicle cluster whose SWIFT
essential pipelines have 3 stages; members are SIGKILLed mid-training and training goes on.

The tests share one live fleet (starting vehicle processes is the slow part) and run in order; each
restarts whatever an earlier one killed, which is also how re-admission is exercised.
"""

from __future__ import annotations

import time

import pytest

from flad_core.protocol import BACKUP_OWNER as BACKUP
from flad_edge.fhdp.recovery.live import LiveFleet
from flad_edge.fhdp.recovery.moves import departed_share, moved_bytes, plan_moves

IDS = ["v0", "v1", "v2"]
STEPS = 6          # per pipeline per round
E = 2              # backup interval


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    lf = LiveFleet(tmp_path_factory.mktemp("recovery"), IDS)
    lf.client = lf.edge.cluster_client(IDS, "c1")
    yield lf
    lf.close()


def _ensure_all_up(live) -> None:
    for v in IDS:
        if live.group.procs[v].poll() is not None:
            live.restart(v)


def _check_round(summary, live) -> dict:
    assert summary["errors"] == {}, summary
    assert summary["accepted"] == 1 and summary["missing"] == []       # one update, counted once
    info = summary["per_client"]["c1"]
    return info


def test_essential_pipelines_have_three_stages(live):
    assert all(len(p) == 3 for p in live.client.pipelines)
    assert live.edge.templates["c1"].wait(30)          # generated in the background, before any failure


def test_kill_middle_stage_resumes_on_its_template(live):
    rnd = 0
    first_pipe = live.client.pipelines[0]
    first, mid = first_pipe[0][0], first_pipe[1][0]
    killer = live.when(f"r{rnd}-c1-{first}-", 3, lambda: live.kill(mid))
    summary = live.edge.run_round(rnd, [live.client])
    killer.join(5)
    _check_round(summary, live)
    (rec,) = summary["recoveries"]
    assert rec["departed"] == [mid] and rec["reason"] == "disconnect"
    survivors = [v for v in IDS if v != mid]
    tpl = live.edge.templates["c1"].template_for(survivors, compute_if_missing=False)
    expected = [(str(v), s, e) for v, (s, e) in zip(tpl.pipelines[first].path, tpl.pipelines[first].ranges,
                                                      strict=True)]
    assert [tuple(x) for x in rec["new_pipeline"]] == expected and rec["template_precomputed"]
    # only the departed vehicle's layers moved, all restored from the edge backup; accounting is exact
    moves = plan_moves(first_pipe, expected, {mid}, live.edge.layers, live.edge.layer_bytes)
    assert [tuple(m) for m in rec["moves"]] == [(m.layer, m.source, m.dest) for m in moves]
    assert {m.source for m in moves} == {BACKUP}
    assert rec["planned_moved_bytes"] == moved_bytes(moves) == departed_share(first_pipe, {mid}, live.edge.layers,
                                                                                  live.edge.layer_bytes)
    # measured payload = those tensors + the safetensors headers (a few bytes per tensor)
    assert rec["planned_moved_bytes"] <= rec["moved_bytes"] <= rec["planned_moved_bytes"] * 1.02 + 8192
    assert rec["moved_bytes"] < 0.2 * rec["model_bytes"]
    # steps lost are bounded by the backup interval; the pipeline still completed all its steps
    assert rec["completed_before"] >= 3 and rec["steps_lost"] <= E
    assert rec["recovery_s"] < 5.0 and rec["t_detect"] - rec["t_failure"] < 1.0
    rounds_pipes = summary["per_client"]["c1"]["pipelines"]
    assert rounds_pipes == 2                      # the departed vehicle's own pipeline went with its data
    assert summary["samples"] == 2 * STEPS * 4
    # the restored layers came from the backup service, exactly those layers
    served = [n for r in live.edge.backup_servers["c1"].audit for n in r["names"]]
    assert sorted(served) == sorted(m.layer for m in moves)


def test_restored_layers_equal_the_edge_backup(live):
    store = live.edge.backups["c1"]
    rec = live.edge.records[-1]
    for layer, _, _ in rec.moves:
        if live.edge.layer_bytes[layer]:
            tensors, entry = store.get(layer)
            assert entry.owner in IDS and entry.step >= 0
            assert any(k.startswith("m/") for k in tensors)      # optimizer state travels with the weights


def test_returning_vehicle_is_admitted_next_round(live):
    gone = live.edge.records[-1].departed[0]
    live.restart(gone)
    summary = live.edge.run_round(1, [live.client])
    _check_round(summary, live)
    assert gone in [r["vehicle"] for r in live.edge.readmitted]
    assert summary["recoveries"] == [] and summary["departed"] == []
    assert summary["per_client"]["c1"]["pipelines"] == 3 and summary["samples"] == 3 * STEPS * 4


def test_kill_first_stage(live):
    _ensure_all_up(live)
    rnd = 2
    second = live.client.pipelines[1]
    first = second[0][0]
    killer = live.when(f"r{rnd}-c1-{first}-", 2, lambda: live.kill(first))
    summary = live.edge.run_round(rnd, [live.client])
    killer.join(5)
    _check_round(summary, live)
    (rec,) = summary["recoveries"]
    assert rec["departed"] == [first] and rec["new_pipeline"] == []     # its data left with it
    # the first pipeline ran in full before; the third runs on the survivors' template
    assert summary["per_client"]["c1"]["pipelines"] == 3
    assert summary["samples"] == (2 * STEPS + rec["completed_before"]) * 4


def test_two_departures(live):
    _ensure_all_up(live)
    live.edge.readmit()
    rnd = 3
    pipe = live.client.pipelines[0]
    first, mid = pipe[0][0], pipe[1][0]
    other = next(v for v in IDS if v not in (first, mid))
    k1 = live.when(f"r{rnd}-c1-{first}-", 2, lambda: live.kill(mid), attempt=0)
    k2 = live.when(f"r{rnd}-c1-{first}-", 2, lambda: live.kill(other), attempt=1)    # 2 steps into the resumption
    summary = live.edge.run_round(rnd, [live.client])
    k1.join(5)
    k2.join(5)
    _check_round(summary, live)
    recs = summary["recoveries"]
    assert [r["departed"] for r in recs] == [[mid], [other]]
    assert [tuple(x) for x in recs[-1]["new_pipeline"]] == [(first, 0, len(live.edge.layers))]
    assert all(r["steps_lost"] <= E for r in recs)
    assert summary["samples"] == STEPS * 4        # only the surviving data owner's pipeline, in full


def test_planned_departure_hands_over_without_loss(live):
    _ensure_all_up(live)
    live.edge.readmit()
    rnd = 4
    pipe = live.client.pipelines[0]
    mid = pipe[1][0]
    # the mobility model predicts that `mid` leaves coverage shortly after its pipeline starts
    step_s = live.edge.step_time or 0.3
    live.edge.predict_departure(mid, time.time() + live.edge.rcfg.handover_margin_s + 2.5 * step_s)
    summary = live.edge.run_round(rnd, [live.client])
    _check_round(summary, live)
    assert summary["recoveries"] == []
    (h,) = summary["handovers"]
    assert h["leaving"] == [mid] and h["steps_lost"] == 0
    assert h["moves"] and {src for _, src, _ in h["moves"]} <= {v for v, _, _ in pipe}   # from vehicles, not backup
    assert BACKUP not in {src for _, src, _ in h["moves"]}
    # every step of the surviving data owners' pipelines ran; the leaving vehicle's own pipeline did not
    assert summary["samples"] == 2 * STEPS * 4
    live.kill(mid)          # it leaves after the hand-over: nothing left to recover


def test_failure_curve_settings_count_samples_and_bring_vehicles_back(live):
    """`flad bench pipeline --only failures`'s loop on this fleet: the failure-free setting trains every step of
    every pipeline; with a failure every 12 s a member is killed at 6 s, recovered in its round, started again
    and re-admitted, and only the samples of accepted updates count."""
    import random

    from flad_bench.pipeline_failures import failure_times, run_setting

    assert failure_times(60.0, 200.0) == [30.0, 90.0, 150.0] and failure_times(10.0, 5.0) == []
    _ensure_all_up(live)
    live.edge.predicted_departures.clear()
    full_round = 3 * STEPS * 4
    free = run_setting(live, live.client, IDS, None, 2.0, 200, random.Random(0))
    assert free["failures"] == 0 and free["recoveries"] == 0 and free["rounds_failed"] == 0
    assert free["round_samples"] == [full_round] * free["rounds"] and free["samples"] == full_round * free["rounds"]
    assert free["samples_per_s"] == pytest.approx(free["samples"] / free["seconds"], rel=0.01)   # seconds: 2 decimals
    # one failure per 12 s: the first at 6 s, the next at 18 s (only if the last round, started before 7 s, is
    # still running then)
    hurt = run_setting(live, live.client, IDS, 12.0, 7.0, 200 + free["rounds"], random.Random(1))
    assert hurt["failures"] >= 1 and hurt["rounds_failed"] == 0
    kill = hurt["kills"][0]
    assert 6.0 <= kill["at_s"] < 7.0 and kill["vehicle"] in IDS and live.alive(kill["vehicle"])
    assert all(k["at_s"] >= 18.0 for k in hurt["kills"][1:])
    # a round was running at 6 s (they run back to back until 7 s): it recovered there (possibly without losing a
    # sample: a member whose own pipeline had run), or, had the kill fallen between rounds, the next round ran
    # without the member's pipeline; no step is counted twice
    assert hurt["recoveries"] >= 1 or min(hurt["round_samples"]) < full_round
    assert hurt["steps_lost"] <= E * hurt["recoveries"] and max(hurt["round_samples"]) <= full_round
    assert hurt["samples"] == sum(hurt["round_samples"])
