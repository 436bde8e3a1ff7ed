"""Availability (§4.1.1): the MAPE dwell regressor, Eq. 1 eligibility and the Eq. 2 resource split."""

from __future__ import annotations

import numpy as np
import pytest

from flad_edge.swift.availability import (
    DwellRegressor,
    Zone,
    classify,
    dwell_samples,
    eligible,
    m_cmp,
    mape,
    resource_sufficient,
)
from flad_edge.swift.model import Layer, Profile
from flad_edge.swift.traces import generate_traces


def test_eq1_eligibility_by_hand():
    # 100 s x 1 TFLOPS = 1e14 FLOPs; alpha 0.5 x M_cmp 1e13 x 10 epochs = 5e13 -> eligible
    assert eligible(100.0, 1.0, 1e13, 10, 0.5)
    assert not eligible(100.0, 1.0, 1e13, 30, 0.5)  # needs 1.5e14
    assert eligible(150.0, 1.0, 1e13, 30, 0.5)  # exactly enough
    with pytest.raises(ValueError):
        eligible(1.0, 1.0, 1.0, 1, 1.5)


def test_eq2_split_by_hand():
    prof = Profile([Layer("a", 1e9, 0, 0, 2e9), Layer("b", 1e9, 0, 0, 2e9)])  # M_cap 4 GB, 2e9 FLOPs/sample
    assert m_cmp(prof, 50) == pytest.approx(1e11)  # Eq. 7
    assert resource_sufficient(100.0, 1.0, 8e9, 1e11, 10, prof.m_cap)
    assert not resource_sufficient(100.0, 1.0, 3e9, 1e11, 10, prof.m_cap)  # memory short
    vs = [{"id": "rich", "dwell_s": 100.0, "tflops": 1.0, "mem_bytes": 8e9},
          {"id": "small", "dwell_s": 100.0, "tflops": 1.0, "mem_bytes": 3e9},
          {"id": "brief", "dwell_s": 1e-4, "tflops": 1.0, "mem_bytes": 8e9},
          {"id": "slowish", "dwell_s": 0.6, "tflops": 1.0, "mem_bytes": 8e9}]
    out = classify(vs, prof, n_batch=50, e_req=10, alpha=0.5)
    assert out.sufficient == ["rich"]
    assert out.limited == ["small", "slowish"]  # slowish: eligible (>= half the work) but not sufficient
    assert out.ineligible == ["brief"]


def test_regressor_minimises_mape_on_an_exact_relation():
    rng = np.random.default_rng(0)
    X = np.column_stack([np.ones(200), rng.uniform(1, 100, 200), rng.uniform(0, 5, 200)])
    a = 3.0 + 2.0 * X[:, 1] + 0.5 * X[:, 2]
    r = DwellRegressor().fit(X, a)
    assert mape(a, r.predict(X)) < 1e-4
    # with outliers, the MAPE fit beats plain least squares on MAPE
    a2 = a.copy()
    a2[:10] *= 8
    r2 = DwellRegressor().fit(X, a2)
    ls = np.linalg.lstsq(X, a2, rcond=None)[0]
    assert mape(a2, r2.predict(X)) < mape(a2, X @ ls)
    assert r2.objective(X, a2) == pytest.approx(np.sum(np.abs(a2 - r2.predict(X)) / a2))


def test_regressor_on_generated_traces_beats_the_constant_baseline():
    rows, _ = generate_traces(60, 900, seed=4)
    zone = Zone(500, 500, 400)
    X, a, ids = dwell_samples(rows, zone)
    assert len(a) > 100 and np.all(a > 0)
    vids = sorted(set(ids))
    train = np.array([i in set(vids[: len(vids) * 2 // 3]) for i in ids])
    r = DwellRegressor().fit(X[train], a[train])
    baseline = np.full((~train).sum(), np.median(a[train]))
    assert mape(a[~train], r.predict(X[~train])) < mape(a[~train], baseline)


def test_dwell_samples_skip_censored_passages():
    # one vehicle crosses the zone (x 0 -> 20, zone radius 5 around 10) and one parks inside until the end
    rows = [("go", float(t), float(t), 10.0) for t in range(21)]
    rows += [("park", float(t), 10.0, 10.0) for t in range(21)]
    _, a, ids = dwell_samples(rows, Zone(10.0, 10.0, 5.0), every_s=2.0)
    assert set(ids) == {"go"}
    # enters at t=5, leaves at t=16: observed at t=7, 9, ..., 15
    assert a.tolist() == [9.0, 7.0, 5.0, 3.0, 1.0]
