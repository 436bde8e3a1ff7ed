"""`flad eval replay`: a bag recorded by `flad bag record` (encoder driving) replays open-loop through the encoder
(+ an ADM) to a JSON evaluation; the metric is right; bad bags exit 2 naming the file."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from flad_edge.eval.replay import ade_fde, latency_summary

torch.set_num_threads(1)

SECONDS = 4.0
ENCODER = {"name": "tiny", "cameras": {"rgb_front": [32, 32]}, "lidar_rays": 512, "d_model": 32, "n_heads": 2,
           "ffn_dim": 64, "rgb_stem": [8], "rgb_widths": [8, 16, 16], "lidar_widths": [16, 16], "pillar_channels": 16,
           "gru_hidden": 32, "lidar_grid": 25, "tl_focus_widths": [8, 8, 8]}


def flad(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLAD_RUNS_DIR": str(cwd / "runs")}
    return subprocess.run([sys.executable, "-m", "flad_core.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("replay")


@pytest.fixture(scope="module")
def checkpoint(work: Path) -> Path:
    """A tiny randomly initialised encoder for a one-camera 32x32 rig with an 8 x 64 LiDAR."""
    from flad_vehicle.encoder import VisionEncoder
    from flad_vehicle.encoder.checkpoint import save_checkpoint

    torch.manual_seed(0)
    return save_checkpoint(work / "encoder.safetensors", VisionEncoder(ENCODER))


@pytest.fixture(scope="module")
def bag(work: Path, checkpoint: Path) -> Path:
    """`flad bag record --agent encoder`: the encoder drives 4 simulated seconds and everything is recorded."""
    out = work / "encoder_run"
    proc = flad("bag", "record", "--agent", "encoder", "--checkpoint", str(checkpoint), "--seconds", str(SECONDS),
                "--lidar-channels", "8", "--lidar-azimuth-steps", "64", "--out", str(out), "--no-progress", cwd=work)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["agent"] == "encoder" and summary["frames"] == 40
    assert summary["topics"]["/flad/hero/features"] == 40 and summary["topics"]["/flad/hero/waypoints"] == 40
    return out


@pytest.fixture(scope="module")
def adm_dir(work: Path) -> Path:
    """A tiny randomly initialised ADM taking this encoder's [31, 32] features, saved as CELLAdapt does."""
    from flad_edge.celladapt.model import ADLLM, AdapterConfig, ADLLMConfig, tiny_llama

    model = ADLLM.build(ADLLMConfig(name="adm", llm=tiny_llama(32, 1, 4, 2),
                                    adapter=AdapterConfig(d_feature=32, n_feature_tokens=31, d_model=32, n_queries=2)))
    return model.save_pretrained(work / "adm")


def finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def test_replay_cli_reports_json(work, bag, checkpoint):
    proc = flad("eval", "replay", str(bag), "--checkpoint", str(checkpoint), "--json", cwd=work)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    for key in ("bag", "frames", "frames_with_expert", "waypoints", "traffic_light", "latency_ms", "recorded_result",
                "run", "report"):
        assert key in res, key
    assert res["frames"] == 40
    assert res["frames_with_expert"] == int(round((SECONDS - 2.5) / 0.1))
    head = res["waypoints"]["encoder_head"]
    assert head["n"] == res["frames_with_expert"] and finite(head["ade_m"]) and finite(head["fde_m"])
    assert head["ade_m"] >= 0 and head["fde_m"] >= 0
    # the replayed head is the head that drove: same checkpoint, same decoded frames
    assert res["replay_vs_recorded_plan_max_abs_m"] < 1e-4
    assert res["waypoints"]["recorded_plan"]["ade_m"] == pytest.approx(head["ade_m"], abs=1e-4)
    assert "adm" not in res["waypoints"]
    tl = res["traffic_light"]
    assert tl["n"] == 40 and 0.0 <= tl["accuracy"] <= 1.0 and sum(map(sum, tl["confusion_true_by_pred"])) == 40
    for stage in ("decode", "encoder"):
        lat = res["latency_ms"][stage]
        assert lat["n"] == 40 and 0 < lat["p50"] <= lat["p99"]
    assert res["recorded_result"]["final"] and res["recorded_result"]["route_id"].startswith("Town01/")
    run = Path(res["run"])
    assert json.loads((run / "replay.json").read_text()) == res
    for f in ("report.md", "trajectories.png", "ade.png"):
        assert (run / f).stat().st_size > 0, f
    assert "trajectories.png" in (run / "report.md").read_text()


def test_replay_with_an_adm(work, bag, checkpoint, adm_dir):
    proc = flad("eval", "replay", str(bag), "--checkpoint", str(checkpoint), "--adm", str(adm_dir), "--json",
                "--max-frames", "12", cwd=work)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["frames"] == 12
    adm = res["waypoints"]["adm"]
    assert adm["n"] == 12 and finite(adm["ade_m"]) and finite(adm["fde_m"])
    assert res["latency_ms"]["adm"]["n"] == 12


def test_adm_with_other_feature_shape_is_refused(work, bag, checkpoint):
    from flad_edge.celladapt.model import ADLLM, AdapterConfig, ADLLMConfig, tiny_llama

    other = ADLLM.build(ADLLMConfig(name="adm", llm=tiny_llama(32, 1, 4, 2), adapter=AdapterConfig(d_feature=64)))
    path = other.save_pretrained(work / "adm64")
    proc = flad("eval", "replay", str(bag), "--checkpoint", str(checkpoint), "--adm", str(path), cwd=work)
    assert proc.returncode == 2
    assert "adm64" in proc.stderr and "[31, 64]" in proc.stderr


def test_bad_bags_exit_2_naming_the_file(work, bag, checkpoint, tmp_path):
    cut = tmp_path / "cut_bag"
    shutil.copytree(bag, cut)
    mcap = next(cut.glob("*.mcap"))
    os.truncate(mcap, mcap.stat().st_size * 2 // 3)
    for path, needle in ((cut, mcap.name), (mcap, mcap.name), (tmp_path / "nope", "nope"),
                         (tmp_path, "metadata.yaml")):
        proc = flad("eval", "replay", str(path), "--checkpoint", str(checkpoint), "--json", cwd=work)
        assert proc.returncode == 2, (path, proc.stderr)
        assert needle in proc.stderr and proc.stdout == ""
        assert "Traceback" not in proc.stderr


def test_bag_without_the_encoders_cameras_exits_2(work, checkpoint, tmp_path):
    """A front-camera-only bag cannot feed an encoder that also needs rgb_left: exit 2 naming the missing topic."""
    from flad_vehicle.encoder import VisionEncoder
    from flad_vehicle.encoder.checkpoint import save_checkpoint

    two = save_checkpoint(tmp_path / "two.safetensors",
                          VisionEncoder({**ENCODER, "cameras": {"rgb_front": [32, 32], "rgb_left": [16, 16]}}))
    proc = flad("bag", "record", "--seconds", "0.5", "--front-size", "32", "--side-size", "0", "--lidar-channels", "8",
                "--lidar-azimuth-steps", "64", "--out", str(tmp_path / "front_only"), "--no-progress", cwd=work)
    assert proc.returncode == 0, proc.stderr
    proc = flad("eval", "replay", str(tmp_path / "front_only"), "--checkpoint", str(two), cwd=work)
    assert proc.returncode == 2
    assert "/carla/hero/rgb_left/image" in proc.stderr


@given(wp=arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(1, 6), st.just(2)),
                 elements=st.floats(-100, 100)),
       shift=st.tuples(st.floats(-10, 10), st.floats(-10, 10)))
@settings(max_examples=50, deadline=None)
def test_ade_fde(wp, shift):
    ade, fde = ade_fde(wp, wp)           # the expert scored against itself
    assert np.all(ade == 0) and np.all(fde == 0)
    moved = wp + np.array(shift)
    ade, fde = ade_fde(moved, wp)        # a constant offset d: every error is |d|
    assert ade == pytest.approx(np.full(len(wp), np.hypot(*shift)), abs=1e-9)
    assert fde == pytest.approx(np.full(len(wp), np.hypot(*shift)), abs=1e-9)
    one_ade, one_fde = ade_fde(moved[0], wp[0])
    assert one_fde.shape == (1,)
    assert one_ade.shape == (1,) and one_ade[0] == pytest.approx(ade[0])


def test_ade_fde_known_values_and_shape_errors():
    gt = np.zeros((5, 2))
    pred = np.zeros((5, 2))
    pred[:, 0] = [1, 2, 3, 4, 5]
    ade, fde = ade_fde(pred, gt)
    assert ade[0] == pytest.approx(3.0) and fde[0] == pytest.approx(5.0)
    with pytest.raises(ValueError, match="waypoints"):
        ade_fde(np.zeros((5, 2)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="waypoints"):
        ade_fde(np.zeros((5, 3)), np.zeros((5, 3)))


def test_latency_summary():
    assert latency_summary([]) is None
    s = latency_summary([0.001] * 99 + [0.1])
    assert s["p50"] == pytest.approx(1.0) and s["n"] == 100 and s["p99"] > s["p50"]


def test_bus_recording_replays_by_header_stamp(work, bag, checkpoint, tmp_path, port_base):
    """A deployment's recording (`flad bag record --from-bus`: receive-time bag stamps) replays like the world's
    own bag: frames are matched by header stamp, and the replayed head equals the recorded plan."""
    import time

    from flad_core.bus import BusConfig, BusHub, ZmqBus
    from flad_sim.bag import bag_info, read_bag

    msgs = list(read_bag(bag, raw=True))
    topics = bag_info(bag).topics
    cfg = BusConfig(hub_pub=f"tcp://127.0.0.1:{port_base}", hub_sub=f"tcp://127.0.0.1:{port_base + 1}")
    hub = BusHub(cfg)
    pub = ZmqBus("world", cfg)
    out = tmp_path / "from_bus"
    args = ["bag", "record", "--from-bus", "--hub-sub", cfg.hub_sub, "--seconds", "10", "--out", str(out),
            "--no-progress"]
    for t in topics:
        args += ["--topic", f"{t}:{topics[t].msgtype}"]
    rec = subprocess.Popen([sys.executable, "-m", "flad_core.cli", *args], cwd=work, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env={**os.environ, "FLAD_RUNS_DIR": str(work / "runs")})
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".from_bus.*.partial")):     # the recorder has opened its bag
            assert rec.poll() is None and time.monotonic() < deadline, "recorder did not start"
            time.sleep(0.05)
        time.sleep(1.5)                                           # ... and its subscriptions reached the hub
        for m in msgs:                                            # the run, once, at about 1000 messages/s
            pub.publish_raw(m.topic, m.msgtype, m.msg)
            time.sleep(0.001)
        _, err = rec.communicate(timeout=60)
    finally:
        if rec.poll() is None:
            rec.kill()
            rec.wait()
        pub.close()
        hub.close()
    assert rec.returncode == 0, err
    times = [m.time_ns for m in read_bag(out, raw=True)]
    assert times == sorted(times) and times[0] > 10**18        # wall-clock receive times, not simulated time
    proc = flad("eval", "replay", str(out), "--checkpoint", str(checkpoint), "--json", cwd=work)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert 1 <= res["frames"] <= 40
    assert res["frames_with_expert"] >= 1 and finite(res["waypoints"]["encoder_head"]["ade_m"])
    assert res["replay_vs_recorded_plan_max_abs_m"] < 1e-4
