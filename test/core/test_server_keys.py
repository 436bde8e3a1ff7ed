"""CURVE clients expect the key of the server they reach: a vehicle's control socket answers with that vehicle's
key, the cloud's services with the cloud's, the edge's with the edge's (`SecurityConfig.server_keys`, filled by
`flad_core.roles.security_for`); and no CURVE server starts without an allow-list."""

from __future__ import annotations

import dataclasses
import time

import pytest

from flad_core import codec
from flad_core.bus import BusConfig, BusHub, RequestTimeoutError, ZmqBus
from flad_core.config import ConfigError, to_dict
from flad_core.fleet import fleet_from_dict, load_fleet
from flad_core.roles import default_fleet_path, security_for, server_keys_for
from flad_core.security import SecurityConfig, SecurityError, generate_keypair

from flad_testing import free_port_base


def test_security_for_names_the_key_of_every_server_address():
    fleet = load_fleet(default_fleet_path())
    keys = security_for(fleet, "v000").server_keys
    for v in fleet.vehicles:
        assert keys[v.control] == v.id
    for service, address in fleet.bus.services.items():
        assert keys[address] == (fleet.cloud.id if service.startswith("cloud/") else fleet.edge.id), service
    sec = security_for(fleet, "v000")
    assert sec.identity == "v000" and sec.server_key(fleet.bus.hub_sub) == fleet.security.server


def test_server_keys_of_the_fleet_file_win():
    fleet = load_fleet(default_fleet_path())
    v = fleet.vehicles[0]
    fleet = dataclasses.replace(fleet, security=dataclasses.replace(fleet.security, server_keys={v.control: "slot00"}))
    assert server_keys_for(fleet)[v.control] == "slot00"
    assert fleet_from_dict(to_dict(fleet)).security.server_keys == {v.control: "slot00"}   # survives the YAML


def test_curve_without_an_allow_list_is_a_config_error():
    data = to_dict(load_fleet(default_fleet_path()))
    data["security"].update(curve=True, allow_dir=None)
    with pytest.raises(ConfigError, match=r"security\.allow_dir: must be set when curve is true"):
        fleet_from_dict(data)
    data["security"]["curve"] = False
    assert fleet_from_dict(data).security.allow_dir is None        # plain TCP needs none


@pytest.fixture
def keys(tmp_path):
    keys = tmp_path / "keys"
    for name in ("edge", "v1", "cloud"):
        generate_keypair(keys, name, allow_dir=keys / "allowed")
    return keys


def _sec(keys, name, **kw) -> SecurityConfig:
    return SecurityConfig(curve=True, keys_dir=keys, identity=name, server="edge", allow_dir=keys / "allowed", **kw)


def test_no_curve_server_without_an_allow_list(keys):
    base = free_port_base(4)
    cfg = BusConfig(hub_pub=f"tcp://127.0.0.1:{base}", hub_sub=f"tcp://127.0.0.1:{base + 1}")
    unlisted = dataclasses.replace(_sec(keys, "edge"), allow_dir=None)
    with pytest.raises(SecurityError, match="allow_dir is not set"):
        BusHub(cfg, unlisted, "edge")
    with ZmqBus("edge", cfg, unlisted) as bus:
        bus.serve("x/ping", "flad_msgs/msg/Heartbeat", "flad_msgs/msg/Ack", lambda m: None,
                  address=f"tcp://127.0.0.1:{base + 2}")
        for _ in range(100):
            if bus.errors:
                break
            time.sleep(0.02)
        assert bus.errors and "allow_dir is not set" in bus.errors[0]


def test_requests_expect_each_servers_own_key(keys):
    base = free_port_base(4)
    cfg = BusConfig(hub_pub=f"tcp://127.0.0.1:{base}", hub_sub=f"tcp://127.0.0.1:{base + 1}")
    vehicle_at, cloud_at = f"tcp://127.0.0.1:{base + 2}", f"tcp://127.0.0.1:{base + 3}"

    def ack(who):
        return lambda m: codec.new("flad_msgs/msg/Ack", ok=True, message=f"{who} {m.vehicle_id}")

    ping = codec.new("flad_msgs/msg/Heartbeat", vehicle_id="edge")
    with ZmqBus("v1", cfg, _sec(keys, "v1")) as vehicle, ZmqBus("cloud", cfg, _sec(keys, "cloud")) as cloud:
        vehicle.serve("vehicle/ping", "flad_msgs/msg/Heartbeat", "flad_msgs/msg/Ack", ack("v1"), address=vehicle_at)
        cloud.serve("cloud/ping", "flad_msgs/msg/Heartbeat", "flad_msgs/msg/Ack", ack("cloud"), address=cloud_at)
        with ZmqBus("edge", cfg, _sec(keys, "edge", server_keys={vehicle_at: "v1", cloud_at: "cloud"})) as edge:
            assert edge.request("vehicle/ping", ping, "flad_msgs/msg/Ack", address=vehicle_at).message == "v1 edge"
            assert edge.request("cloud/ping", ping, "flad_msgs/msg/Ack", address=cloud_at).message == "cloud edge"
        # expecting the edge's key at the vehicle's socket: no handshake, and the error says which key it expected
        with ZmqBus("edge", cfg, _sec(keys, "edge")) as edge, pytest.raises(
                RequestTimeoutError, match="CURVE handshake failed: we expect server key 'edge'"):
            edge.request("vehicle/ping", ping, "flad_msgs/msg/Ack", address=vehicle_at, timeout_s=1.0)
