"""What quick recovery is configured with, and what it records of each recovery (paper §4.2)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from flad_vehicle.fhdp.pipeline import Stage


@dataclass
class RecoveryConfig:
    """How the edge detects departures and recovers."""

    backup_every: int = 2                 # e: vehicles upload changed layers every e steps (0: no backups)
    heartbeat_timeout_s: float = 0.0      # detection of silent vehicles; 0: the fleet file's heartbeat.timeout_s
    watch_disconnects: bool = True        # also detect a dropped TCP connection (a killed process) at once
    link_timeout_s: float = 60.0          # a survivor gives up on a silent neighbour after this (abort comes first)
    templates_f: int = 2                  # preventive templates for up to f departures per cluster
    template_method: str = "exact"        # SWIFT method for the templates (exact | greedy | swift)
    handover_margin_s: float = 3.0        # planned departure: hand over when less than this dwell time is left
    # prefer "keep in place" (the departed stage's layers join its upstream neighbour, nothing else moves) over
    # the template when its bottleneck is at most this many times the template's (0: always the template)
    min_move_slowdown: float = 1.5
    backup_dir: str = ""                  # keep backups on disk here (atomic, checksummed); "": memory only
    abort_wait_s: float = 5.0             # how long survivors get to confirm an abort
    max_recoveries_per_pipeline: int = 8

    def validate(self) -> None:
        if self.backup_every < 0 or self.templates_f < 0:
            raise ValueError("backup_every and templates_f must be >= 0")
        if self.heartbeat_timeout_s < 0 or self.link_timeout_s <= 0:
            raise ValueError("heartbeat_timeout_s must be >= 0 and link_timeout_s > 0")


class PipelineFailedError(Exception):
    """Members of the running pipeline left (or failed); `departed` names them."""

    def __init__(self, departed: set[str], reason: str, t_detect: float) -> None:
        super().__init__(f"{sorted(departed)} left ({reason})")
        self.departed, self.reason, self.t_detect = departed, reason, t_detect


@dataclass
class RecoveryRecord:
    """One recovery, as the benchmark and the tests read it (times in seconds, wall clock stamps)."""

    client: str
    round: int
    pipeline: str
    departed: list[str]
    reason: str
    planned: bool
    t_failure: float                  # when the edge learned of it (disconnect / heartbeat / error event time)
    t_detect: float                   # when the training thread acted on it
    t_replanned: float = 0.0
    t_redeployed: float = 0.0
    t_resumed: float = 0.0            # first completed step afterwards (progress message received)
    completed_before: int = 0         # steps of the pipeline completed before the failure
    steps_lost: int = 0               # steps whose updates were lost (restored layers were backed up earlier)
    moved_bytes: int = 0              # layer payload bytes the new owners actually fetched
    planned_moved_bytes: int = 0      # plan_moves' exact tensor bytes
    departed_share_bytes: int = 0     # tensor bytes the departed vehicles held (the lower bound)
    model_bytes: int = 0              # the whole model's tensor bytes (weights + AdamW state)
    moves: list[tuple[str, str, str]] = field(default_factory=list)   # (layer, source, dest)
    template_precomputed: bool = True
    choice: str = "template"          # template | keep-in-place (fewer moved bytes, see RecoveryConfig)
    old_pipeline: list[Stage] = field(default_factory=list)
    new_pipeline: list[Stage] = field(default_factory=list)

    def phases(self) -> dict[str, float]:
        out = {"replan_s": self.t_replanned - self.t_detect if self.t_replanned else math.nan,
               "redeploy_s": self.t_redeployed - self.t_replanned if self.t_redeployed else math.nan,
               "resume_s": self.t_resumed - self.t_redeployed if self.t_resumed and self.t_redeployed else math.nan}
        out["recovery_s"] = self.t_resumed - self.t_detect if self.t_resumed else math.nan
        return out

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), **self.phases()}
