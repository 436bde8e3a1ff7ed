"""flad_core.device: which device runs, the errors for a bad one, autocast, and the host staging buffers."""

from __future__ import annotations

import pytest
import torch

from flad_core.config import ConfigError
from flad_core.device import (
    DeviceError,
    HostStaging,
    autocast,
    check_device_spec,
    device_info,
    grad_scaler,
    peak_memory_bytes,
    resolve_device,
    to_device,
)
from flad_core.fleet import DeviceProfile, VehicleSpec


def test_auto_is_cuda_when_present_else_cpu() -> None:
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("CPU") == torch.device("cpu")
    assert resolve_device(torch.device("meta")) == torch.device("meta")


@pytest.mark.parametrize("bad", ["gpu", "tpu", "cuda:x", "", "mps"])
def test_a_bad_device_is_named_in_the_error(bad: str) -> None:
    if bad == "":
        assert resolve_device(bad) == resolve_device("auto")    # empty = auto, as in configs
        return
    with pytest.raises(DeviceError, match=repr(bad)):
        resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a host without CUDA")
def test_cuda_without_a_gpu_is_an_error_not_a_silent_cpu_run() -> None:
    with pytest.raises(DeviceError, match="sees no CUDA device"):
        resolve_device("cuda:0")


def test_config_check_needs_no_device_but_rejects_nonsense() -> None:
    assert check_device_spec("cuda:3") == "cuda:3"      # a GPU machine's config validates anywhere
    with pytest.raises(DeviceError):
        check_device_spec("gpu0")
    VehicleSpec(id="v0", device="cuda:1").validate()
    with pytest.raises(ConfigError, match="device"):
        VehicleSpec(id="v0", device="nvidia").validate()


def test_device_info_says_what_ran() -> None:
    info = device_info("cpu")
    assert info["device"] == "cpu" and info["type"] == "cpu" and info["torch"] == torch.__version__
    assert peak_memory_bytes("cpu") is None


def test_unified_memory_is_one_budget_and_a_discrete_gpu_its_own() -> None:
    jetson = DeviceProfile(mem_gb=8, tflops=0.5)
    assert jetson.unified_memory and jetson.stage_mem_bytes == jetson.mem_bytes
    server = DeviceProfile(mem_gb=64, tflops=60, unified_memory=False, gpu_mem_gb=80)
    server.validate()
    assert server.stage_mem_bytes == 80 * 1024**3
    with pytest.raises(ConfigError, match="gpu_mem_gb"):
        DeviceProfile(mem_gb=64, tflops=60, unified_memory=False).validate()


def test_autocast_bf16_on_cpu_and_the_scaler_only_for_cuda_fp16() -> None:
    a = torch.randn(4, 4)
    with autocast("cpu", "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with autocast("cpu", "fp32"):
        assert (a @ a).dtype == torch.float32
    assert not grad_scaler("cpu", "fp16").is_enabled()
    with pytest.raises(DeviceError, match="fp8"):
        autocast("cpu", "fp8")


def test_host_staging_cpu_tensors_pass_through_unless_staged() -> None:
    t = {"x": torch.arange(6.0).reshape(2, 3)}
    plain = HostStaging("cpu")
    assert plain.to_host(t)["x"] is t["x"] and plain.copies == 0
    staged = HostStaging("cpu", stage_cpu=True)
    out = staged.to_host(t)
    assert out["x"] is not t["x"] and torch.equal(out["x"], t["x"]) and staged.copies == 1
    buf = out["x"]
    staged.to_host({"x": t["x"] + 1})
    assert buf.data_ptr() == staged.to_host(t)["x"].data_ptr()         # the buffer is reused, not reallocated
    back = staged.to_device({"x": out["x"]})
    assert torch.equal(back["x"], t["x"]) and back["x"].data_ptr() != out["x"].data_ptr()   # a fresh tensor
    with pytest.raises(DeviceError, match="meta"):
        staged.to_host({"m": torch.empty(2, device="meta")})


def test_pinned_buffers_need_cuda() -> None:
    if torch.cuda.is_available():
        assert HostStaging("cuda").pin
    else:
        with pytest.raises(DeviceError, match="pinned"):
            HostStaging("cpu", pin=True)


def test_to_device_moves_only_what_is_elsewhere() -> None:
    x = torch.ones(2)
    assert to_device({"x": x}, "cpu")["x"] is x
    assert to_device({"x": x}, "meta")["x"].device.type == "meta"


@pytest.mark.cuda
def test_host_staging_round_trip_through_pinned_buffers_on_cuda() -> None:
    st = HostStaging("cuda")
    src = {"a": torch.randn(3, 5, device="cuda"), "b": torch.randint(0, 9, (4,), device="cuda")}
    host = st.to_host(src)
    assert all(v.device.type == "cpu" and v.is_pinned() for v in host.values())
    assert torch.equal(host["a"], src["a"].cpu()) and torch.equal(host["b"], src["b"].cpu())
    back = st.to_device(host)
    torch.cuda.synchronize()
    assert torch.equal(back["a"], src["a"]) and back["a"].device.type == "cuda"
