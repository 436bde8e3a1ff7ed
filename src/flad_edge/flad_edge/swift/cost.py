"""The pipeline cost model, Eqs. 8-10 of the paper, exactly as the paper states them.

Eq. 8:  t_cmp(v) = sum of the per-sample forward FLOPs of v's layers x n_batch x nu / (TFLOPS_v x 1e12 x mu)
Eq. 9:  t_com(v) = 2 x activation_bytes(last layer of v) x n_batch x nu / (link_mbps_v x 1e6 / 8)
Eq. 10: t_path   = sum over the path of t_cmp + sum over all but the last vehicle of t_com

Reading of Eq. 9 (documented choice): the paper writes 2 M_cap^v, the *partition* size, as the traffic. In
pipeline parallelism the bytes that cross a cut are the activations of the last layer before the cut (forward)
and the equally sized gradient w.r.t. them (backward) -- hence the factor 2 -- not the parameters, which never
leave their stage. So we use the activation bytes at v's last layer. The last stage sends nothing onward.

The bottleneck (largest per-vehicle t_cmp + t_com, the last stage counting t_cmp only) is reported as well:
it bounds pipelined throughput, whereas t_path is the latency of one batch through the path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from flad_edge.swift.model import Cluster, Plan, Profile, Vehicle

INF = math.inf


def t_cmp(flops_per_sample: float, vehicle: Vehicle, cluster: Cluster) -> float:
    """Eq. 8 for a partition with `flops_per_sample` forward FLOPs."""
    return flops_per_sample * cluster.n_batch * cluster.nu / (vehicle.tflops * 1e12 * cluster.mu)


def t_com(activation_bytes: float, vehicle: Vehicle, cluster: Cluster) -> float:
    """Eq. 9: forward activations plus backward gradients of the cut tensor, over v's link."""
    return 2.0 * activation_bytes * cluster.n_batch * cluster.nu / (vehicle.link_mbps * 1e6 / 8.0)


@dataclass
class StageCost:
    vehicle: str | int
    start: int
    end: int
    mem_bytes: float
    t_cmp_s: float
    t_com_s: float


def stage_costs(path: list[str | int], ranges: list[tuple[int, int]], cluster: Cluster,
                profile: Profile) -> list[StageCost]:
    """Per-stage Eq. 8/9 costs, computed directly from the layer lists (no precomputation; the reference)."""
    out = []
    n = len(path)
    for i, (vid, (a, b)) in enumerate(zip(path, ranges, strict=True)):
        v = cluster.vehicles[cluster.index_of(vid)]
        layers = profile.layers[a:b]
        tc = t_cmp(sum(x.flops for x in layers), v, cluster)
        tm = t_com(layers[-1].activation_bytes, v, cluster) if (i < n - 1 and layers) else 0.0
        out.append(StageCost(vid, a, b, sum(x.mem_bytes for x in layers), tc, tm))
    return out


def t_path(stages: list[StageCost]) -> float:
    """Eq. 10 (the last stage's t_com is already 0)."""
    return sum(s.t_cmp_s + s.t_com_s for s in stages)


def bottleneck(stages: list[StageCost]) -> float:
    return max((s.t_cmp_s + s.t_com_s for s in stages), default=0.0)


def validate_plan(path: list[str | int], ranges: list[tuple[int, int]], cluster: Cluster, profile: Profile,
                  require_all: bool = True, first: str | int | None = None) -> list[str]:
    """Everything wrong with a plan: memory, contiguity/coverage, empty stages, unknown/missing vehicles."""
    problems: list[str] = []
    ids = [str(v.id) for v in cluster.vehicles]
    if len(path) != len(ranges):
        return [f"path has {len(path)} vehicles but {len(ranges)} ranges"]
    if len({str(p) for p in path}) != len(path):
        problems.append("a vehicle appears twice in the path")
    unknown = [p for p in path if str(p) not in ids]
    if unknown:
        return [*problems, f"unknown vehicles {unknown}"]
    if require_all and sorted(str(p) for p in path) != sorted(ids):
        problems.append(f"path does not use every vehicle: {sorted(set(ids) - {str(p) for p in path})} missing")
    if first is not None and (not path or str(path[0]) != str(first)):
        problems.append(f"path must start with {first!r}")
    if len(path) > 1 and ranges and ranges[0][1] < profile.min_first_end:
        problems.append(f"first stage ends at {ranges[0][1]} but raw-input layers run to "
                        f"{profile.min_first_end}: raw sensor data would leave the data owner")
    pos = 0
    for vid, (a, b) in zip(path, ranges, strict=True):
        if a != pos:
            problems.append(f"{vid}: range starts at {a}, expected {pos} (not contiguous)")
        if b <= a:
            problems.append(f"{vid}: empty range [{a}, {b})")
        v = cluster.vehicles[cluster.index_of(vid)]
        mem = sum(x.mem_bytes for x in profile.layers[a:b])
        if mem > v.mem_bytes * (1 + 1e-12):
            problems.append(f"{vid}: needs {mem:.4g} B, has {v.mem_bytes:.4g} B")
        pos = b
    if pos != len(profile.layers):
        problems.append(f"layers cover [0, {pos}) of {len(profile.layers)}")
    return problems


class CostModel:
    """Eqs. 8-10 precomputed for one (cluster, profile): prefix sums and per-vehicle (L+1)x(L+1) cost matrices.

    `C[v][a, b]` is the cost of vehicle v holding layers [a, b) as a non-final stage (t_cmp + t_com); the final
    stage (b == L) is charged t_cmp only. Entries are +inf where b <= a, the range does not fit v's memory, or
    a first stage (a == 0) would end before the profile's raw-input layers do.
    """

    def __init__(self, cluster: Cluster, profile: Profile) -> None:
        self.cluster = cluster
        self.profile = profile
        self.n = len(cluster.vehicles)
        self.L = len(profile.layers)
        flops = np.array([x.flops for x in profile.layers], dtype=np.float64)
        mem = np.array([x.mem_bytes for x in profile.layers], dtype=np.float64)
        self.act = np.array([x.activation_bytes for x in profile.layers], dtype=np.float64)
        self.flops_prefix = np.concatenate([[0.0], np.cumsum(flops)])
        self.mem_prefix = np.concatenate([[0.0], np.cumsum(mem)])
        self.mem = mem
        self.mem_v = np.array([v.mem_bytes for v in cluster.vehicles], dtype=np.float64)
        L = self.L
        a = np.arange(L + 1)[:, None]
        b = np.arange(L + 1)[None, :]
        flops_ab = self.flops_prefix[None, :] - self.flops_prefix[:, None]
        mem_ab = self.mem_prefix[None, :] - self.mem_prefix[:, None]
        act_end = np.concatenate([[0.0], self.act])  # activation of layer b-1, i.e. at the cut b
        valid = b > a
        self.cmp = np.empty((self.n, L + 1, L + 1))
        self.com = np.empty((self.n, L + 1, L + 1))
        self.C = np.empty((self.n, L + 1, L + 1))
        for i, v in enumerate(cluster.vehicles):
            tc = flops_ab * cluster.n_batch * cluster.nu / (v.tflops * 1e12 * cluster.mu)
            tm = np.broadcast_to(2.0 * act_end[None, :] * cluster.n_batch * cluster.nu
                                 / (v.link_mbps * 1e6 / 8.0), (L + 1, L + 1)).copy()
            tm[:, L] = 0.0
            ok = valid & (mem_ab <= v.mem_bytes * (1 + 1e-12))
            self.cmp[i] = np.where(valid, tc, INF)
            self.com[i] = np.where(valid, tm, INF)
            self.C[i] = np.where(ok, tc + tm, INF)
        # raw sensor data never leaves its vehicle: the first stage must end at or after min_first_end
        self.min_first = profile.min_first_end if self.n > 1 else 1
        self.C[:, 0, : self.min_first] = INF
        # furthest end each vehicle can reach from each start (memory only), for greedy and feasibility
        self.max_end = np.zeros((self.n, L + 1), dtype=np.int64)
        for i in range(self.n):
            ends = np.searchsorted(self.mem_prefix, self.mem_prefix + self.mem_v[i] * (1 + 1e-12), side="right") - 1
            self.max_end[i] = np.minimum(ends, L)

    def stage(self, i: int, a: int, b: int) -> tuple[float, float]:
        """(t_cmp, t_com) of vehicle index i holding [a, b)."""
        return float(self.cmp[i, a, b]), float(self.com[i, a, b])

    def evaluate(self, order: list[int], cuts: list[int]) -> tuple[float, float]:
        """(t_path, bottleneck) of vehicle indices `order` with boundaries `cuts` (len n+1, 0..L); inf if invalid."""
        costs = [self.C[v, cuts[k], cuts[k + 1]] for k, v in enumerate(order)]
        if not costs or cuts[0] != 0 or cuts[-1] != self.L:
            return INF, INF
        return float(sum(costs)), float(max(costs))

    def to_plan(self, method: str, order: list[int], cuts: list[int], objective: str,
                plan_time_s: float = 0.0) -> Plan:
        tp, bn = self.evaluate(order, cuts)
        ids = [self.cluster.vehicles[i].id for i in order]
        ranges = [(int(cuts[k]), int(cuts[k + 1])) for k in range(len(order))]
        if not math.isfinite(tp):
            return Plan(method, ids, ranges, INF, INF, False, "plan violates a memory or contiguity constraint",
                        plan_time_s, objective)
        return Plan(method, ids, ranges, tp, bn, True, "", plan_time_s, objective)
