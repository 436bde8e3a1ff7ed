"""Pipeline planners for one cluster (Eq. 11): greedy (Phase 1), exact DP, fixed-order cuts, brute force, swift.

All planners work on a `CostModel` and return `(order, cuts)` in vehicle indices; `plan()` wraps them into a
`Plan` with ids, timings and the objective. Every vehicle of the cluster holds one non-empty contiguous layer
range (c1, c2, c4, c5 of Eq. 11); `first` pins the data owner to stage 0.

Objectives: `path` minimises t_path (Eq. 10, the paper's); `bottleneck` minimises the largest per-stage cost.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from flad_edge.swift.cost import INF, CostModel
from flad_edge.swift.cover import cover_table
from flad_edge.swift.model import Cluster, Plan, Profile, infeasible

log = logging.getLogger(__name__)

METHODS = ("greedy", "dqn", "exact", "swift")
OBJECTIVES = ("path", "bottleneck")
EXACT_MAX_N = 14

Solution = tuple[list[int], list[int]]  # (vehicle indices in stage order, cut positions 0..L)


class PlannerError(ValueError):
    """The request cannot be planned as asked (e.g. exact on a cluster too large for it)."""


def _combine(objective: str) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    return np.add if objective == "path" else np.maximum


def _score(cm: CostModel, sol: Solution | None, objective: str) -> float:
    if sol is None:
        return INF
    tp, bn = cm.evaluate(*sol)
    return tp if objective == "path" else bn


def stability_order(cm: CostModel, first: int | None = None) -> list[int]:
    """Most stable first (early stages must stay longest, §4.1.3); `first` pinned at the front."""
    order = sorted(range(cm.n), key=lambda i: (-cm.cluster.vehicles[i].stability, i))
    if first is not None:
        order.remove(first)
        order.insert(0, first)
    return order


def greedy_cuts(cm: CostModel, order: list[int]) -> list[int] | None:
    """The paper's Phase-1 rule for a fixed order: each vehicle takes the largest range that fits its memory,
    leaving one layer for each later vehicle. None if that runs out (taking less early can still work, which
    `greedy`'s repair handles)."""
    pos, cuts = 0, [0]
    n = len(order)
    for k, v in enumerate(order):
        end = min(int(cm.max_end[v, pos]), cm.L - (n - k - 1))
        if end <= pos or (k == 0 and end < cm.min_first):
            return None
        pos = end
        cuts.append(pos)
    return cuts if pos == cm.L else None


def greedy(cm: CostModel, first: int | None = None, repair: bool = True) -> tuple[Solution | None, bool]:
    """Phase 1: stability order, largest-fitting ranges. Returns (solution, used_the_plain_rule).

    If the plain rule cannot hold the model and `repair` is set, each step instead takes the most stable
    vehicle that can still lead to a complete plan, with the largest range that keeps one possible (exact,
    via the cover table), so greedy is feasible whenever any plan is.
    """
    order = stability_order(cm, first)
    cuts = greedy_cuts(cm, order)
    if cuts is not None:
        return (order, cuts), True
    if not repair:
        return None, False
    cover = cover_table(cm)
    full = (1 << cm.n) - 1
    pos, R, out, cuts = 0, full, [], [0]
    rank = {v: r for r, v in enumerate(stability_order(cm))}
    while R:
        k = bin(R).count("1")
        choices = [first] if (first is not None and not out) else sorted((v for v in range(cm.n) if R >> v & 1),
                                                                          key=rank.__getitem__)
        for v in choices:
            hi = min(int(cm.max_end[v, pos]), cm.L - (k - 1))
            lo = max(pos + 1, cm.min_first if pos == 0 else 0)
            ok = [b for b in range(hi, lo - 1, -1) if cover[R ^ (1 << v)][b]]
            if ok:
                out.append(v)
                pos, R = ok[0], R ^ (1 << v)
                cuts.append(pos)
                break
        else:
            return None, False
    return (out, cuts), False


def best_cuts(cm: CostModel, order: list[int], objective: str = "path") -> tuple[float, list[int] | None]:
    """Optimal cut points for a fixed order: DP over (stage, cut), O(n L^2) vectorised."""
    comb = _combine(objective)
    f = np.full(cm.L + 1, INF)
    f[0] = 0.0
    args = []
    for v in order:
        M = comb(f[:, None], cm.C[v])
        arg = M.argmin(axis=0)
        f = M[arg, np.arange(cm.L + 1)]
        args.append(arg)
    if not math.isfinite(f[cm.L]):
        return INF, None
    cuts = [cm.L]
    for arg in reversed(args):
        cuts.append(int(arg[cuts[-1]]))
    return float(f[cm.L]), cuts[::-1]


@dataclass
class ExactTable:
    """Backward DP g[S][a]: best cost of covering [a, L) with exactly the vehicles in S (any order)."""

    g: np.ndarray
    arg_v: np.ndarray
    arg_b: np.ndarray


def exact_table(cm: CostModel, objective: str = "path") -> ExactTable:
    if cm.n > EXACT_MAX_N:
        raise PlannerError(f"exact is limited to clusters of <= {EXACT_MAX_N} vehicles (got {cm.n})")
    comb = _combine(objective)
    n, L = cm.n, cm.L
    full = 1 << n
    g = np.full((full, L + 1), INF)
    g[0, L] = 0.0
    arg_v = np.full((full, L + 1), -1, dtype=np.int16)
    arg_b = np.full((full, L + 1), -1, dtype=np.int32)
    rows = np.arange(L + 1)
    for S in sorted(range(1, full), key=lambda s: bin(s).count("1")):
        k = bin(S).count("1")
        if k == n:
            continue  # the full set is only entered through a chosen first vehicle
        for v in range(n):
            if not S >> v & 1:
                continue
            prev = g[S ^ (1 << v)]
            M = comb(cm.C[v], prev[None, :])
            b = M.argmin(axis=1)
            val = M[rows, b]
            better = val < g[S]
            if better.any():
                g[S] = np.where(better, val, g[S])
                arg_v[S] = np.where(better, v, arg_v[S])
                arg_b[S] = np.where(better, b, arg_b[S])
    return ExactTable(g, arg_v, arg_b)


def exact_for_first(cm: CostModel, table: ExactTable, f: int, objective: str = "path") -> tuple[float, Solution | None]:
    """Best plan with vehicle f first, read off the backward table (one table serves every first vehicle)."""
    comb = _combine(objective)
    rest = ((1 << cm.n) - 1) ^ (1 << f)
    vals = comb(cm.C[f][0], table.g[rest])
    b = int(vals.argmin())
    if not math.isfinite(vals[b]):
        return INF, None
    order, cuts, S, pos = [f], [0, b], rest, b
    while S:
        v, nb = int(table.arg_v[S][pos]), int(table.arg_b[S][pos])
        order.append(v)
        cuts.append(nb)
        S, pos = S ^ (1 << v), nb
    return float(vals[b]), (order, cuts)


def exact(cm: CostModel, first: int | None = None, objective: str = "path") -> Solution | None:
    """Optimal plan (DP over vehicle subsets x cut points): O(2^n n L^2), fine for n <= ~12."""
    table = exact_table(cm, objective)
    firsts = [first] if first is not None else list(range(cm.n))
    best: tuple[float, Solution | None] = (INF, None)
    for f in firsts:
        val, sol = exact_for_first(cm, table, f, objective)
        if val < best[0]:
            best = (val, sol)
    return best[1]


def brute_force(cm: CostModel, first: int | None = None, objective: str = "path") -> tuple[float, Solution | None]:
    """Every order x every composition of the layers; the test oracle for `exact` (tiny instances only)."""
    best: tuple[float, Solution | None] = (INF, None)
    n, L = cm.n, cm.L
    for order in itertools.permutations(range(n)):
        if first is not None and order[0] != first:
            continue
        for inner in itertools.combinations(range(1, L), n - 1):
            cuts = [0, *inner, L]
            tp, bn = cm.evaluate(list(order), cuts)
            val = tp if objective == "path" else bn
            if val < best[0]:
                best = (val, (list(order), cuts))
    return best


def batch_order_values(cm: CostModel, orders: np.ndarray, objective: str = "path") -> np.ndarray:
    """Optimal-cut objective value of many orders at once (K x n int array): `best_cuts` vectorised over K."""
    comb = _combine(objective)
    K = orders.shape[0]
    f = np.full((K, cm.L + 1), INF)
    f[:, 0] = 0.0
    for s in range(orders.shape[1]):
        f = comb(f[:, :, None], cm.C[orders[:, s]]).min(axis=1)
    return f[:, cm.L]


def _neighbours(order: list[int], pinned: int) -> np.ndarray:
    n = len(order)
    base = np.array(order)
    out = {}
    for i in range(pinned, n):
        for j in range(pinned, n):
            if i == j:
                continue
            o = base.copy()
            if i < j:
                o[i], o[j] = o[j], o[i]
                out.setdefault(o.tobytes(), o)
            o = list(order)
            o.insert(j, o.pop(i))
            arr = np.array(o)
            out.setdefault(arr.tobytes(), arr)
    return np.array(list(out.values())) if out else np.zeros((0, n), dtype=int)


def local_search(cm: CostModel, order: list[int], objective: str = "path", max_passes: int = 4,
                 pinned: int = 1) -> tuple[float, Solution | None]:
    """Phase 2 refinement: optimal cuts for the order, then best-improvement swap/insert moves on the order.

    The first `pinned` stages stay (the data owner); all neighbours of a pass are scored at once with optimal
    cut points (`batch_order_values`), so a pass costs a few vectorised DP sweeps.
    """
    best_order = list(order)
    best_val = float(batch_order_values(cm, np.array([best_order]), objective)[0])
    for _ in range(max_passes):
        nb = _neighbours(best_order, pinned)
        if not len(nb):
            break
        vals = batch_order_values(cm, nb, objective)
        k = int(vals.argmin())
        if not vals[k] < best_val - 1e-12 * max(1.0, abs(best_val)):
            break
        best_val, best_order = float(vals[k]), [int(x) for x in nb[k]]
    val, cuts = best_cuts(cm, best_order, objective)
    if cuts is None:
        return INF, None
    return val, (best_order, cuts)


@dataclass
class SwiftResult:
    phase1: Solution | None
    phase1_time_s: float
    essential: dict[int, tuple[float, Solution | None]]  # first vehicle -> (objective value, solution)
    best: Solution | None


def swift(cm: CostModel, first: int | None = None, objective: str = "path", policy: object | None = None,
          all_firsts: bool = True, max_passes: int = 3, seeds: dict[int, list[list[int]]] | None = None,
          greedy_starts: bool = False) -> SwiftResult:
    """SWIFT (§4.1.3): Phase 1 greedy pipeline at once, then Phase 2 per first vehicle (DQN + refinement).

    Phase 2 visits the other vehicles in ascending stability (the paper's order), proposes a pipeline with the
    DQN policy and refines it (optimal cuts for the order + swap/insert local search, `max_passes`); the
    Phase-1 pipeline is refined too. The greedy order for the same first is the start when there is no DQN
    proposal (or always, with `greedy_starts`).
    `seeds` (e.g. the pre-departure pipelines, for templates) replace the DQN proposal for their first vehicle:
    a warm start from the running pipeline converges fastest and moves the fewest partitions. With `first`
    given (or `all_firsts` False) only that vehicle's essential pipeline is built.
    """
    t0 = time.perf_counter()
    phase1, _ = greedy(cm, first)
    t1 = time.perf_counter() - t0
    p1_first = phase1[0][0] if phase1 else (first if first is not None else stability_order(cm)[0])
    if first is not None or not all_firsts:
        firsts = [p1_first]
    else:
        rest = sorted((v for v in range(cm.n) if v != p1_first), key=lambda i: (cm.cluster.vehicles[i].stability, i))
        firsts = [p1_first, *rest]
    cover = None
    essential: dict[int, tuple[float, Solution | None]] = {}
    for f in firsts:
        starts: list[list[int]] = list((seeds or {}).get(f, []))
        if f == p1_first and phase1 is not None:
            starts.append(phase1[0])
        # with two vehicles and the first pinned there is one order: its optimal cuts (local_search) are the
        # answer, and a DQN proposal could only repeat it
        if policy is not None and cm.n > 2 and not (seeds and seeds.get(f)):
            if cover is None:
                cover = cover_table(cm)
            sol = policy.rollout(cm, first=f, objective=objective, cover=cover)  # type: ignore[attr-defined]
            if sol is not None:
                starts.append(sol[0])
        if greedy_starts or not starts:
            g, _ = greedy(cm, f)
            if g is not None:
                starts.append(g[0])
        best: tuple[float, Solution | None] = (INF, None)
        for s in dict.fromkeys(tuple(x) for x in starts):
            val, sol = local_search(cm, list(s), objective, max_passes=max_passes)
            if val < best[0]:
                best = (val, sol)
        essential[f] = best
    overall = min(essential.values(), key=lambda x: x[0], default=(INF, None))
    return SwiftResult(phase1, t1, essential, overall[1])


def plan(cluster: Cluster, profile: Profile, method: str = "swift", first: str | int | None = None,
         objective: str = "path", policy: object | None = None, policy_path: str | None = None,
         cm: CostModel | None = None) -> Plan:
    """Plan one pipeline for `cluster` and return a `Plan` (infeasible plans carry the reason).

    `dqn`/`swift` use `policy` (a `DQNPolicy`), else the one at `policy_path` / the default path, training and
    saving a small one on first use. Raises PlannerError/KeyError for requests that cannot be honoured as asked.
    """
    if method not in METHODS:
        raise PlannerError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    if objective not in OBJECTIVES:
        raise PlannerError(f"unknown objective {objective!r} (choose from {', '.join(OBJECTIVES)})")
    fi = cluster.index_of(first) if first is not None else None
    if method in ("dqn", "swift") and policy is None:
        from flad_edge.swift.dqn import load_or_train

        policy = load_or_train(policy_path, objective)
    t0 = time.perf_counter()
    cm = cm or CostModel(cluster, profile)
    reason = _quick_infeasible(cm, fi)
    if reason:
        out = infeasible(method, reason, objective)
        out.plan_time_s = time.perf_counter() - t0
        return out
    extra: dict[str, object] = {}
    sol: Solution | None
    if method == "greedy":
        sol, strict = greedy(cm, fi)
        extra["stability_order"] = strict
    elif method == "exact":
        sol = exact(cm, fi, objective)
    elif method == "dqn":
        sol = policy.rollout(cm, first=fi, objective=objective)  # type: ignore[union-attr]
    else:
        res = swift(cm, fi, objective, policy)
        sol = res.best
        extra["phase1_time_s"] = res.phase1_time_s
        extra["pipelines"] = [_essential_json(cm, f, s) for f, (_, s) in res.essential.items()]
    dt = time.perf_counter() - t0
    if sol is None:
        why = ("no assignment fits: " + _why(cm, fi)) if method != "greedy" else \
            "greedy found no assignment: " + _why(cm, fi)
        out = infeasible(method, why, objective)
        out.plan_time_s = dt
        out.extra = extra
        return out
    out = cm.to_plan(method, sol[0], sol[1], objective, dt)
    out.extra = extra
    return out


def _essential_json(cm: CostModel, f: int, sol: Solution | None) -> dict[str, object]:
    """One essential pipeline in the CLI's format (same keys as the plan itself)."""
    vid = cm.cluster.vehicles[f].id
    if sol is None:
        return {"first": vid, "feasible": False, "reason": f"no pipeline with {vid!r} first"}
    p = cm.to_plan("swift", sol[0], sol[1], "path").to_json()
    return {"first": vid, "path": p["path"], "layers": p["layers"], "t_path_s": p["t_path_s"],
            "bottleneck_s": p["bottleneck_s"], "feasible": p["feasible"]}


def _quick_infeasible(cm: CostModel, first: int | None) -> str:
    if cm.n > cm.L:
        return f"the profile has {cm.L} layers but the cluster has {cm.n} vehicles; each needs at least one"
    total = float(cm.mem_prefix[-1])
    have = float(cm.mem_v.sum())
    if have < total:
        return f"cluster memory {have / 1e9:.3f} GB < model training footprint {total / 1e9:.3f} GB"
    biggest = float(cm.mem.max())
    if biggest > cm.mem_v.max():
        return f"layer needing {biggest / 1e9:.3f} GB fits on no vehicle (largest has {cm.mem_v.max() / 1e9:.3f} GB)"
    if cm.n > 1 and cm.L - cm.min_first < cm.n - 1:
        return (f"the first stage must keep layers [0, {cm.min_first}) (raw sensor inputs), leaving "
                f"{cm.L - cm.min_first} layers for the other {cm.n - 1} vehicles")
    if first is not None and cm.max_end[first, 0] < cm.min_first:
        return (f"vehicle {cm.cluster.vehicles[first].id!r} cannot hold the raw-input layers "
                f"[0, {cm.min_first}) that must stay on the data owner")
    return ""


def _why(cm: CostModel, first: int | None) -> str:
    return ("memory and contiguity constraints cannot all be met"
            + (f" with {cm.cluster.vehicles[first].id!r} first" if first is not None else "")
            + f" ({cm.n} vehicles, {cm.L} layers, {float(cm.mem_v.sum()) / 1e9:.3f} GB for "
              f"{float(cm.mem_prefix[-1]) / 1e9:.3f} GB)")
