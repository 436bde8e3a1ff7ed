"""The edge's round loop as a strategy: clients hand back `Update | Failure`, the loop decides the round.

A real `FhdpEdge` (its edge server and bus on loopback) runs rounds over clients that implement the client
interface directly, so the loop's own rules are checked without vehicle processes: failures are recorded
with their reason and never wait for the deadline, the round is the exact FedAvg of what was accepted, a
straggler's update that arrives after the round closed is refused as late, and a round with no update fails.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid

import pytest
import torch

from flad_core.fleet import load_fleet, with_port_base
from flad_edge.fhdp.client import ClientStats, Failure, PipelineRun
from flad_edge.fhdp.config import FhdpConfig
from flad_edge.fhdp.orchestrator import FhdpEdge
from flad_edge.fl.aggregation import Update

from flad_testing import REPO, free_port_base


class ScriptedClient:
    """A client whose round is given: after `delay_s`, an update of the global weights + `shift`, or a failure."""

    def __init__(self, client_id: str, *, shift: float = 0.0, samples: int = 8, fail: str = "",
                 delay_s: float = 0.0, release: threading.Event | None = None) -> None:
        self.id, self.members, self.pipelines = client_id, [client_id], []
        self.shift, self.samples, self.fail, self.delay_s, self.release = shift, samples, fail, delay_s, release

    def train(self, rnd: int, global_model) -> Update | Failure:
        time.sleep(self.delay_s)
        if self.release is not None:
            self.release.wait(30)
        if self.fail:
            return Failure(self.id, rnd, self.fail)
        state = {k: v.detach().clone() + self.shift if v.is_floating_point() else v.clone()
                 for k, v in global_model.model.state_dict().items()}
        stats = ClientStats(self.id, [PipelineRun(self.id, [(self.id, 0, 1)], loss=1.0 + self.shift, steps=2)],
                            samples=self.samples, steps=2)
        return Update(self.id, rnd, f"{self.id}-r{rnd}-{uuid.uuid4().hex[:6]}", self.samples, state, metrics=stats)


@pytest.fixture
def edge():
    base = load_fleet(REPO / "launch" / "fleet.yaml")
    fleet = with_port_base(dataclasses.replace(base, vehicles=base.vehicles[:2]), free_port_base(24))
    fhdp = FhdpEdge(fleet, FhdpConfig(round_deadline_s=20.0, quorum=1, seed=1))
    try:
        yield fhdp
    finally:
        fhdp.close()


def test_a_failed_client_is_recorded_and_the_round_does_not_wait_for_its_deadline(edge):
    before = {k: v.detach().clone() for k, v in edge.model.state_dict().items()}
    clients = [ScriptedClient("a", shift=1.0, samples=8), ScriptedClient("b", shift=4.0, samples=24),
               ScriptedClient("c", fail="c: vehicle/assign timed out")]
    t0 = time.monotonic()
    summary = edge.run_round(0, clients)
    assert time.monotonic() - t0 < 10          # the deadline is 20 s: a failure ends the wait at once
    assert summary["errors"] == {"c": "c: vehicle/assign timed out"}
    assert summary["accepted"] == 2 and summary["missing"] == ["c"] and summary["samples"] == 32
    assert summary["train_loss"] == pytest.approx((2.0 + 5.0) / 2)
    after = edge.model.state_dict()
    for k, v in before.items():              # FedAvg by samples: 8 x (+1) and 24 x (+4) -> +3.25
        if v.is_floating_point():
            assert torch.allclose(after[k], v + 3.25, atol=1e-5), k


def test_a_straggler_is_refused_as_late_and_changes_nothing(edge):
    release = threading.Event()
    clients = [ScriptedClient("a", shift=1.0), ScriptedClient("slow", shift=100.0, release=release)]
    edge.cfg.round_deadline_s = 1.0
    summary = edge.run_round(0, clients)
    assert summary["accepted"] == 1 and summary["missing"] == ["slow"]
    aggregated = {k: v.detach().clone() for k, v in edge.model.state_dict().items()}
    release.set()
    collector = edge.collectors[0]
    deadline = time.monotonic() + 10
    while not collector.refused and time.monotonic() < deadline:
        time.sleep(0.02)
    assert collector.refused == [("slow", "late: the round closed at its deadline")]
    for k, v in edge.model.state_dict().items():
        assert torch.equal(v, aggregated[k]), k


def test_a_round_without_any_update_fails_with_every_reason(edge):
    clients = [ScriptedClient("a", fail="a: no member left"), ScriptedClient("b", fail="b: SWIFT found no pipeline")]
    with pytest.raises(RuntimeError, match=r"round 3: no client delivered an update.*no member left.*no pipeline"):
        edge.run_round(3, clients)
