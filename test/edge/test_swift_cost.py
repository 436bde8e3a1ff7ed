"""Eqs. 8-10 on hand-computed examples, and the precomputed cost model against the direct formulas."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from flad_edge.swift import CostModel, bottleneck, stage_costs, t_cmp, t_com, t_path, validate_plan
from flad_edge.swift.model import Cluster, Layer, Profile, Vehicle, random_cluster, synthetic_profile


def _cluster() -> Cluster:
    # a: 1 TFLOPS, 8 Mb/s = 1e6 B/s; b: 2 TFLOPS, 16 Mb/s
    return Cluster([Vehicle("a", 10e9, 1.0, 8.0, 0.9), Vehicle("b", 10e9, 2.0, 16.0, 0.1)], mu=0.5, nu=1.0,
                   n_batch=2)


def _profile() -> Profile:
    return Profile([Layer("l0", 1e12, 0, 1e6, 1e9), Layer("l1", 2e12, 0, 3e6, 1e9), Layer("l2", 1e12, 0, 5e5, 1e9)])


def test_eq8_compute_time_by_hand():
    c = _cluster()
    # 1e12 FLOPs x 2 batches x nu 1 / (1 TFLOPS x 1e12 x mu 0.5) = 4 s
    assert t_cmp(1e12, c.vehicles[0], c) == pytest.approx(4.0)
    assert t_cmp(1e12, c.vehicles[1], c) == pytest.approx(2.0)
    c.nu = 1.5
    assert t_cmp(1e12, c.vehicles[0], c) == pytest.approx(6.0)


def test_eq9_activation_traffic_by_hand():
    c = _cluster()
    # 2 x 1e6 B x 2 batches x nu 1 / (8 Mb/s = 1e6 B/s) = 4 s
    assert t_com(1e6, c.vehicles[0], c) == pytest.approx(4.0)
    assert t_com(1e6, c.vehicles[1], c) == pytest.approx(2.0)


def test_eq10_path_time_and_bottleneck_by_hand():
    c, p = _cluster(), _profile()
    st = stage_costs(["a", "b"], [(0, 2), (2, 3)], c, p)
    # a: layers 0-1: 3e12 FLOPs -> 12 s compute; sends activations of layer 1 (3e6 B) -> 12 s
    # b: layer 2: 1e12 FLOPs on 2 TFLOPS -> 2 s; last stage sends nothing
    assert (st[0].t_cmp_s, st[0].t_com_s) == pytest.approx((12.0, 12.0))
    assert (st[1].t_cmp_s, st[1].t_com_s) == pytest.approx((2.0, 0.0))
    assert t_path(st) == pytest.approx(26.0)
    assert bottleneck(st) == pytest.approx(24.0)
    cm = CostModel(c, p)
    assert cm.evaluate([0, 1], [0, 2, 3]) == pytest.approx((26.0, 24.0))
    plan = cm.to_plan("x", [0, 1], [0, 2, 3], "path")
    assert plan.to_json()["layers"] == {"a": [0, 2], "b": [2, 3]}
    assert plan.t_path_s == pytest.approx(26.0)


def test_memory_limit_and_validity_checks():
    c, p = _cluster(), _profile()
    c.vehicles[1].mem_bytes = 1.5e9
    assert validate_plan(["a", "b"], [(0, 1), (1, 3)], c, p) == ["b: needs 2e+09 B, has 1.5e+09 B"]
    assert validate_plan(["a", "b"], [(0, 2), (2, 3)], c, p) == []
    assert any("not contiguous" in s for s in validate_plan(["a", "b"], [(0, 1), (2, 3)], c, p))
    assert any("empty" in s for s in validate_plan(["a", "b"], [(0, 3), (3, 3)], c, p))
    assert any("every vehicle" in s for s in validate_plan(["a"], [(0, 3)], c, p))
    assert any("start with" in s for s in validate_plan(["a", "b"], [(0, 2), (2, 3)], c, p, first="b"))
    cm = CostModel(c, p)
    assert math.isinf(cm.evaluate([0, 1], [0, 1, 3])[0])  # b cannot hold two layers


def test_cost_matrices_match_direct_formulas():
    c, p = random_cluster(4, seed=3), synthetic_profile(5.55, n_layers=12, seed=2)
    cm = CostModel(c, p)
    rng = np.random.default_rng(0)
    for _ in range(30):
        order = list(rng.permutation(4))
        cuts = [0, *sorted(rng.choice(np.arange(1, 12), 3, replace=False).tolist()), 12]
        ids = [c.vehicles[i].id for i in order]
        ranges = list(itertools.pairwise(cuts))
        st = stage_costs(ids, ranges, c, p)
        tp, bn = cm.evaluate(order, cuts)
        if validate_plan(ids, ranges, c, p):
            assert math.isinf(tp)
        else:
            assert tp == pytest.approx(t_path(st)) and bn == pytest.approx(bottleneck(st))
