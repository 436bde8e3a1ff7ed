"""`flad llm serve --fleet F`: with `security.curve: true` in F the waypoint service is a CURVE server with the
fleet edge's key behind the fleet's allow-list; an allow-listed vehicle gets waypoints, a plaintext client nothing."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from flad_core.bus import RequestTimeoutError, ZmqBus
from flad_core.config import to_dict
from flad_core.fleet import load_fleet
from flad_core.roles import default_fleet_path, security_for
from flad_core.security import generate_keypair
from flad_edge.celladapt.model import ADLLM, AdapterConfig, ADLLMConfig, tiny_llama
from flad_edge.celladapt.service import WaypointClient, free_tcp_address

from flad_testing import free_port_base


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    work = tmp_path_factory.mktemp("llm-serve-curve")
    torch.manual_seed(0)
    model = ADLLM.build(ADLLMConfig(llm=tiny_llama(32, 1, 4, 2), adapter=AdapterConfig(d_model=32, n_queries=2)))
    model.save_pretrained(work / "model")
    fleet = load_fleet(default_fleet_path())
    keys, allowed = work / "keys", work / "keys" / "allowed"
    for name in (fleet.edge.id, "v000"):
        generate_keypair(keys, name, allow_dir=allowed)
    fleet = dataclasses.replace(fleet, security=dataclasses.replace(fleet.security, curve=True, keys_dir=keys,
                                                                    allow_dir=allowed))
    fleet_file = work / "fleet.yaml"
    fleet_file.write_text(yaml.safe_dump(to_dict(fleet), sort_keys=False))
    address = free_tcp_address()
    proc = subprocess.Popen([sys.executable, "-m", "flad_core.cli", "llm", "serve", "--model", str(work / "model"),
                             "--fleet", str(fleet_file), "--address", address, "--run-dir", str(work / "logs")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield fleet, address, model, proc
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
        print(err[-3000:])


def test_an_allow_listed_vehicle_gets_waypoints_a_plaintext_one_nothing(served):
    fleet, address, model, proc = served
    a = model.cfg.adapter
    feats = np.random.default_rng(0).standard_normal((a.n_feature_tokens, a.d_feature)).astype(np.float32)
    base = free_port_base(2)
    bus_cfg = dataclasses.replace(fleet.bus, hub_pub=f"tcp://127.0.0.1:{base}", hub_sub=f"tcp://127.0.0.1:{base + 1}")
    with ZmqBus("v000", bus_cfg, security_for(fleet, "v000")) as bus:
        client = WaypointClient(bus, address, timeout_s=5.0)
        deadline = time.monotonic() + 120       # the process loads torch and the model first
        while True:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            try:
                wps = client.waypoints(feats, "turn left now", vehicle_id="v000")
                break
            except RequestTimeoutError:
                if time.monotonic() > deadline:
                    raise
        assert wps.shape == (5, 2) and np.isfinite(wps).all()
    with ZmqBus("plain", bus_cfg) as plain, pytest.raises(RequestTimeoutError):
        WaypointClient(plain, address, timeout_s=1.0).waypoints(feats, "turn left now", vehicle_id="plain")
