"""FHDP over CURVE across real processes: `flad demo --fixed-fleet --curve` trains one round with a cloud, an edge
and a 2-vehicle cluster (the smallest fleet that uses every kind of link), every link encrypted and authenticated.

Each server answers with its own key pair (the edge, the cloud, each vehicle's control socket and stage inbox), so
the round exercises every client's choice of server key: the edge's assignments, starts and layer gathers to the
vehicles, the cluster members' layer moves to each other, their stage links, and the edge's uploads to the cloud.
A pooled slot serves with its slot id's key whoever it plays; the pool's addresses say so (no processes needed).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time

import pytest
import yaml

from flad_core.config import to_dict
from flad_core.fleet import load_fleet
from flad_core.roles import default_fleet_path, security_for
from flad_edge.experiment.pool import BUSY, Identity, VehiclePool
from flad_edge.fhdp.config import FhdpConfig
from flad_edge.fhdp.recovery.detection import DisconnectWatch
from flad_edge.fhdp.recovery.live import small_fleet

from flad_testing import free_port_base, processes_mentioning

VEHICLES = ("v002", "v003")     # a Nano + NX cluster: two pipelines, stage links and a layer move between them


@pytest.fixture(scope="module")
def curve_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("fhdp-curve")
    fleet = load_fleet(default_fleet_path())
    fleet = dataclasses.replace(fleet, vehicles=[v for v in fleet.vehicles if v.id in VEHICLES])
    fleet_file, config_file, runs = work / "fleet.yaml", work / "fhdp.yaml", work / "runs"
    fleet_file.write_text(yaml.safe_dump(to_dict(fleet), sort_keys=False))
    cfg = FhdpConfig(rounds=1, local_steps=1, batch_size=4, n_micro=2, time_scale=0.02, round_deadline_s=120,
                     planner="exact", encoder="tiny", seed=7, clusters=[["v002", "v003"]])
    config_file.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    cmd = [sys.executable, "-m", "flad_core.cli", "demo", "--fixed-fleet", "--curve", "--rounds", "1", "--data",
           "synthetic", "--fleet", str(fleet_file), "--config", str(config_file), "--runs-dir", str(runs),
           "--port-base", str(free_port_base(24)), "--timeout", "120"]
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    (run,) = list(runs.iterdir())
    return out, run, time.monotonic() - t0, runs


def test_a_round_trains_over_curve_and_exits_cleanly(curve_run):
    out, run, seconds, runs = curve_run
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "CURVE-encrypted" in out.stdout and "round 0: train loss" in out.stdout and "cloud aggregated" in out.stdout
    assert yaml.safe_load((run / "fleet.yaml").read_text())["security"]["curve"] is True
    (r,) = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"round"' in x]
    assert r["clients"] == 1 and r["accepted"] == 1 and r["missing"] == [] and not r["errors"]
    assert set(r["per_client"]) == {"cluster1"}
    assert r["per_client"]["cluster1"]["pipelines"] == 2 and r["per_client"]["cluster1"]["moved_bytes"] > 0
    assert (run / "global_encoder.safetensors").exists()
    # the cluster's stage links carried activations; nothing was refused or failed a handshake anywhere
    sent = [json.loads(x) for p in run.glob("audit-*.jsonl") for x in p.read_text().splitlines()]
    assert any(rec.get("kind") == 0 for rec in sent)
    logs = "".join(p.read_text() for p in run.glob("*.log"))
    for bad in ("refused", "handshake failed", "no reply from", "Traceback"):
        assert bad not in logs, bad
    for _ in range(100):
        if not processes_mentioning(str(runs)):
            break
        time.sleep(0.1)
    assert processes_mentioning(str(runs)) == []
    assert seconds < 90, f"took {seconds:.0f} s (goal < 60 s)"


def test_pooled_slots_are_reached_with_their_slot_keys(tmp_path):
    fleet = small_fleet([], free_port_base(8))
    fleet = dataclasses.replace(fleet, security=dataclasses.replace(
        fleet.security, curve=True, keys_dir=tmp_path / "keys", allow_dir=tmp_path / "keys" / "allowed"))
    pool = VehiclePool(fleet, 2, tmp_path / "pool", "synthetic")     # slot processes are never started
    try:
        slots = {s.id: s.control for s in pool.slot_fleet().vehicles}
        for sid, control in slots.items():
            assert pool.bus.security.server_keys[control] == sid            # the pool's adopt requests
            assert security_for(pool.slot_fleet(), sid).server_keys[control] == sid   # slot -> slot layer moves
        slot = pool._slots["slot01"]
        slot.state, slot.identity = BUSY, Identity("v7", "jetson_nano", "Town01", 300.0)
        played = pool.fleet_for(["v7"])
        (v7,) = played.vehicles
        assert v7.control == slots["slot01"]
        assert security_for(played, fleet.edge.id).server_keys[v7.control] == "slot01"   # the edge's requests
    finally:
        pool.close()


def test_the_disconnect_watch_expects_each_control_sockets_key(tmp_path, monkeypatch):
    """A vehicle's own key, or the slot's that plays it (named in `security.server_keys`, as `fleet_for` does)."""
    fleet = small_fleet(["v1", "v7"], free_port_base(8))
    played = fleet.vehicles[1].control
    fleet = dataclasses.replace(fleet, security=dataclasses.replace(
        fleet.security, curve=True, keys_dir=tmp_path / "keys", allow_dir=tmp_path / "keys" / "allowed",
        server_keys={played: "slot01"}))
    seen = []
    monkeypatch.setattr("flad_edge.fhdp.recovery.detection.make_client",
                        lambda sock, sec, identity, server: seen.append((sec.identity, server)))
    DisconnectWatch(fleet, fleet.edge.id, lambda *_: None).close()
    assert seen == [(fleet.edge.id, "v1"), (fleet.edge.id, "slot01")]
