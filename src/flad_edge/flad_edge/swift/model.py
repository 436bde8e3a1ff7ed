"""SWIFT's inputs and outputs: vehicles, clusters, model profiles and plans, plus the paper's device mix.

The JSON formats are the ones the `flad edge plan` CLI reads; they are parsed with
`flad_core.config.from_dict`, so a bad key is reported by name (e.g. `vehicles[1].tflops: expected a number`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flad_core.config import ConfigError, from_dict

GB = 1e9


def _finite_nonneg(key: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ConfigError(key, f"must be a finite number >= 0, got {value!r}")


def _finite_pos(key: str, value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(key, f"must be a finite number > 0, got {value!r}")


@dataclass
class Vehicle:
    """One cluster member: memory available for training, compute and link capability (Table 1)."""

    id: str | int
    mem_bytes: float
    tflops: float
    link_mbps: float
    stability: float = 0.0

    def validate(self) -> None:
        _finite_pos("mem_bytes", self.mem_bytes)
        _finite_pos("tflops", self.tflops)
        _finite_pos("link_mbps", self.link_mbps)
        if not math.isfinite(self.stability):
            raise ConfigError("stability", f"must be finite, got {self.stability!r}")


@dataclass
class Cluster:
    """A cluster and the cost-model parameters: mu = GPU utilisation, nu = memory-traffic overhead (Eq. 8)."""

    vehicles: list[Vehicle]
    mu: float = 0.5
    nu: float = 1.3
    n_batch: int = 1

    def validate(self) -> None:
        if not self.vehicles:
            raise ConfigError("vehicles", "must list at least one vehicle")
        seen: set[str] = set()
        for i, v in enumerate(self.vehicles):
            if str(v.id) in seen:
                raise ConfigError(f"vehicles[{i}].id", f"duplicate vehicle id {v.id!r}")
            seen.add(str(v.id))
        if not (math.isfinite(self.mu) and 0 < self.mu <= 1):
            raise ConfigError("mu", f"utilisation must be in (0, 1], got {self.mu!r}")
        _finite_pos("nu", self.nu)
        if self.n_batch < 1:
            raise ConfigError("n_batch", f"must be >= 1, got {self.n_batch!r}")

    def index_of(self, vid: str | int) -> int:
        """Index of vehicle `vid`, matching on the string form so CLI strings find integer ids."""
        for i, v in enumerate(self.vehicles):
            if str(v.id) == str(vid):
                return i
        raise KeyError(f"no vehicle with id {vid!r} (ids: {', '.join(str(v.id) for v in self.vehicles)})")

    def subset(self, ids: list[str | int]) -> Cluster:
        keep = {str(i) for i in ids}
        return Cluster([v for v in self.vehicles if str(v.id) in keep], self.mu, self.nu, self.n_batch)


@dataclass
class Layer:
    """One layer of the topologically sorted encoder: per-sample forward FLOPs, bytes, training memory."""

    name: str
    flops: float
    param_bytes: float
    activation_bytes: float
    mem_bytes: float

    def validate(self) -> None:
        for k in ("flops", "param_bytes", "activation_bytes", "mem_bytes"):
            _finite_nonneg(k, getattr(self, k))


@dataclass
class Profile:
    """The encoder team's model-profile format: `{"layers": [...]}`; extra metadata is allowed in `meta`."""

    layers: list[Layer]
    meta: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if not self.layers:
            raise ConfigError("layers", "must list at least one layer")
        m = self.meta.get("min_first_stage_end", 1)
        if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= len(self.layers):
            raise ConfigError("min_first_stage_end", f"must be an integer in [1, {len(self.layers)}], got {m!r}")

    @property
    def min_first_end(self) -> int:
        """Smallest allowed end of stage 0: layers before it read raw sensor data, which must stay on the
        data-owning vehicle (the encoder profile's `min_first_stage_end`; 1 when absent)."""
        return int(self.meta.get("min_first_stage_end", 1))

    @property
    def m_cap(self) -> float:
        """Training memory footprint of the whole model (the paper's M_cap)."""
        return float(sum(layer.mem_bytes for layer in self.layers))

    @property
    def m_cmp_per_sample(self) -> float:
        return float(sum(layer.flops for layer in self.layers))


def load_cluster(data: Any) -> Cluster:
    return from_dict(Cluster, data, "")


def load_profile(data: Any) -> Profile:
    """Parse a profile; top-level keys other than `layers` (config name, totals, ...) are kept in `meta`."""
    if isinstance(data, dict) and set(data) - {"layers", "meta"}:
        meta = {k: v for k, v in data.items() if k not in ("layers", "meta")}
        meta.update(data.get("meta") or {})
        data = {"layers": data.get("layers"), "meta": meta} if "layers" in data else {"meta": meta}
    return from_dict(Profile, data, "")


@dataclass
class Plan:
    """One pipeline: vehicles in stage order and each one's contiguous layer range [start, end)."""

    method: str
    path: list[str | int]
    ranges: list[tuple[int, int]]
    t_path_s: float
    bottleneck_s: float
    feasible: bool
    reason: str = ""
    plan_time_s: float = 0.0
    objective: str = "path"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "method": self.method,
            "path": list(self.path),
            "layers": {str(v): [int(a), int(b)] for v, (a, b) in zip(self.path, self.ranges, strict=True)},
            "t_path_s": self.t_path_s if self.feasible else None,
            "bottleneck_s": self.bottleneck_s if self.feasible else None,
            "feasible": self.feasible,
            "reason": self.reason,
            "plan_time_s": self.plan_time_s,
            "objective": self.objective,
        }
        out.update(self.extra)
        return out


def infeasible(method: str, reason: str, objective: str = "path") -> Plan:
    return Plan(method, [], [], math.inf, math.inf, False, reason, objective=objective)


# --- the paper's device mix (Table 1) -------------------------------------------------------------------------
# Link rates are our documented choice (the paper gives none): V2V rates of DSRC/C-V2X class radios, faster
# for the AGX, which in a vehicle would sit beside a better modem. Memory is the Table-1 total; how much of it
# training may use is a bench parameter (`mem_fraction`), since Jetsons share memory with the OS and driving.
DEVICES: dict[str, dict[str, float]] = {
    "jetson-nano": {"mem_gb": 8.0, "tflops": 0.472, "link_mbps": 20.0},
    "jetson-nx": {"mem_gb": 8.0, "tflops": 0.404, "link_mbps": 50.0},
    "jetson-agx": {"mem_gb": 32.0, "tflops": 3.85, "link_mbps": 100.0},
}
# The paper's testbed: four Nano, two NX, one AGX.
DEVICE_MIX: dict[str, float] = {"jetson-nano": 4 / 7, "jetson-nx": 2 / 7, "jetson-agx": 1 / 7}
PAPER_FOOTPRINTS_GB = (5.55, 11.10, 14.01)


def random_cluster(n: int, seed: int, mem_fraction: float = 0.5, mu: float = 0.5, nu: float = 1.3,
                   n_batch: int = 100) -> Cluster:
    """A cluster of `n` vehicles drawn from the Table-1 mix, with random stability scores."""
    rng = np.random.default_rng(seed)
    names = list(DEVICE_MIX)
    kinds = rng.choice(len(names), size=n, p=[DEVICE_MIX[k] for k in names])
    vehicles = []
    for i, k in enumerate(kinds):
        d = DEVICES[names[int(k)]]
        vehicles.append(Vehicle(id=f"v{i}", mem_bytes=d["mem_gb"] * GB * mem_fraction, tflops=d["tflops"],
                                link_mbps=d["link_mbps"], stability=float(np.round(rng.uniform(0, 1), 4))))
    return Cluster(vehicles, mu=mu, nu=nu, n_batch=n_batch)


def synthetic_profile(footprint_gb: float, n_layers: int = 40, seed: int = 0,
                      gflops_per_gb: float = 40.0) -> Profile:
    """A synthetic LMDrive-like encoder profile whose training memory sums to `footprint_gb`.

    Shape (why): two backbones (conv: high FLOPs, large activations shrinking with depth), then a transformer
    encoder/decoder (parameter-heavy, small constant activations). That gives the partitioner the real
    trade-off: early cuts are expensive to send, late layers are memory-heavy. FLOPs scale with the footprint.
    """
    rng = np.random.default_rng(seed)
    n_conv = n_layers // 2
    layers = []
    for i in range(n_layers):
        if i < n_conv:  # backbone: activations shrink 64 MB -> 1 MB (per sample), FLOPs heavy
            frac = i / max(1, n_conv - 1)
            act = 16e6 * (0.5 ** (4 * frac)) * rng.uniform(0.7, 1.3)
            flops = rng.uniform(0.8, 1.6)
            mem = rng.uniform(0.5, 1.0)
            params = mem * 0.15
            kind = "conv"
        else:  # transformer: small activations, memory heavy
            act = rng.uniform(0.3e6, 1.2e6)
            flops = rng.uniform(0.4, 0.9)
            mem = rng.uniform(1.0, 2.5)
            params = mem * 0.3
            kind = "attn"
        layers.append([f"{kind}{i}", flops, params, act, mem])
    mem_tot = sum(r[4] for r in layers)
    flop_tot = sum(r[1] for r in layers)
    out = []
    for name, flops, params, act, mem in layers:
        m = mem / mem_tot * footprint_gb * GB
        out.append(Layer(name=name, flops=flops / flop_tot * gflops_per_gb * footprint_gb * 1e9,
                         param_bytes=m * params / mem / 10.0, activation_bytes=float(act), mem_bytes=m))
    return Profile(out, meta={"source": "synthetic", "footprint_gb": footprint_gb, "seed": seed})
