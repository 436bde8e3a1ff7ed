"""One edge's round plan from the fleet's mobility traces: SWIFT §4.1 end to end, then client sampling.

    coverage -> dwell prediction (regressor fitted on this edge's own completed passages) -> Eq. 1 eligibility
    and Eq. 2 resource classes -> mobility clustering of the resource-limited vehicles (DTMC learned online from
    the traces, Eqs. 3-6) -> client sampling (sufficient vehicles and clusters are the FL clients)

Pipelines are planned afterwards by the edge's FHDP orchestrator (SWIFT method + preventive templates).
Stability (Eq. 5) is computed for neighbour pairs only, with every vehicle's Eq. 3 prediction batched into
one matrix product per step: at 1,000 vehicles a dense pairwise loop would take minutes.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flad_edge.experiment.config import EdgeSpec
from flad_edge.swift.availability import (
    Availability,
    DwellRegressor,
    Zone,
    classify,
    dwell_samples_from_tracks,
    mape,
    trajectory_features,
)
from flad_edge.swift.clustering import Member, cluster_fleet
from flad_edge.swift.mobility import Grid, MobilityModel
from flad_edge.swift.model import Profile

log = logging.getLogger(__name__)

MIN_DWELL_SAMPLES = 12          # below this many observations the regressor is not fitted (straight-line ETA)
HISTORY_ROWS = 30               # trajectory rows the dwell features look at
#: candidates per clustering seed: its nearest vehicles within R_v. Eq. 6 is solved exactly over them (clusters
#: are at most `cluster_cap` <= 9 vehicles; in a dense fleet hundreds are in range, and farther ones are also
#: the least stable partners), which keeps a round's planning linear in the fleet size.
NEIGHBOURS_K = 12


def place_edges(tiles: list[Any], n: int, coverage: float) -> list[EdgeSpec]:
    """`n` coverage discs over the towns (k-means of the town centres, farthest-point start), together as large
    as `coverage` of the towns' area: vehicles drive in and out of them, and some towns lie between edges."""
    centres = np.array([[(t.x0 + t.x1) / 2, (t.y0 + t.y1) / 2] for t in tiles])
    area = sum((t.x1 - t.x0) * (t.y1 - t.y0) for t in tiles)
    radius = math.sqrt(coverage * area / (n * math.pi))
    picks = [int(np.argmin(centres[:, 0] + centres[:, 1]))]
    while len(picks) < min(n, len(centres)):
        d = np.min([((centres - centres[p]) ** 2).sum(1) for p in picks], axis=0)
        picks.append(int(np.argmax(d)))
    c = centres[picks]
    if n > len(centres):      # more edges than towns: split the map's extent along x for the rest
        x0, x1 = min(t.x0 for t in tiles), max(t.x1 for t in tiles)
        extra = [[x0 + (i + 0.5) * (x1 - x0) / (n - len(c)), centres[:, 1].mean()] for i in range(n - len(c))]
        c = np.vstack([c, extra])
    for _ in range(20):
        label = ((centres[:, None] - c[None]) ** 2).sum(-1).argmin(1)
        new = np.array([centres[label == k].mean(0) if np.any(label == k) else c[k] for k in range(len(c))])
        if np.allclose(new, c):
            break
        c = new
    order = np.lexsort((c[:, 1], c[:, 0]))
    return [EdgeSpec(id=f"edge-{i}", x=round(float(c[k, 0]), 1), y=round(float(c[k, 1]), 1),
                     radius_m=round(radius, 1)) for i, k in enumerate(order)]


def edge_of(positions: dict[str, tuple[float, float]], edges: list[EdgeSpec]) -> dict[str, str | None]:
    """Which edge serves each vehicle: the nearest centre among the discs that cover it (None: no coverage)."""
    ids = list(positions)
    if not ids:
        return {}
    xy = np.array([positions[v] for v in ids])
    c = np.array([[e.x, e.y] for e in edges])
    r = np.array([e.radius_m for e in edges])
    d = np.sqrt(((xy[:, None, :] - c[None]) ** 2).sum(-1))
    d = np.where(d <= r[None], d, np.inf)
    best = d.argmin(1)
    return {v: (edges[int(b)].id if math.isfinite(d[i, b]) else None) for i, (v, b) in enumerate(zip(ids, best,
                                                                                                   strict=True))}


def tracks_from_arrays(ids: list[str], times: np.ndarray, xy: np.ndarray) -> dict[str, np.ndarray]:
    """Per-vehicle (t, x, y) arrays from a fleet's trace arrays (times [T], xy [T, V, 2])."""
    t = np.asarray(times, dtype=float)
    return {v: np.column_stack([t, xy[:, k, 0].astype(float), xy[:, k, 1].astype(float)])
            for k, v in enumerate(ids)}


@dataclass
class DwellModel:
    """The edge's dwell regressor, refitted each round on the passages completed so far (its own traces)."""

    zone: Zone
    regressor: DwellRegressor | None = None
    samples: int = 0
    fit_mape: float = math.nan

    def fit(self, tracks: dict[str, np.ndarray]) -> None:
        X, a, _ = dwell_samples_from_tracks(tracks, self.zone)
        self.samples = len(a)
        keep = a > 0
        if keep.sum() < MIN_DWELL_SAMPLES:
            self.regressor = None
            return
        self.regressor = DwellRegressor().fit(X[keep], a[keep])
        self.fit_mape = mape(a[keep], self.regressor.predict(X[keep]))

    def predict(self, tracks: dict[str, np.ndarray], vehicles: list[str]) -> dict[str, float]:
        """Remaining dwell (s) of each vehicle now inside the zone, from its track since it arrived."""
        out: dict[str, float] = {}
        for v in vehicles:
            arr = tracks.get(v)
            if arr is None or len(arr) == 0:
                continue
            inside = self.zone.inside(arr[:, 1], arr[:, 2])
            outside = np.flatnonzero(~inside)
            start = int(outside[-1]) + 1 if len(outside) else 0
            hist = arr[max(start, len(arr) - HISTORY_ROWS):]
            if len(hist) < 2:
                hist = arr[-2:] if len(arr) >= 2 else arr
            feats = trajectory_features(hist, self.zone, float(arr[start, 0]) if start < len(arr) else hist[0, 0])
            if self.regressor is None:
                out[v] = max(1.0, float(feats[1]))          # eta_now: straight line at the current speed
            else:
                out[v] = float(self.regressor.predict(feats[None])[0])
        return out


@dataclass
class ClientPlan:
    id: str
    kind: str                       # solo | cluster
    members: list[str]


@dataclass
class EdgeRoundPlan:
    edge: str
    in_coverage: list[str]
    dwell: dict[str, float]
    availability: Availability
    clusters: list[list[str]]
    candidates: list[ClientPlan]
    clients: list[ClientPlan] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    dwell_samples: int = 0
    dwell_fit_mape: float = math.nan

    def summary(self) -> dict[str, Any]:
        return {"in_coverage": len(self.in_coverage), "eligible": len(self.in_coverage)
                - len(self.availability.ineligible), "sufficient": list(self.availability.sufficient),
                "limited": list(self.availability.limited), "ineligible": list(self.availability.ineligible),
                "clusters": [list(c) for c in self.clusters], "clients": [c.id for c in self.clients],
                "dwell_samples": self.dwell_samples,
                "dwell_fit_mape": None if math.isnan(self.dwell_fit_mape) else round(self.dwell_fit_mape, 4),
                "planning_s": {k: round(v, 4) for k, v in self.timings.items()}}


def zone_grid(zone: Zone, cell_m: float) -> Grid:
    return Grid(zone.x - zone.radius_m, zone.y - zone.radius_m, 2 * zone.radius_m, cell_m)


def cell_histories(tracks: dict[str, np.ndarray], grid: Grid, step_s: float, horizon_s: float | None = None
                   ) -> dict[str, list[int]]:
    """Each vehicle's cells every `step_s` (interpolated), optionally only the last `horizon_s`."""
    out = {}
    for v, arr in tracks.items():
        if len(arr) < 2:
            continue
        t0 = arr[0, 0] if horizon_s is None else max(arr[0, 0], arr[-1, 0] - horizon_s)
        ts = np.arange(t0, arr[-1, 0] + 1e-9, step_s)
        xs, ys = np.interp(ts, arr[:, 0], arr[:, 1]), np.interp(ts, arr[:, 0], arr[:, 2])
        i = np.clip(((xs - grid.origin_x) // grid.cell_m).astype(int), 0, grid.side - 1)
        j = np.clip(((ys - grid.origin_y) // grid.cell_m).astype(int), 0, grid.side - 1)
        out[v] = (j * grid.side + i).tolist()
    return out


def batched_predictions(model: MobilityModel, histories: dict[str, list[int]], steps: int) -> tuple[list[str],
                                                                                                   np.ndarray]:
    """Eq. 3 for many vehicles at once: (ids, array (n, steps + 1, |C|)) of future-cell distributions."""
    ids = list(histories)
    n, C = len(ids), model.grid.n_cells
    out = np.zeros((n, steps + 1, C))
    if not n:
        return ids, out
    post = batched_posterior(model, [histories[v] for v in ids])          # (n, K)
    start = np.zeros((n, C), dtype=np.float32)
    start[np.arange(n), [histories[v][-1] for v in ids]] = 1.0
    out = out.astype(np.float32)
    out[:, 0] = start
    P = model.P.astype(np.float32)
    for m in range(len(model.patterns)):
        active = post[:, m] > 1e-9           # vehicles for which pattern m matters at all
        if not active.any():
            continue
        row = start[active]
        w = post[active, m:m + 1].astype(np.float32)
        for t in range(1, steps + 1):
            row = row @ P[m]
            out[active, t] += w * row
    return ids, out


def batched_posterior(model: MobilityModel, histories: list[list[int]]) -> np.ndarray:
    """`MobilityModel.posterior` for many histories at once (same arithmetic, one gather over all transitions)."""
    n = len(histories)
    logp = np.tile(np.log(model.prior), (n, 1))
    owner = np.concatenate([np.full(max(0, len(h) - 1), i) for i, h in enumerate(histories)]).astype(int)
    if len(owner):
        a = np.concatenate([np.asarray(h[:-1]) for h in histories if len(h) >= 2])
        b = np.concatenate([np.asarray(h[1:]) for h in histories if len(h) >= 2])
        contrib = np.log(np.maximum(model.P[:, a, b], 1e-12))                    # (K, transitions)
        for k in range(len(model.patterns)):
            logp[:, k] += np.bincount(owner, weights=contrib[k], minlength=n)
    logp -= logp.max(axis=1, keepdims=True)
    p = np.exp(logp)
    return p / p.sum(axis=1, keepdims=True)


def pair_stability(model: MobilityModel, ids: list[str], pred: np.ndarray, pairs: list[tuple[int, int]],
                   dwell_steps: dict[str, int], radius_m: float) -> dict[tuple[str, str], float]:
    """Eq. 5 for the given (v, nb) index pairs: sum over t <= dwl_v of E[proximity] under Eq. 4's joint."""
    if not pairs:
        return {}
    K = model.proximity(radius_m)
    n, T1, C = pred.shape
    Q = (pred.reshape(n * T1, C) @ K).reshape(n, T1, C)                   # pred_v[t] @ K, all v and t at once
    a = np.array([p[0] for p in pairs])
    b = np.array([p[1] for p in pairs])
    per_t = np.concatenate([np.einsum("ptc,ptc->pt", Q[a[k:k + 4096]], pred[b[k:k + 4096]])
                            for k in range(0, len(a), 4096)])                 # (pairs, T+1), in bounded chunks
    per_vehicle = np.array([min(T1, dwell_steps.get(v, T1 - 1) + 1) for v in ids])
    limit = per_vehicle[a]
    mask = np.arange(T1)[None, :] < limit[:, None]
    vals = (per_t * mask).sum(1)
    return {(ids[i], ids[j]): float(s) for i, j, s in zip(a, b, vals, strict=True)}


def plan_edge_round(edge: EdgeSpec, tracks: dict[str, np.ndarray],
                    present: list[str], profiles: dict[str, Any], plan_profile: Profile, *, samples_per_epoch: int,
                    epochs: int, alpha: float, alpha_p: float, v2v_radius_m: float, cell_m: float, step_s: float,
                    patterns: int, cluster_cap: int, horizon_s: float, seed: int) -> EdgeRoundPlan:
    """Everything SWIFT decides for one edge's round except the pipelines (see the module docstring).

    `tracks`: per-vehicle (t, x, y) arrays of the whole fleet so far (the dwell regressor's and the DTMC's
    input); `present`: vehicles this edge serves now; `profiles`: vehicle -> DeviceProfile.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    zone = Zone(edge.x, edge.y, edge.radius_m)
    dwell_model = DwellModel(zone)
    dwell_model.fit(tracks)
    dwell = dwell_model.predict(tracks, present)
    timings["dwell"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    vehicles = [{"id": v, "dwell_s": dwell[v], "tflops": profiles[v].tflops, "mem_bytes": profiles[v].mem_bytes}
                for v in present if v in dwell]
    avail = classify(vehicles, plan_profile, samples_per_epoch, float(epochs), alpha)
    timings["availability"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    clusters = cluster_limited(avail.limited, tracks, dwell, profiles, plan_profile, zone,
                               samples_per_epoch=samples_per_epoch, epochs=epochs, alpha_p=alpha_p,
                               v2v_radius_m=v2v_radius_m, cell_m=cell_m, step_s=step_s, patterns=patterns,
                               cluster_cap=cluster_cap, horizon_s=horizon_s, seed=seed)
    timings["clustering"] = time.perf_counter() - t2

    candidates = [ClientPlan(v, "solo", [v]) for v in avail.sufficient]
    candidates += [ClientPlan("+".join(c), "cluster", list(c)) for c in clusters]
    timings["total"] = time.perf_counter() - t0
    return EdgeRoundPlan(edge.id, list(present), dwell, avail, clusters, candidates, timings=timings,
                         dwell_samples=dwell_model.samples, dwell_fit_mape=dwell_model.fit_mape)


def cluster_limited(limited: list[str], tracks: dict[str, np.ndarray], dwell: dict[str, float],
                    profiles: dict[str, Any], plan_profile: Profile, zone: Zone, *, samples_per_epoch: int,
                    epochs: int, alpha_p: float, v2v_radius_m: float, cell_m: float, step_s: float, patterns: int,
                    cluster_cap: int, horizon_s: float, seed: int) -> list[list[str]]:
    """Eq. 6 over the resource-limited vehicles, with a DTMC fitted on this zone's traces so far (Eqs. 3-5)."""
    if len(limited) < 2:
        return []
    grid = zone_grid(zone, cell_m)
    inside_tracks = {}
    for v, arr in tracks.items():
        keep = zone.inside(arr[:, 1], arr[:, 2])
        if keep.sum() >= 2:
            inside_tracks[v] = arr[keep]
    sequences = cell_histories(inside_tracks, grid, step_s)
    if not sequences:
        return []
    model = MobilityModel.fit(sequences, grid, k=patterns, step_s=step_s, seed=seed)
    recent = cell_histories({v: tracks[v] for v in limited}, grid, step_s, horizon_s=120.0)
    recent = {v: h for v, h in recent.items() if h}
    steps = max(1, int(math.ceil(horizon_s / step_s)))
    ids, pred = batched_predictions(model, recent, steps)
    index = {v: i for i, v in enumerate(ids)}
    xy = np.array([tracks[v][-1, 1:] for v in ids]) if ids else np.zeros((0, 2))
    d = np.sqrt(((xy[:, None, :] - xy[None]) ** 2).sum(-1)) if len(ids) else np.zeros((0, 0))
    near = (d <= v2v_radius_m) & ~np.eye(len(ids), dtype=bool)
    if len(ids) > NEIGHBOURS_K + 1:      # a seed considers its nearest NEIGHBOURS_K vehicles in range only
        rank = np.argsort(np.where(near, d, np.inf), axis=1)[:, :NEIGHBOURS_K]
        keep = np.zeros_like(near)
        np.put_along_axis(keep, rank, True, axis=1)
        near &= keep
    pairs = [(int(i), int(j)) for i, j in zip(*np.nonzero(near), strict=True)]
    dwell_steps = {v: int(dwell.get(v, horizon_s) // step_s) for v in ids}
    stb = pair_stability(model, ids, pred, pairs, dwell_steps, v2v_radius_m)
    neighbours = {v: {ids[j] for j in np.flatnonzero(near[index[v]])} for v in ids}
    members = [Member(v, profiles[v].stage_mem_bytes, profiles[v].tflops, profiles[v].link_mbps, dwell.get(v, 0.0))
               for v in ids]
    m_cmp = plan_profile.m_cmp_per_sample * samples_per_epoch
    choices = cluster_fleet(members, stb, neighbours, plan_profile.m_cap, m_cmp, float(epochs), alpha_p,
                            hard_cap=cluster_cap)
    return [c.members for c in choices]


def sample_clients(plans: list[EdgeRoundPlan], total: int, slots: int, rng: np.random.Generator) -> None:
    """Pick `total` active clients over all edges (uniformly at random, as Flower's default strategy does),
    shared between edges by their number of candidates (largest remainder; every edge with candidates gets
    one while there are clients to give). An edge takes no more members than it has pool slots."""
    counts = [len(p.candidates) for p in plans]
    n_cand = sum(counts)
    want = min(total, n_cand)
    share = [0] * len(plans)
    if want:
        quota = [want * c / n_cand for c in counts]
        share = [int(q) for q in quota]
        for i in sorted(range(len(plans)), key=lambda i: -(quota[i] - share[i])):
            if sum(share) >= want:
                break
            share[i] += 1
        for i, c in enumerate(counts):       # an edge with candidates is not left out while others have 2+
            if c and not share[i]:
                donor = max(range(len(plans)), key=lambda k: share[k])
                if share[donor] > 1:
                    share[donor] -= 1
                    share[i] = 1
    for plan, k in zip(plans, share, strict=True):
        order = rng.permutation(len(plan.candidates)).tolist() if plan.candidates else []
        chosen, used = [], 0
        for idx in order:
            if len(chosen) >= k:
                break
            c = plan.candidates[idx]
            if used + len(c.members) <= slots:
                chosen.append(c)
                used += len(c.members)
        plan.clients = chosen
