"""Mobility and clustering (§4.1.2): grid, DTMCs, Eqs. 3-6 by hand, learned from generated traces."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flad_edge.swift.clustering import Member, cluster_fleet, form_cluster, size_bound_from_neighbours, to_cluster
from flad_edge.swift.mobility import Grid, MobilityModel, cell_sequences, stability_scores
from flad_edge.swift.planners import plan
from flad_edge.swift.traces import generate_traces


def _two_pattern_model() -> MobilityModel:
    """2x2 grid; pattern A moves 0 -> 1, pattern B moves 0 -> 2; other cells stay put."""
    g = Grid(0, 0, 2, 1)
    P = np.zeros((2, 4, 4))
    for m in range(2):
        P[m] = np.eye(4)
    P[0, 0] = [0, 1, 0, 0]
    P[1, 0] = [0, 0, 1, 0]
    return MobilityModel(g, ["A", "B"], P, np.array([0.5, 0.5]))


def test_grid_cells():
    g = Grid(0, 0, 1000, 50)
    assert g.n_cells == 400 == 1000**2 / 50**2
    assert g.cell(0, 0) == 0 and g.cell(75, 0) == 1 and g.cell(0, 75) == 20
    assert g.cell(5000, -5) == 19  # clipped to the area
    assert g.cell_distance(0, 21) == pytest.approx(math.sqrt(2))
    n = len(g.cells_in_radius(g.cell(500, 500), 200))
    assert abs(n - math.pi * 200**2 / 50**2) / n < 0.1  # |C_v| ~ pi R_v^2 / rho^2


def test_eq3_mixture_prediction_by_hand():
    m = _two_pattern_model()
    pred = m.predict([0], 2)
    assert pred[0].tolist() == [1, 0, 0, 0]
    assert pred[1].tolist() == pytest.approx([0, 0.5, 0.5, 0])  # 0.5 * P_A + 0.5 * P_B
    assert pred[2].tolist() == pytest.approx([0, 0.5, 0.5, 0])
    # a history that moved 0 -> 1 is only possible under A: the posterior picks A
    assert m.posterior([0, 1]).tolist() == pytest.approx([1.0, 0.0], abs=1e-9)


def test_eq4_joint_is_the_product():
    m = _two_pattern_model()
    pv, pn = m.predict([0], 1)[1], np.array([0.25, 0.25, 0.5, 0.0])
    J = m.joint(pv, pn)
    assert J.shape == (4, 4) and J.sum() == pytest.approx(1.0)
    assert J[1, 2] == pytest.approx(0.5 * 0.5)


def test_eq5_stability_by_hand():
    g = Grid(0, 0, 10, 1)
    P = np.eye(g.n_cells)[None]  # everyone stays put
    m = MobilityModel(g, ["still"], P, np.array([1.0]))
    a, b = m.predict([g.cell(0.5, 0.5)], 4), m.predict([g.cell(2.5, 0.5)], 4)
    # same cell: RD = 1 at each of t = 0..4 -> 5; two cells apart with R_v = 4 cells: (1 - 2/4) x 5 = 2.5
    assert m.stability(a, a, radius_m=4.0) == pytest.approx(5.0)
    assert m.stability(a, b, radius_m=4.0) == pytest.approx(2.5)
    assert m.stability(a, b, radius_m=4.0, dwell_steps=1) == pytest.approx(1.0)  # sum over t <= dwl_v only
    assert m.stability(a, b, radius_m=1.5) == 0.0  # out of range
    assert m.expected_neighbours(a, {"b": b}, 4.0).tolist() == [1.0] * 5


def test_eq6_cluster_by_hand():
    GB = 1e9
    ms = [Member("v", 4 * GB, 0.5, 20, 600), Member("x", 4 * GB, 0.5, 20, 600), Member("y", 5 * GB, 0.5, 20, 600),
          Member("z", 2 * GB, 0.5, 20, 600)]
    stb = {"x": 3.0, "y": 1.0, "z": 5.0}
    # M_cap 10 GB (c1 is strict): no pair fits; triples {v,x,y} (Stb 4) and {v,y,z} (Stb 6) do -> {v,y,z}
    c = form_cluster("v", ms, stb, m_cap=10 * GB, m_cmp=1e12)
    assert sorted(c.members) == ["v", "y", "z"] and c.stability == 6.0
    # without the size preference the objective takes the most stable allowed set (all four)
    c = form_cluster("v", ms, stb, m_cap=10 * GB, m_cmp=1e12, prefer_small=False)
    assert sorted(c.members) == ["v", "x", "y", "z"]
    # c3: a size bound of 2 makes it infeasible; c2: too little compute x dwell also
    assert form_cluster("v", ms, stb, m_cap=10 * GB, m_cmp=1e12, size_bound=2) is None
    assert form_cluster("v", ms, stb, m_cap=10 * GB, m_cmp=1e18, epochs=1, alpha_p=1.5) is None
    assert size_bound_from_neighbours([3.7, 2.2, 5.0]) == 3


def test_learned_patterns_and_clusters_from_traces():
    rows, labels = generate_traces(40, 600, seed=3)
    assert generate_traces(40, 600, seed=3)[0] == rows  # seeded
    g = Grid(0, 0, 1000, 50)
    seqs = cell_sequences(rows, g, 5.0)
    model = MobilityModel.fit(seqs, g, labels)
    assert np.allclose(model.P.sum(-1), 1.0)
    hits = [model.patterns[int(model.posterior(s[:12]).argmax())] == labels[v] for v, s in seqs.items()
            if len(s) > 12]
    assert np.mean(hits) > 0.8
    unsup = MobilityModel.fit(seqs, g, None, k=4)
    assert len(unsup.patterns) == 4
    # integer ids (e.g. from the embedded world) work too
    int_rows = [(int(v[3:]), t, x, y) for v, t, x, y in rows]
    assert sorted(cell_sequences(int_rows, g, 5.0)) == sorted(str(int(v[3:])) for v in seqs)

    hist = {v: s[:6] for v, s in seqs.items() if len(s) > 30}
    stb = stability_scores(model, hist, {v: 12 for v in hist}, radius_m=300.0)
    ids = sorted(hist)
    members = [Member(v, 4e9, 0.472, 20.0, 600.0) for v in ids]
    nbrs = {v: {u for u in ids if u != v and stb[(v, u)] > 0} for v in ids}
    clusters = cluster_fleet(members, stb, nbrs, m_cap=11.1e9, m_cmp=1e12)
    seen = [m for c in clusters for m in c.members]
    assert len(seen) == len(set(seen))  # disjoint
    assert clusters and all(c.mem_bytes > 11.1e9 for c in clusters)
    cl = to_cluster(clusters[0], members, stb)
    assert max(v.stability for v in cl.vehicles) == pytest.approx(1.0)
    from flad_edge.swift.model import synthetic_profile

    assert plan(cl, synthetic_profile(11.10, seed=0), "exact").feasible
