"""`flad chaos --scope fleet`: the audit that turns a run's own records into its verdict.

The processes, kills and restarts it drives are exercised by test_crash_resume.py (edge and cloud SIGKILL
with the same Supervisor and checkpoints); here the audit must catch each way a run can go wrong.
"""

from __future__ import annotations

import argparse
import itertools
import random

from flad_edge.fhdp.recovery.fleet_chaos import POISONED_ID, audit, edge_kill_slots, verdict


def ledger(rounds: int, clients: list[str]) -> list[dict]:
    return [{"round": r, "edge": "edge-0", "client": c, "update_id": f"{c}-r{r}", "samples": 12}
            for r in range(rounds) for c in clients]


def records(entries: list[dict], rejected: dict[int, dict[str, str]] | None = None,
            cloud: list[dict] | None = None) -> dict:
    rounds = sorted({e["round"] for e in entries} | set(rejected or {}))
    return {"ledger": entries, "summaries": [{"round": r, "rejected": (rejected or {}).get(r, {})} for r in rounds],
            "resumes": 0, "last_round": max(rounds, default=-1),
            "cloud_counted": cloud if cloud is not None else [{"round": r, "edge": "edge-0"} for r in rounds]}


CLIENTS = ["v000", "v001", "cluster1", "cluster2"]


def test_a_clean_run_passes_the_audit() -> None:
    a = audit(records(ledger(3, CLIENTS), {r: {POISONED_ID: "moved the model by 5000"} for r in range(3)}), 3,
              POISONED_ID)
    assert a["updates_counted_twice"] == 0 and a["poisoned_updates_accepted"] == 0 and a["rounds_lost"] == []
    assert a["poisoned_updates_rejected"] == 3 and a["samples_committed"] == 3 * 4 * 12
    assert a["cloud_rounds_counted"] == 3


def test_an_update_counted_twice_is_caught_in_the_ledger_and_at_the_cloud() -> None:
    entries = ledger(2, CLIENTS)
    twice = audit(records([*entries, dict(entries[0])]), 2, None)
    assert twice["updates_counted_twice"] == 2      # the (round, client) pair and the update id
    cloud = [{"round": 0, "edge": "edge-0"}, {"round": 0, "edge": "edge-0"}, {"round": 1, "edge": "edge-0"}]
    assert audit(records(entries, cloud=cloud), 2, None)["updates_counted_twice"] == 1


def test_a_poisoned_update_accepted_alone_or_inside_a_cluster_is_caught() -> None:
    alone = audit(records(ledger(1, [*CLIENTS, POISONED_ID])), 1, POISONED_ID)
    assert alone["poisoned_updates_accepted"] == 1
    inside = audit(records(ledger(1, ["v000", f"v002+{POISONED_ID}"])), 1, POISONED_ID)
    assert inside["poisoned_updates_accepted"] == 1
    # a vehicle id that merely contains the poisoned one is another vehicle
    assert audit(records(ledger(1, [f"{POISONED_ID}0"])), 1, POISONED_ID)["poisoned_updates_accepted"] == 0


def test_a_round_missing_from_the_ledger_is_lost() -> None:
    entries = [e for e in ledger(4, CLIENTS) if e["round"] != 2]
    assert audit(records(entries), 4, None)["rounds_lost"] == [2]
    assert audit(records(ledger(3, CLIENTS)), 4, None)["rounds_lost"] == [3]


def test_edge_kills_are_spread_over_the_run_and_never_first() -> None:
    for seed in range(20):
        slots = sorted(edge_kill_slots(50, 4, random.Random(seed)))
        assert len(slots) == 4 and slots[0] >= 2 and slots[-1] < 50
        assert all(b > a for a, b in itertools.pairwise(slots))
    assert edge_kill_slots(50, 0, random.Random(0)) == set()


def test_the_verdict_fails_each_goal_it_should() -> None:
    args = argparse.Namespace(poison="scale:100", loss_tolerance=0.10)
    events = [{"kind": k} for k in ["kill", "stop", "cutoff"] * 17 + ["edge"] * 2 + ["skipped"]]
    good = {"exit": 0, "events": events, "heldout": {"loss": 1.05},
            "audit": audit(records(ledger(3, CLIENTS)), 3, POISONED_ID)}
    v = verdict(good, {"heldout": {"loss": 1.0}}, args)
    assert v["ok"] and v["events_total"] == 54 and v["events_by_kind"]["poisoned_vehicle"] == 1
    worse = dict(good, heldout={"loss": 1.2})
    assert not verdict(worse, {"heldout": {"loss": 1.0}}, args)["goals"]["final_loss_within_tolerance"]["met"]
    few = dict(good, events=events[:40])
    assert not verdict(few, {"heldout": {"loss": 1.0}}, args)["goals"]["events_at_least_50"]["met"]
    crashed = dict(good, exit=1)
    assert not verdict(crashed, {"heldout": {"loss": 1.0}}, args)["ok"]
    assert not verdict(good, None, args)["goals"]["final_loss_within_tolerance"]["met"]   # nothing to compare
