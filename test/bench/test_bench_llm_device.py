"""`flad bench llm --device`: a device this host lacks is one line and exit 2; the JSON says which device ran and
has the service's batch-1 p50 (and, on CUDA, batch-32 throughput and peak CUDA memory).

The runs use `--service-only` on a tiny saved ADM (the waypoint-service part of the benchmark, seconds long);
the full `--quick` run is test_bench_quick.py's.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

FLAD = [sys.executable, "-m", "flad_core.cli"]


@pytest.fixture(scope="module")
def adm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from flad_edge.celladapt.model import ADLLM, AdapterConfig, ADLLMConfig, tiny_llama

    model = ADLLM.build(ADLLMConfig(llm=tiny_llama(32, 1, 4, 2), adapter=AdapterConfig(d_model=32, n_queries=2)))
    return model.save_pretrained(tmp_path_factory.mktemp("bench-llm-device") / "adm")


def _bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLAD_CACHE": str(tmp_path / "cache")}
    env.pop("FLAD_RUNS_DIR", None)
    return subprocess.run([*FLAD, "bench", "llm", "--json", "--", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


# ids spelled out: a test id "cuda" would read as the `cuda` marker's keyword and be skipped (test/conftest.py)
@pytest.mark.parametrize("device", ["gpu", "cuda:99", *(["cuda"] if not torch.cuda.is_available() else [])],
                         ids=lambda d: f"device={d}")
def test_bad_device_is_one_line_and_exit_2(tmp_path: Path, adm_dir: Path, device: str) -> None:
    r = _bench(tmp_path, "--service-only", str(adm_dir), "--device", device)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("flad bench llm: --device:") and repr(device) in last, last
    assert not (tmp_path / "runs").exists()


def _service_json(tmp_path: Path, adm_dir: Path, device: str) -> dict:
    r = _bench(tmp_path, "--service-only", str(adm_dir), "--device", device, "--quick")   # 1 s of load, 1 pair
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_service_only_on_cpu_reports_the_device_and_batch1_p50(tmp_path: Path, adm_dir: Path) -> None:
    d = _service_json(tmp_path, adm_dir, "cpu")
    cond, svc = d["conditions"], d["service"]
    assert cond["device"]["device"] == "cpu" and cond["device"]["type"] == "cpu"
    assert cond["peak_memory_bytes"] is None                       # CUDA memory only
    p50 = svc["service_p50_ms_batch1"]
    assert isinstance(p50, float) and math.isfinite(p50) and p50 == svc["adm_batch1_one_client"]["p50_ms"] > 0
    assert svc["service_samples_per_s_batch32"] is None            # measured on CUDA only
    assert (svc["device"], svc["dtype"]) == ("cpu", "fp32")        # the CPU serves fp32, as before


@pytest.mark.cuda
def test_service_only_on_cuda_reports_batch32_throughput_and_peak_memory(tmp_path: Path, adm_dir: Path) -> None:
    d = _service_json(tmp_path, adm_dir, "cuda")
    cond, svc = d["conditions"], d["service"]
    assert cond["device"]["type"] == "cuda" and cond["device"]["name"]
    assert cond["peak_memory_bytes"] > 0
    assert (svc["device"], svc["dtype"]) == ("cuda:0", "fp16")
    assert svc["service_p50_ms_batch1"] > 0 and svc["service_samples_per_s_batch32"] > 0
    assert svc["adm_32_clients_batch32"]["clients"] == 32 and svc["adm_32_clients_batch32"]["errors"] == 0
