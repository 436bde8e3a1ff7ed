"""Child processes that never outlive their parent.

Launchers (`flad demo`, benchmarks, tests) start every role as a real OS process. Each child asks
the kernel to SIGTERM it when its parent dies (Linux PR_SET_PDEATHSIG), and `ProcessGroup` stops
children in order on exit, Ctrl-C included: SIGTERM, a grace period, then SIGKILL.

`Supervisor` watches some of a group's children (the edge, the cloud) and starts one that crashed again,
a bounded number of times: the roles resume from their own checkpoints, so a crash costs a restart, not
the run.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import functools
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int | None = None, sig: int = signal.SIGTERM) -> None:  # in the child, fork to exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
    if parent is not None and os.getppid() != parent:
        os._exit(1)     # the parent died between fork and prctl: no signal would ever come


def python_module_cmd(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


class ProcessGroup:
    """Start named child processes; stop them all (no orphans) when the block exits."""

    def __init__(self, grace_s: float = 5.0) -> None:
        self.grace_s = grace_s
        self.procs: dict[str, subprocess.Popen] = {}
        self.specs: dict[str, dict[str, Any]] = {}     # how each child was started: `restart` does it again
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
        self.specs[name] = {"cmd": list(cmd), "log_path": log_path, "env": env, "show_stdout": show_stdout}
        log.debug("started %s (pid %d): %s", name, proc.pid, " ".join(cmd))
        return proc

    def restart(self, name: str) -> subprocess.Popen:
        """Start `name` again, as it was started (its old process must have exited)."""
        old = self.procs[name]
        if old.poll() is None:
            raise RuntimeError(f"{name} (pid {old.pid}) is still running")
        return self.start(name, **self.specs[name])

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


def describe_exit(code: int | None) -> str:
    """How a child ended, for a log line: 'exit code 1', 'killed by signal 9 (SIGKILL)'."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown signal"
        return f"killed by signal {-code} ({name})"
    return f"exit code {code}"


@dataclass
class Supervisor:
    """Restarts watched children of a `ProcessGroup` that crash, at most `max_restarts` times each.

    `services` never end on their own (the cloud): any exit is a crash. `jobs` end with exit 0 once their
    work is done (the edge after its rounds): a non-zero exit or a signal is a crash, except the codes in
    `final_codes` (2: bad arguments or config, which a restart would only repeat). Call `check()` every
    ~0.1 s: detection takes one poll, and the restart is logged with the pid, how it ended and the count.
    """

    group: ProcessGroup
    services: Sequence[str] = ()
    jobs: Sequence[str] = ()
    max_restarts: int = 3
    final_codes: Iterable[int] = (2,)
    restarts: dict[str, int] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)     # one per crash: what, when, restarted or not
    ended: dict[str, int] = field(default_factory=dict)           # watched children that ended for good

    def check(self) -> dict[str, int]:
        """Restart every watched child that crashed; return {name: exit code} of those that ended for good
        (a job that finished, or a child that crashed once more than it may be restarted), so far."""
        for name in (*self.services, *self.jobs):
            proc = self.group.procs.get(name)
            code = None if proc is None or name in self.ended else proc.poll()
            if code is None:
                continue
            if name in self.jobs and code == 0:
                self.ended[name] = 0
            elif not self._restart(name, proc.pid, code):
                self.ended[name] = code
        return dict(self.ended)

    def _restart(self, name: str, pid: int, code: int) -> bool:
        done = self.restarts.get(name, 0)
        event = {"process": name, "pid": pid, "exit": describe_exit(code), "code": code, "t": time.time(),
                 "restarted": False}
        self.events.append(event)
        if code in set(self.final_codes) or done >= self.max_restarts:
            why = "a restart would not help" if code in set(self.final_codes) else f"restarted {done} time(s) already"
            log.error("%s (pid %d) died: %s; not restarting it (%s)", name, pid, describe_exit(code), why)
            return False
        t0 = time.monotonic()
        proc = self.group.restart(name)
        self.restarts[name] = done + 1
        event.update(restarted=True, new_pid=proc.pid, restart_s=round(time.monotonic() - t0, 3))
        log.error("%s (pid %d) died: %s; restarted it as pid %d (restart %d of at most %d)", name, pid,
                  describe_exit(code), proc.pid, done + 1, self.max_restarts)
        return True


def install_stop_handlers(stop: threading.Event) -> None:
    """SIGTERM/SIGINT set `stop` so a role process can leave cleanly (say goodbye, close sockets)."""

    def handler(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    # `kill -USR1 <pid>` dumps every thread's stack to stderr: how to see where a stuck role waits
    faulthandler.register(signal.SIGUSR1, all_threads=True)


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections (Linux; the IANA range elsewhere)."""
    try:
        low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 49152, 65535


def _range_free(base: int, count: int, host: str = "127.0.0.1") -> bool:
    socks = []
    try:
        for port in range(base, base + count):
            sock = socket.socket()
            socks.append(sock)
            sock.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        for sock in socks:
            sock.close()


def free_port_base(count: int = 8, host: str = "127.0.0.1") -> int:
    """A base port such that `base .. base+count-1` are free on `host` (an address of this machine) right now.

    The range is drawn below the kernel's ephemeral range when there is room: ports are bound seconds after
    they are chosen, and in between any outgoing connection on the host (ZeroMQ connects included) may be given
    a free port of the ephemeral range as its local port, which then makes the later bind fail."""
    low, _ = _ephemeral_range()
    rng = random.Random()
    if low - count > 10000:
        for _ in range(200):
            base = rng.randrange(10000, low - count)
            if _range_free(base, count, host):
                return base
    for _ in range(200):
        with socket.socket() as s:
            s.bind((host, 0))
            base = s.getsockname()[1]
        if base + count >= 65000:
            continue
        if _range_free(base, count, host):
            return base
    raise RuntimeError(f"no free range of {count} ports on {host}")
