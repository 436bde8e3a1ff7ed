"""The closed-loop summary of `flad bench llm`: bootstrap intervals and per-agent figures from route records."""

from __future__ import annotations

import numpy as np
import pytest

from flad_bench.driving import bootstrap_ci, route_jobs, summarize_agent


def _route(rid: str, ds: float, rc: float, status: str, kinds: list[str]) -> dict:
    infr = [{"kind": k, "time_s": 1.0, "x": 0.0, "y": 0.0, "actor_id": -1, "penalty": 0.6 if "collision" in k else 1.0,
             "info": ""} for k in kinds]
    return {"route_id": rid, "town": "Town05", "route_length_m": 100.0, "rc": rc, "is": ds / rc if rc else 1.0,
            "ds": ds, "status": status, "duration_s": 30.0, "outside_lanes_fraction": 0.0, "infractions": infr}


def test_bootstrap_interval_is_seeded_and_brackets_the_mean() -> None:
    x = np.random.default_rng(0).uniform(0, 100, 30)
    lo, hi = bootstrap_ci(x)
    assert lo < x.mean() < hi and hi - lo < 40
    assert bootstrap_ci(x) == (lo, hi)                       # same seed, same interval
    assert bootstrap_ci([50.0] * 5) == (50.0, 50.0)          # no spread: the point itself
    assert bootstrap_ci([70.0]) == (70.0, 70.0)
    wide = bootstrap_ci(np.r_[np.zeros(15), np.full(15, 100.0)])
    assert wide[0] < 40 < 60 < wide[1]


def test_summary_counts_infractions_deviations_and_rates_by_the_leaderboard() -> None:
    routes = [_route("a", 100.0, 100.0, "completed", []),
              _route("b", 30.0, 50.0, "route_deviation", ["collision_vehicle", "route_deviation"]),
              _route("c", 0.0, 0.0, "timeout", ["timeout"]),
              _route("d", 60.0, 100.0, "completed", ["collision_vehicle"])]
    s = summarize_agent(routes)
    assert s["n_routes"] == 4 and s["ds"] == pytest.approx(47.5) and s["rc"] == pytest.approx(62.5)
    assert s["ds_std"] == pytest.approx(float(np.std([100, 30, 0, 60], ddof=1)), abs=0.01)
    assert s["ds_ci95"][0] <= 47.5 <= s["ds_ci95"][1]
    assert s["statuses"] == {"completed": 2, "route_deviation": 1, "timeout": 1}
    assert s["infractions"] == {"collision_vehicle": 2, "route_deviation": 1, "timeout": 1}
    assert s["route_deviation_share"] == 0.25
    # per km, route by route: b has 1 collision over 0.05 km, d 1 over 0.1 km; c (RC 0) is left out
    assert s["infractions_per_km"]["collision_vehicle"] == pytest.approx(1 / 0.05 + 1 / 0.1, abs=1e-3)
    assert s["infractions_per_km"]["timeout"] == 0.0
    assert [r["route"] for r in s["per_route"]] == ["a", "b", "c", "d"]


def test_every_agent_drives_the_same_routes() -> None:
    jobs = route_jobs(("expert", "constant"), ["Town05", "Town06"], 3)
    assert len(jobs) == 12
    by_agent = {a: sorted((t, i) for b, t, i in jobs if b == a) for a in ("expert", "constant")}
    assert by_agent["expert"] == by_agent["constant"]
