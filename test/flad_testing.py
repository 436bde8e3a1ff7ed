"""Helpers shared by the test suites: free loopback ports and a look at which processes are alive."""

from __future__ import annotations

import os
from pathlib import Path

from flad_core.procs import free_port_base

__all__ = ["free_port_base", "processes_mentioning", "reference_step"]

REPO = Path(__file__).resolve().parents[1]


def processes_mentioning(text: str) -> list[int]:
    """PIDs of live processes whose command line contains `text` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if text in cmdline and ") Z " not in stat:  # zombies are already dead
            pids.append(int(entry.name))
    return pids


def reference_step(model, batch, clip):
    """One single-process training step of the whole encoder (AdamW with the paper's two learning rates, global
    clipping): what a pipelined step must equal. Returns (loss, gradient norm, gradients by parameter name)."""
    import torch

    opt = torch.optim.AdamW(model.param_groups(7.5e-4, 3e-4, 0.05), eps=1e-8)
    loss = model.forward_train(batch)["loss"]
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    return float(loss.detach()), float(norm), grads
