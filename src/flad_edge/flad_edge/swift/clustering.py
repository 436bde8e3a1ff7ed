"""Capacity- and geography-based clustering of resource-limited vehicles (§4.1.2, Eq. 6).

For a seed vehicle v: choose Clu_v among v's neighbours (plus v) maximising sum Stb_nb subject to
  c1  sum mem_nb > M_cap                      (the cluster can hold the model),
  c2  sum dwl_nb com_nb > e alpha' M_cmp     (it can run e epochs with redundancy alpha' >= 1),
  c3  |Clu_v| <= |C_v(t)| for all t <= dwl_v (no larger than the neighbourhood v keeps; plus a hard cap).
The paper says large clusters are penalised (more members, more sudden departures), while the objective
alone (stabilities are >= 0) always prefers more members. Documented choice: with `prefer_small` (default)
we take the smallest size that satisfies c1-c3, and among those the most stable subset; otherwise the most
stable subset of any allowed size. Exact enumeration for up to `exact_limit` candidates, greedy beyond.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

from flad_edge.swift.model import Cluster, Vehicle

log = logging.getLogger(__name__)


@dataclass
class Member:
    id: str
    mem_bytes: float
    tflops: float
    link_mbps: float
    dwell_s: float


@dataclass
class ClusterChoice:
    members: list[str]
    stability: float
    mem_bytes: float
    work_flops: float


def form_cluster(seed: str, candidates: list[Member], stb: dict[str, float], m_cap: float, m_cmp: float,
                 epochs: float = 1.0, alpha_p: float = 1.0, size_bound: int = 9, prefer_small: bool = True,
                 exact_limit: int = 14) -> ClusterChoice | None:
    """Eq. 6 for seed vehicle `seed` (in `candidates`); `stb[nb]` is Stb_nb relative to the seed."""
    if alpha_p < 1:
        raise ValueError(f"alpha' must be >= 1, got {alpha_p}")
    by_id = {m.id: m for m in candidates}
    if seed not in by_id:
        raise ValueError(f"seed {seed!r} is not among the candidates")
    others = [m for m in candidates if m.id != seed]
    need_work = epochs * alpha_p * m_cmp

    def ok(group: list[Member]) -> bool:
        return (sum(m.mem_bytes for m in group) > m_cap
                and sum(m.dwell_s * m.tflops * 1e12 for m in group) > need_work)

    def score(group: list[Member]) -> float:
        return sum(stb.get(m.id, 0.0) for m in group if m.id != seed)

    best: tuple[float, list[Member]] | None = None
    max_k = min(size_bound, len(candidates))
    if len(others) <= exact_limit:
        for k in range(1, max_k + 1):
            for combo in itertools.combinations(others, k - 1):
                group = [by_id[seed], *combo]
                if ok(group) and (best is None or score(group) > best[0]):
                    best = (score(group), group)
            if best is not None and prefer_small:
                break
    else:  # greedy: add the most stable neighbours until the constraints hold
        group = [by_id[seed]]
        for m in sorted(others, key=lambda m: -stb.get(m.id, 0.0)):
            if len(group) >= max_k or (prefer_small and ok(group)):
                break
            group.append(m)
        if ok(group):
            best = (score(group), group)
    if best is None:
        return None
    g = best[1]
    return ClusterChoice([m.id for m in g], best[0], sum(m.mem_bytes for m in g),
                         sum(m.dwell_s * m.tflops * 1e12 for m in g))


def size_bound_from_neighbours(expected_neighbours: list[float] | None, hard_cap: int = 9) -> int:
    """c3: the cluster may not exceed the neighbourhood v keeps over its dwell (v itself + min_t E|C_v(t)|)."""
    if not expected_neighbours:
        return hard_cap
    return max(1, min(hard_cap, 1 + int(min(expected_neighbours))))


def cluster_fleet(members: list[Member], stb: dict[tuple[str, str], float], neighbours: dict[str, set[str]],
                  m_cap: float, m_cmp: float, epochs: float = 1.0, alpha_p: float = 1.0, hard_cap: int = 9,
                  size_bounds: dict[str, int] | None = None) -> list[ClusterChoice]:
    """Cluster resource-limited vehicles: longest-dwelling unassigned vehicle seeds the next cluster."""
    free = {m.id: m for m in members}
    out = []
    for m in sorted(members, key=lambda m: (-m.dwell_s, m.id)):
        if m.id not in free:
            continue
        cands = [free[m.id]] + [free[n] for n in sorted(neighbours.get(m.id, ())) if n in free and n != m.id]
        bound = (size_bounds or {}).get(m.id, hard_cap)
        choice = form_cluster(m.id, cands, {n: stb.get((m.id, n), 0.0) for n in free}, m_cap, m_cmp, epochs,
                              alpha_p, min(bound, hard_cap))
        if choice is None:
            continue
        for vid in choice.members:
            free.pop(vid, None)
        out.append(choice)
    log.info("formed %d clusters from %d resource-limited vehicles", len(out), len(members))
    return out


def to_cluster(choice: ClusterChoice, members: list[Member], stb: dict[tuple[str, str], float], mu: float = 0.5,
               nu: float = 1.3, n_batch: int = 100) -> Cluster:
    """A plannable `Cluster`; each vehicle's stability is its summed Stb to the others, scaled to [0, 1]."""
    by_id = {m.id: m for m in members}
    raw = {v: sum(stb.get((v, u), 0.0) for u in choice.members if u != v) for v in choice.members}
    top = max(raw.values(), default=0.0) or 1.0
    return Cluster([Vehicle(v, by_id[v].mem_bytes, by_id[v].tflops, by_id[v].link_mbps, raw[v] / top)
                    for v in choice.members], mu=mu, nu=nu, n_batch=n_batch)
