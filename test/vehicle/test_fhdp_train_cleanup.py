"""A stage that cannot build its stage links (a peer's CURVE key is missing) leaves nothing behind: the links it
did build are closed, the optimizer is detached from the layer store, and the error reaches the caller (the work
loop reports it to the edge)."""

from __future__ import annotations

import pytest

from flad_core.bus import BusConfig
from flad_core.fleet import FleetConfig, VehicleSpec
from flad_core.procs import free_port_base
from flad_core.security import SecurityConfig, SecurityError, generate_keypair
from flad_vehicle.fhdp import worker
from flad_vehicle.fhdp.pipeline import Assignment, Pipeline, Stage
from flad_vehicle.fhdp.worker import FhdpVehicle


def test_a_missing_peer_key_closes_the_built_links_and_detaches_the_optimizer(tmp_path, monkeypatch):
    keys = tmp_path / "keys"
    for name in ("va", "v0"):                         # "vb", the next stage, has no key
        generate_keypair(keys, name, allow_dir=keys / "allowed")
    base = free_port_base(8)
    addr = [f"tcp://127.0.0.1:{base + i}" for i in range(8)]
    fleet = FleetConfig(bus=BusConfig(hub_pub=addr[0], hub_sub=addr[1]),
                        security=SecurityConfig(curve=True, keys_dir=keys, allow_dir=keys / "allowed"),
                        vehicles=[VehicleSpec("va", control=addr[2], data=addr[3]),
                                  VehicleSpec("v0", control=addr[4], data=addr[5]),
                                  VehicleSpec("vb", control=addr[6], data=addr[7])])
    vehicle = FhdpVehicle(fleet, "v0", encoder="tiny")
    try:
        n = len(vehicle.store.layer_names)
        vehicle.store.owned = set(vehicle.store.layer_names)
        a = Assignment(pipeline_id="p1", round=0, cluster_id="c0", method="swift",
                       pipeline=Pipeline((Stage("va", 0, 1), Stage("v0", 1, n - 1), Stage("vb", n - 1, n))),
                       members={"va": addr[2], "v0": addr[4], "vb": addr[6]}, inboxes=[addr[3], addr[5], addr[7]],
                       layer_owner=["edge"] * n, steps=1)
        vehicle._current = {"assignment": a, "stage_index": 1, "range": (1, n - 1), "fetched": 0,
                            "wanted": set(vehicle.store.layers_in(1, n - 1))}
        attached, detached, closed = [], [], []
        monkeypatch.setattr(vehicle.store, "attach", attached.append)
        monkeypatch.setattr(vehicle.store, "detach", detached.append)
        real_close = worker.OutLink.close

        def close(link):
            closed.append(link.peer)
            real_close(link)

        monkeypatch.setattr(worker.OutLink, "close", close)
        with pytest.raises(SecurityError, match=r"vb\.key"):
            vehicle.train(a)
        assert len(attached) == 1 and detached == attached
        assert closed == ["va"]                       # the link to the previous stage was built, and closed
        assert vehicle.agent.state == "idle"
    finally:
        vehicle.close()
