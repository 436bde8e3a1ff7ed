"""Every registered benchmark runs `flad bench NAME --json -- --quick` as a user does from a fresh clone.

Each run is a real `flad` subprocess in an empty working directory (no data/, no runs/): it must exit 0,
print one JSON object with its usual keys, and finish within a minute on the 2-core CI host (the check allows
QUICK_LIMIT_S for a noisy host; test/bench/conftest.py lists the measured seconds in the terminal summary).
Benchmarks measure, tests check behaviour: nothing here asserts a figure's size, only that it is there and sane.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

#: "under 60 s" is the goal; the assertion absorbs CI noise, the summary reports the measured times
QUICK_GOAL_S = 60.0
QUICK_LIMIT_S = 90.0

EXPECTED = {"bus", "sim", "encoder", "swift", "pipeline", "llm", "recovery", "ros", "fleet"}

def _benches() -> list[str]:
    return sorted(ep.name for ep in entry_points(group="flad.benchmarks"))


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_bus(d: dict) -> None:
    for size in ("1KB_image", "1.6MB_pointcloud2"):
        lat = d["latency"][size]
        assert lat["samples"] == 30 and 0 < lat["one_way_p50_ms"] <= lat["one_way_p99_ms"]
        assert d["throughput"][size]["received"] > 0
    assert d["tensor_frames_4MB"]["frames"] == 10 and d["tensor_frames_4MB"]["GB_per_s"] > 0
    assert d["tensor_frames_4MB_no_checksum"]["checksum"] is False
    assert set(d["goals"]) == {"pointcloud2_p50_le_3ms", "tensor_frames_ge_1GBps"}
    assert {"cpus", "pyzmq", "libzmq"} <= set(d["conditions"])
    # the FHDP stage links, plaintext and CURVE: every 4 MB frame through, none refused (the driver's key is
    # the one the peer's inbox allows), a throughput for each and their ratio
    stage = d["stage_link_4MB_curve"]
    assert d["conditions"]["curve"] is True
    for mode in ("plaintext", "curve"):
        link = stage[mode]
        assert link["frames"] == 10 and link["frame_bytes"] == 4 * 1024 * 1024 and link["refused"] == 0, mode
        assert _num(link["MB_per_s"]) and link["MB_per_s"] > 0 and _num(link["sender_seconds"]), mode
    assert _num(stage["curve_over_plaintext"]) and stage["curve_over_plaintext"] > 0
    assert stage["goal"]["measured_ratio"] == stage["curve_over_plaintext"]
    assert isinstance(stage["goal"]["met"], bool) and stage["goal"]["target_ratio"] > 0


def _check_sim(d: dict) -> None:
    assert d["benchmark"] == "sim"
    assert d["sensors"]["frames_per_s"] > 0 and d["sensors"]["towns"] == ["Town01"]
    assert d["physics"]["ticks_per_s"] > 0 and d["physics"]["actors"] == 50
    assert d["loader"]["samples_per_s"] > 0 and d["loader"]["collected"]["source"] == "world"
    assert "frames_per_s>=50" in d["goals_met"] and "pinned_cpu" in d["conditions"]


def _check_encoder(d: dict) -> None:
    assert d["bench"] == "encoder" and d["models"]["tiny"]["params"] > 0
    assert "paper" not in d["models"]                       # --quick skips the paper-size figures
    assert d["tiny_training_speed"]["samples_per_s"] > 0
    assert d["conditions"]["device"]["device"] == d["tiny_training_speed"]["device"]    # says which device ran
    assert d["training_speed_by_device"]["tiny"]["cpu"]["samples_per_s"] > 0
    tr = d["training"]
    assert tr["steps"] >= 1 and _num(tr["first_loss"]) and _num(tr["eval_heldout"]["tl_accuracy"])
    # fresh clone: no data/fleet-200, so synthetic data, and the JSON says which command makes the real one
    assert tr["dataset"]["kind"] == "synthetic" and "flad sim collect" in tr["dataset"]["missing"]
    assert set(tr["baseline"]) >= {"tl_accuracy", "wp_l1", "majority_class"}


def _check_swift(d: dict) -> None:
    assert d["bench"] == "swift" and set(d["per_size"]) == {"3", "5"}
    for m in ("greedy", "dqn", "exact", "swift"):
        assert 0 <= d["overall"][m]["feasible_rate"] <= 1
    assert d["dqn_policy"]["path"] is None                  # --quick never writes the real policy's file
    assert d["real_profile"]["profile"]["used"] is True
    assert {"swift", "swift_cold", "exact"} <= set(d["templates_n9_single_departure"])
    assert "swift_feasible_wherever_exact_is" in d["goals_met"]


def _check_pipeline(d: dict) -> None:
    assert d["bench"] == "pipeline" and d["conditions"]["emulated"] is True
    tp = d["throughput_samples_per_s_emulated"]
    for key in ("fhdp_swift", "standalone_agx", "random_mean", "ideal_bound", "torch_pipelining"):
        assert tp[key] > 0, key
    assert set(d["codecs"]) == {"fp32", "int8"}
    assert set(d["codec_modes"]["modes"]) == {"labels_forward", "u_shaped"}
    assert d["torch_pipelining"]["works"] is True
    assert set(d["goals"]) >= {"fhdp_vs_standalone", "fhdp_vs_torch_pipelining", "int8_byte_reduction"}
    assert set(d["pipeline_floor"]["codecs"]["fp32"]) >= {"any", "useful"} and "codecs" in d["link_floor"]
    assert d["codecs"]["int8"]["bytes_per_sample"] < d["codecs"]["fp32"]["bytes_per_sample"]
    assert set(d["goals"]) >= {"fhdp_vs_random", "fhdp_vs_ideal", "int8_loss_within_2pct", "every_member_vs_standalone",
                               "every_member_prediction_error"}
    assert d["conditions"]["device"]["device"] == "cpu"       # the emulation's default: stages on the host CPU
    # every member's data at once: the fan-in run trained all three members' samples each step
    em = d["every_member"]
    fp32 = em["runs"]["fp32"]
    assert sorted(fp32["sources"]) == ["agx", "n1", "n2"] and fp32["samples_per_step"] == 3 * 6
    assert fp32["sources"][0] == fp32["trunk"][0][0]       # the hub's own data goes first
    assert fp32["samples_per_s"] > 0 and fp32["losses"] and fp32["dropped_steps"] == 0
    assert fp32["predicted_step_s"] > 0 and fp32["flop_model_predicted_step_s"] > 0
    assert em["plans"]["candidates"] > 10 and len(em["plans"]["layer_seconds_per_sample_host"]) == d["layers"]
    assert tp["every_member"]["fp32"] == fp32["samples_per_s"] and em["skipped"] == {}


def _check_llm(d: dict) -> None:
    assert d["bench"] == "llm"
    for name in ("ad_llm", "adm", "general", "constant"):
        assert _num(d["open_loop_held_out"][name]["wp_l1"]), name
    assert d["latency_batch1_inprocess"]["adm"]["p50_ms"] > 0
    assert d["service"]["adm_batch1_one_client"]["requests"] > 0 and d["service"]["batching_speedup"] > 0
    assert d["conditions"]["device"]["type"] in ("cpu", "cuda") and _num(d["service"]["service_p50_ms_batch1"])
    if d["conditions"]["device"]["type"] == "cpu":     # the CPU serves fp32, as before; batch-32 figures are CUDA's
        assert (d["service"]["device"], d["service"]["dtype"]) == ("cpu", "fp32")
        assert d["service"]["service_samples_per_s_batch32"] is None and d["conditions"]["peak_memory_bytes"] is None
    assert set(d["closed_loop"]["agents"]) == {"expert", "encoder_head", "ad_llm", "adm_via_service", "constant"}
    assert all(a["n_routes"] == 1 for a in d["closed_loop"]["agents"].values())
    for a in d["closed_loop"]["agents"].values():      # one route: the interval is the point itself
        assert a["ds_ci95"][0] <= a["ds"] <= a["ds_ci95"][1] and set(a["per_route"][0]) >= {"bag", "status"}
        assert (Path(a["per_route"][0]["bag"]) / "metadata.yaml").is_file()
    assert d["conditions"]["encoder"]["held_out"]["samples"] > 0
    assert d["training_budget"]["ad_llm"]["frames"]["cloud"] > 0
    assert set(d["goals"]) >= {"expert_ds_ge_95", "encoder_head_ds_ge_80", "route_deviations_le_10pct"}
    # fresh clone: no data/fleet, so --quick collected a small one into its run folder (not into ./data)
    data = d["conditions"]["data"]
    assert data["collected"]["samples"] > 0 and str(Path(data["root"])).startswith("runs")
    assert set(d["goals"]) >= {"student_l1_le_1.15x_teacher", "batching_ge_3x_throughput_8_clients"}
    assert 0 < d["lora"]["trainable_fraction"] < 1


def _check_recovery(d: dict) -> None:
    assert d["benchmark"] == "recovery"
    q = d["quick_recovery"]
    assert q["n"] == 1 and q["failed"] == 0, q["samples"]
    assert q["total_s"]["p50"] > 0 and q["total_excl_detection_s"]["p50"] <= q["total_s"]["p50"]
    assert "relaunch" not in d and "torchrun_elastic" not in d   # --quick: no baselines
    assert "recovery_p50_excl_detection_s" in d["goals"] and d["bytes"]["model_bytes"] > 0


def _check_ros(d: dict) -> None:
    assert d["benchmark"] == "ros"
    z = d["results"]["zmq"]
    assert z["e2e_ms"]["n"] == 5 and z["lost_frames"] == 0
    assert set(d["exit_codes"]) >= {"zmq-encoder", "zmq-waypoint", "zmq-controller"}
    assert all(c == 0 for c in d["exit_codes"].values()), d["exit_codes"]
    try:
        import rclpy  # noqa: F401
    except ImportError:   # the main tier: --quick says it ran ZeroMQ only
        assert "ros" not in d["results"] and "rclpy" in d["skipped_transports"]["ros"]


def _check_fleet(d: dict) -> None:
    assert d["bench"] == "fleet" and [p["vehicles"] for p in d["planning"]] == [50, 200]
    for p in d["planning"]:
        assert p["in_coverage"] == p["vehicles"] and p["clusters"] >= 1 and p["essential_pipelines"] >= p["clusters"]
        assert p["sufficient"] + p["limited"] + p["ineligible"] == p["in_coverage"]
        assert _num(p["seconds"]["total"]) and p["seconds"]["total"] > 0
    mem = d["memory"]
    assert [r["vehicles"] for r in mem["runs"]] == [50, 200] and _num(mem["per_idle_vehicle_MB"])
    assert d["goals"]["planning_le_1s_at_1000"]["met"] is None      # 1,000 vehicles only without --quick
    assert d["goals"]["idle_vehicle_le_5MB"]["met"] in (True, False)


CHECKS = {"fleet": _check_fleet, "bus": _check_bus, "sim": _check_sim, "encoder": _check_encoder, "swift": _check_swift,
          "pipeline": _check_pipeline, "llm": _check_llm, "recovery": _check_recovery, "ros": _check_ros}


def test_every_benchmark_has_a_quick_check():
    assert set(_benches()) == EXPECTED == set(CHECKS)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", _benches())
def test_quick_bench_from_a_fresh_clone(name: str, tmp_path: Path, record_property):
    (tmp_path / "tmp").mkdir()      # what a bench leaves in its temp folders stays with this test
    env = {**os.environ, "FLAD_SWIFT_POLICY_DIR": str(tmp_path / "policy"), "FLAD_CACHE": str(tmp_path / "cache"),
           "TMPDIR": str(tmp_path / "tmp")}
    env.pop("FLAD_RUNS_DIR", None)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "flad_core.cli", "bench", name, "--json", "--", "--quick"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    secs = time.monotonic() - t0
    record_property("quick_bench_seconds", (name, round(secs, 1)))   # listed in the terminal summary (conftest)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "Traceback" not in r.stderr, r.stderr[-4000:]
    d = json.loads(r.stdout)                       # exactly one JSON object on stdout
    assert isinstance(d, dict)
    if name != "recovery":                         # (recovery's JSON is another engineer's; its --quick is not marked)
        assert d.get("quick"), sorted(d)
    CHECKS[name](d)
    assert not (tmp_path / "data").exists(), "a --quick run must not write ./data"
    assert secs < QUICK_LIMIT_S, f"{name} --quick took {secs:.0f} s (goal < {QUICK_GOAL_S:.0f} s)"
