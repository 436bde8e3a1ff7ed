"""`flad bench llm --device cuda`: on a GPU the JSON has the service's batch-32 throughput and peak CUDA memory.

The run uses `--service-only` on a tiny saved ADM (the waypoint-service part of the benchmark, seconds long). The
CPU run's device, dtype and batch-1 p50 are checked on the full `--quick` run (test_bench_quick.py), a bad
`--device` in test_cli_inputs.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def _service_json(tmp_path: Path, adm_dir: Path, device: str) -> dict:
    r = _bench(tmp_path, "--service-only", str(adm_dir), "--device", device, "--quick")   # 1 s of load, 1 pair
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return json.loads(r.stdout)


@pytest.mark.cuda
def test_service_only_on_cuda_reports_batch32_throughput_and_peak_memory(tmp_path: Path, adm_dir: Path) -> None:
    d = _service_json(tmp_path, adm_dir, "cuda")
    cond, svc = d["conditions"], d["service"]
    assert cond["device"]["type"] == "cuda" and cond["device"]["name"]
    assert cond["peak_memory_bytes"] > 0
    assert (svc["device"], svc["dtype"]) == ("cuda:0", "fp16")
    assert svc["service_p50_ms_batch1"] > 0 and svc["service_samples_per_s_batch32"] > 0
    assert svc["adm_32_clients_batch32"]["clients"] == 32 and svc["adm_32_clients_batch32"]["errors"] == 0
