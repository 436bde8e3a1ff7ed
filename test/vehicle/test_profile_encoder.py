"""The per-layer profile: SWIFT's JSON format, per-layer sums equal whole-model figures."""

from __future__ import annotations

import json

import pytest
import torch
from _encoder_testlib import tiny_batch, tiny_model
from torch.utils.flop_counter import FlopCounterMode

from flad_core.cli import main as flad_main
from flad_vehicle.encoder.partition import build_graph
from flad_vehicle.encoder.profile import UNITS, profile_model, swift_profile


@pytest.fixture(scope="module")
def prof():
    m = tiny_model()
    return m, profile_model(m, tiny_batch(2), measure=True)


def test_format_and_order(prof):
    m, p = prof
    g = build_graph(m)
    assert [r["name"] for r in p["layers"]] == g.names
    for r in p["layers"]:
        assert set(r) == {"name", "flops", "param_bytes", "activation_bytes", "mem_bytes"}
        assert all(isinstance(r[k], int) and r[k] >= 0 for k in r if k != "name")
    assert set(p["units"]) == set(UNITS)
    s = swift_profile(p)
    assert json.loads(json.dumps(s))["layers"] == p["layers"]


def test_sums_equal_whole_model(prof):
    m, p = prof
    t, w = p["totals"], p["whole_model"]
    B = 2
    with FlopCounterMode(display=False) as fc:
        m.forward_train(tiny_batch(B))
    assert t["flops"] == w["flops"] == fc.get_total_flops() // B
    assert t["param_bytes"] == w["param_bytes"] == sum(q.numel() * q.element_size() for q in m.parameters())
    assert t["saved_activation_bytes"] == w["saved_activation_bytes"]
    assert abs(t["mem_bytes"] - w["mem_bytes_estimate"]) <= len(p["layers"])   # per-layer rounding only
    assert t["params"] == sum(q.numel() for q in m.parameters())


def test_activation_bytes_are_the_live_tensors(prof):
    m, p = prof
    g = build_graph(m)
    b = tiny_batch(2)
    with torch.no_grad():
        out = m.forward_train(b)
    # after the last layer, the live tensors are exactly the model outputs
    last = sum(v.numel() * v.element_size() for v in out.values()) / 2
    assert p["layers"][-1]["activation_bytes"] == round(last)
    assert p["min_first_stage_end"] == g.min_first_end
    assert p["input_bytes"] > 128 * 128 * 3 + 16384 * 16      # raw images + LiDAR per sample
    assert p["measured"]["train_step_peak_bytes"] > p["totals"]["param_bytes"]
    assert all(d["measured_peak_bytes"] >= 0 for d in p["layer_details"])


def test_profile_cli(tmp_path):
    out = tmp_path / "profile.json"
    assert flad_main(["vehicle", "profile", "--config", "tiny", "--out", str(out), "--batch-size", "2",
                      "--no-measure"]) == 0
    data = json.loads(out.read_text())
    assert data["batch_size"] == 2 and len(data["layers"]) == 23 and data["graph_method"] == "fx"
