"""Harness logic of `flad bench pipeline` (no timed assertions: benchmarks measure, tests check behaviour)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from flad_bench import pipeline as bp
from flad_bench.pipeline_common import summarize
from flad_core import tensorcodec, tensorframe
from flad_edge.swift.bounds import ideal_step_s


def test_ideal_bound_is_fill_plus_micro_batches_times_slowest_plus_drain():
    # per micro-batch: 0.25, 0.5, 0.25 -> fill+drain of one micro-batch (1.0) + 3 more at the slowest (1.5)
    assert ideal_step_s([1.0, 2.0, 1.0], 4) == pytest.approx(2.5)
    assert ideal_step_s([3.0], 1) == pytest.approx(3.0)          # one stage, one micro-batch: no pipelining
    assert ideal_step_s([1.0, 1.0], 1) == pytest.approx(2.0)     # one micro-batch: stages run in sequence
    # many micro-batches: the slowest stage dominates
    assert ideal_step_s([1.0, 2.0], 1000) == pytest.approx(2.0, rel=2e-3)
    with pytest.raises(ValueError):
        ideal_step_s([], 2)


def test_random_partitions_are_valid_and_seeded():
    vehicles = ["n1", "n2", "agx"]
    seen = set()
    for seed in range(200):
        p = bp.random_partition(random.Random(seed), vehicles, 22, 3)
        assert bp.valid_partition(p, 22, 3), p
        assert sorted(v for v, _, _ in p) == sorted(vehicles)
        assert p[0][2] >= 3                        # the raw-input layers stay with the data owner
        seen.add(tuple(p))
    assert len(seen) > 50                          # really random
    assert bp.random_partition(random.Random(5), vehicles, 22, 3) == bp.random_partition(random.Random(5), vehicles,
                                                                                           22, 3)
    assert not bp.valid_partition([("a", 0, 2), ("b", 2, 22)], 22, 3)   # first stage ends before the raw readers
    assert not bp.valid_partition([("a", 0, 5), ("b", 6, 22)], 22, 3)   # gap
    assert not bp.valid_partition([("a", 0, 5), ("a", 5, 22)], 22, 3)   # a vehicle twice
    with pytest.raises(ValueError):
        bp.random_partition(random.Random(0), vehicles, 4, 3)


def _frame_bytes(tensors, codec):
    frames = tensorframe.pack(tensorcodec.encode(tensors, codec), kind=tensorframe.KIND_ACTIVATION, step=0,
                              micro_batch=0, stage=0)
    return sum(memoryview(f).nbytes for f in frames)


def test_codec_byte_ratios_on_wide_activations():
    torch.manual_seed(0)
    acts = {"dec.2": torch.randn(8, 31, 64), "pred.bev": torch.randn(8, 50, 50)}
    fp32 = _frame_bytes(acts, "fp32")
    for codec in ("fp16", "bf16"):
        assert fp32 / _frame_bytes(acts, codec) == pytest.approx(2.0, rel=0.05)
    assert fp32 / _frame_bytes(acts, "int8") > 3.5
    # integer labels are never quantised: fp32 sends them raw, int8 deflates them (a mostly empty BEV label is a
    # few dozen bytes), so they no longer dilute int8's ratio; they still arrive bit-exact
    bev = torch.zeros(8, 50, 50, dtype=torch.uint8)
    bev[:, 10:14, 20:23] = 1
    labels = {"tl_state": torch.arange(8, dtype=torch.int64) % 4, "bev": bev}
    with_labels = {**acts, **labels}
    assert _frame_bytes(with_labels, "fp32") - fp32 > bev.numel()
    assert _frame_bytes(with_labels, "int8") - _frame_bytes(acts, "int8") < bev.numel() // 20
    _, wire = tensorframe.unpack(tensorframe.pack(tensorcodec.encode(with_labels, "int8"),
                                                  kind=tensorframe.KIND_ACTIVATION, step=0, micro_batch=0, stage=0))
    back = tensorcodec.decode(wire)
    assert all(torch.equal(back[k], v) for k, v in labels.items())


def test_summarize_turns_step_records_into_emulated_throughput():
    def rec(index, vehicle, t0s, loss=None):
        return {"idle": False, "index": index, "vehicle": vehicle, "range": [index, index + 1],
                "steps": [{"t0": t0, "t1": t0 + 1.0, "loss": loss, "compute_s": 0.1, "emulated_compute_s": 0.4,
                           "wait_s": 0.0, "bytes_sent": 100} for t0 in t0s]}

    results = [rec(1, "b", [0.1, 1.1, 2.1], loss=2.0), rec(0, "a", [0.0, 1.0, 2.0]), {"idle": True}]
    out = summarize(results, batch_size=8, warmup=1, time_scale=2.0)
    # timed steps 1..2: wall from 1.0 to 3.1 = 2.1 s -> 1.05 emulated s for 16 samples
    assert out["samples_per_s"] == pytest.approx(16 / 1.05)
    assert out["stages"] == [["a", 0, 1], ["b", 1, 2]]
    assert out["stage_compute_s"] == pytest.approx([0.2, 0.2])      # 0.4 s of dilated wall = 0.2 emulated s
    assert out["bytes_per_sample"] == pytest.approx(600 / 24)
    assert out["final_loss"] == pytest.approx(2.0)


def test_auto_time_scale_makes_the_fastest_device_slower_than_the_host():
    ts = bp.auto_time_scale(host_tflops=0.1, fastest_tflops=3.85, factor=2.0)
    assert 0.1 / 3.85 * ts == pytest.approx(2.0)


def test_summarize_takes_the_loss_from_the_data_owner_of_a_u_shaped_pipeline():
    def rec(index, losses, link):
        return {"idle": False, "index": index, "vehicle": f"v{index}", "range": [index, index + 1],
                "link_bytes_per_step": link,
                "steps": [{"t0": float(i), "t1": i + 1.0, "loss": loss, "compute_s": 0.1, "emulated_compute_s": 0.1,
                           "wait_s": 0.0, "bytes_sent": 10} for i, loss in enumerate(losses)]}

    results = [rec(0, [3.0, 2.0], {"next": 5.0, "turn": 2.0, "turn_to": 1}),
               rec(1, [None, None], {"prev": 4.0, "turn": 2.0, "turn_to": 0})]
    out = summarize(results, batch_size=2, warmup=0, time_scale=1.0)
    assert out["losses"] == [3.0, 2.0] and out["final_loss"] == pytest.approx(2.5)
    assert sorted(out["link_bytes_per_step"]) == [[0, 1, 2.0], [0, 1, 5.0], [1, 0, 2.0], [1, 0, 4.0]]


def _codec_run(bytes_per_sample, loss):
    return {"bytes_per_sample": bytes_per_sample, "final_loss": loss, "losses": [loss], "samples_per_s": 1.0,
            "stages": [["a", 0, 1]], "link_bytes_per_step": []}


def test_int8_goal_is_judged_on_the_mode_with_less_traffic():
    tables = {"labels_forward": bp.codec_table({"fp32": _codec_run(1000.0, 1.0), "int8": _codec_run(300.0, 1.001)}),
              "u_shaped": bp.codec_table({"fp32": _codec_run(1600.0, 1.0), "int8": _codec_run(400.0, 1.03)}),
              "labels_forward_same_cuts": bp.codec_table({"fp32": _codec_run(100.0, 1.0),
                                                          "int8": _codec_run(10.0, 1.0)})}
    modes = bp.codec_modes(tables)
    assert modes["less_traffic"] == "labels_forward"     # the diagnostic same-cuts mode is never the pick
    assert modes["labels_forward_over_u_bytes"]["int8"] == pytest.approx(0.75)
    goals = bp.codec_goals(modes)
    assert goals["int8_byte_reduction"] == {"value": pytest.approx(3.3333, abs=1e-4), "target": 3.5, "met": False,
                                            "mode": "labels_forward"}
    assert goals["int8_loss_within_2pct"]["met"] is True
    assert goals["int8_byte_reduction_u_shaped"]["met"] is True
    assert goals["int8_loss_within_2pct_u_shaped"]["met"] is False
    # with less U-shaped traffic, the goal follows the U-shaped mode
    tables["u_shaped"] = bp.codec_table({"fp32": _codec_run(800.0, 1.0), "int8": _codec_run(200.0, 1.0)})
    goals = bp.codec_goals(bp.codec_modes(tables))
    assert goals["int8_byte_reduction"]["mode"] == "u_shaped" and goals["int8_byte_reduction"]["met"] is True


def test_codecs_only_run_reports_both_modes(capsys):
    code = bp.main(["--quick", "--json", "--only", "codecs", "--codecs", "fp32", "int8"])
    data = json.loads(capsys.readouterr().out.strip())
    assert code == 0 and data["only"] == "codecs"
    assert "throughput_samples_per_s_emulated" not in data and "standalone" not in data
    modes = data["codec_modes"]["modes"]
    assert set(modes) == {"labels_forward", "u_shaped", "labels_forward_same_cuts"}
    for table in modes.values():
        assert set(table) == {"fp32", "int8"}
        for row in table.values():
            assert row["bytes_per_sample"] > 0 and row["final_loss"] > 0
    # U-shaped: the trunk ends where the heads start, and the data owner's stage sends over the turnaround
    u_stages = modes["u_shaped"]["fp32"]["stages"]
    assert u_stages[-1][2] < data["layers"]
    assert [s[:2] for s in modes["labels_forward_same_cuts"]["fp32"]["stages"][:-1]] == [s[:2] for s in u_stages[:-1]]
    assert data["codec_modes"]["less_traffic"] in ("labels_forward", "u_shaped")
    assert data["goals"]["int8_byte_reduction"]["mode"] == data["codec_modes"]["less_traffic"]


def test_cut_traffic_counts_live_tensors_and_keeps_labels_exact():
    from flad_edge.swift.bounds import cut_traffic

    rows = cut_traffic("tiny", "synthetic", "v000", ("fp32", "int8"))
    by_layer = {r["layer"]: r for r in rows}
    # before the loss only the outputs and labels cross: pred.bev [50,50] f32, pred.tl [4], pred.waypoints [5,2],
    # the LLM features [31,64] f32, and the labels bev [50,50] u8, tl_state i64, waypoints [5,2] f32; gradients
    # come back for the predictions only (the loss does not read the features)
    loss = by_layer["loss"]
    assert loss["forward"]["fp32"] == 4 * (2500 + 4 + 10 + 31 * 64) + 2500 + 8 + 40
    assert loss["backward"]["fp32"] == 4 * (2500 + 4 + 10)
    # before the feature head the decoder output crosses too, but only the feature head reads it there: no gradient
    assert by_layer["features"]["backward"]["fp32"] == loss["backward"]["fp32"]
    assert by_layer["wp_head"]["backward"]["fp32"] > loss["backward"]["fp32"] + 4 * 64 * 31
    assert not loss["trained_layers_after"] and by_layer["wp_head"]["trained_layers_after"]
    # int8 shrinks the predictions (one byte a value + a float32 scale per last-dim channel); the labels travel
    # exact, the BEV label deflated (the two small ones raw: packing them would not pay)
    assert loss["labels"]["raw"] == 2500 + 8 + 40
    assert 8 + 40 < loss["labels"]["packed"] < 2500 // 4 + 8 + 40
    assert loss["forward"]["int8"] == ((2500 + 50 * 4) + (4 + 4 * 4) + (10 + 2 * 4) + (31 * 64 + 64 * 4)
                                       + loss["labels"]["packed"])


def test_link_floor_arithmetic():
    from flad_bench.pipeline import BenchConfig
    from flad_edge.swift.bounds import link_floor

    traffic = [{"cut_before": 5, "layer": "a", "trained_layers_after": True,
                "forward": {"fp32": 1_000_000}, "backward": {"fp32": 800_000}},
               {"cut_before": 6, "layer": "b", "trained_layers_after": True,
                "forward": {"fp32": 500_000}, "backward": {"fp32": 600_000}},
               {"cut_before": 7, "layer": "loss", "trained_layers_after": False,    # cheaper but useless
                "forward": {"fp32": 10}, "backward": {"fp32": 10}}]
    cfg = BenchConfig(codecs=("fp32",))        # default cluster: 2 Nanos (50 Mb/s) and an AGX (100 Mb/s)
    f = link_floor(cfg.cluster, cfg.codecs, traffic, standalone_sps=20.0)["codecs"]["fp32"]
    assert f["cheapest_cut_before"] == 6
    assert f["link_s_per_sample_fastest"] == pytest.approx(600_000 * 8 / 100e6)
    assert f["max_pipeline_vs_standalone_fastest_link"] == pytest.approx(0.05 / 0.048)
    assert f["max_pipeline_vs_standalone_slowest_link"] == pytest.approx(0.05 / 0.096)


def test_noniid_seed_summary_arithmetic():
    from flad_bench.pipeline_noniid import summarize_seeds

    def res(fhdp_tl, hdp_tl, fhdp_wp, hdp_wp):
        r = {"fhdp": {"tl_accuracy": fhdp_tl, "wp_l1": fhdp_wp, "loss": 0.3},
             "hdp": {"tl_accuracy": hdp_tl, "wp_l1": hdp_wp, "loss": 1.5},
             "central": {"tl_accuracy": 0.8, "wp_l1": 0.6, "loss": 0.2},
             "majority_baseline": {"tl_accuracy": 0.55}}
        return {"results": r}

    s = summarize_seeds({7: res(0.7, 0.5, 0.7, 1.1), 8: res(0.5, 0.6, 0.6, 0.7), 9: {"error": "boom"}})
    assert "fhdp_fanin" not in s and "goals" not in s         # a study without the fan-in run has no fan-in goals
    assert s["seeds"] == [7, 8] and s["failed_seeds"] == [9]
    assert s["fhdp"]["tl_accuracy"] == {"mean": 0.6, "sd": pytest.approx(0.1414, abs=1e-4), "min": 0.5, "max": 0.7}
    d = s["fhdp_minus_hdp"]
    assert d["tl_accuracy"]["mean"] == pytest.approx(0.05) and d["tl_accuracy"]["fhdp_better_in"] == "1/2"
    assert d["wp_l1"]["fhdp_better_in"] == "2/2" and d["loss"]["mean"] == pytest.approx(-1.2)
    assert s["fhdp_minus_central"]["tl_accuracy"]["fhdp_better_in"] == "0/2"
    with pytest.raises(ValueError, match="no seed"):
        summarize_seeds({1: {"error": "x"}})
    # with the fan-in schedule: its own differences, and the goals (>= HDP in every seed, <= 3 points
    # behind centralised on average)
    a, b = res(0.7, 0.5, 0.7, 1.1), res(0.5, 0.6, 0.6, 0.7)
    a["results"]["fhdp_fanin"] = {"tl_accuracy": 0.79, "wp_l1": 0.6, "loss": 0.25}
    b["results"]["fhdp_fanin"] = {"tl_accuracy": 0.75, "wp_l1": 0.6, "loss": 0.25}
    s = summarize_seeds({7: a, 8: b})
    assert s["fhdp_fanin_minus_hdp"]["tl_accuracy"]["mean"] == pytest.approx(0.22)
    assert s["fhdp_fanin_minus_central"]["tl_accuracy"]["mean"] == pytest.approx(-0.03)
    assert s["goals"]["fanin_tl_ge_hdp_every_seed"] == {"value": [0.29, 0.15], "met": True}
    assert s["goals"]["fanin_tl_within_3_points_of_central"]["met"] is True
    b["results"]["fhdp_fanin"]["tl_accuracy"] = 0.55                # behind HDP in seed 8
    g = summarize_seeds({7: a, 8: b})["goals"]
    assert g["fanin_tl_ge_hdp_every_seed"]["met"] is False and g["fanin_tl_within_3_points_of_central"]["met"] is False


def test_noniid_study_runs_per_seed_over_real_processes(tmp_path):
    """`--noniid-only --quick --noniid-seeds 1 2`: FHDP and HDP over real vehicle processes, per seed, summarised."""
    import subprocess
    import sys

    data = tmp_path / "fleet"
    towns = ",".join(f"Town0{i}" for i in range(1, 7))
    r = subprocess.run([sys.executable, "-m", "flad_core.cli", "sim", "collect", "--source", "synthetic", "--out",
                        str(data), "--vehicles", "6", "--frames-per-vehicle", "8", "--towns", towns, "--workers", "1",
                        "--runs-dir", str(tmp_path / "runs"), "--no-progress"], capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "flad_bench.pipeline", "--noniid-only", "--quick", "--data",
                        str(data), "--noniid-seeds", "1", "2"], capture_output=True, text=True, timeout=600,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    study = json.loads(r.stdout)["noniid"]
    assert sorted(study["per_seed"]) == ["1", "2"]
    for seed, one in study["per_seed"].items():
        assert one["setup"]["seed"] == int(seed)
        assert [c["towns"] for c in one["setup"]["cluster"]] == [["Town01"], ["Town02"], ["Town03"]]
        res = one["results"]
        assert res["fhdp"]["samples_trained"] == res["hdp"]["samples_trained"] == res["central"]["samples_trained"]
        # the fan-in schedule on the same FL path: the same samples, every member's in every step
        fanin = res["fhdp_fanin"]
        assert fanin["samples_trained"] == res["fhdp"]["samples_trained"]
        assert 0.0 <= fanin["tl_accuracy"] <= 1.0 and fanin["wp_l1"] > 0
    # different seeds, different initial weights
    assert study["per_seed"]["1"]["results"]["initial"] != study["per_seed"]["2"]["results"]["initial"]
    summary = study["summary"]
    assert summary["seeds"] == [1, 2] and summary["failed_seeds"] == []
    assert set(summary["fhdp_minus_hdp"]) == {"tl_accuracy", "wp_l1", "loss"}
    assert set(summary["fhdp_fanin_minus_central"]) == {"tl_accuracy", "wp_l1", "loss"}
    assert set(summary["goals"]) == {"fanin_tl_ge_hdp_every_seed", "fanin_tl_within_3_points_of_central"}


def test_pipeline_floor_estimate_arithmetic():
    from flad_bench.pipeline import BenchConfig
    from flad_edge.swift.bounds import pipeline_floor

    # 4 layers, FLOPs 70/20/5/5 %, parameters in all but the last; cuts allowed before layers 1..3
    profile = {"layers": [{"flops": f, "param_bytes": pb} for f, pb in ((70, 1), (20, 1), (5, 1), (5, 0))]}
    traffic = [{"cut_before": c, "forward": {"fp32": fb}, "backward": {"fp32": bb}}
               for c, fb, bb in ((1, 100_000, 100_000), (2, 10_000, 10_000), (3, 1_000, 0))]
    cfg = BenchConfig(codecs=("fp32",))     # agx (3.85 TFLOPS, 100 Mb/s), n1, n2 (0.472 TFLOPS, 50 Mb/s)
    # 10 ms a sample alone
    f = pipeline_floor(cfg.cluster, cfg.codecs, traffic, profile, standalone_sps=100.0)["codecs"]["fp32"]
    slow = 3.85 / 0.472
    # any partition: the AGX keeps [0,2) (9 ms); each Nano one 5 % layer (0.5 ms x 8.16); links <= 1.6 ms
    best = f["any"]
    assert best["pipeline"][0] == ["agx", 0, 2] and [st[1:] for st in best["pipeline"][1:]] == [[2, 3], [3, 4]]
    assert best["s_per_sample"] == pytest.approx(0.009) and best["bound_by"] == "compute"
    assert best["vs_standalone"] == pytest.approx(0.01 / 0.009)
    # useful: the parameter-free last layer may not be a stage alone, so the cuts must be (1, 2); the Nano with
    # the 20 % layer is the bottleneck (the 100 KB gradients over its 50 Mb/s link take 16 ms, it computes 16.3)
    useful = f["useful"]
    assert useful["pipeline"][0] == ["agx", 0, 1] and [st[1:] for st in useful["pipeline"][1:]] == [[1, 2], [2, 4]]
    assert useful["s_per_sample"] == pytest.approx(0.002 * slow) and useful["bound_by"] == "compute"
    assert useful["stage_flops_share"] == [0.7, 0.2, 0.1]


def test_torch_pipelining_baseline_trains_like_one_process():
    """Baseline (d) on a partition whose middle stage has parameters: its losses equal a single-process run of
    the same model, data and optimizer (torch's first-step metadata inference once left NaN in such a stage's
    grads: this would catch it)."""
    from flad_bench.pipeline import BenchConfig
    from flad_bench.pipeline_torchpp import run_torch_pipelining
    from flad_core.emulation import host_tflops
    from flad_vehicle.encoder.config import get_config
    from flad_vehicle.encoder.model import VisionEncoder
    from flad_vehicle.encoder.partition import Partitioner
    from flad_vehicle.fhdp.data import vehicle_batches
    from flad_vehicle.fhdp.optim import stage_adamw

    cfg = BenchConfig(data="synthetic", steps=3, warmup=0, seed=3)
    pipeline = [("agx", 0, 12), ("n1", 12, 20), ("n2", 20, 23)]
    got = run_torch_pipelining(cfg, pipeline, host_tflops(), 1e-4)    # tiny time scale: no emulated slowdown
    assert got["works"] and all(math.isfinite(x) for x in got["losses"]), got

    torch.manual_seed(cfg.seed)
    model = VisionEncoder(get_config("tiny"))
    whole = Partitioner(model).stage((0, 23))
    opt = stage_adamw(whole, model)
    batches = vehicle_batches("synthetic", cfg.data_owner, cfg.batch_size, seed=cfg.seed)
    want = []
    for _ in range(cfg.steps):
        loss = model.forward_train(next(batches))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        want.append(float(loss.detach()))
    assert got["losses"] == pytest.approx(want, rel=1e-4)


def test_pipeline_floor_needs_a_standalone_figure_and_two_vehicles():
    from flad_bench.pipeline import BenchConfig
    from flad_edge.swift.bounds import pipeline_floor

    profile = {"layers": [{"flops": 1, "param_bytes": 1}] * 2}
    traffic = [{"cut_before": 1, "forward": {"fp32": 10}, "backward": {"fp32": 10}}]
    assert "error" in pipeline_floor(BenchConfig().cluster, ("fp32",), traffic, profile, standalone_sps=0.0)
    alone = BenchConfig(codecs=("fp32",), cluster=(("agx", "jetson_agx"),))
    assert "one-vehicle" in pipeline_floor(alone.cluster, alone.codecs, traffic, profile, standalone_sps=10.0)["error"]


def test_failure_curve_segments_merge_into_one_setting():
    from flad_bench.pipeline_failures import FailureCurveConfig, merge_segments

    def seg(seconds, samples, kills, recoveries, p50):
        return {"interval_s": 60.0, "failures": len(kills), "seconds": seconds, "rounds": 2, "samples": samples,
                "samples_per_s": samples / seconds, "recoveries": recoveries, "steps_lost": recoveries,
                "recovery_s_p50": p50, "rounds_failed": 0, "errors": [], "kills": kills, "round_samples": [1, 2],
                "final_train_loss": 0.5}

    m = merge_segments([seg(80.0, 400, [{"at_s": 30.0}], 1, 0.6), seg(90.0, 450, [{"at_s": 90.0}], 1, 0.8),
                        seg(70.0, 300, [], 0, None)])
    assert m["seconds"] == 240.0 and m["samples"] == 1150 and m["samples_per_s"] == pytest.approx(1150 / 240)
    assert m["failures"] == 2 and m["recoveries"] == 2 and m["segments"] == 3
    assert [k["at_s"] for k in m["kills"]] == [30.0, 90.0] and m["round_samples"] == [1, 2] * 3
    assert m["recovery_s_p50_of_segments"] == pytest.approx(0.7)
    with pytest.raises(ValueError, match="cycles"):
        FailureCurveConfig(cycles=0)
    with pytest.raises(ValueError, match="intervals"):
        FailureCurveConfig(intervals_s=(60.0, 0.0))
