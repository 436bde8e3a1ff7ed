"""FedAvg and two-tier arithmetic by hand; a round counts each update once and never waits forever."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flad_edge.fl.aggregation import AggregationError, RoundCollector, Update, fedavg, two_tier


def test_fedavg_by_hand():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(9)}
    out = fedavg([a, b], [1, 3])                      # (1*[1,2] + 3*[3,6]) / 4
    assert torch.allclose(out["w"], torch.tensor([2.5, 5.0]))
    assert out["n"].item() == 9                        # integer tensors come from the heaviest update
    assert torch.equal(fedavg([a], [5])["w"], a["w"])


def test_fedavg_errors():
    a = {"w": torch.ones(2)}
    with pytest.raises(AggregationError, match="no updates"):
        fedavg([], [])
    with pytest.raises(AggregationError, match="weights"):
        fedavg([a, a], [1])
    with pytest.raises(AggregationError, match="non-negative"):
        fedavg([a], [0])
    with pytest.raises(AggregationError, match="shape"):
        fedavg([a, {"w": torch.ones(3)}], [1, 1])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(1, 1000), min_size=1, max_size=4), min_size=1, max_size=4),
       st.integers(0, 10_000))
def test_two_tier_equals_flat(samples, seed):
    g = torch.Generator().manual_seed(seed)
    edges = [[({"w": torch.randn(4, 3, generator=g)}, n) for n in edge] for edge in samples]
    cloud, total = two_tier(edges)
    flat = fedavg([s for e in edges for s, _ in e], [n for e in edges for _, n in e])
    assert total == sum(sum(e) for e in samples)
    assert torch.allclose(cloud["w"], flat["w"], atol=1e-6)


def upd(client, rnd=1, uid=None, n=10, value=1.0):
    return Update(client, rnd, uid or f"{client}-{rnd}", n, {"w": torch.full((2,), value)})


def test_each_update_counted_once():
    rc = RoundCollector(1, ["a", "b"], deadline_s=5)
    assert rc.offer(upd("a", value=1.0)) == (True, "accepted")
    assert rc.offer(upd("a", value=1.0))[0] is False                       # same update id again
    assert rc.offer(upd("a", uid="a-retry", value=100.0))[0] is False      # a second update from a
    assert not rc.offer(upd("c"))[0]                                        # not selected
    assert not rc.offer(upd("b", rnd=2))[0]                                 # other round
    assert rc.offer(upd("b", n=30, value=5.0))[0]
    state, total = rc.aggregate()
    assert total == 40 and torch.allclose(state["w"], torch.full((2,), 4.0))   # (10*1 + 30*5)/40
    assert rc.complete() and rc.can_close()


def test_dead_client_does_not_block_the_round():
    rc = RoundCollector(3, ["alive", "dead"], deadline_s=0.4, quorum=1)
    threading.Timer(0.05, lambda: rc.offer(upd("alive", rnd=3))).start()
    t0 = time.monotonic()
    assert rc.wait()
    assert 0.35 <= time.monotonic() - t0 < 2.0
    assert rc.missing() == ["dead"]
    assert rc.offer(upd("dead", rnd=3))[1].startswith("late")
    assert rc.aggregate()[1] == 10


def test_no_quorum_reports_failure():
    rc = RoundCollector(1, ["a", "b"], deadline_s=0.1, quorum=2)
    rc.offer(upd("a"))
    assert rc.wait() is False
    with pytest.raises(AggregationError, match="quorum"):
        RoundCollector(1, ["a"], deadline_s=1, quorum=2)


def test_an_abstaining_client_completes_the_round_without_weight():
    """An edge with no vehicles this round abstains: the cloud stops waiting for it and averages the rest."""
    c = RoundCollector(3, ["edge-0", "edge-1"], deadline_s=60)
    assert c.abstain("edge-9") == (False, "edge-9 was not selected for round 3")
    assert not c.complete()
    assert c.abstain("edge-1") == (True, "abstained")
    assert not c.complete() and c.missing() == ["edge-0"]
    ok, _ = c.offer(Update("edge-0", 3, "u0", 8, {"w": torch.ones(2)}))
    assert ok and c.complete() and c.missing() == []
    state, samples = c.aggregate()
    assert samples == 8 and torch.equal(state["w"], torch.ones(2))
    assert c.abstain("edge-0")[0] is False      # it already delivered
