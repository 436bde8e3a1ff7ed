"""The vision encoder and its users put their tensors on the device they are given (issue 20): built, loaded,
trained, profiled and served with `device="cpu"`, and with `"meta"` (no memory, no data) to prove that no
part is hard-wired to the CPU; a CUDA-marked test trains and compares on a GPU when there is one."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace as Ns

import numpy as np
import pytest
import torch

from flad_core.config import ConfigError, from_dict
from flad_vehicle.control.agent import WaypointAgent
from flad_vehicle.encoder.checkpoint import load_checkpoint, save_checkpoint
from flad_vehicle.encoder.model import VisionEncoder, batch_to_torch
from flad_vehicle.encoder.profile import profile_model
from flad_vehicle.encoder.stream import EncoderNodeConfig, load_encoder
from flad_vehicle.encoder.synthetic import synthetic_batches
from flad_vehicle.encoder.train import TrainConfig, train


def _devices(model: torch.nn.Module) -> set[str]:
    return {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()}


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_encoder_built_and_loaded_on_the_given_device(device: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = VisionEncoder("tiny", device=device)
    assert _devices(m) == {device} and m.device.type == device
    ckpt = save_checkpoint(tmp_path / "e.safetensors", VisionEncoder("tiny"), step=3)
    loaded, meta = load_checkpoint(ckpt, device=device)
    assert _devices(loaded) == {device} and meta["step"] == 3
    assert _devices(load_encoder(str(ckpt), device=device)) == {device}
    assert _devices(load_encoder("", seed=1, device=device)) == {device}


def test_the_same_seed_gives_the_same_weights_whatever_the_device() -> None:
    torch.manual_seed(5)
    a = VisionEncoder("tiny")
    torch.manual_seed(5)
    b = VisionEncoder("tiny", device="cpu")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_training_records_its_device_and_precision() -> None:
    cfg = TrainConfig(synthetic=True, steps=2, batch_size=2, progress=False, device="cpu", precision="bf16",
                      synthetic_eval_samples=4)
    res = train(cfg)
    assert res["device"]["device"] == "cpu" and res["precision"] == "bf16"
    assert np.isfinite(res["first_loss"]) and res["peak_device_memory_bytes"] is None
    assert next(res["model"].parameters()).dtype == torch.float32      # autocast keeps fp32 master weights
    with pytest.raises(ValueError, match="fp8"):
        train(TrainConfig(synthetic=True, steps=1, progress=False, precision="fp8"))


def test_profile_says_which_device_ran() -> None:
    torch.manual_seed(0)
    m = VisionEncoder("tiny", device="cpu")
    batch = batch_to_torch(next(synthetic_batches(1, 2, seed=0)))
    prof = profile_model(m, batch, measure=True)
    assert prof["device"]["device"] == "cpu"
    assert prof["measured"]["train_step_peak_bytes"] > 0 and prof["measured"]["estimate_bytes"] > 0


class _RecordingEncoder:
    """Stands in for an encoder on another device: records where its inputs were put, answers on the host."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.sensor_inputs = ("rgb_front", "lidar")
        self.seen: set[str] = set()

    def eval(self) -> _RecordingEncoder:
        return self

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.seen |= {t.device.type for t in batch.values()}
        return {"features": torch.zeros(1, 31, 64, device=self.device),
                "pred.waypoints": torch.zeros(1, 5, 2, device=self.device)}


def test_the_driving_agent_feeds_the_encoder_on_its_device() -> None:
    enc = _RecordingEncoder("meta")
    agent = WaypointAgent(enc, source=None)
    agent.reset(None)
    obs = {"rgb_front": np.zeros((3, 8, 8), np.uint8), "lidar": np.zeros((4, 4), np.float32),
           "ego": Ns(speed=0.0, x=0.0, y=0.0, yaw=0.0), "time_s": 0.0}
    with pytest.raises(NotImplementedError):      # meta tensors have no data to copy back to the host
        agent._replan(obs)
    assert enc.seen == {"meta"}
    cpu = _RecordingEncoder("cpu")
    agent = WaypointAgent(cpu, source=None)
    agent.reset(None)
    agent._replan(obs)
    assert cpu.seen == {"cpu"} and agent.plan.shape == (5, 2)


def test_node_config_rejects_a_bad_device() -> None:
    # the CLI's answer to a bad --device is in test/bench/test_cli_inputs.py
    with pytest.raises(ConfigError, match="device"):
        from_dict(EncoderNodeConfig, {"device": "gpu"}).validate()
    assert from_dict(EncoderNodeConfig, {"device": "cuda:1"}).device == "cuda:1"   # validates on any host


@pytest.mark.cuda
def test_training_on_cuda_matches_the_cpu_loss() -> None:
    cfg = dict(synthetic=True, steps=3, batch_size=2, progress=False, augment=False, seed=1)
    cpu = train(TrainConfig(**cfg, device="cpu"))
    gpu = train(TrainConfig(**cfg, device="cuda"))
    assert gpu["device"]["type"] == "cuda" and gpu["peak_device_memory_bytes"] > 0
    # same seed, same data: the first loss agrees to the GPU's float32 rounding (TF32 off by default)
    assert gpu["first_loss"] == pytest.approx(cpu["first_loss"], rel=1e-3)
