"""CELLAdapt on a chosen device: every component puts its model where `device` says, serves in half precision
close to fp32, and a device this host lacks (or no device at all) is one clear CLI error.

The `meta` device proves that nothing is hard-wired to the CPU: each component is constructed there (structure
only, no forward pass). The `cuda` test skips without a GPU (test/conftest.py).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from flad_core.bus import BusConfig, ZmqBus
from flad_edge.celladapt.data import FeatureSet, synthetic_feature_set
from flad_edge.celladapt.model import ADLLM, AdapterConfig, ADLLMConfig, tiny_llama
from flad_edge.celladapt.service import ServiceConfig, WaypointClient, WaypointService, free_tcp_address
from flad_edge.celladapt.train import FitConfig, apply_lora, fit, make_optimizer

torch.set_num_threads(1)

#: half precision against fp32, in metres: bf16 keeps 8 significant bits (fp16 11), so each matmul rounds at
#: ~0.4 % and a few layers leave ~1 % of the output's size; 0.1 m + 2 % is far below the models' own error
#: (waypoint L1 of ~0.5 m and more) yet catches a wrong dtype path (a cast lost, NaN, a garbage buffer)
HALF_ATOL_M, HALF_RTOL = 0.1, 0.02


def tiny_cfg(seed: int = 0) -> ADLLMConfig:
    return ADLLMConfig(llm=tiny_llama(32, 1, 4, 2), adapter=AdapterConfig(d_model=32, n_queries=2), seed=seed)


@pytest.fixture(scope="module")
def data() -> FeatureSet:
    return synthetic_feature_set(64, seed=1)


@pytest.fixture(scope="module")
def trained(data: FeatureSet) -> ADLLM:
    """A tiny model trained a little, so its waypoints have the metre scale a real one answers in."""
    model = ADLLM.build(tiny_cfg())
    fit(model, data, FitConfig(steps=30, batch_size=16, lr=3e-3, warmup_steps=2, device="cpu"))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, trained: ADLLM) -> Path:
    return trained.save_pretrained(tmp_path_factory.mktemp("celladapt-device") / "adm")


def _placed(module: torch.nn.Module) -> set[str]:
    return {t.device.type for t in [*module.parameters(), *module.buffers()]}


def _components(saved: Path) -> dict[str, Callable[[str], tuple[ADLLM, Callable[[], None]]]]:
    """name -> (device -> (the model the component runs, its clean-up))."""
    from flad_core.config import from_dict
    from flad_edge.celladapt.agents import load_shared
    from flad_edge.celladapt.pipeline import PipelineConfig, _general
    from flad_edge.celladapt.stream import WaypointNodeConfig, WaypointStream
    from flad_edge.eval.replay import load_adm
    from flad_vehicle.encoder.config import get_config

    def build(device: str) -> tuple[ADLLM, Callable[[], None]]:
        return ADLLM.build(tiny_cfg(), device=device), lambda: None

    def loaded(device: str) -> tuple[ADLLM, Callable[[], None]]:
        return ADLLM.from_pretrained(saved, device=device), lambda: None

    def lora(device: str) -> tuple[ADLLM, Callable[[], None]]:
        model = apply_lora(ADLLM.from_pretrained(saved, device=device))
        opt = make_optimizer(model, FitConfig())
        assert {p.device.type for g in opt.param_groups for p in g["params"]} == {torch.device(device).type}
        return model, lambda: None

    def general(device: str) -> tuple[ADLLM, Callable[[], None]]:
        return _general(PipelineConfig(general="tiny"), device), lambda: None

    def service(device: str) -> tuple[ADLLM, Callable[[], None]]:
        model = ADLLM.from_pretrained(saved)
        svc = WaypointService.for_model(model, ServiceConfig(address=free_tcp_address(), device=device))
        assert svc.device.type == device and svc.stats.to_dict()["device"] == device
        return model, lambda: None

    def stream(device: str) -> tuple[ADLLM, Callable[[], None]]:
        bus = ZmqBus("device-test", BusConfig())
        node = WaypointStream(bus, from_dict(WaypointNodeConfig, {"model_dir": str(saved), "device": device}))
        assert node.device.type == device
        return node.model, lambda: (node.close(), bus.close())

    def agent(device: str) -> tuple[ADLLM, Callable[[], None]]:
        return load_shared(str(saved), device), lambda: None

    def replay(device: str) -> tuple[ADLLM, Callable[[], None]]:
        return load_adm(str(saved), get_config("tiny"), device), lambda: None

    return {"build": build, "from_pretrained": loaded, "lora_training": lora, "pipeline_general": general,
            "waypoint_service": service, "waypoint_node": stream, "closed_loop_agent": agent, "replay_adm": replay}


COMPONENTS = ["build", "from_pretrained", "lora_training", "pipeline_general", "waypoint_service", "waypoint_node",
              "closed_loop_agent", "replay_adm"]


@pytest.mark.parametrize("name", COMPONENTS)
def test_component_runs_on_cpu_as_before_and_builds_on_meta(name: str, saved: Path, data: FeatureSet) -> None:
    make = _components(saved)[name]
    model, close = make("meta")
    try:
        assert _placed(model) == {"meta"} and model.device.type == "meta"
    finally:
        close()
    model, close = make("cpu")
    try:
        assert _placed(model) == {"cpu"} and model.dtype == torch.float32
        # the same answers as the model built or loaded the way it was before devices existed
        reference = ADLLM.build(general_config_if(name)) if name in ("build", "pipeline_general") else \
            ADLLM.from_pretrained(saved)
        b = next(data.batches(6, shuffle=False))
        args = (b["features"], b["instruction"], b["notice"], b["target_point"])
        assert torch.equal(model.predict(*args), reference.predict(*args))
    finally:
        close()


def general_config_if(name: str) -> ADLLMConfig:
    from flad_edge.celladapt.model import general_config

    return general_config() if name == "pipeline_general" else tiny_cfg()


def test_fit_trains_on_the_configured_device_and_records_it(data: FeatureSet) -> None:
    model = ADLLM.build(tiny_cfg())
    default = copy.deepcopy(model)
    cfg = FitConfig(steps=8, batch_size=16, lr=3e-3, warmup_steps=2)
    r = fit(model, data, FitConfig(**{**cfg.__dict__, "device": "cpu"}))
    assert r["device"]["device"] == "cpu" and r["precision"] == "fp32" and r["peak_device_memory_bytes"] is None
    assert _placed(model) == {"cpu"}
    if not torch.cuda.is_available():      # here `auto` is the CPU: the same losses, step by step
        assert fit(default, data, cfg)["last_loss_mean10"] == r["last_loss_mean10"]
    bf16 = fit(ADLLM.build(tiny_cfg()), data, FitConfig(**{**cfg.__dict__, "precision": "bf16"}))
    assert bf16["precision"] == "bf16" and bf16["last_loss_mean10"] < bf16["first_loss"]


def test_half_precision_on_cpu_predicts_close_to_fp32(trained: ADLLM, data: FeatureSet) -> None:
    half = copy.deepcopy(trained).place("cpu", "half")
    assert half.dtype == torch.bfloat16
    assert all(b.dtype == torch.float32 for b in half.buffers())       # rotary frequencies stay fp32
    b = next(data.batches(32, shuffle=False))
    args = (b["features"], b["instruction"], b["notice"], b["target_point"])
    want, got = trained.predict(*args), half.predict(*args)
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    assert want.abs().max() > 1.0                                       # metre-scale answers, not ~0
    torch.testing.assert_close(got, want, atol=HALF_ATOL_M, rtol=HALF_RTOL)
    assert not torch.equal(got, want)                                   # it really ran in bf16


@pytest.fixture
def bus() -> Iterator[ZmqBus]:
    b = ZmqBus("vehicle-device-test", BusConfig())
    yield b
    b.close()


def _served(model: ADLLM, bus: ZmqBus, feats: np.ndarray, targets: np.ndarray, cfg: ServiceConfig
            ) -> tuple[np.ndarray, dict[str, Any]]:
    with WaypointService.for_model(model, cfg) as svc:
        client = WaypointClient(bus, cfg.address, timeout_s=10.0)
        wp = np.stack([client.waypoints(f, "turn left now", vehicle_id="v0", target_point=t)
                       for f, t in zip(feats, targets, strict=True)])
    return wp, svc.stats.to_dict()


def test_service_defaults_keep_cpu_answers_and_half_is_close(trained: ADLLM, bus: ZmqBus) -> None:
    rng = np.random.default_rng(4)
    feats = rng.standard_normal((4, 31, 64)).astype(np.float32)
    targets = np.array([[15.0, 8.0], [15.0, -8.0], [12.0, 0.0], [20.0, 3.0]], np.float32)
    with torch.no_grad():
        want = trained.predict(torch.from_numpy(feats), ["turn left now"] * 4, [""] * 4,
                               torch.from_numpy(targets)).numpy()
    fp32, stats = _served(copy.deepcopy(trained), bus, feats, targets, ServiceConfig(address=free_tcp_address()))
    assert (stats["device"], stats["dtype"], stats["max_batch"]) == ("cpu", "fp32", 16)   # CPU defaults as before
    np.testing.assert_allclose(fp32, want, atol=1e-4, rtol=1e-4)
    half, stats = _served(copy.deepcopy(trained), bus, feats, targets,
                          ServiceConfig(address=free_tcp_address(), device="cpu", dtype="half"))
    assert stats["dtype"] == "bf16" and stats["ok"] == 4
    np.testing.assert_allclose(half, want, atol=HALF_ATOL_M, rtol=HALF_RTOL)


@pytest.mark.cuda
def test_service_on_cuda_in_half_precision_matches_cpu_fp32(trained: ADLLM, bus: ZmqBus) -> None:
    from flad_core.device import peak_memory_bytes

    rng = np.random.default_rng(5)
    feats = rng.standard_normal((6, 31, 64)).astype(np.float32)
    targets = rng.uniform(-10, 20, (6, 2)).astype(np.float32)
    want, cpu = _served(copy.deepcopy(trained), bus, feats, targets,
                        ServiceConfig(address=free_tcp_address(), device="cpu"))
    model = copy.deepcopy(trained)
    got, gpu = _served(model, bus, feats, targets, ServiceConfig(address=free_tcp_address(), device="cuda"))
    assert cpu["dtype"] == "fp32" and (gpu["device"], gpu["dtype"], gpu["max_batch"]) == ("cuda:0", "fp16", 32)
    assert model.device.type == "cuda" and model.dtype == torch.float16
    assert peak_memory_bytes("cuda") > 0
    np.testing.assert_allclose(got, want, atol=HALF_ATOL_M, rtol=HALF_RTOL)


# ------------------------------------------------------------------------------------------------ CLI


def _flad(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    """(exit code, the command's own stderr lines) of an in-process `flad ARGV`."""
    from flad_core.cli import main

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        rc = main(list(argv))
    except SystemExit as exc:      # argparse's own errors
        rc = int(exc.code or 0)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, "\n".join(ln for ln in err.splitlines() if ln.startswith("flad "))


BAD_DEVICES = ["gpu", "cuda:99", *(["cuda"] if not torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", BAD_DEVICES, ids=lambda d: f"device={d}")   # (an id "cuda" reads as the marker)
@pytest.mark.parametrize("argv", [
    ["llm", "serve", "--model", "{saved}"],
    ["llm", "train", "--encoder", "enc.safetensors"],
    ["eval", "replay", "bag", "--checkpoint", "enc.safetensors"],
    ["edge", "closed-loop", "--source", "edge"],
], ids=["llm-serve", "llm-train", "eval-replay", "edge-closed-loop"])
def test_a_device_this_host_lacks_is_one_clear_error(capsys, tmp_path, monkeypatch, saved: Path, argv: list[str],
                                                     device: str) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FLAD_RUNS_DIR", raising=False)
    rc, err = _flad(capsys, *[a.format(saved=saved) for a in argv], "--device", device)
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith(f"flad {argv[0]}") and repr(device) in err, err
    assert not (tmp_path / "runs").exists()
