"""Honest emulation of heterogeneous devices and links on one host (docs/architecture.md, "Emulated and real").

* `TokenBucket` shapes a link: every send waits until its bytes fit the profile's Mb/s.
* `Radio` is one device's radio budget, shared by all of its links: a vehicle with two neighbours
  splits its Mb/s between them instead of getting it twice. Half duplex (one channel, like 802.11 or
  C-V2X) charges sends and receives to one bucket; full duplex gives each direction the full rate.
* `ComputeDilation` stretches measured compute time to what the emulated device would take:
  target = measured × (host TFLOPS / device TFLOPS) × time_scale, where the host's TFLOPS is
  calibrated once (a float32 matmul on one thread). `time_scale` < 1 shrinks every device alike so
  a 2-core host can keep several emulated devices busy; ratios between devices are preserved.
* `MemoryGuard` enforces a memory cap from the profile: it checks the process's resident memory
  growth since the guard started and raises when the emulated device would have run out.

Figures that depend on any of this must be labelled "emulated" in reports.
"""

from __future__ import annotations

import functools
import logging
import math
import resource
import threading
import time
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


class TokenBucket:
    """Rate limiter in bytes/s with a burst allowance; thread-safe; `rate <= 0` means unlimited."""

    def __init__(self, rate_bytes_per_s: float, burst_bytes: float | None = None) -> None:
        self.rate = float(rate_bytes_per_s)
        self.burst = float(burst_bytes if burst_bytes is not None else max(self.rate * 0.01, 65536.0))
        self._tokens = self.burst
        self._last = time.monotonic()
        self._lock = threading.Lock()
        self.waited_s = 0.0
        self.sent_bytes = 0

    @classmethod
    def from_mbps(cls, link_mbps: float, time_scale: float = 1.0) -> TokenBucket:
        """A bucket for a link of `link_mbps` megabits/s, slowed by `time_scale` like compute is."""
        rate = link_mbps * 1e6 / 8 / time_scale if link_mbps > 0 else 0.0
        return cls(rate)

    def reserve(self, nbytes: int) -> float:
        """Charge `nbytes` now without waiting; return the seconds until they have gone through (0: at once).

        For traffic that takes air time in the background, such as a frame being received while the vehicle
        computes: the caller holds the frame back until then, and later sends queue behind it."""
        with self._lock:    # a shared bucket (`Radio`) is charged from several threads: keep its counters exact
            self.sent_bytes += nbytes
            if self.rate <= 0:
                return 0.0
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= nbytes
            return -self._tokens / self.rate if self._tokens < 0 else 0.0

    def consume(self, nbytes: int) -> float:
        """Block until `nbytes` may be sent; return the seconds waited."""
        wait = self.reserve(nbytes)
        if wait > 0:
            time.sleep(wait)
            with self._lock:
                self.waited_s += wait
        return wait


class Radio:
    """One device's radio: the link budget every one of its links shares.

    A vehicle talks to all its neighbours over one radio, so its links must draw on one budget rather
    than each getting the full rate. `duplex="half"` (one shared channel, like 802.11 or C-V2X) charges
    every send and every receive to one bucket; `duplex="full"` gives sends and receives a bucket each,
    both at the full rate. `link_mbps == 0` means unlimited; `time_scale` slows the rate like compute.
    """

    DUPLEX_MODES = ("half", "full")

    def __init__(self, link_mbps: float, time_scale: float = 1.0, duplex: str = "half") -> None:
        if duplex not in self.DUPLEX_MODES:
            raise ValueError(f"duplex must be one of {', '.join(self.DUPLEX_MODES)}, got {duplex!r}")
        if not math.isfinite(link_mbps) or link_mbps < 0:
            raise ValueError(f"link_mbps must be a finite number >= 0 (0: unlimited), got {link_mbps!r}")
        if not math.isfinite(time_scale) or time_scale <= 0:
            raise ValueError(f"time_scale must be a finite number > 0, got {time_scale!r}")
        self.link_mbps = float(link_mbps)
        self.time_scale = float(time_scale)
        self.duplex = duplex
        self._send = TokenBucket.from_mbps(self.link_mbps, self.time_scale)
        self._recv = self._send if duplex == "half" else TokenBucket.from_mbps(self.link_mbps, self.time_scale)

    @property
    def send_bucket(self) -> TokenBucket:
        """The bucket every outbound link of the device charges."""
        return self._send

    @property
    def recv_bucket(self) -> TokenBucket:
        """The bucket the device's inbox charges (the send bucket itself when half duplex)."""
        return self._recv

    def __repr__(self) -> str:
        return f"Radio(link_mbps={self.link_mbps:g}, time_scale={self.time_scale:g}, duplex={self.duplex!r})"


@functools.lru_cache(maxsize=1)
def host_tflops(size: int = 512, repeats: int = 8) -> float:
    """Achieved float32 matmul TFLOPS of this host on one thread (the dilation reference)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return 2 * size**3 / best / 1e12


@dataclass
class ComputeDilation:
    """Stretch compute time from this host to an emulated device."""

    device_tflops: float
    time_scale: float = 1.0
    host_tflops_ref: float | None = None   # None: calibrate on first use

    def factor(self) -> float:
        host = self.host_tflops_ref if self.host_tflops_ref is not None else host_tflops()
        return host / self.device_tflops * self.time_scale

    def stretch(self, measured_s: float) -> float:
        """Sleep so that `measured_s` of real compute lasts as long as on the device; return the target."""
        target = measured_s * self.factor()
        extra = target - measured_s
        if extra > 0:
            time.sleep(extra)
        return max(target, measured_s)


class MemoryCapError(MemoryError):
    """The emulated device ran out of memory."""


class MemoryGuard:
    """Raise when this process has grown by more than `cap_bytes` since the guard was created.

    Reads the current resident set size at each `check()` (call it where memory peaks: after the
    forward pass of the largest micro-batch); `peak_used` keeps the largest growth seen.
    """

    def __init__(self, cap_bytes: int, label: str = "device") -> None:
        self.cap_bytes = cap_bytes
        self.label = label
        self.baseline = self.rss()
        self.peak_used = 0

    @staticmethod
    def rss() -> int:
        """Current resident set size in bytes (/proc on Linux; peak RSS elsewhere)."""
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * resource.getpagesize()
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def used(self) -> int:
        used = max(0, self.rss() - self.baseline)
        self.peak_used = max(self.peak_used, used)
        return used

    def check(self) -> int:
        used = self.used()
        if used > self.cap_bytes:
            raise MemoryCapError(f"{self.label}: peak memory grew by {used / 2**20:.1f} MiB, over the emulated "
                                 f"device's {self.cap_bytes / 2**20:.1f} MiB")
        return used
