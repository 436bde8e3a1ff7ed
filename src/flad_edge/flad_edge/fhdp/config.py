"""How the edge trains with FHDP (the paper: batch 4, 5 local epochs; the defaults are scaled for a CPU demo)."""

from __future__ import annotations

from dataclasses import dataclass, field

from flad_core.config import ConfigError
from flad_core.device import PRECISIONS
from flad_edge.fl.aggregation import AggregationConfig

#: how a cluster covers its members' data each round (FhdpConfig.cluster_schedule)
CLUSTER_SCHEDULES = ("rotation", "fanin")


@dataclass
class FhdpConfig:
    rounds: int = 3
    local_steps: int = 3            # training steps per pipeline per round
    batch_size: int = 4
    n_micro: int = 2
    schedule: str = "1f1b"
    codec: str = "fp32"
    time_scale: float = 0.02        # emulation: every device runs 1/time_scale times faster than real
    round_deadline_s: float = 600.0
    quorum: int = 1
    clusters: list[list[str]] = field(default_factory=list)   # explicit clusters; others train alone
    planner: str = "exact"          # SWIFT method for the essential pipelines (exact: optimal, small clusters)
    encoder: str = "tiny"
    seed: int = 0
    # True: FHDP, a cluster rotates over its essential pipelines so every member's data trains the model.
    # False: traditional HDP, a cluster runs only its first pipeline (only that member's data is used), for
    # len(members) x local_steps steps so the step/sample budget per round is the same (non-IID studies).
    rotate: bool = True
    # True: U-shaped pipelines -- each pipeline's data owner (stage 0) also holds the task heads and the loss;
    # the last trunk stage returns its features to it, so labels never leave the vehicle that owns them
    # (flad_vehicle.fhdp.ushape). False (default): labels travel with the activations to the last stage.
    u_shaped: bool = False
    # how a cluster covers its members' data each round: "rotation" (default) runs its essential pipelines one
    # after the other, local_steps each; "fanin" runs every member's data in every step (flad_vehicle.fhdp.fanin:
    # each member a replica of the raw-input layers on its own data, one shared trunk), local_steps steps of
    # members x batch_size samples -- the rotation's samples per round. Not with U-shaped pipelines, HDP
    # (rotate: false) or quick recovery.
    cluster_schedule: str = "rotation"
    # how the edge combines its clients' updates (FedAvg by default) and screens them first: a poisoned
    # vehicle's cluster update is rejected rather than averaged in (flad_edge.fl.aggregation)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    # every stage's training precision: fp32, or autocast to bf16 / fp16 (fp16 with the pipeline's loss scale on
    # CUDA); each vehicle trains on its own device (the fleet file's `device`, or its worker's --device)
    precision: str = "fp32"

    def validate(self) -> None:
        if self.schedule not in ("gpipe", "1f1b"):
            raise ValueError(f"schedule must be gpipe or 1f1b, got {self.schedule!r}")
        if self.n_micro < 1 or self.batch_size < self.n_micro:
            raise ValueError("need 1 <= n_micro <= batch_size")
        if not isinstance(self.u_shaped, bool):
            raise ValueError(f"u_shaped must be true or false, got {self.u_shaped!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.cluster_schedule not in CLUSTER_SCHEDULES:
            raise ValueError(f"cluster_schedule must be one of {', '.join(CLUSTER_SCHEDULES)}, got "
                             f"{self.cluster_schedule!r}")
        if self.cluster_schedule == "fanin" and (self.u_shaped or not self.rotate):
            raise ValueError("cluster_schedule fanin trains every member's data with labels-forward pipelines: it "
                             "cannot be combined with u_shaped: true or rotate: false")
        try:
            self.aggregation.validate()
        except ConfigError as exc:
            raise ConfigError(f"aggregation.{exc.key}", exc.reason) from exc
