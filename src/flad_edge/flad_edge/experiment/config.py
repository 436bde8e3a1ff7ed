"""`flad run EXPERIMENT.yaml`: the typed experiment config, and the `paper` / `quick` presets.

Every section is a dataclass read by `flad_core.config.from_dict`, so a bad value is reported by its dotted
key (`rounds.clients_per_round: must be >= 1, got 0`). The presets live as YAML in `launch/experiments/` and
are what `flad run paper` / `flad run quick` load; a user's file names only what it changes from the defaults.

The `paper` preset is the FLAD paper's §6 setup: 50 virtual vehicles, non-IID data by CARLA-like town, 5 active
clients per round, batch 4, 5 local epochs, learning rates 7.5e-4 (general) / 3e-4 (backbone) with Adam.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from flad_core import tensorcodec
from flad_core.config import ConfigError, from_dict, load_yaml
from flad_core.device import DeviceError, check_device_spec, check_precision
from flad_core.fleet import DeviceProfile
from flad_edge.experiment.driver import DriverConfig
from flad_edge.fl.aggregation import AggregationConfig

PRESETS_DIR = Path(__file__).resolve().parents[4] / "launch" / "experiments"
PRESETS = ("paper", "quick")


def _positive(key: str, value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(key, f"must be a finite number > 0, got {value!r}")


def _default_devices() -> dict[str, DeviceProfile]:
    """Table 1's Jetsons with the memory each can give to FL training while it also drives.

    The paper's point is that a vehicle's own driving stack leaves little memory for training; these
    budgets make Nano/NX resource-limited (they must cluster) and AGX sufficient for the paper-size encoder.
    """
    return {"jetson_nano": DeviceProfile(mem_gb=0.6, tflops=0.472, link_mbps=50.0),
            "jetson_nx": DeviceProfile(mem_gb=0.8, tflops=0.404, link_mbps=50.0),
            "jetson_agx": DeviceProfile(mem_gb=8.0, tflops=3.85, link_mbps=100.0)}


@dataclass
class FleetSection:
    """The virtual vehicles: how many, where they drive (one town each: non-IID by town), what hardware."""

    vehicles: int = 50
    towns: list[str] = field(default_factory=lambda: ["Town01", "Town02", "Town03", "Town04", "Town05"])
    device_mix: dict[str, float] = field(default_factory=lambda: {"jetson_agx": 0.2, "jetson_nx": 0.4,
                                                                    "jetson_nano": 0.4})
    devices: dict[str, DeviceProfile] = field(default_factory=_default_devices)
    dirichlet_alpha: float | None = None     # optional label skew on top of the town split
    frames_per_vehicle: int = 16             # each vehicle's recorded shard (sensors render only these frames)
    data: str = ""                           # an existing `flad sim collect` root; "": collect into the run folder
    dt_s: float = 0.5                        # physics step of the moving fleet (no sensors)
    background_per_town: int = 0             # extra NPC traffic per town (slows the fleet down realistically)

    def validate(self) -> None:
        if self.vehicles < 2:
            raise ConfigError("vehicles", f"must be >= 2, got {self.vehicles}")
        if not self.towns:
            raise ConfigError("towns", "must name at least one town")
        from flad_sim.towns import TOWN_NAMES

        for i, t in enumerate(self.towns):
            if t not in TOWN_NAMES:
                raise ConfigError(f"towns[{i}]", f"unknown town {t!r} (towns: {', '.join(TOWN_NAMES)})")
        if not self.device_mix:
            raise ConfigError("device_mix", "must name at least one device")
        for name, share in self.device_mix.items():
            if name not in self.devices:
                raise ConfigError(f"device_mix.{name}", f"no such device in devices ({', '.join(self.devices)})")
            if not math.isfinite(share) or share < 0:
                raise ConfigError(f"device_mix.{name}", f"must be a share >= 0, got {share!r}")
        if sum(self.device_mix.values()) <= 0:
            raise ConfigError("device_mix", "shares must not all be 0")
        if self.dirichlet_alpha is not None:
            _positive("dirichlet_alpha", self.dirichlet_alpha)
        if self.frames_per_vehicle < 1:
            raise ConfigError("frames_per_vehicle", f"must be >= 1, got {self.frames_per_vehicle}")
        _positive("dt_s", self.dt_s)
        if self.background_per_town < 0:
            raise ConfigError("background_per_town", "must be >= 0")


@dataclass
class EdgeSpec:
    """One edge server's coverage: a disc (its RSUs' range) on the global map."""

    id: str
    x: float
    y: float
    radius_m: float

    def validate(self) -> None:
        _positive("radius_m", self.radius_m)


@dataclass
class EdgesSection:
    """Edge servers: `count` placed automatically over the map, or an explicit `placement` list."""

    count: int = 2
    coverage: float = 0.55          # auto placement: fraction of the map's area the discs cover together
    placement: list[EdgeSpec] = field(default_factory=list)

    def validate(self) -> None:
        if self.placement:
            ids = [e.id for e in self.placement]
            if len(set(ids)) != len(ids):
                raise ConfigError("placement", f"duplicate edge ids {ids}")
        elif self.count < 1:
            raise ConfigError("count", f"must be >= 1, got {self.count}")
        if not 0 < self.coverage <= 1:
            raise ConfigError("coverage", f"must be in (0, 1], got {self.coverage!r}")

    @property
    def n(self) -> int:
        return len(self.placement) or self.count


@dataclass
class RoundsSection:
    """Federated rounds over simulated time."""

    rounds: int = 10
    round_s: float = 120.0          # simulated seconds a round lasts (vehicles move this much per round)
    warmup_s: float = 300.0         # the fleet drives this long before round 0 (first traces for SWIFT)
    clients_per_round: int = 5      # active FL clients per round over all edges (the paper: 5)
    deadline_s: float = 900.0       # wall-clock limit of one edge's round
    eval_frames: int = 64           # held-out frames the global encoder is scored on after each round

    def validate(self) -> None:
        if self.rounds < 1:
            raise ConfigError("rounds", f"must be >= 1, got {self.rounds}")
        _positive("round_s", self.round_s)
        if self.warmup_s < 0:
            raise ConfigError("warmup_s", "must be >= 0")
        if self.clients_per_round < 1:
            raise ConfigError("clients_per_round", f"must be >= 1, got {self.clients_per_round}")
        _positive("deadline_s", self.deadline_s)
        if self.eval_frames < 0:
            raise ConfigError("eval_frames", "must be >= 0")


@dataclass
class TrainSection:
    """Local training of the vision encoder (FHDP): the paper's batch 4, 5 local epochs, Adam(W), 7.5e-4 / 3e-4."""

    encoder: str = "tiny"
    batch_size: int = 4
    local_epochs: int = 5
    n_micro: int = 2
    schedule: str = "1f1b"
    codec: str = "fp32"
    time_scale: float = 0.02        # emulated devices run 1/time_scale times faster than Table 1
    device: str = "auto"            # where the pooled vehicle processes train: auto | cpu | cuda[:N]
    precision: str = "fp32"         # stage training precision: fp32 | bf16 | fp16 (autocast)

    def validate(self) -> None:
        for name, check in (("device", check_device_spec), ("precision", check_precision)):
            try:
                check(getattr(self, name))
            except DeviceError as exc:
                raise ConfigError(name, str(exc)) from exc
        if self.encoder not in ("tiny", "paper"):
            raise ConfigError("encoder", f"must be tiny or paper, got {self.encoder!r}")
        if self.batch_size < 1 or self.local_epochs < 1:
            raise ConfigError("batch_size" if self.batch_size < 1 else "local_epochs", "must be >= 1")
        if not 1 <= self.n_micro <= self.batch_size:
            raise ConfigError("n_micro", f"must be in [1, batch_size={self.batch_size}], got {self.n_micro}")
        if self.schedule not in ("gpipe", "1f1b"):
            raise ConfigError("schedule", f"must be gpipe or 1f1b, got {self.schedule!r}")
        if self.codec not in tensorcodec.CODECS:
            raise ConfigError("codec", f"must be one of {', '.join(tensorcodec.CODECS)}, got {self.codec!r}")
        _positive("time_scale", self.time_scale)


@dataclass
class SwiftSection:
    """SWIFT at each edge: availability (Eqs. 1-2), mobility clustering (Eqs. 3-6), pipeline planning."""

    method: str = "swift"           # essential pipelines: swift | greedy | dqn | exact
    plan_encoder: str = "paper"     # encoder whose M_cap / FLOPs decide Eqs. 1, 2 and 6 (the model the paper trains)
    alpha: float = 0.5              # Eq. 1: a vehicle must stay long enough for this share of the work
    alpha_p: float = 1.0            # Eq. 6 c2: redundancy of a cluster's compute over its dwell
    v2v_radius_m: float = 150.0     # R_v: clusters form among vehicles within this range
    cell_m: float = 50.0            # mobility grid cell side (rho)
    step_s: float = 10.0            # DTMC time step
    patterns: int = 4               # mobility patterns (k-means groups of trajectories)
    cluster_cap: int = 4            # largest cluster
    templates_f: int = 2            # preventive templates per cluster (quick recovery)

    def validate(self) -> None:
        if self.method not in ("swift", "greedy", "dqn", "exact"):
            raise ConfigError("method", f"must be swift, greedy, dqn or exact, got {self.method!r}")
        if self.plan_encoder not in ("tiny", "paper"):
            raise ConfigError("plan_encoder", f"must be tiny or paper, got {self.plan_encoder!r}")
        if not 0 <= self.alpha <= 1:
            raise ConfigError("alpha", f"must be in [0, 1], got {self.alpha!r}")
        if self.alpha_p < 1:
            raise ConfigError("alpha_p", f"must be >= 1, got {self.alpha_p!r}")
        for key in ("v2v_radius_m", "cell_m", "step_s"):
            _positive(key, getattr(self, key))
        if self.patterns < 1 or self.cluster_cap < 2 or self.templates_f < 0:
            raise ConfigError("patterns" if self.patterns < 1 else "cluster_cap" if self.cluster_cap < 2
                              else "templates_f", "out of range (patterns >= 1, cluster_cap >= 2, templates_f >= 0)")


@dataclass
class FailuresSection:
    """Sudden failures on top of mobility (a vehicle that crashes mid-round is recovered, not handed over)."""

    p_crash: float = 0.0            # per training vehicle per round
    recovery: bool = True           # quick recovery on (backups, templates); off: a departure fails its client

    def validate(self) -> None:
        if not 0 <= self.p_crash <= 1:
            raise ConfigError("p_crash", f"must be in [0, 1], got {self.p_crash!r}")


@dataclass
class PoolSection:
    """Virtual vehicles: worker processes per edge that take on a training vehicle's identity for a round."""

    slots_per_edge: int = 8

    def validate(self) -> None:
        if self.slots_per_edge < 1:
            raise ConfigError("slots_per_edge", f"must be >= 1, got {self.slots_per_edge}")


ENGINES = ("local", "ray")


@dataclass
class EngineSection:
    """Where the run's processes live. `local`: the edges in the `flad run` process, the cloud and every pool
    slot as its child processes on this machine. `ray`: the edges, the cloud and every slot as Ray actors spread
    over a Ray cluster's nodes (`flad_edge.experiment.ray_engine`; `pip install .[ray]`), each with the
    resource share below; Ray only admits an actor where its share is free."""

    name: str = "local"
    address: str = ""               # ray: the cluster to join (`ray start --head` prints it); "": a new local one
    edge_cpus: float = 1.0          # ray: CPUs reserved per edge actor (hub, FHDP orchestrator, FedAvg)
    cloud_cpus: float = 1.0         # ray: CPUs reserved for the cloud
    slot_cpus: float = 1.0          # ray: CPUs reserved per pool slot (one vehicle's training process)
    slot_gpus: float = 0.0          # ray, with train.device cuda: GPU share per slot (0: all slots share one GPU)

    def validate(self) -> None:
        if self.name not in ENGINES:
            raise ConfigError("name", f"unknown engine {self.name!r} (engines: {', '.join(ENGINES)})")
        if self.address and self.name != "ray":
            raise ConfigError("address", "is for engine ray (a Ray cluster address); the local engine takes none")
        for key in ("edge_cpus", "cloud_cpus", "slot_cpus", "slot_gpus"):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(key, f"must be a finite number >= 0, got {value!r}")


@dataclass
class AggregationSection:
    """How each tier combines its round's updates (`rule`: fedavg, median, trimmed_mean, krum, multi_krum) and
    screens them first (shape/dtype, NaN/inf, norm bound): the edge over its FL clients (vehicles and clusters),
    the cloud over the edges' aggregates. FedAvg with screening on by default, at both tiers."""

    edge: AggregationConfig = field(default_factory=AggregationConfig)
    cloud: AggregationConfig = field(default_factory=AggregationConfig)


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    fleet: FleetSection = field(default_factory=FleetSection)
    edges: EdgesSection = field(default_factory=EdgesSection)
    rounds: RoundsSection = field(default_factory=RoundsSection)
    train: TrainSection = field(default_factory=TrainSection)
    swift: SwiftSection = field(default_factory=SwiftSection)
    failures: FailuresSection = field(default_factory=FailuresSection)
    pool: PoolSection = field(default_factory=PoolSection)
    aggregation: AggregationSection = field(default_factory=AggregationSection)
    engine: EngineSection = field(default_factory=EngineSection)
    driver: DriverConfig = field(default_factory=DriverConfig)   # CELLAdapt + closed-loop eval (after the rounds)

    def validate(self) -> None:
        held = set(self.driver.eval_towns) & set(self.fleet.towns)
        if self.driver.enabled and held:
            raise ConfigError("driver.eval_towns", f"{sorted(held)} are also training towns (fleet.towns); the "
                              "driver is evaluated on held-out towns")
        if self.pool.slots_per_edge < self.swift.cluster_cap:
            raise ConfigError("pool.slots_per_edge", f"must hold the largest cluster (swift.cluster_cap = "
                              f"{self.swift.cluster_cap}), got {self.pool.slots_per_edge}")

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.fleet.frames_per_vehicle / self.train.batch_size))

    @property
    def local_steps(self) -> int:
        """Training steps of one vehicle's data per round: local epochs over its shard."""
        return self.steps_per_epoch * self.train.local_epochs


def load_experiment(source: str | Path) -> ExperimentConfig:
    """A preset name (`paper`, `quick`) or a YAML file."""
    text = str(source)
    if text in PRESETS:
        return load_yaml(ExperimentConfig, PRESETS_DIR / f"{text}.yaml")
    path = Path(text)
    if not path.exists():
        raise ConfigError("", f"no experiment file {path} (or use a preset: {', '.join(PRESETS)})")
    return load_yaml(ExperimentConfig, path)


def experiment_from_dict(data: dict) -> ExperimentConfig:
    return from_dict(ExperimentConfig, data)
