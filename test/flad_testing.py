"""Helpers shared by the test suites: free loopback ports and a look at which processes are alive."""

from __future__ import annotations

import os
from pathlib import Path

from flad_core.procs import free_port_base

__all__ = ["free_port_base", "processes_mentioning"]

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
