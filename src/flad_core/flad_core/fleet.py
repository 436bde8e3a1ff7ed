"""The fleet description (`launch/fleet.yaml`): roles, addresses, device profiles, seeds.

Both `ros2 launch` and the plain CLI read this one file; moving from one laptop to a real fleet
changes only the addresses in it.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from flad_core.bus import BusConfig
from flad_core.config import ConfigError, from_dict, load_yaml
from flad_core.device import DeviceError, check_device_spec
from flad_core.security import SecurityConfig

GB = 1024**3


@dataclass
class DeviceProfile:
    """Compute a vehicle offers for training. Figures for emulated devices come from the paper's Table 1."""

    mem_gb: float
    tflops: float
    link_mbps: float = 50.0
    #: Jetson-style unified memory: the GPU and the CPU share `mem_gb`, so a stage's model, its activations and
    #: the host-side buffers (pinned staging, data) all count against that one budget. A discrete GPU
    #: (`unified_memory: false`) has `gpu_mem_gb` of its own for the stage's tensors.
    unified_memory: bool = True
    gpu_mem_gb: float = 0.0

    def validate(self) -> None:
        for name in ("mem_gb", "tflops", "link_mbps"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be positive, got {getattr(self, name)}")
        if not self.unified_memory and self.gpu_mem_gb <= 0:
            raise ConfigError("gpu_mem_gb", "a discrete-GPU profile (unified_memory: false) needs its GPU memory")
        if self.gpu_mem_gb < 0:
            raise ConfigError("gpu_mem_gb", f"must not be negative, got {self.gpu_mem_gb}")

    @property
    def mem_bytes(self) -> int:
        return int(self.mem_gb * GB)

    @property
    def stage_mem_bytes(self) -> int:
        """The budget a training stage's tensors (weights, gradients, optimizer state, activations) must fit:
        the shared memory on a unified-memory device, the GPU's own memory on a discrete one."""
        return int((self.mem_gb if self.unified_memory else self.gpu_mem_gb) * GB)


#: Jetson devices of the paper's prototype (Table 1); link rates are our assumption (802.11ac-class V2V)
PAPER_PROFILES: dict[str, DeviceProfile] = {
    "jetson_nano": DeviceProfile(mem_gb=8, tflops=0.472, link_mbps=50.0),
    "jetson_nx": DeviceProfile(mem_gb=8, tflops=0.404, link_mbps=50.0),
    "jetson_agx": DeviceProfile(mem_gb=32, tflops=3.85, link_mbps=100.0),
}

#: Per-device link rates (Mb/s) an emulation can run under, by setting name.
#: "table1": the profiles' own rates (Table 1 gives compute and memory; these rates are our assumption).
#: "measured": the inter-vehicle throughput the FLAD paper measured on its Jetson testbed (Table 2,
#: 14-22 Mb/s): FHDP pipelines reached 22 Mb/s per stage, random partitions 14-15 Mb/s. Mapping the upper
#: figure to the AGX and the lower one to the Nano and NX is ours; the paper reports no per-device rate.
LINK_SETTINGS: dict[str, dict[str, float]] = {
    "table1": {name: profile.link_mbps for name, profile in PAPER_PROFILES.items()},
    "measured": {"jetson_nano": 14.0, "jetson_nx": 14.0, "jetson_agx": 22.0},
}


def link_mbps(profile_name: str, setting: str = "table1") -> float:
    """Link rate in Mb/s of paper profile `profile_name` under link setting `setting` (`LINK_SETTINGS`)."""
    if setting not in LINK_SETTINGS:
        raise ValueError(f"unknown link setting {setting!r} (known: {', '.join(sorted(LINK_SETTINGS))})")
    rates = LINK_SETTINGS[setting]
    if profile_name not in rates:
        raise ValueError(f"no {setting!r} link rate for profile {profile_name!r} "
                         f"(known: {', '.join(sorted(rates))})")
    return rates[profile_name]


@dataclass
class VehicleSpec:
    id: str
    profile: str = "jetson_nano"
    town: str = ""
    predicted_dwell_s: float = 600.0
    control: str = ""    # tcp address where this vehicle serves edge requests (FHDP training)
    data: str = ""       # tcp address of its pipeline inbox (tensor frames)
    device: str = "auto"  # where its models run: auto | cpu | cuda[:N] (flad_core.device)

    def validate(self) -> None:
        for key in ("control", "data"):
            value = getattr(self, key)
            if value and not re.fullmatch(r"tcp://[^:/]+:\d+", value):
                raise ConfigError(key, f"bad ZeroMQ address {value!r} (expected e.g. tcp://127.0.0.1:7200)")
        try:
            check_device_spec(self.device)
        except DeviceError as exc:
            raise ConfigError("device", str(exc)) from exc
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_\-]{0,63}", self.id):
            raise ConfigError("id", f"vehicle id {self.id!r} must start with a letter and use [A-Za-z0-9_-]")


@dataclass
class RoleSpec:
    """An edge or cloud process."""

    id: str = "edge-0"


@dataclass
class HeartbeatConfig:
    interval_s: float = 0.5
    timeout_s: float = 2.0

    def validate(self) -> None:
        if self.interval_s <= 0:
            raise ConfigError("interval_s", "must be positive")
        if self.timeout_s <= self.interval_s:
            raise ConfigError("timeout_s", f"must exceed interval_s ({self.interval_s})")


@dataclass
class FleetConfig:
    name: str = "loopback"
    seed: int = 0
    bus: BusConfig = field(default_factory=BusConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)
    profiles: dict[str, DeviceProfile] = field(default_factory=dict)
    edge: RoleSpec = field(default_factory=RoleSpec)
    cloud: RoleSpec = field(default_factory=lambda: RoleSpec(id="cloud"))
    vehicles: list[VehicleSpec] = field(default_factory=list)

    def validate(self) -> None:
        seen: set[str] = set()
        for i, v in enumerate(self.vehicles):
            if v.id in seen:
                raise ConfigError(f"vehicles[{i}].id", f"duplicate vehicle id {v.id!r}")
            seen.add(v.id)
            if v.profile not in self.all_profiles():
                raise ConfigError(f"vehicles[{i}].profile",
                                  f"unknown profile {v.profile!r} (known: {', '.join(sorted(self.all_profiles()))})")

    def all_profiles(self) -> dict[str, DeviceProfile]:
        """Built-in paper profiles, overridden/extended by the file's own `profiles`."""
        return {**PAPER_PROFILES, **self.profiles}

    def vehicle(self, vehicle_id: str) -> VehicleSpec:
        for v in self.vehicles:
            if v.id == vehicle_id:
                return v
        raise KeyError(f"vehicle {vehicle_id!r} is not in fleet {self.name!r}")


def load_fleet(path: str | Path) -> FleetConfig:
    return load_yaml(FleetConfig, path)


def fleet_from_dict(data: dict) -> FleetConfig:
    return from_dict(FleetConfig, data)


def _move_port(address: str, base: int, offsets: dict[int, int]) -> str:
    match = re.fullmatch(r"(tcp://[^:]+):(\d+)", address)
    if not match:
        return address
    port = int(match.group(2))
    if port not in offsets:
        offsets[port] = len(offsets)
    return f"{match.group(1)}:{base + offsets[port]}"


def with_port_base(cfg: FleetConfig, base: int) -> FleetConfig:
    """Copy of `cfg` with every TCP port renumbered from `base` (parallel runs and tests on one host)."""
    offsets: dict[int, int] = {}
    bus = dataclasses.replace(
        cfg.bus,
        hub_pub=_move_port(cfg.bus.hub_pub, base, offsets),
        hub_sub=_move_port(cfg.bus.hub_sub, base, offsets),
        services={k: _move_port(v, base, offsets) for k, v in cfg.bus.services.items()},
    )
    vehicles = [dataclasses.replace(v, control=_move_port(v.control, base, offsets) if v.control else "",
                                    data=_move_port(v.data, base, offsets) if v.data else "")
                for v in cfg.vehicles]
    return dataclasses.replace(cfg, bus=bus, vehicles=vehicles)
