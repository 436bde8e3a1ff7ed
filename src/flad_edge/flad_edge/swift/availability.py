"""Vehicle availability (§4.1.1): dwell-time prediction, Eq. 1 eligibility, Eq. 2 resource split.

Dwell regressor (documented choice). The paper fits R minimising sum |a_i - R(b_i)| / a_i + Omega(R) with a
wide-deep-recurrent network. We keep the objective and replace the network by a model that is cheap,
deterministic and hard to overfit on an edge server's small history: a linear model on trajectory features
(time-to-boundary at current and mean speed, speed, elapsed time in the zone, radial position, heading
towards the centre), fitted *exactly for MAPE* by iteratively reweighted least squares -- MAPE is a weighted
L1 loss (weights 1/a_i), and IRLS solves weighted L1 with an L2 ridge Omega. The feature map plays the
recurrent part's role (it summarises the history); the ridge is Omega.

Eq. 1 is printed as dwl * cmp <= alpha M_cmp e_req; read as an eligibility test it must be >=
(a vehicle qualifies if it stays long enough to finish at least a fraction alpha of the required work), which
is also how Eq. 2 uses it. M_cmp = per-sample FLOPs x N_batch (Eq. 7); cmp in FLOP/s (TFLOPS x 1e12).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from flad_edge.swift.model import Profile
from flad_edge.swift.traces import Row, by_vehicle

log = logging.getLogger(__name__)

FEATURES = ("bias", "eta_now", "eta_mean", "log_eta_now", "log_eta_mean", "speed", "mean_speed", "elapsed",
            "radial", "inward")
ETA_CAP_S = 600.0


@dataclass(frozen=True)
class Zone:
    """The edge server's coverage: a disc (RSU range)."""

    x: float
    y: float
    radius_m: float

    def inside(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (x - self.x) ** 2 + (y - self.y) ** 2 <= self.radius_m ** 2


def _time_to_exit(zone: Zone, x: float, y: float, vx: float, vy: float) -> float:
    """Seconds until a straight line at velocity (vx, vy) leaves the disc (capped)."""
    sp2 = vx * vx + vy * vy
    if sp2 < 1e-9:
        return ETA_CAP_S
    px, py = x - zone.x, y - zone.y
    b = px * vx + py * vy
    c = px * px + py * py - zone.radius_m ** 2
    disc = b * b - sp2 * c
    if disc < 0:
        return 0.0
    return float(min(ETA_CAP_S, max(0.0, (-b + math.sqrt(disc)) / sp2)))


def trajectory_features(hist: np.ndarray, zone: Zone, arrival_t: float) -> np.ndarray:
    """Feature vector (see FEATURES) from a history of (t, x, y) rows up to now, inside the zone."""
    t, x, y = hist[-1]
    if len(hist) >= 2:
        dt = max(1e-6, hist[-1, 0] - hist[-2, 0])
        vx, vy = (hist[-1, 1] - hist[-2, 1]) / dt, (hist[-1, 2] - hist[-2, 2]) / dt
        seg = np.diff(hist[:, 1:], axis=0)
        span = max(1e-6, hist[-1, 0] - hist[0, 0])
        mean_speed = float(np.linalg.norm(seg, axis=1).sum() / span)
    else:
        vx = vy = 0.0
        mean_speed = 0.0
    speed = math.hypot(vx, vy)
    eta_now = _time_to_exit(zone, x, y, vx, vy)
    scale = mean_speed / speed if speed > 1e-6 else 0.0
    eta_mean = _time_to_exit(zone, x, y, vx * scale, vy * scale) if scale > 0 else ETA_CAP_S
    r = math.hypot(x - zone.x, y - zone.y)
    inward = -((x - zone.x) * vx + (y - zone.y) * vy) / (r * speed) if r > 1e-6 and speed > 1e-6 else 0.0
    return np.array([1.0, eta_now, eta_mean, math.log1p(eta_now), math.log1p(eta_mean), speed, mean_speed,
                     t - arrival_t, r / zone.radius_m, inward])


def dwell_samples(rows: list[Row], zone: Zone, every_s: float = 10.0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(X, remaining dwell a, vehicle ids) for each observation point of each complete zone passage.

    A passage still inside the zone when the trace ends is censored (its departure is unknown) and skipped.
    """
    return dwell_samples_from_tracks(by_vehicle(rows), zone, every_s)


def dwell_samples_from_tracks(tracks: dict[str, np.ndarray], zone: Zone, every_s: float = 10.0
                              ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """`dwell_samples` over per-vehicle (t, x, y) arrays already grouped and sorted by time."""
    xs, ys, ids = [], [], []
    for vid, arr in tracks.items():
        inside = zone.inside(arr[:, 1], arr[:, 2])
        idx = np.flatnonzero(np.diff(np.concatenate([[0], inside.astype(int), [0]])))
        for s, e in zip(idx[::2], idx[1::2], strict=True):
            if e >= len(arr):
                continue  # censored
            arrival, departure = arr[s, 0], arr[e, 0]
            t_obs = arrival + every_s
            while t_obs < departure:
                k = int(np.searchsorted(arr[:, 0], t_obs, side="right"))
                hist = arr[max(s, k - 30):k]
                if len(hist) >= 2:
                    xs.append(trajectory_features(hist, zone, arrival))
                    ys.append(departure - arr[k - 1, 0])
                    ids.append(vid)
                t_obs += every_s
    if not xs:
        return np.zeros((0, len(FEATURES))), np.zeros(0), []
    return np.array(xs), np.array(ys), ids


def mape(actual: np.ndarray, pred: np.ndarray) -> float:
    return float(np.mean(np.abs(actual - pred) / actual)) if len(actual) else math.nan


@dataclass
class DwellRegressor:
    """Linear model on trajectory features fitted for minimum MAPE (+ ridge) by IRLS."""

    ridge: float = 0.0  # Omega; off by default: on our traces any ridge raised held-out MAPE
    iters: int = 50
    min_dwell_s: float = 1.0
    w: np.ndarray | None = None
    scale: np.ndarray | None = None

    def fit(self, X: np.ndarray, a: np.ndarray) -> DwellRegressor:
        if len(a) == 0 or np.any(a <= 0):
            raise ValueError("dwell targets must be positive and non-empty")
        self.scale = np.maximum(np.abs(X).max(axis=0), 1e-9)
        Z = X / self.scale
        reg = self.ridge * np.eye(Z.shape[1])
        reg[0, 0] = 0.0  # do not shrink the intercept
        w = np.linalg.lstsq(Z / a[:, None], np.ones_like(a), rcond=None)[0]  # relative least squares start
        for _ in range(self.iters):
            r = np.abs(a - Z @ w)
            wt = 1.0 / (a * np.maximum(r, 1e-6 * a))  # weighted-L1 (MAPE) as reweighted L2
            A = Z.T @ (Z * wt[:, None])
            A = A + reg * (np.trace(A) / len(A))  # ridge relative to the data term, so it is scale-free
            w_new = np.linalg.solve(A, Z.T @ (wt * a))
            if np.allclose(w_new, w, rtol=1e-7, atol=1e-10):
                w = w_new
                break
            w = w_new
        self.w = w
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        if self.w is None or self.scale is None:
            raise RuntimeError("fit the regressor first")
        return np.maximum(self.min_dwell_s, (X / self.scale) @ self.w)

    def objective(self, X: np.ndarray, a: np.ndarray) -> float:
        """The paper's training objective: sum of relative errors + ridge."""
        return float(np.sum(np.abs(a - self.predict(X)) / a) + self.ridge * float(np.sum(self.w[1:] ** 2)))


def m_cmp(profile: Profile, n_batch: int) -> float:
    """Eq. 7: computation per epoch = per-sample FLOPs x batches per epoch."""
    return profile.m_cmp_per_sample * n_batch


def eligible(dwell_s: float, tflops: float, m_cmp_flops: float, e_req: float, alpha: float) -> bool:
    """Eq. 1 (read as >=): can the vehicle finish a fraction alpha of e_req epochs while it stays?"""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return dwell_s * tflops * 1e12 >= alpha * m_cmp_flops * e_req


def resource_sufficient(dwell_s: float, tflops: float, mem_bytes: float, m_cmp_flops: float, e_req: float,
                        m_cap: float) -> bool:
    """Eq. 2: it can train the whole model alone (compute over its dwell and memory for M_cap)."""
    return dwell_s * tflops * 1e12 >= m_cmp_flops * e_req and mem_bytes >= m_cap


@dataclass
class Availability:
    sufficient: list[str]
    limited: list[str]
    ineligible: list[str]


def classify(vehicles: list[dict], profile: Profile, n_batch: int, e_req: float, alpha: float) -> Availability:
    """Split vehicles (`{"id", "dwell_s", "tflops", "mem_bytes"}`) by Eqs. 1-2; M_cap from the profile."""
    mc = m_cmp(profile, n_batch)
    out = Availability([], [], [])
    for v in vehicles:
        vid = str(v["id"])
        if not eligible(v["dwell_s"], v["tflops"], mc, e_req, alpha):
            out.ineligible.append(vid)
        elif resource_sufficient(v["dwell_s"], v["tflops"], v["mem_bytes"], mc, e_req, profile.m_cap):
            out.sufficient.append(vid)
        else:
            out.limited.append(vid)
    return out
