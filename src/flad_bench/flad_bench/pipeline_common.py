"""Helpers shared by `flad bench pipeline` (flad_bench.pipeline) and its torch-pipelining baseline
(flad_bench.pipeline_torchpp): free loopback ports and the per-configuration summary of step records.

Kept apart so that neither module imports the other's internals (pipeline -> pipeline_torchpp only).
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any


def free_ports(n: int) -> list[int]:
    """`n` TCP ports free on 127.0.0.1 right now (bound together, then released)."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def summarize(results: Sequence[dict], batch_size: int, warmup: int, time_scale: float) -> dict[str, Any]:
    """Throughput and per-stage figures of one configuration from its workers' per-step records."""
    busy = sorted((r for r in results if not r.get("idle")), key=lambda r: r["index"])
    n = len(busy[0]["steps"]) - warmup
    if n < 1:
        raise ValueError("no timed steps")
    t0 = min(r["steps"][warmup]["t0"] for r in busy)
    t1 = max(r["steps"][-1]["t1"] for r in busy)
    wall = t1 - t0
    emulated = wall / time_scale
    timed = [r["steps"][warmup:] for r in busy]
    stage_emul = [sum(s["emulated_compute_s"] for s in st) / n / time_scale for st in timed]
    stage_real = [sum(s["compute_s"] for s in st) / n for st in timed]
    stage_bytes = [sum(s["bytes_sent"] for s in st) / n for st in timed]
    links = []   # directed links: (from stage, to stage, bytes per step)
    for r in busy:
        lb = r.get("link_bytes_per_step") or {}
        if lb.get("next"):
            links.append([r["index"], r["index"] + 1, lb["next"]])
        if lb.get("prev"):
            links.append([r["index"], r["index"] - 1, lb["prev"]])
        if lb.get("turn"):   # U-shaped: the turnaround hop between the last trunk stage and the data owner
            links.append([r["index"], lb["turn_to"], lb["turn"]])
    all_steps = [r["steps"] for r in busy]
    bytes_total = sum(s["bytes_sent"] for st in all_steps for s in st)
    # the loss stage: the last one, or the data owner of a U-shaped pipeline
    losses = next(([s["loss"] for s in r["steps"] if s["loss"] is not None] for r in reversed(busy)
                   if any(s["loss"] is not None for s in r["steps"])), [])
    return {
        "stages": [[r["vehicle"], *r["range"]] for r in busy],
        "samples_per_s": batch_size * n / emulated,
        "step_s": emulated / n,
        "wall_s": round(wall, 3),
        "stage_compute_s": stage_emul,        # emulated compute per step, per stage
        "stage_host_compute_s": stage_real,   # measured on this host, per step, per stage
        "stage_bytes_per_step": stage_bytes,  # sent by each stage (activations down, gradients up)
        "link_bytes_per_step": links,
        "bytes_per_sample": bytes_total / (batch_size * len(all_steps[0])),
        "losses": losses,
        "final_loss": sum(losses[-3:]) / len(losses[-3:]) if losses else None,
    }
