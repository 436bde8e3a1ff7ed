"""Child processes that never outlive their parent.

Launchers (`flad demo`, benchmarks, tests) start every role as a real OS process. Each child asks
the kernel to SIGTERM it when its parent dies (Linux PR_SET_PDEATHSIG), and `ProcessGroup` stops
children in order on exit, Ctrl-C included: SIGTERM, a grace period, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int | None = None) -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if parent is not None and os.getppid() != parent:
        os._exit(1)     # the parent died between fork and prctl: no signal would ever come


def python_module_cmd(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


class ProcessGroup:
    """Start named child processes; stop them all (no orphans) when the block exits."""

    def __init__(self, grace_s: float = 5.0) -> None:
        self.grace_s = grace_s
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: list = []

    def start(self, name: str, cmd: Sequence[str], log_path: Path | None = None,
              env: dict[str, str] | None = None, show_stdout: bool = False) -> subprocess.Popen:
        """Start `cmd`. Its stderr (logs) goes to `log_path` or nowhere (roles keep their own log
        files); its stdout too, unless `show_stdout` passes it through to ours."""
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed in stop()
        if log_path:
            self._logs.append(out)
        proc = subprocess.Popen(list(cmd), stdout=None if show_stdout else out, stderr=out, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})},
                                preexec_fn=functools.partial(_die_with_parent, os.getpid()))
        self.procs[name] = proc
        log.debug("started %s (pid %d): %s", name, proc.pid, " ".join(cmd))
        return proc

    def wait(self, name: str, timeout: float | None = None) -> int | None:
        try:
            return self.procs[name].wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def alive(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is None]

    def stop(self) -> dict[str, int]:
        """SIGTERM every live child, wait up to `grace_s`, SIGKILL the rest; return exit codes."""
        for name in self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.procs[name].send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for name, proc in self.procs.items():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM; dumping its stacks (SIGUSR1) and killing it", name, proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGUSR1)
                time.sleep(0.3)
                proc.kill()
                proc.wait()
        for fh in self._logs:
            fh.close()
        self._logs.clear()
        return {n: p.returncode for n, p in self.procs.items()}

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def install_stop_handlers(stop: threading.Event) -> None:
    """SIGTERM/SIGINT set `stop` so a role process can leave cleanly (say goodbye, close sockets)."""

    def handler(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    # `kill -USR1 <pid>` dumps every thread's stack to stderr: how to see where a stuck role waits
    faulthandler.register(signal.SIGUSR1, all_threads=True)


def free_port_base(count: int = 8) -> int:
    """A base port such that `base .. base+count-1` are free on 127.0.0.1 right now (tests, benches)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count >= 65000:
            continue
        socks = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                sock.bind(("127.0.0.1", port))
                socks.append(sock)
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free range of loopback ports")
