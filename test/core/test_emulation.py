"""Emulation primitives: link shaping holds its rate, dilation keeps device ratios, memory caps bite."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from flad_core.emulation import ComputeDilation, MemoryCapError, MemoryGuard, Radio, TokenBucket, host_tflops
from flad_core.fleet import LINK_SETTINGS, PAPER_PROFILES, link_mbps


def test_token_bucket_holds_rate():
    bucket = TokenBucket(rate_bytes_per_s=2_000_000, burst_bytes=100_000)
    t0 = time.monotonic()
    for _ in range(20):
        bucket.consume(50_000)       # 1 MB in total
    elapsed = time.monotonic() - t0
    # (1 MB - 100 kB burst) at 2 MB/s = 0.45 s; sleeping may overshoot, never undershoot
    assert 0.43 <= elapsed < 1.5
    assert bucket.sent_bytes == 1_000_000


def test_token_bucket_from_mbps_and_unlimited():
    assert TokenBucket.from_mbps(80).rate == pytest.approx(10e6)
    assert TokenBucket.from_mbps(80, time_scale=0.5).rate == pytest.approx(20e6)
    free = TokenBucket(0)
    t0 = time.monotonic()
    free.consume(10**9)
    assert time.monotonic() - t0 < 0.05


def test_dilation_preserves_device_ratios():
    nano = ComputeDilation(device_tflops=0.472, time_scale=0.01, host_tflops_ref=0.1)
    agx = ComputeDilation(device_tflops=3.85, time_scale=0.01, host_tflops_ref=0.1)
    assert nano.factor() / agx.factor() == pytest.approx(3.85 / 0.472)
    t0 = time.monotonic()
    target = ComputeDilation(device_tflops=0.05, time_scale=1.0, host_tflops_ref=0.1).stretch(0.05)
    assert target == pytest.approx(0.1) and time.monotonic() - t0 >= 0.049
    assert ComputeDilation(device_tflops=10, host_tflops_ref=0.1).stretch(0.02) == 0.02  # cannot speed up


def test_host_calibration_is_plausible():
    assert 1e-4 < host_tflops() < 10


def test_memory_guard_catches_growth():
    guard = MemoryGuard(cap_bytes=50 * 2**20, label="jetson_nano")
    guard.check()
    hog = np.ones(120 * 2**20 // 8)  # 120 MiB, touched
    with pytest.raises(MemoryCapError, match="jetson_nano"):
        guard.check()
    del hog


@pytest.mark.parametrize(("kwargs", "bad"), [
    ({"link_mbps": 8, "duplex": "simplex"}, "'simplex'"),
    ({"link_mbps": -1}, "-1"),
    ({"link_mbps": float("nan")}, "nan"),
    ({"link_mbps": 8, "time_scale": 0}, "time_scale"),
    ({"link_mbps": 8, "time_scale": -0.5}, "-0.5"),
])
def test_radio_rejects_bad_arguments(kwargs, bad):
    with pytest.raises(ValueError, match=re.escape(bad)):
        Radio(**kwargs)


def test_radio_half_duplex_shares_one_bucket_full_duplex_two():
    half = Radio(link_mbps=8)
    assert half.duplex == "half"
    assert half.send_bucket is half.recv_bucket
    assert half.send_bucket.rate == pytest.approx(1e6)
    full = Radio(link_mbps=8, time_scale=0.5, duplex="full")
    assert full.send_bucket is not full.recv_bucket
    assert full.send_bucket.rate == full.recv_bucket.rate == pytest.approx(2e6)   # each direction at full rate
    free = Radio(link_mbps=0)
    assert free.send_bucket.rate == 0
    t0 = time.monotonic()
    free.send_bucket.consume(10**9)
    assert time.monotonic() - t0 < 0.05


def test_link_settings():
    assert LINK_SETTINGS["table1"] == {name: p.link_mbps for name, p in PAPER_PROFILES.items()}
    assert link_mbps("jetson_nano") == 50.0 and link_mbps("jetson_nx") == 50.0 and link_mbps("jetson_agx") == 100.0
    assert link_mbps("jetson_nano", "measured") == 14.0
    assert link_mbps("jetson_nx", "measured") == 14.0
    assert link_mbps("jetson_agx", "measured") == 22.0
    with pytest.raises(ValueError, match=r"'lab'.*measured, table1"):
        link_mbps("jetson_nano", "lab")
    with pytest.raises(ValueError, match=r"'jetson_tx2'.*jetson_agx, jetson_nano, jetson_nx"):
        link_mbps("jetson_tx2", "measured")
