"""Pipeline schedules: the order of forward (F) and backward (B) micro-batch operations per stage.

GPipe: all forwards, then all backwards (every stage holds all M micro-batches' activations).
1F1B:  stage s warms up with min(K-1-s, M) forwards, then alternates one forward and one backward,
       then drains the remaining backwards; at most K-s micro-batches are in flight at stage s.
Both give the same gradients; they differ in memory and in the shape of the pipeline bubble.
"""

from __future__ import annotations

from typing import Literal

Schedule = Literal["gpipe", "1f1b"]
Op = tuple[str, int]   # ("F" | "B", micro-batch index)


def stage_ops(schedule: Schedule, n_stages: int, stage: int, n_micro: int) -> list[Op]:
    if not 0 <= stage < n_stages:
        raise ValueError(f"stage {stage} out of range for {n_stages} stages")
    if n_micro < 1:
        raise ValueError("need at least one micro-batch")
    if schedule == "gpipe":
        return [("F", m) for m in range(n_micro)] + [("B", m) for m in range(n_micro)]
    if schedule == "1f1b":
        warmup = min(n_stages - 1 - stage, n_micro)
        ops: list[Op] = [("F", m) for m in range(warmup)]
        for i in range(n_micro - warmup):
            ops += [("F", warmup + i), ("B", i)]
        ops += [("B", m) for m in range(n_micro - warmup, n_micro)]
        return ops
    raise ValueError(f"unknown schedule {schedule!r} (gpipe or 1f1b)")


def max_in_flight(schedule: Schedule, n_stages: int, stage: int, n_micro: int) -> int:
    """Largest number of micro-batches forwarded but not yet backwarded at `stage`."""
    live = peak = 0
    for kind, _ in stage_ops(schedule, n_stages, stage, n_micro):
        live += 1 if kind == "F" else -1
        peak = max(peak, live)
    return peak
