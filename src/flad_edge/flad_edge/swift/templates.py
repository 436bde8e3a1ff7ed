"""Preventive pipeline templates (§4.2): a ready plan for every cluster reachable by up to f departures.

For each surviving subset the template holds its essential pipeline set (one pipeline per surviving vehicle
as the first stage, so every vehicle's data keeps flowing, §4.1.3) and the best of them. Generation runs in a
background thread (`start()`), off the training critical path; `template_for(surviving_ids)` is the O(1)
lookup used at recovery time and, if that subset is not ready yet, plans it on the spot.

Methods: `swift` (Phase 1 + DQN + refinement, the paper's way; each survivor's running pipeline minus the
departed vehicle is the warm start, the DQN proposes where there is none), `exact` (one backward DP per subset gives
every first vehicle's optimum at once -- fast and optimal for n <= ~10) or `greedy`.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from flad_edge.swift.cost import CostModel
from flad_edge.swift.model import Cluster, Plan, Profile, infeasible
from flad_edge.swift.planners import (
    _quick_infeasible,
    exact_for_first,
    exact_table,
    greedy,
    swift,
)

log = logging.getLogger(__name__)


@dataclass
class Template:
    """Plans for one surviving subset: `pipelines[first_id]` and the `best` one (by the objective)."""

    surviving: frozenset[str]
    pipelines: dict[str, Plan]
    best: Plan
    build_time_s: float = 0.0

    @property
    def feasible(self) -> bool:
        return self.best.feasible

    def to_json(self) -> dict:
        return {"surviving": sorted(self.surviving), "feasible": self.feasible, "best": self.best.to_json(),
                "pipelines": {k: p.to_json() for k, p in sorted(self.pipelines.items())},
                "build_time_s": self.build_time_s}


def departure_subsets(ids: Iterable[str | int], f: int = 1) -> list[frozenset[str]]:
    """Every non-empty subset reachable from `ids` by 1..f departures (largest first)."""
    ids = [str(i) for i in ids]
    out = []
    for k in range(1, min(f, len(ids) - 1) + 1):
        out.extend(frozenset(c) for c in itertools.combinations(ids, len(ids) - k))
    return out


def build_template(cluster: Cluster, profile: Profile, surviving: Iterable[str | int], method: str = "swift",
                   objective: str = "path", policy: object | None = None,
                   parent: dict[str, list[str]] | None = None) -> Template:
    """Essential pipeline set for `cluster` restricted to `surviving`.

    `parent` maps a first vehicle to its current (pre-departure) path; with `swift`, each survivor's running
    path minus the departed vehicles is the warm start of its refinement, so a template moves few partitions.
    """
    t0 = time.perf_counter()
    sub = cluster.subset(list(surviving))
    key = frozenset(str(v.id) for v in sub.vehicles)
    cm = CostModel(sub, profile)
    pipelines: dict[str, Plan] = {}
    reason = _quick_infeasible(cm, None)
    if reason:
        return Template(key, {}, infeasible(method, reason, objective), time.perf_counter() - t0)
    if method == "exact":
        table = exact_table(cm, objective)
        sols = {f: exact_for_first(cm, table, f, objective)[1] for f in range(cm.n)}
    elif method == "greedy":
        sols = {f: greedy(cm, f)[0] for f in range(cm.n)}
    elif method == "swift":
        seeds: dict[int, list[list[int]]] = {}
        ids = [str(v.id) for v in sub.vehicles]
        for f, vid in enumerate(ids):
            path = [p for p in (parent or {}).get(vid, []) if p in ids]
            if len(path) == len(ids) and path[0] == vid:
                seeds[f] = [[ids.index(p) for p in path]]
        # one start per first vehicle: the warm start where there is one, else the DQN proposal
        res = swift(cm, None, objective, policy, seeds=seeds)
        sols = {f: s for f, (_, s) in res.essential.items()}
    else:
        raise ValueError(f"unknown template method {method!r}")
    for f, sol in sols.items():
        vid = str(sub.vehicles[f].id)
        pipelines[vid] = (cm.to_plan(method, *sol, objective) if sol is not None
                          else infeasible(method, f"no pipeline with {vid!r} first", objective))
    ok = [p for p in pipelines.values() if p.feasible]
    score = (lambda p: p.t_path_s) if objective == "path" else (lambda p: p.bottleneck_s)
    best = min(ok, key=score) if ok else infeasible(method, "no feasible pipeline for the surviving vehicles",
                                                    objective)
    dt = time.perf_counter() - t0
    best.plan_time_s = dt
    return Template(key, pipelines, best, dt)


@dataclass
class PreventiveTemplates:
    """All templates for departures of up to `f` vehicles, built in the background."""

    cluster: Cluster
    profile: Profile
    f: int = 1
    method: str = "swift"
    objective: str = "path"
    policy: object | None = None
    running: dict[str, list[str]] | None = None  # the essential set in use: first id -> path (warm starts)
    templates: dict[frozenset[str], Template] = field(default_factory=dict)
    generation_time_s: float = 0.0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._parent: dict[str, list[str]] | None = (
            {str(k): [str(v) for v in p] for k, p in self.running.items()} if self.running else None)
        self.subsets = departure_subsets([v.id for v in self.cluster.vehicles], self.f)
        if self.method in ("swift", "dqn") and self.policy is None:
            from flad_edge.swift.dqn import load_or_train

            self.policy = load_or_train(None, self.objective)

    @staticmethod
    def running_from_plan(plan: Plan) -> dict[str, list[str]]:
        """The essential set of a `swift` plan (`plan.extra["pipelines"]`) as first id -> path."""
        return {str(p["first"]): [str(v) for v in p["path"]] for p in plan.extra.get("pipelines", []) if "path" in p}

    def parent_paths(self) -> dict[str, list[str]]:
        """The running cluster's essential pipelines (first vehicle -> path), the warm starts for templates;
        built here (swift on the full cluster) unless given as `running`."""
        if self._parent is None:
            full = build_template(self.cluster, self.profile, [v.id for v in self.cluster.vehicles], self.method,
                                  self.objective, self.policy)
            self._parent = {f: [str(v) for v in p.path] for f, p in full.pipelines.items() if p.feasible}
        return self._parent

    def generate(self) -> dict[frozenset[str], Template]:
        """Build every template now (synchronously); returns the table."""
        t0 = time.perf_counter()
        parent = self.parent_paths() if self.method == "swift" else None
        for s in self.subsets:
            if self._stop.is_set():
                break
            with self._lock:
                have = s in self.templates
            if not have:
                tpl = build_template(self.cluster, self.profile, s, self.method, self.objective, self.policy,
                                     parent)
                with self._lock:
                    self.templates.setdefault(s, tpl)
        self.generation_time_s = time.perf_counter() - t0
        log.info("built %d preventive templates (f=%d, %s) in %.3f s", len(self.templates), self.f, self.method,
                 self.generation_time_s)
        return self.templates

    def start(self) -> PreventiveTemplates:
        """Generate in a daemon thread, alongside training; poll `done` or `wait()`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self.generate, name="swift-templates", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.done

    @property
    def done(self) -> bool:
        with self._lock:
            return all(s in self.templates for s in self.subsets)

    def template_for(self, surviving_ids: Iterable[str | int], compute_if_missing: bool = True) -> Template | None:
        """The template for exactly these surviving vehicles (None if not reachable/ready and not computed)."""
        key = frozenset(str(i) for i in surviving_ids)
        with self._lock:
            tpl = self.templates.get(key)
        if tpl is None and compute_if_missing and key and key <= {str(v.id) for v in self.cluster.vehicles}:
            parent = self.parent_paths() if self.method == "swift" else None
            tpl = build_template(self.cluster, self.profile, key, self.method, self.objective, self.policy, parent)
            with self._lock:
                self.templates.setdefault(key, tpl)
        return tpl
