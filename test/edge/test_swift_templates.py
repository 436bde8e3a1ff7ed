"""Preventive templates (§4.2): every subset reachable by up to f departures has a ready, valid template."""

from __future__ import annotations

import itertools

import pytest

from flad_edge.swift import validate_plan
from flad_edge.swift.model import random_cluster, synthetic_profile
from flad_edge.swift.templates import PreventiveTemplates, departure_subsets


def test_departure_subsets_counts():
    ids = ["a", "b", "c", "d"]
    assert len(departure_subsets(ids, 1)) == 4
    assert len(departure_subsets(ids, 2)) == 4 + 6
    assert len(departure_subsets(ids, 9)) == 4 + 6 + 4  # never the empty cluster
    assert frozenset({"b", "c", "d"}) in departure_subsets(ids, 1)


@pytest.mark.parametrize("method", ["swift", "exact", "greedy"])
def test_templates_cover_every_single_departure(method, swift_policy):
    cl, pr = random_cluster(6, seed=7), synthetic_profile(5.55, seed=3)
    pt = PreventiveTemplates(cl, pr, f=1, method=method, policy=swift_policy).start()
    assert pt.wait(timeout=60)
    ids = [v.id for v in cl.vehicles]
    for gone in ids:
        surviving = [i for i in ids if i != gone]
        tpl = pt.template_for(surviving, compute_if_missing=False)
        assert tpl is not None, gone
        assert tpl.surviving == frozenset(surviving)
        sub = cl.subset(surviving)
        if tpl.feasible:
            assert set(tpl.pipelines) == set(surviving)  # essential set: every survivor first once
            for first, p in tpl.pipelines.items():
                if p.feasible:
                    assert validate_plan(p.path, p.ranges, sub, pr, first=first) == []
            assert validate_plan(tpl.best.path, tpl.best.ranges, sub, pr) == []


def test_templates_match_exact_optimum_per_subset(swift_policy):
    cl, pr = random_cluster(5, seed=11), synthetic_profile(11.10, seed=1)
    sw = PreventiveTemplates(cl, pr, f=2, method="swift", policy=swift_policy)
    ex = PreventiveTemplates(cl, pr, f=2, method="exact")
    sw.generate()
    ex.generate()
    assert set(sw.templates) == set(ex.templates) == set(departure_subsets([v.id for v in cl.vehicles], 2))
    for key, tpl in ex.templates.items():
        assert sw.templates[key].feasible == tpl.feasible
        if tpl.feasible:
            assert sw.templates[key].best.t_path_s >= tpl.best.t_path_s * (1 - 1e-9)


def test_lookup_outside_the_prepared_set_plans_on_demand():
    cl, pr = random_cluster(5, seed=2), synthetic_profile(5.55, seed=0)
    pt = PreventiveTemplates(cl, pr, f=1, method="exact")
    ids = [v.id for v in cl.vehicles]
    two_gone = ids[2:]
    assert pt.template_for(two_gone, compute_if_missing=False) is None
    assert pt.template_for(two_gone).surviving == frozenset(two_gone)
    assert pt.template_for(["nobody"]) is None
    for combo in itertools.combinations(ids, 4):
        assert pt.template_for(combo) is not None
    assert pt.done


def test_templates_warm_started_from_the_running_essential_set(swift_policy):
    from flad_edge.swift import plan

    cl, pr = random_cluster(6, seed=21), synthetic_profile(11.10, seed=2)
    running = PreventiveTemplates.running_from_plan(plan(cl, pr, "swift", policy=swift_policy))
    assert set(running) == {v.id for v in cl.vehicles}
    pt = PreventiveTemplates(cl, pr, f=1, method="swift", policy=swift_policy, running=running)
    ex = PreventiveTemplates(cl, pr, f=1, method="exact")
    pt.generate()
    ex.generate()
    assert set(pt.templates) == set(ex.templates)
    for key, tpl in pt.templates.items():
        assert tpl.feasible == ex.templates[key].feasible
        for first, p in tpl.pipelines.items():
            if p.feasible:
                assert validate_plan(p.path, p.ranges, cl.subset(sorted(key)), pr, first=first) == []
