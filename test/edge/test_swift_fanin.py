"""SWIFT's fan-in planner: the step-time model's arithmetic and the plans it enumerates."""

from __future__ import annotations

import pytest

from flad_edge.swift.fanin import Device, flop_layer_seconds, plan_fanin, predict

# 1 MB/s links: 8 Mb/s
SLOW = Device("nano", tflops=1.0, link_mbps=8.0)
FAST = Device("agx", tflops=4.0, link_mbps=16.0)
DEVICES = {d.id: d for d in (SLOW, FAST)}
LAYER_S = [0.1, 0.2, 0.3, 0.4]                      # seconds per sample on the 1-TFLOPS reference
TRAFFIC = {c: {"forward": 1e5 * c, "backward": 5e4 * c} for c in range(1, 4)}   # bytes per sample at each cut


def test_one_member_no_links_is_pure_compute():
    step, why = predict({"agx": FAST}, LAYER_S, 1.0, TRAFFIC, 0.0, ["agx"], [("agx", 2, 4)], batch=4, n_micro=2)
    compute = 4 * sum(LAYER_S) / 4.0                   # 4 samples of the whole model at 4 TFLOPS
    fill = 2 * (sum(LAYER_S[:2]) + sum(LAYER_S[2:])) / 4.0
    assert why["radio_s"]["agx"] == 0 and why["replica_reduction_s"] == 0
    assert step == pytest.approx(compute + fill)
    assert why["bottleneck"] == "agx"


def test_remote_source_charges_both_radios_and_the_reduction():
    # nano replicates [0, 1) on its 4 samples and sends them to the hub (agx), which trains [1, 4) on all 8
    step, why = predict(DEVICES, LAYER_S, 1.0, TRAFFIC, 2e5, ["nano", "agx"], [("agx", 1, 4)], batch=4, n_micro=2)
    per_sample = TRAFFIC[1]["forward"] + TRAFFIC[1]["backward"]
    nano_bytes = 4 * per_sample + 2 * 2e5
    assert why["radio_s"]["nano"] == pytest.approx(nano_bytes / 1e6)
    assert why["radio_s"]["agx"] == pytest.approx(nano_bytes / 2e6)
    assert why["compute_s"]["nano"] == pytest.approx(4 * 0.1)
    assert why["compute_s"]["agx"] == pytest.approx((4 * 0.1 + 8 * 0.9) / 4.0)
    assert why["replica_reduction_s"] == pytest.approx(2 * 2e5 / 2e6)
    assert why["bottleneck"] == "agx" and why["samples_per_step"] == 8
    assert step > why["bottleneck_s"] + why["replica_reduction_s"]


def test_plans_cover_every_cut_and_trunk_and_sort_by_throughput():
    traffic = {"fp32": TRAFFIC, "int8": {c: {k: v / 4 for k, v in t.items()} for c, t in TRAFFIC.items()}}
    plans = plan_fanin([SLOW, FAST], LAYER_S, 1.0, traffic, [0, 1e4, 2e4, 3e4], min_first_end=1, batch=4,
                       n_micro=2, codecs=("fp32", "int8"))
    # cuts 1..3; one-stage trunks on either device (2), two-stage trunks in either order with an inner cut
    per_codec = 3 * 2 + 2 * (2 + 1)
    assert len(plans) == 2 * per_codec
    rates = [p.samples_per_step / p.step_s for p in plans]
    assert rates == sorted(rates, reverse=True)
    assert all(p.trunk[0][1] >= 1 and p.trunk[-1][2] == 4 for p in plans)
    # int8 moves a quarter of the bytes: on these slow links the best plan uses it
    assert plans[0].codec == "int8"
    best_fp32 = next(p for p in plans if p.codec == "fp32")
    assert best_fp32.to_json()["predicted_samples_per_s"] == pytest.approx(8 / best_fp32.step_s)


def test_flop_model_is_three_times_forward_flops_at_peak():
    layer_s, ref = flop_layer_seconds([1e12, 2e12])
    assert ref == 1.0 and layer_s == pytest.approx([3.0, 6.0])
