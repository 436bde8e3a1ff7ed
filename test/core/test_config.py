"""Typed configs: a wrong key, type or value is reported with its dotted path."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flad_core.config import ConfigError, from_dict, load_yaml, to_dict
from flad_core.fleet import FleetConfig, fleet_from_dict, load_fleet, with_port_base
from flad_core.roles import default_fleet_path


def test_shipped_fleet_file_loads():
    fleet = load_fleet(default_fleet_path())
    assert fleet.vehicles and fleet.all_profiles()["jetson_agx"].tflops == 3.85


@pytest.mark.parametrize(("data", "key", "reason"), [
    ({"vehicles": [{"id": "v1", "profile": "toaster"}]}, "vehicles[0].profile", "unknown profile"),
    ({"vehicles": [{"id": "v1"}, {"id": "v1"}]}, "vehicles[1].id", "duplicate"),
    ({"vehicles": [{"id": "1bad"}]}, "vehicles[0].id", "must start with a letter"),
    ({"vehicles": [{"id": "v1", "colour": "red"}]}, "vehicles[0].colour", "unknown key"),
    ({"bus": {"hub_pub": "localhost"}}, "bus.hub_pub", "bad ZeroMQ address"),
    ({"bus": {"services": {"x": "nowhere"}}}, "bus.services.x", "bad ZeroMQ address"),
    ({"profiles": {"p": {"mem_gb": "lots", "tflops": 1}}}, "profiles.p.mem_gb", "expected a number"),
    ({"profiles": {"p": {"tflops": 1}}}, "profiles.p.mem_gb", "required key is missing"),
    ({"profiles": {"p": {"mem_gb": -1, "tflops": 1}}}, "profiles.p.mem_gb", "must be positive"),
    ({"heartbeat": {"interval_s": 1.0, "timeout_s": 0.5}}, "heartbeat.timeout_s", "must exceed"),
    ({"seed": "seven"}, "seed", "expected an integer"),
    ({"security": {"curve": "yes"}}, "security.curve", "expected true/false"),
    ([1, 2], "FleetConfig", "expected a mapping"),
])
def test_errors_name_the_bad_key(data, key, reason):
    with pytest.raises(ConfigError) as err:
        fleet_from_dict(data)
    assert err.value.key == key
    assert reason in str(err.value)


def test_yaml_file_errors_name_file_and_key(tmp_path):
    bad = tmp_path / "fleet.yaml"
    bad.write_text("vehicles:\n  - {id: v1, profile: nope}\n")
    with pytest.raises(ConfigError, match=r"vehicles\[0\]\.profile.*fleet\.yaml"):
        load_fleet(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("vehicles: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_fleet(broken)
    with pytest.raises(ConfigError, match="not found"):
        load_fleet(tmp_path / "missing.yaml")


def test_port_base_renumbers_consistently():
    fleet = fleet_from_dict({"bus": {"hub_pub": "tcp://127.0.0.1:7100", "hub_sub": "tcp://127.0.0.1:7101",
                                     "services": {"a": "tcp://127.0.0.1:7110", "b": "tcp://127.0.0.1:7100"}}})
    moved = with_port_base(fleet, 30000)
    assert moved.bus.hub_pub == "tcp://127.0.0.1:30000"
    assert moved.bus.hub_sub == "tcp://127.0.0.1:30001"
    assert moved.bus.services == {"a": "tcp://127.0.0.1:30002", "b": "tcp://127.0.0.1:30000"}


@dataclass
class Inner:
    mode: Literal["fast", "slow"] = "fast"
    weights: list[float] = field(default_factory=list)


@dataclass
class Outer:
    name: str
    inner: Inner = field(default_factory=Inner)
    pair: tuple[int, int] = (1, 2)
    optional: int | None = None


def test_generic_dataclass_loading():
    cfg = from_dict(Outer, {"name": "x", "inner": {"mode": "slow", "weights": [1, 2.5]}, "pair": [3, 4]})
    assert cfg.inner.weights == [1.0, 2.5] and cfg.pair == (3, 4) and cfg.optional is None
    assert to_dict(cfg)["inner"]["mode"] == "slow"
    with pytest.raises(ConfigError, match=r"inner\.mode.*one of"):
        from_dict(Outer, {"name": "x", "inner": {"mode": "medium"}})
    with pytest.raises(ConfigError, match=r"inner\.weights\[1\]"):
        from_dict(Outer, {"name": "x", "inner": {"weights": [1, "a"]}})
    with pytest.raises(ConfigError, match="pair: expected 2 items"):
        from_dict(Outer, {"name": "x", "pair": [1]})


@given(st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.text(max_size=5), st.none()), max_size=4))
def test_arbitrary_mappings_load_or_fail_cleanly(data):
    try:
        from_dict(FleetConfig, data)
    except ConfigError as exc:
        assert exc.key  # always says where


def test_roundtrip_through_yaml(tmp_path):
    import yaml

    fleet = load_fleet(default_fleet_path())
    path = tmp_path / "f.yaml"
    path.write_text(yaml.safe_dump(to_dict(fleet)))
    assert load_yaml(FleetConfig, path) == fleet
