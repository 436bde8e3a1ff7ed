"""The process host of `flad run --engine ray` (`ray_engine`): a Ray actor that runs one OS process on its node.

Its own module, importing nothing heavy: a Ray worker imports the module of the actor class it hosts, and a
slot's host must start in about a second, not spend seconds importing torch it never uses (the process it
starts imports its own).
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
from pathlib import Path

import ray

from flad_core.procs import _die_with_parent, free_port_base


def rss_bytes(pid: int) -> int:
    """Resident memory of process `pid` (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def node_address() -> tuple[str, str]:
    """This Ray worker's node: its IP address (where peers reach its sockets) and its node id."""
    return ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id()


class ProcessHost:
    """Runs one OS process on the node Ray placed it on (the actor is its parent: the process dies with it).

    A plain (non-threaded) actor: every call runs on the worker's main thread, the thread that forks the
    process, so the child's PR_SET_PDEATHSIG fires only when the actor's process ends."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self._log = None

    def where(self, n_ports: int) -> tuple[str, list[int], str]:
        """This node's address, `n_ports` consecutive ports free on it now, and its node id."""
        host, node = node_address()
        base = free_port_base(n_ports, host=host)
        return host, list(range(base, base + n_ports)), node

    def start(self, cmd: list[str], log_path: str, env: dict[str, str]) -> int:
        if self.proc is not None:
            raise RuntimeError("this host already runs a process")
        path = Path(log_path)
        if not path.parent.is_dir():
            raise FileNotFoundError(f"{path.parent} does not exist on node {node_address()[0]}: every node must see "
                                    "the run folder at the same path (a shared filesystem)")
        self._log = open(path, "ab")  # noqa: SIM115 - the process's stderr for its lifetime
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=self._log, stdin=subprocess.DEVNULL,
                                     env={**os.environ, **env},
                                     preexec_fn=functools.partial(_die_with_parent, os.getpid(), signal.SIGKILL))
        return self.proc.pid

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def rss_bytes(self) -> int:
        """Resident memory of this actor's worker process and of the process it runs."""
        child = rss_bytes(self.proc.pid) if self.proc is not None and self.proc.poll() is None else 0
        return rss_bytes(os.getpid()) + child
