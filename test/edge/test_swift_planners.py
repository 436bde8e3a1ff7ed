"""Planners: exact == brute force; greedy/dqn/swift always valid and feasible whenever exact is."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flad_edge.swift import CostModel, plan, validate_plan
from flad_edge.swift import planners as P
from flad_edge.swift.model import Cluster, Layer, Profile, Vehicle, random_cluster, synthetic_profile


@st.composite
def instances(draw, max_n: int = 4, max_layers: int = 7):
    n = draw(st.integers(2, max_n))
    L = draw(st.integers(n, max_layers))
    layers = [Layer(f"l{i}", draw(st.floats(1e9, 1e12)), 0.0, draw(st.floats(1e4, 1e7)),
                    draw(st.floats(1e8, 3e9))) for i in range(L)]
    vehicles = [Vehicle(f"v{i}", draw(st.floats(5e8, 8e9)), draw(st.sampled_from([0.404, 0.472, 3.85])),
                        draw(st.sampled_from([20.0, 50.0, 100.0])), draw(st.floats(0, 1))) for i in range(n)]
    # raw-input layers that must stay on the first stage (the encoder profile's min_first_stage_end)
    meta = {"min_first_stage_end": draw(st.integers(1, L - n + 1))}
    return Cluster(vehicles, mu=0.5, nu=1.3, n_batch=draw(st.integers(1, 50))), Profile(layers, meta)


def _value(cm, sol, objective):
    tp, bn = cm.evaluate(*sol)
    return tp if objective == "path" else bn


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(inst=instances(), objective=st.sampled_from(["path", "bottleneck"]), pin=st.booleans())
def test_exact_equals_brute_force(inst, objective, pin):
    cluster, profile = inst
    cm = CostModel(cluster, profile)
    first = 0 if pin else None
    bf_val, bf_sol = P.brute_force(cm, first, objective)
    sol = P.exact(cm, first, objective)
    if bf_sol is None:
        assert sol is None
        return
    assert sol is not None
    assert _value(cm, sol, objective) == pytest.approx(bf_val, rel=1e-9)
    ids = [cluster.vehicles[i].id for i in sol[0]]
    assert validate_plan(ids, list(zip(sol[1][:-1], sol[1][1:], strict=True)), cluster, profile,
                         first=cluster.vehicles[0].id if pin else None) == []


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(inst=instances(max_n=5, max_layers=9), objective=st.sampled_from(["path", "bottleneck"]),
       pin=st.booleans())
def test_heuristics_valid_and_feasible_when_exact_is(inst, objective, pin, swift_policy):
    cluster, profile = inst
    first = cluster.vehicles[-1].id if pin else None
    ref = plan(cluster, profile, "exact", first, objective)
    for method in ("greedy", "dqn", "swift"):
        out = plan(cluster, profile, method, first, objective, policy=swift_policy)
        assert out.feasible == ref.feasible, (method, out.reason)
        if out.feasible:
            assert validate_plan(out.path, out.ranges, cluster, profile, first=first) == [], method
            val = out.t_path_s if objective == "path" else out.bottleneck_s
            best = ref.t_path_s if objective == "path" else ref.bottleneck_s
            assert val >= best * (1 - 1e-9)
        else:
            assert out.reason


def test_greedy_phase1_by_hand():
    # 4 equal layers of 1 GB; most stable vehicle 'b' (3 GB) goes first and takes all it can while leaving
    # one layer for 'a'; 'a' (2 GB) takes the rest.
    prof = Profile([Layer(f"l{i}", 1e12, 0, 1e6, 1e9) for i in range(4)])
    cl = Cluster([Vehicle("a", 2e9, 1.0, 8.0, 0.2), Vehicle("b", 3e9, 1.0, 8.0, 0.9)])
    out = plan(cl, prof, "greedy")
    assert out.path == ["b", "a"] and out.ranges == [(0, 3), (3, 4)]
    assert out.extra["stability_order"] is True
    out = plan(cl, prof, "greedy", first="a")
    assert out.path == ["a", "b"] and out.ranges == [(0, 2), (2, 4)]


def test_greedy_repairs_an_order_that_cannot_hold_the_model():
    # Stability says small 'a' first, but the big layer 0 only fits on 'b': greedy reorders instead of failing.
    prof = Profile([Layer("big", 1e12, 0, 1e6, 3e9), Layer("s1", 1e12, 0, 1e6, 1e9), Layer("s2", 1e12, 0, 1e6, 1e9)])
    cl = Cluster([Vehicle("a", 2e9, 1.0, 8.0, 0.9), Vehicle("b", 3e9, 1.0, 8.0, 0.1)])
    out = plan(cl, prof, "greedy")
    assert out.feasible and out.path == ["b", "a"] and out.extra["stability_order"] is False
    assert not plan(cl, prof, "greedy", first="a").feasible  # pinned data owner cannot hold layer 0


def test_infeasible_reasons():
    prof = synthetic_profile(14.01, seed=0)
    cl = random_cluster(3, seed=0, mem_fraction=0.1)
    out = plan(cl, prof, "exact")
    assert not out.feasible and "cluster memory" in out.reason
    tiny = Profile([Layer("only", 1.0, 0, 1.0, 1.0)])
    out = plan(random_cluster(2, seed=0), tiny, "greedy")
    assert not out.feasible and "1 layers" in out.reason


def test_swift_close_to_exact_and_better_than_greedy(swift_policy):
    gaps, gains = [], []
    for s in range(8):
        cl, pr = random_cluster(5 + s % 3, seed=100 + s), synthetic_profile(11.10, seed=s)
        ex = plan(cl, pr, "exact")
        if not ex.feasible:
            continue
        sw = plan(cl, pr, "swift", policy=swift_policy)
        gr = plan(cl, pr, "greedy")
        assert len(sw.extra["pipelines"]) == len(cl.vehicles)  # one essential pipeline per first vehicle
        assert {p["first"] for p in sw.extra["pipelines"]} == {v.id for v in cl.vehicles}
        gaps.append(sw.t_path_s / ex.t_path_s - 1)
        gains.append(1 - sw.t_path_s / gr.t_path_s)
    assert gaps and sorted(gaps)[len(gaps) // 2] <= 0.02
    assert sum(gains) / len(gains) >= 0.10


def test_exact_rejects_oversized_clusters():
    cl = random_cluster(P.EXACT_MAX_N + 1, seed=0)
    with pytest.raises(P.PlannerError):
        plan(cl, synthetic_profile(5.55, n_layers=40), "exact")


def test_policy_is_reused_from_disk(swift_policy_dir, monkeypatch):
    from flad_edge.swift import dqn

    monkeypatch.setenv("FLAD_SWIFT_POLICY_DIR", str(swift_policy_dir))
    monkeypatch.setattr(dqn, "train", lambda *a, **k: pytest.fail("must not retrain"))
    pol = dqn.load_or_train(None, "path")
    assert pol.meta["objective"] == "path" and int(pol.meta["episodes"]) > 0
    cm = CostModel(random_cluster(4, seed=1), synthetic_profile(5.55, seed=1))
    a, b = pol.rollout(cm), pol.rollout(cm)
    assert a == b and not math.isinf(cm.evaluate(*a)[0])


def _corrupt_policies(tmp_path, swift_policy_dir):
    """Files at a policy path that are not usable policies: garbage, a torn policy, a foreign safetensors file,
    one with the right metadata and the wrong tensors, a folder."""
    import torch
    from safetensors.torch import save as st_save

    from flad_edge.swift.dqn import FEATURE_VERSION

    good = (swift_policy_dir / "dqn_path.safetensors").read_bytes()
    ours = {"feature_version": FEATURE_VERSION}
    out = {}
    for name, data in (("garbage", b"not a policy"), ("torn", good[: len(good) // 2]),
                       ("foreign", st_save({"w": torch.zeros(3)})),
                       ("wrong_tensors", st_save({"w": torch.zeros(3)}, metadata=ours))):
        f = tmp_path / f"{name}.safetensors"
        f.write_bytes(data)
        out[name] = f
    (tmp_path / "folder.safetensors").mkdir()
    out["folder"] = tmp_path / "folder.safetensors"
    return out


def test_corrupt_policy_file_raises_and_is_never_overwritten(tmp_path, swift_policy_dir, monkeypatch):
    from flad_core.config import ConfigError
    from flad_edge.swift import dqn

    monkeypatch.setattr(dqn, "train", lambda *a, **k: pytest.fail("must not train over an existing file"))
    for name, f in _corrupt_policies(tmp_path, swift_policy_dir).items():
        before = f.read_bytes() if f.is_file() else None
        with pytest.raises(dqn.PolicyFileError, match="not a usable DQN policy") as info:
            dqn.load_or_train(f, "path")
        assert str(f) in str(info.value) and info.value.path == f, name
        assert isinstance(info.value, ConfigError) and "\n" not in str(info.value)   # `flad` prints one line
        assert (f.read_bytes() if f.is_file() else None) == before, f"{name} was modified"
    # the default location, through the planner: the same error, and the file stays
    monkeypatch.setenv("FLAD_SWIFT_POLICY_DIR", str(tmp_path))
    torn = (swift_policy_dir / "dqn_path.safetensors").read_bytes()[:100]
    dqn.default_policy_path("path").write_bytes(torn)
    with pytest.raises(dqn.PolicyFileError, match=r"dqn_path\.safetensors"):
        plan(random_cluster(3, seed=0), synthetic_profile(5.55, n_layers=16), "swift")
    assert dqn.default_policy_path("path").read_bytes() == torn


def test_policy_of_an_older_feature_version_is_retrained_in_place(tmp_path, swift_policy_dir, monkeypatch):
    import torch
    from safetensors.torch import save as st_save

    from flad_edge.swift import dqn

    f = tmp_path / "old.safetensors"
    f.write_bytes(st_save({"w": torch.zeros(3)}, metadata={"feature_version": "0", "objective": "path"}))
    fresh = dqn.DQNPolicy.load(swift_policy_dir / "dqn_path.safetensors")
    calls = []
    monkeypatch.setattr(dqn, "train", lambda *a, **k: calls.append(a) or fresh)
    pol = dqn.load_or_train(f, "path", episodes=5)
    assert pol is fresh and len(calls) == 1
    assert dqn.DQNPolicy.load(f).meta["feature_version"] == dqn.FEATURE_VERSION


def test_training_progress_bar_only_on_a_terminal(monkeypatch, capsys):
    import torch
    import tqdm

    from flad_edge.swift import dqn

    made = []

    class Bar(tqdm.tqdm):
        def __init__(self, *a, **k):
            made.append(k["disable"])
            super().__init__(*a, **k)

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    a = dqn.train(episodes=3, seed=0)                          # pytest captures stdout: not a terminal
    monkeypatch.setattr("sys.stdout.isatty", lambda: True, raising=False)
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    b = dqn.train(episodes=3, seed=0, progress=False)
    c = dqn.train(episodes=3, seed=0)
    assert made == [True, True, False]
    capsys.readouterr()
    for x in (b, c):   # the bar changes nothing about the training
        assert all(torch.equal(a.net.state_dict()[k], v) for k, v in x.net.state_dict().items())


def test_raw_input_layers_stay_on_the_first_stage():
    prof = Profile([Layer(f"l{i}", 1e12, 0, 1e6 if i else 1e3, 1e9) for i in range(5)], {"min_first_stage_end": 3})
    cl = Cluster([Vehicle("a", 2e9, 1.0, 8.0, 0.9), Vehicle("b", 5e9, 1.0, 8.0, 0.1)])
    for method in ("exact", "greedy"):
        out = plan(cl, prof, method)
        assert out.feasible and out.path[0] == "b" and out.ranges[0][1] >= 3, method  # 'a' cannot hold 3 layers
    out = plan(cl, prof, "exact", first="a")
    assert not out.feasible and "raw-input" in out.reason
    assert validate_plan(["b", "a"], [(0, 1), (1, 5)], cl, prof)  # cheap cut of raw data is rejected
    from flad_core.config import ConfigError
    from flad_edge.swift.model import load_profile

    with pytest.raises(ConfigError, match="min_first_stage_end"):
        load_profile({"layers": [{"name": "x", "flops": 1, "param_bytes": 1, "activation_bytes": 1,
                                  "mem_bytes": 1}], "min_first_stage_end": 5})


def _coverable(cm, R, e):
    """Brute force: some order of the vehicles in bitmask R covers [e, L), each non-empty and fitting."""
    vs = [v for v in range(cm.n) if R >> v & 1]
    if not vs:
        return e == cm.L
    for order in itertools.permutations(vs):
        for inner in itertools.combinations(range(e + 1, cm.L), len(vs) - 1):
            cuts = [e, *inner, cm.L]
            if all(b > a and cm.mem_prefix[b] - cm.mem_prefix[a] <= cm.mem_v[v] * (1 + 1e-12)
                   for v, a, b in zip(order, cuts[:-1], cuts[1:], strict=True)):
                return True
    return False


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(inst=instances(max_n=4, max_layers=7))
def test_cover_table_is_exact(inst):
    cluster, profile = inst
    cm = CostModel(cluster, profile)
    cover = P.cover_table(cm)
    for R in range(1 << cm.n):
        for e in range(cm.L + 1):
            assert cover[R][e] == _coverable(cm, R, e), (R, e)
