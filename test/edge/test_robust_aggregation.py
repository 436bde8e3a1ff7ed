"""Robust aggregation: Flower's arithmetic exactly, update screening, and a poisoned client that spoils nothing.

1. Median, trimmed mean, Krum and multi-Krum against a line-by-line numpy transcription of Flower's functions
   (github.com/adap/flower, src/py/flwr/server/strategy/aggregate.py at 00cd859ae81b903e3188d0a55b358c7c7e2821c4,
   Apache-2.0), on random inputs.
2. Screening: wrong shape/dtype, unknown tensors, NaN, inf and norm outliers are rejected with their reason,
   never aggregated nor counted, and their client has answered (at most once).
3. An in-process FL simulation (7 clients training a small MLP for real, one of them poisoned: weights x100 or
   NaN): under every rule the final held-out loss is within 5 % of the clean run (same seed, same honest clients,
   no attacker), and the attacker's update is not what the round aggregates.
4. The cloud tier: its collector screens edge uploads against the last global model; `--aggregation` errors name
   the field; the experiment starts (and restarts) the cloud with its configured rule.
"""

from __future__ import annotations

import copy
import math
from functools import reduce
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flad_core import weights as wts
from flad_core.config import ConfigError
from flad_edge.fl.aggregation import (
    MIN_UPDATES_FOR_NORM,
    AggregationConfig,
    AggregationError,
    RoundCollector,
    Update,
    aggregate_states,
    krum_scores,
    krum_select,
    median,
    screen_round,
    screen_update,
    trimmed_mean,
)

torch.set_num_threads(1)     # small tensors: threads only contend on a shared CPU


# -- Flower, transcribed line by line (aggregate.py @ 00cd859a; only the type hints dropped) -------------------
def fl_aggregate(results):
    num_examples_total = sum(num_examples for (_, num_examples) in results)
    weighted_weights = [[layer * num_examples for layer in weights] for weights, num_examples in results]
    weights_prime = [reduce(np.add, layer_updates) / num_examples_total for layer_updates in zip(*weighted_weights)]  # noqa: B905
    return weights_prime


def fl_aggregate_median(results):
    weights = [weights for weights, _ in results]
    median_w = [np.median(np.asarray(layer), axis=0) for layer in zip(*weights)]  # noqa: B905
    return median_w


def fl_compute_distances(weights):
    flat_w = np.array([np.concatenate(p, axis=None).ravel() for p in weights])
    distance_matrix = np.zeros((len(weights), len(weights)))
    for i, flat_w_i in enumerate(flat_w):
        for j, flat_w_j in enumerate(flat_w):
            delta = flat_w_i - flat_w_j
            norm = np.linalg.norm(delta)
            distance_matrix[i, j] = norm**2
    return distance_matrix


def fl_krum_scores(weights, num_malicious):
    """The scoring half of aggregate_krum, verbatim (split off so the scores themselves can be compared)."""
    distance_matrix = fl_compute_distances(weights)
    num_closest = max(1, len(weights) - num_malicious - 2)
    closest_indices = []
    for distance in distance_matrix:
        closest_indices.append(np.argsort(distance)[1 : num_closest + 1].tolist())
    scores = [np.sum(distance_matrix[i, closest_indices[i]]) for i in range(len(distance_matrix))]
    return scores


def fl_aggregate_krum(results, num_malicious, to_keep):
    weights = [weights for weights, _ in results]
    scores = fl_krum_scores(weights, num_malicious)
    if to_keep > 0:
        best_indices = np.argsort(scores)[::-1][len(scores) - to_keep :]
        best_results = [results[i] for i in best_indices]
        return fl_aggregate(best_results)
    return weights[np.argmin(scores)]


def fl_trim_mean(array, proportiontocut):
    axis = 0
    nobs = array.shape[axis]
    lowercut = int(proportiontocut * nobs)
    uppercut = nobs - lowercut
    if lowercut > uppercut:
        raise ValueError("Proportion too big.")
    atmp = np.partition(array, (lowercut, uppercut - 1), axis)
    slice_list = [slice(None)] * atmp.ndim
    slice_list[axis] = slice(lowercut, uppercut)
    result = np.mean(atmp[tuple(slice_list)], axis=axis)
    return result


def fl_aggregate_trimmed_avg(results, proportiontocut):
    weights = [weights for weights, _ in results]
    trimmed_w = [fl_trim_mean(np.asarray(layer), proportiontocut=proportiontocut) for layer in zip(*weights)]  # noqa: B905
    return trimmed_w


# -- inputs ---------------------------------------------------------------------------------------------------
SHAPES = st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=2).map(tuple), min_size=1, max_size=3)


def make_round(n: int, shapes, seed: int, dtype=torch.float64, spread: float = 1.0):
    """n random states (name -> tensor) of `shapes`, and the same as Flower's (NDArrays, num_examples) results."""
    g = torch.Generator().manual_seed(seed)
    states = [{f"t{i}": (torch.randn(shape, generator=g, dtype=torch.float64) * spread).to(dtype)
               for i, shape in enumerate(shapes)} for _ in range(n)]
    samples = torch.randint(1, 1000, (n,), generator=g).tolist()
    results = [([s[k].numpy() for k in s], m) for s, m in zip(states, samples, strict=True)]
    return states, samples, results


def assert_matches(ours: dict, theirs: list, rtol=1e-12, atol=1e-12):
    assert len(ours) == len(theirs)
    for (k, t), ref in zip(ours.items(), theirs, strict=True):
        ref = np.asarray(ref)
        assert tuple(t.shape) == ref.shape, k
        np.testing.assert_allclose(t.double().numpy(), ref.astype(np.float64), rtol=rtol, atol=atol, err_msg=k)


# -- 1. Flower's arithmetic -------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9), SHAPES, st.integers(0, 10**6))
def test_median_is_flowers(n, shapes, seed):
    states, samples, results = make_round(n, shapes, seed)
    assert_matches(median(states, samples), fl_aggregate_median(results))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9), SHAPES, st.integers(0, 10**6), st.floats(0.0, 0.49))
def test_trimmed_mean_is_flowers(n, shapes, seed, beta):
    states, samples, results = make_round(n, shapes, seed)
    assert_matches(trimmed_mean(states, beta, samples), fl_aggregate_trimmed_avg(results, beta))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9), SHAPES, st.integers(0, 10**6), st.integers(0, 4))
def test_krum_scores_and_choice_are_flowers(n, shapes, seed, f):
    states, samples, results = make_round(n, shapes, seed)
    weights = [w for w, _ in results]
    np.testing.assert_allclose(krum_scores(states, f), fl_krum_scores(weights, f), rtol=1e-12, atol=1e-12)
    ours, used = aggregate_states(states, samples, AggregationConfig(rule="krum", krum_f=f))
    assert_matches(ours, fl_aggregate_krum(results, f, 0), rtol=0, atol=0)     # the very update Flower picks
    assert used == [int(np.argmin(fl_krum_scores(weights, f)))]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9), SHAPES, st.integers(0, 10**6), st.integers(0, 4), st.data())
def test_multi_krum_is_flowers(n, shapes, seed, f, data):
    states, samples, results = make_round(n, shapes, seed)
    keep = data.draw(st.integers(1, n))
    ours, used = aggregate_states(states, samples, AggregationConfig(rule="multi_krum", krum_f=f, multi_krum_keep=keep))
    assert_matches(ours, fl_aggregate_krum(results, f, keep))      # the sample-weighted mean of the kept
    scores = fl_krum_scores([w for w, _ in results], f)
    assert used == np.argsort(scores)[::-1][len(scores) - keep:].tolist()


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 8), SHAPES, st.integers(0, 10**6))
def test_float32_updates_match_flower_to_float32_rounding(n, shapes, seed):
    states, samples, results = make_round(n, shapes, seed, dtype=torch.float32)
    for ours, theirs in ((median(states), fl_aggregate_median(results)),
                         (trimmed_mean(states, 0.2), fl_aggregate_trimmed_avg(results, 0.2)),
                         (aggregate_states(states, samples, AggregationConfig(rule="multi_krum", multi_krum_keep=2))[0],
                          fl_aggregate_krum(results, 1, 2))):
        assert all(t.dtype == torch.float32 for t in ours.values())
        assert_matches(ours, theirs, rtol=1e-5, atol=1e-6)


def test_flower_details_by_hand():
    s = [{"w": torch.tensor([v])} for v in (1.0, 2.0, 10.0, 4.0)]
    assert median(s)["w"].item() == 3.0                           # even count: the mean of the two middle values
    assert trimmed_mean(s, 0.25)["w"].item() == 3.0               # int(0.25 * 4) = 1 cut at each end
    assert trimmed_mean(s, 0.2)["w"].item() == 4.25               # int(0.8) = 0: nothing cut
    # Krum with f = 0 and n = 4: each update's n - f - 2 = 2 nearest others, squared distances summed
    assert krum_scores(s, 0) == pytest.approx([1 + 9, 1 + 4, 36 + 64, 4 + 9])
    assert krum_select(s, 0) == [1]
    assert krum_select(s, 0, keep=2) == [0, 1]                    # Flower's order: argsort(scores)[::-1][n-keep:]
    assert krum_select(s, 0, keep=9) == [2, 3, 0, 1]              # keep > n: all of them (Flower's slice: fewer)
    # non-float tensors: from the heaviest update (as fedavg); Krum: the chosen update's own
    s2 = [{"w": torch.tensor([v]), "n": torch.tensor(i)} for i, v in enumerate((1.0, 2.0, 10.0))]
    assert median(s2, [1, 5, 2])["n"].item() == 1
    assert aggregate_states(s2, [1, 1, 9], AggregationConfig(rule="krum", krum_f=0))[0]["n"].item() == 0


def test_median_propagates_nan_as_numpy_and_trimmed_mean_sorts_it_last():
    s = [{"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([2.0, math.nan])}, {"w": torch.tensor([3.0, 3.0])}]
    np.testing.assert_array_equal(median(s)["w"].numpy(), np.median(np.stack([x["w"].numpy() for x in s]), axis=0))
    assert math.isnan(median(s)["w"][1])
    five = [*s, {"w": torch.tensor([4.0, 4.0])}, {"w": torch.tensor([5.0, 5.0])}]
    np.testing.assert_allclose(trimmed_mean(five, 0.2)["w"].numpy(),
                               fl_trim_mean(np.stack([x["w"].numpy() for x in five]), 0.2))


# -- config ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("spec", "field"), [
    ("mean", "rule"), ("trimmed_mean,trim_fraction=0.5", "trim_fraction"), ("krum,krum_f=-1", "krum_f"),
    ("multi_krum,multi_krum_keep=x", "multi_krum_keep"), ("median,norm_bound=0.5", "norm_bound"),
    ("median,validate_updates=maybe", "validate_updates"), ("median,bogus=1", "bogus"),
])
def test_bad_config_names_the_field(spec, field):
    with pytest.raises(ConfigError) as exc:
        AggregationConfig.parse(spec)
    assert exc.value.key == field


def test_config_round_trips_through_its_command_line_form():
    for cfg in (AggregationConfig(), AggregationConfig(rule="multi_krum", krum_f=2, multi_krum_keep=3, norm_bound=None),
                AggregationConfig(rule="trimmed_mean", trim_fraction=0.1, validate_updates=False)):
        assert AggregationConfig.parse(cfg.to_spec()) == cfg
    assert AggregationConfig.parse("median") == AggregationConfig(rule="median")


def test_fhdp_and_experiment_configs_carry_a_rule_per_tier():
    from flad_core.config import from_dict
    from flad_edge.experiment.config import experiment_from_dict
    from flad_edge.experiment.sites import fhdp_config
    from flad_edge.fhdp.config import FhdpConfig

    assert FhdpConfig().aggregation == AggregationConfig()           # FedAvg (+ screening) stays the default
    cfg = experiment_from_dict({"aggregation": {"edge": {"rule": "krum", "krum_f": 2}, "cloud": {"rule": "median"}}})
    assert fhdp_config(cfg).aggregation == AggregationConfig(rule="krum", krum_f=2)
    assert cfg.aggregation.cloud.rule == "median"
    with pytest.raises(ConfigError, match=r"aggregation\.edge\.trim_fraction"):
        experiment_from_dict({"aggregation": {"edge": {"trim_fraction": 0.7}}})
    with pytest.raises(ConfigError, match=r"aggregation\.rule"):
        from_dict(FhdpConfig, {"aggregation": {"rule": "avg"}})


# -- 2. screening ---------------------------------------------------------------------------------------------
def ref_state():
    return {"w": torch.zeros(3, 2), "b": torch.zeros(2), "n": torch.tensor(0)}


def upd(client, state, n=10, rnd=0):
    return Update(client, rnd, f"{client}-{rnd}", n, state)


def moved(delta: float, **over):
    s = {"w": torch.full((3, 2), delta), "b": torch.full((2,), delta), "n": torch.tensor(1)}
    s.update(over)
    return s


@pytest.mark.parametrize(("bad", "reason"), [
    (moved(0.1, w=torch.zeros(2, 3)), "shape"),
    (moved(0.1, b=torch.zeros(2, dtype=torch.float64)), "dtype"),
    (moved(0.1, n=torch.tensor(1.0)), "dtype"),
    (moved(0.1, extra=torch.zeros(1)), "unknown tensor extra"),
    (moved(0.1, w=torch.tensor([[0.0, math.nan]] * 3)), "NaN"),
    (moved(0.1, b=torch.tensor([math.inf, 0.0])), "inf"),
])
def test_screening_rejects_malformed_updates_with_the_reason(bad, reason):
    assert screen_update(moved(0.1), ref_state()) == ""
    assert reason in screen_update(bad, ref_state())
    rc = RoundCollector(0, ["a", "b", "bad"], 5, config=AggregationConfig(), reference=ref_state())
    assert rc.offer(upd("a", moved(0.1)))[0] and rc.offer(upd("b", moved(0.3), n=30))[0]
    ok, why = rc.offer(upd("bad", bad, n=1000))
    assert not ok and why.startswith("rejected:") and reason in rc.rejected["bad"]
    assert rc.complete() and rc.missing() == []                          # it answered: nobody waits for it
    assert not rc.offer(Update("bad", 0, "bad-retry", 10, moved(0.1)))[0]   # and it does not get a second try
    state, samples = rc.aggregate()
    assert samples == 40 and rc.aggregated_from == ["a", "b"]
    assert torch.allclose(state["w"], torch.full((3, 2), 0.25))          # (10 x 0.1 + 30 x 0.3) / 40


def test_norm_rule_rejects_outliers_relative_to_the_rounds_median():
    rc = RoundCollector(0, list("abcde"), 5, config=AggregationConfig(norm_bound=5.0), reference=ref_state())
    for c, d in zip("abcd", (0.1, 0.2, 0.15, 0.3), strict=True):
        assert rc.offer(upd(c, moved(d)))[0]
    assert rc.offer(upd("e", moved(100 * 0.2), n=10**6))[0]      # passes the per-update checks: finite, right shape
    state, samples = rc.aggregate()
    assert list(rc.rejected) == ["e"] and "median" in rc.rejected["e"]
    assert "e" not in rc.updates and samples == 40
    assert torch.allclose(state["w"], torch.full((3, 2), 0.1875))
    # screening happens once: aggregating again neither rejects more nor changes the result
    again, _ = rc.aggregate()
    assert torch.equal(again["w"], state["w"]) and list(rc.rejected) == ["e"]


def test_norm_rule_needs_three_updates_and_a_scale():
    two = [moved(0.1), moved(100.0)]
    assert MIN_UPDATES_FOR_NORM == 3
    assert screen_round(two, ref_state(), 5.0) == {}                   # two updates: cannot tell who is honest
    assert screen_round([moved(0.1), moved(0.2), moved(100.0)], ref_state(), 5.0).keys() == {2}
    assert screen_round([moved(0.1), moved(0.2), moved(100.0)], ref_state(), None) == {}   # norm rule off
    assert screen_round([moved(0.0), moved(0.0), moved(1.0)], ref_state(), 5.0) == {}      # median distance 0
    # without a reference the round's coordinate-wise median is the centre
    assert screen_round([moved(0.1), moved(0.2), moved(0.15), moved(50.0)], None, 5.0).keys() == {3}
    # tensors other than most updates' are rejected when the round is screened (no reference to check them at offer)
    odd = {"w": torch.zeros(3, 2)}
    assert screen_round([moved(0.1), moved(0.2), odd], None, None).keys() == {2}


def test_without_a_config_the_collector_is_plain_fedavg():
    rc = RoundCollector(0, ["a", "b"], 5)
    assert rc.offer(upd("a", moved(math.nan)))[0]                     # no screening, as before
    assert not rc.config.validate_updates and rc.config.rule == "fedavg"


def test_a_round_where_everything_was_rejected_cannot_aggregate():
    rc = RoundCollector(0, ["a"], 5, config=AggregationConfig(), reference=ref_state())
    assert not rc.offer(upd("a", moved(math.nan)))[0]
    with pytest.raises(AggregationError, match=r"no updates.*rejected"):
        rc.aggregate()


# -- 3. a poisoned client in a real FL run -----------------------------------------------------------------------
N_HONEST, ROUNDS, LOCAL_STEPS, LR = 6, 8, 5, 0.05


def _data(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    w = torch.linspace(-1, 1, 8)
    y = torch.tanh(x @ w).unsqueeze(1) + 0.5 * x[:, :1] * x[:, 1:2] + 0.05 * torch.randn(n, 1, generator=g)
    return x, y


def _model():
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _local_train(model, global_state, data):
    model.load_state_dict(global_state)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = data
    for _ in range(LOCAL_STEPS):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def poison(state, attack):
    if attack == "scale":
        return {k: v * 100 for k, v in state.items()}
    return {k: torch.full_like(v, math.nan) if k.endswith("weight") else v for k, v in state.items()}


def simulate(cfg: AggregationConfig, attack: str | None):
    """ROUNDS of FL over N_HONEST honest clients (+1 attacker that trains honestly, then poisons what it sends);
    returns the held-out loss, and per round the collector and the aggregate."""
    torch.manual_seed(0)
    model = _model()
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    client_data = [_data(100 + i, 48) for i in range(N_HONEST + 1)]
    test_x, test_y = _data(999, 512)
    worker = _model()
    rounds = []
    for rnd in range(ROUNDS):
        clients = [f"c{i}" for i in range(N_HONEST)] + (["attacker"] if attack else [])
        rc = RoundCollector(rnd, clients, 60, config=copy.deepcopy(cfg), reference=global_state)
        for i, c in enumerate(clients):
            state = _local_train(worker, global_state, client_data[i])
            if c == "attacker":
                state = poison(state, attack)
            rc.offer(Update(c, rnd, f"{c}-{rnd}", len(client_data[i][0]), state))
        global_state, _ = rc.aggregate()
        rounds.append((rc, global_state))
    model.load_state_dict(global_state)
    with torch.no_grad():
        loss = float(torch.nn.functional.mse_loss(model(test_x), test_y))
    return loss, rounds


RULES = [AggregationConfig(), AggregationConfig(rule="median"), AggregationConfig(rule="trimmed_mean"),
         AggregationConfig(rule="krum"), AggregationConfig(rule="multi_krum")]


@pytest.fixture(scope="module")
def clean_runs():
    return {cfg.rule: simulate(cfg, None) for cfg in RULES}


@pytest.mark.parametrize("attack", ["scale", "nan"])
@pytest.mark.parametrize("cfg", RULES, ids=lambda c: c.rule)
def test_a_poisoned_client_is_rejected_and_the_run_converges_as_a_clean_one(clean_runs, cfg, attack):
    clean_loss, _ = clean_runs[cfg.rule]
    assert clean_loss < 0.5 * simulate_initial_loss()        # the clean run did learn
    loss, rounds = simulate(cfg, attack)
    assert loss == pytest.approx(clean_loss, rel=0.05)
    for rc, _ in rounds:
        assert "attacker" in rc.rejected and "attacker" not in rc.aggregated_from
        assert ("non-finite" if attack == "nan" else "moved the model") in rc.rejected["attacker"]


@pytest.mark.parametrize("cfg", [AggregationConfig(rule=r, validate_updates=False)
                                 for r in ("median", "trimmed_mean", "krum", "multi_krum")], ids=lambda c: c.rule)
def test_robust_rules_alone_withstand_a_scaled_client(clean_runs, cfg):
    """Screening off: the rule itself must keep the x100 client out (Krum) or bound its influence (median, mean)."""
    clean_loss, clean_rounds = clean_runs[cfg.rule]
    loss, rounds = simulate(cfg, "scale")
    assert loss == pytest.approx(clean_loss, rel=0.05)
    rc, agg = rounds[0]
    assert not rc.rejected
    if cfg.rule in ("krum", "multi_krum"):
        assert all("attacker" not in r.aggregated_from for r, _ in rounds)
    else:
        # the round-0 aggregate is as close to the clean one as the honest updates are to each other
        honest = [u.state for c, u in rc.updates.items() if c != "attacker"]
        _, clean_agg = clean_rounds[0]
        spread = min(_dist(h, clean_agg) for h in honest)
        assert _dist(agg, clean_agg) <= spread


def test_plain_fedavg_is_spoiled_by_the_same_client(clean_runs):
    """The attack is real: FedAvg without screening lets the x100 client ruin the model."""
    clean_loss, _ = clean_runs["fedavg"]
    loss, rounds = simulate(AggregationConfig(validate_updates=False), "scale")
    assert not math.isfinite(loss) or loss > 10 * clean_loss
    assert "attacker" in rounds[0][0].aggregated_from


def _dist(a, b):
    return math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a))


def simulate_initial_loss():
    torch.manual_seed(0)
    model = _model()
    x, y = _data(999, 512)
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(x), y))


# -- 4. the cloud tier -----------------------------------------------------------------------------------------
class StubBus:
    def __init__(self):
        self.handlers = {}

    def serve(self, service, req_type, resp_type, handler, **_):
        self.handlers[service] = handler

    def close(self):
        pass


def _upload(cloud, sender, rnd, state, samples=10, uid=""):
    ack = None
    for chunk in wts.chunk_messages(wts.to_bytes(state), sender=sender, update_id=uid or f"{sender}-r{rnd}", round=rnd,
                                    num_samples=samples):
        ack = cloud._on_chunk(chunk)
    return ack


def test_cloud_screens_edge_uploads_against_the_last_global_model():
    from flad_core.weights import WeightsError
    from flad_edge.fl.cloud import CloudServer

    fleet = SimpleNamespace(cloud=SimpleNamespace(id="cloud"))
    cloud = CloudServer(fleet, ["e1", "e2", "e3"], deadline_s=30, bus=StubBus(),
                        aggregation=AggregationConfig(rule="median"))
    # round 0, no global model yet: an upload unlike the others' is rejected when the round is screened
    assert _upload(cloud, "e1", 0, {"w": torch.full((4,), 0.1)}).ok
    assert _upload(cloud, "e2", 0, {"w": torch.full((4,), 0.3)}).ok
    assert _upload(cloud, "e3", 0, {"w": torch.full((4,), 0.2, dtype=torch.float64)}).ok
    assert cloud.rounds[0].reference is None and 0 in cloud.results            # complete: aggregated at once
    assert cloud.rounds[0].rejected.keys() == {"e3"} and "differ" in cloud.rounds[0].rejected["e3"]
    assert torch.allclose(cloud.global_state["w"], torch.full((4,), 0.2))
    # round 1 is screened against round 0's global model: a wrong shape at once (the edge is told), and a x100
    # edge (it moves the model far more than the others) when the round is aggregated
    ack = _upload(cloud, "e3", 1, {"w": torch.zeros(5)})
    assert not ack.ok and "shape" in ack.message
    assert not _upload(cloud, "e3", 1, {"w": torch.zeros(4)}, uid="again").ok     # one update per edge and round
    assert cloud.rounds[1].rejected.keys() == {"e3"}
    for e, d in (("e1", 0.25), ("e2", 0.15)):
        assert _upload(cloud, e, 1, {"w": torch.full((4,), d)}).ok
    assert 1 in cloud.results and torch.allclose(cloud.global_state["w"], torch.full((4,), 0.2))
    for e, d in (("e1", 0.25), ("e2", 0.15), ("e3", 20.0)):
        assert _upload(cloud, e, 2, {"w": torch.full((4,), d)}).ok
    assert cloud.rounds[2].rejected.keys() == {"e3"} and "moved the model" in cloud.rounds[2].rejected["e3"]
    assert torch.allclose(cloud.global_state["w"], torch.full((4,), 0.2))
    # NaN never even reaches the collector: the weight transport refuses non-finite payloads
    with pytest.raises(WeightsError, match="NaN"):
        _upload(cloud, "e1", 3, {"w": torch.tensor([0.2, math.nan, 0.2, 0.2])})


def test_cloud_cli_names_the_bad_aggregation_field(capsys):
    from flad_edge.fl.cloud import main

    with pytest.raises(SystemExit) as exc:
        main(["--aggregation", "trimmed_mean,trim_fraction=0.9"])
    assert exc.value.code == 2
    assert "--aggregation: trim_fraction: must be in [0, 0.5)" in capsys.readouterr().err


def test_the_experiment_starts_and_restarts_the_cloud_with_its_rule(tmp_path):
    from flad_core.fleet import load_fleet
    from flad_edge.experiment.sites import start_cloud

    from flad_testing import REPO

    class Group:
        def __init__(self):
            self.cmds = []

        def start(self, name, cmd, **_):
            self.cmds.append(cmd)

    fleet = load_fleet(REPO / "launch" / "fleet.yaml")
    group = Group()
    start_cloud(group, tmp_path, fleet, ["e1", "e2"], AggregationConfig(rule="krum", krum_f=0))
    start_cloud(group, tmp_path, fleet, ["e1", "e2"])           # a restart: the run's rule, not the default
    for cmd in group.cmds:
        spec = cmd[cmd.index("--aggregation") + 1]
        assert AggregationConfig.parse(spec) == AggregationConfig(rule="krum", krum_f=0)


def test_a_thin_round_is_screened_against_the_tiers_recent_distances():
    """Most honest clients down: the attacker must not get through just because the round is small."""
    from flad_edge.fl.aggregation import DistanceHistory, screen_round

    gen = torch.Generator().manual_seed(3)
    reference = {"w": torch.randn(64, generator=gen)}

    def honest() -> dict[str, torch.Tensor]:
        return {"w": reference["w"] + 0.01 * torch.randn(64, generator=gen)}

    poisoned = {"w": reference["w"] * 100}
    # without history, two updates cannot say which one is the outlier: the rule is skipped
    assert screen_round([honest(), poisoned], reference, 5.0, DistanceHistory()) == {}
    history = DistanceHistory()
    for _ in range(3):      # ordinary rounds teach the tier how far honest updates move the model
        assert screen_round([honest() for _ in range(4)], reference, 5.0, history) == {}
    assert len(history.values) == 12
    rejected = screen_round([honest(), poisoned], reference, 5.0, history)
    assert list(rejected) == [1] and "recent updates" in rejected[1]
    assert list(screen_round([poisoned], reference, 5.0, history)) == [0]     # alone in its round, too
    assert len(history.values) == 13                                          # only the honest one was learnt
    # a collector with the tier's history rejects the lone attacker of a thin round
    col = RoundCollector(9, ["a", "b"], 60, config=AggregationConfig(), reference=reference, history=history)
    assert col.offer(Update("a", 9, "a9", 10, honest()))[0] and col.offer(Update("b", 9, "b9", 10, poisoned))[0]
    col.aggregate()
    assert set(col.rejected) == {"b"} and col.aggregated_from == ["a"]
