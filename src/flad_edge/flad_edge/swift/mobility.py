"""Mobility prediction (§4.1.2): grid cells, a DTMC per mobility pattern, Eqs. 3-5.

- Grid: the area (side R) in cells of side rho; |C| = R^2 / rho^2. Distances are in cells between cell centres.
- Patterns: one DTMC P(c_i -> c_j | m_k) per pattern, counted from traces sampled every `step_s`, with
  Laplace smoothing restricted to the 3x3 neighbourhood (a vehicle cannot jump across the map in one step).
  Pattern labels come with the traces when known; otherwise trajectories are grouped by k-means on
  (|mean heading x|, |mean heading y|, speed, turn rate).
- Eq. 3: P(c_n -> c_f | H) = sum_m P(m | H) P(c_n -> c_f | m), with P(m | H) the Bayes posterior of the
  pattern given the history's transitions and tau-step transitions P_m^tau.
- Eq. 4: joint occupancy of v and nb = product of their (independent) predictions.
- Eq. 5 (documented reading): Stb_nb = sum_{t=0}^{dwl_v} sum_{c_v, c_nb} P(c_v(t), c_nb(t)) RD(c_v, c_nb). The
  paper calls RD the "relative distance"; summing a raw distance would reward drifting apart, so we take RD
  as relative *proximity* max(0, 1 - d / R_v): 1 in the same cell, 0 at or beyond the communication radius.
  Stb is then the expected number of steps the pair spends in range, weighted by closeness.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from flad_edge.swift.traces import Row, by_vehicle

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Grid:
    origin_x: float
    origin_y: float
    size_m: float
    cell_m: float

    @property
    def side(self) -> int:
        return int(math.ceil(self.size_m / self.cell_m))

    @property
    def n_cells(self) -> int:
        return self.side * self.side

    def cell(self, x: float, y: float) -> int:
        """Cell index of a position (clipped to the area)."""
        i = min(self.side - 1, max(0, int((x - self.origin_x) // self.cell_m)))
        j = min(self.side - 1, max(0, int((y - self.origin_y) // self.cell_m)))
        return j * self.side + i

    def centres(self) -> np.ndarray:
        idx = np.arange(self.n_cells)
        return np.stack([idx % self.side, idx // self.side], axis=1).astype(float)  # in cell units

    def cell_distance(self, a: int, b: int) -> float:
        """n(c_a -> c_b): distance between cell centres, in cells."""
        ax, ay, bx, by = a % self.side, a // self.side, b % self.side, b // self.side
        return math.hypot(ax - bx, ay - by)

    def distance_matrix(self) -> np.ndarray:
        c = self.centres()
        return np.sqrt(((c[:, None, :] - c[None, :, :]) ** 2).sum(-1))

    def cells_in_radius(self, c: int, radius_m: float) -> list[int]:
        """C_v: cells within the communication radius (about pi R_v^2 / rho^2 of them)."""
        r = radius_m / self.cell_m
        d = np.sqrt(((self.centres() - self.centres()[c]) ** 2).sum(-1))
        return [int(i) for i in np.flatnonzero(d <= r)]


def cell_sequences(rows: list[Row], grid: Grid, step_s: float) -> dict[str, list[int]]:
    """Each vehicle's cells sampled every `step_s` (positions interpolated from the trace)."""
    out = {}
    for vid, arr in by_vehicle(rows).items():
        if len(arr) < 2:
            out[vid] = [grid.cell(arr[0, 1], arr[0, 2])] if len(arr) else []
            continue
        ts = np.arange(arr[0, 0], arr[-1, 0] + 1e-9, step_s)
        xs = np.interp(ts, arr[:, 0], arr[:, 1])
        ys = np.interp(ts, arr[:, 0], arr[:, 2])
        out[vid] = [grid.cell(x, y) for x, y in zip(xs, ys, strict=True)]
    return out


def _seq_features(seq: list[int], grid: Grid) -> np.ndarray:
    c = np.array([[s % grid.side, s // grid.side] for s in seq], dtype=float)
    d = np.diff(c, axis=0) if len(c) > 1 else np.zeros((1, 2))
    moving = d[np.abs(d).sum(1) > 0]
    if not len(moving):
        return np.array([0.0, 0.0, 0.0, 0.0])
    u = moving / np.linalg.norm(moving, axis=1, keepdims=True)
    turns = float(np.mean(np.abs(np.diff(u, axis=0)).sum(1) > 0.5)) if len(u) > 1 else 0.0
    return np.array([np.abs(u[:, 0]).mean(), np.abs(u[:, 1]).mean(), len(moving) / max(1, len(d)), turns])


def kmeans(X: np.ndarray, k: int, seed: int = 0, iters: int = 50) -> np.ndarray:
    """Plain k-means (k-means++ init, seeded) returning labels."""
    rng = np.random.default_rng(seed)
    centres = [X[int(rng.integers(len(X)))]]
    for _ in range(1, k):
        d = np.min([((X - c) ** 2).sum(1) for c in centres], axis=0)
        p = d / d.sum() if d.sum() > 0 else np.full(len(X), 1 / len(X))
        centres.append(X[int(rng.choice(len(X), p=p))])
    C = np.array(centres)
    labels = np.zeros(len(X), dtype=int)
    for _ in range(iters):
        labels = ((X[:, None, :] - C[None]) ** 2).sum(-1).argmin(1)
        newC = np.array([X[labels == j].mean(0) if np.any(labels == j) else C[j] for j in range(k)])
        if np.allclose(newC, C):
            break
        C = newC
    return labels


@dataclass
class MobilityModel:
    """DTMCs per pattern + priors; Eqs. 3-5."""

    grid: Grid
    patterns: list[str]
    P: np.ndarray  # (K, C, C) row-stochastic
    prior: np.ndarray  # (K,)
    step_s: float = 5.0
    _pow_cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def fit(cls, sequences: dict[str, list[int]], grid: Grid, labels: dict[str, str] | None = None, k: int = 4,
            smoothing: float = 0.1, step_s: float = 5.0, seed: int = 0) -> MobilityModel:
        """Learn one DTMC per pattern from cell sequences (labels given, or k-means groups)."""
        vids = [v for v in sorted(sequences) if len(sequences[v]) >= 2]
        if not vids:
            raise ValueError("need at least one trajectory with two or more samples")
        if labels is not None:
            names = sorted({labels[v] for v in vids})
            lab = {v: labels[v] for v in vids}
        else:
            X = np.array([_seq_features(sequences[v], grid) for v in vids])
            km = kmeans(X, min(k, len(vids)), seed)
            names = [f"m{j}" for j in range(int(km.max()) + 1)]
            lab = {v: f"m{int(j)}" for v, j in zip(vids, km, strict=True)}
        C = grid.n_cells
        side = grid.side
        # smoothing only towards the 3x3 neighbourhood (including staying put)
        near = np.zeros((C, C))
        for c in range(C):
            cx, cy = c % side, c // side
            for dx in (-1, 0, 1):
                for dy in (-1, 0, 1):
                    x, y = cx + dx, cy + dy
                    if 0 <= x < side and 0 <= y < side:
                        near[c, y * side + x] = 1.0
        P = np.zeros((len(names), C, C))
        counts = np.zeros(len(names))
        for v in vids:
            m = names.index(lab[v])
            seq = sequences[v]
            np.add.at(P[m], (np.array(seq[:-1]), np.array(seq[1:])), 1.0)
            counts[m] += 1
        P += smoothing * near[None]
        P /= P.sum(-1, keepdims=True)
        prior = (counts + 1) / (counts + 1).sum()
        return cls(grid, names, P, prior, step_s)

    def posterior(self, history: list[int]) -> np.ndarray:
        """P(m | H): Bayes over the history's transitions (uniform-ish prior from pattern frequencies)."""
        logp = np.log(self.prior).copy()
        if len(history) >= 2:
            a, b = np.array(history[:-1]), np.array(history[1:])
            logp += np.log(np.maximum(self.P[:, a, b], 1e-12)).sum(1)  # unseen jumps: tiny, not impossible
        logp -= logp.max()
        p = np.exp(logp)
        return p / p.sum()

    def predict(self, history: list[int], steps: int) -> np.ndarray:
        """Eq. 3 for t = 0..steps: row t is P(c_n -> c_f | H) over future cells f after t steps."""
        post = self.posterior(history)
        c_n = history[-1]
        out = np.zeros((steps + 1, self.grid.n_cells))
        for m, w in enumerate(post):
            if w < 1e-12:
                continue
            row = np.zeros(self.grid.n_cells)
            row[c_n] = 1.0
            out[0] += w * row
            for t in range(1, steps + 1):
                row = row @ self.P[m]  # row of P_m^t
                out[t] += w * row
        return out

    @staticmethod
    def joint(p_v: np.ndarray, p_nb: np.ndarray) -> np.ndarray:
        """Eq. 4: P(c_f^nb(t), c_f^v(t)) = P_nb(c) P_v(c'), as a (|C|, |C|) matrix indexed [c_v, c_nb]."""
        return np.outer(p_v, p_nb)

    def proximity(self, radius_m: float) -> np.ndarray:
        """RD(c_v, c_nb) = max(0, 1 - d / R_v) with d in cells (see the module note on Eq. 5)."""
        key = ("prox", radius_m)
        if key not in self._pow_cache:
            r = radius_m / self.grid.cell_m
            self._pow_cache[key] = np.maximum(0.0, 1.0 - self.grid.distance_matrix() / max(r, 1e-9))
        return self._pow_cache[key]

    def stability(self, pred_v: np.ndarray, pred_nb: np.ndarray, radius_m: float, dwell_steps: int | None = None
                  ) -> float:
        """Eq. 5: sum over t <= dwl_v of the expected proximity under the joint occupancy of Eq. 4."""
        T = min(len(pred_v), len(pred_nb)) if dwell_steps is None else min(dwell_steps + 1, len(pred_v),
                                                                            len(pred_nb))
        K = self.proximity(radius_m)
        return float(sum(pred_v[t] @ K @ pred_nb[t] for t in range(T)))

    def expected_neighbours(self, pred_v: np.ndarray, preds: dict[str, np.ndarray], radius_m: float) -> np.ndarray:
        """E|C_v(t)|: expected number of the given vehicles within R_v of v at each t (for Eq. 6 c3)."""
        inr = (self.proximity(radius_m) > 0).astype(float)
        return np.array([sum(pred_v[t] @ inr @ p[t] for p in preds.values()) for t in range(len(pred_v))])


def stability_scores(model: MobilityModel, histories: dict[str, list[int]], dwell_steps: dict[str, int],
                     radius_m: float) -> dict[tuple[str, str], float]:
    """Stb[(v, nb)] for every ordered pair (Eq. 5, horizon dwl_v)."""
    horizon = max(dwell_steps.values(), default=0)
    preds = {v: model.predict(h, horizon) for v, h in histories.items()}
    out = {}
    for v in histories:
        for nb in histories:
            if nb != v:
                out[(v, nb)] = model.stability(preds[v], preds[nb], radius_m, dwell_steps.get(v, horizon))
    return out
