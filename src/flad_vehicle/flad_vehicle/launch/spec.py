"""Launch plans as plain data: which nodes, names, namespaces, parameters and remappings a plan starts.

`ros2 launch` needs the `launch`/`launch_ros` packages, which are not installable everywhere (not on this
project's CI host, for one). So the decisions live in plans, ROS-free and tested: a plan is a function of
`PlanArgs` (the launch arguments every `.launch.py` file declares) returning a `LaunchPlan`. The vehicle
plan is flad_vehicle.launch.vehicle's; the edge, cloud, fleet and closed-loop plans are flad_edge.launch's.

Node kinds register where their plans live (`register_node_kinds`): a `NodeSpec` names its executable, and
`NodeSpec.kind` looks it up among the registered kinds.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from flad_core.config import ConfigError, from_dict
from flad_core.fleet import FleetConfig, load_fleet, with_port_base


@dataclass(frozen=True)
class NodeKind:
    """One node executable: its ROS package, console-script name, `python -m` module and config dataclass."""

    package: str
    executable: str
    module: str
    config: str        # "module:Class" of the dataclass whose fields are the node's ROS parameters


#: every node a plan may start (executable name -> kind), filled by `register_node_kinds` where the plans
#: live. The config class is what `declare_config` declares.
NODE_KINDS: dict[str, NodeKind] = {}


def register_node_kinds(*kinds: NodeKind) -> None:
    """Make `kinds` startable by plans; registering the same kind again is harmless, a different one under a
    taken executable name is an error."""
    for kind in kinds:
        known = NODE_KINDS.setdefault(kind.executable, kind)
        if known != kind:
            raise ValueError(f"node executable {kind.executable!r} is already {known}")


@dataclass
class NodeSpec:
    """One node to start. `parameters` may be nested (dotted ROS names); values are plain YAML types."""

    executable: str
    name: str
    namespace: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    remappings: list[tuple[str, str]] = field(default_factory=list)

    @property
    def kind(self) -> NodeKind:
        return NODE_KINDS[self.executable]

    @property
    def package(self) -> str:
        return self.kind.package

    @property
    def fqn(self) -> str:
        """Fully qualified node name (`/ns/name`), as ROS parameter files address a node."""
        ns = "/" + self.namespace.strip("/") if self.namespace.strip("/") else ""
        return f"{ns}/{self.name}"

    def flat_parameters(self) -> dict[str, Any]:
        """Dotted names -> values, as `launch_ros` and `declare_config` name them."""
        return _flatten(self.parameters)


@dataclass
class IncludeSpec:
    """Another package's launch file (e.g. carla_ros_bridge's), with its launch arguments as strings."""

    package: str
    launch_file: str
    arguments: dict[str, str] = field(default_factory=dict)


@dataclass
class LaunchPlan:
    name: str
    nodes: list[NodeSpec] = field(default_factory=list)
    includes: list[IncludeSpec] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)   # path -> content the plan needs on disk (spawn JSON)


@dataclass
class PlanArgs:
    """The launch arguments every plan understands (the `.launch.py` files declare the same names)."""

    fleet: str = field(default="", metadata={"help": "fleet YAML (empty: launch/fleet.yaml)"})
    vehicle_id: str = field(default="", metadata={"help": "vehicle id from the fleet file (vehicle plan)"})
    role_name: str = field(default="", metadata={
        "help": "carla-ros-bridge role name of the vehicle's ego (empty: the vehicle id; 'hero' for CARLA)"})
    edge_address: str = field(default="", metadata={
        "help": "host name or IP of the edge, replacing the host of the edge's hub and services in the fleet file"})
    vehicles: int = field(default=0, metadata={
        "help": "closed loops: how many of the fleet's vehicles drive (0: one); fleet plan: 0 = all"})
    port_base: int = field(default=0, metadata={"help": "renumber the fleet's TCP ports from this base (0: keep)"})
    run_dir: str = field(default="", metadata={"help": "folder for node logs and records (empty: none)"})
    fhdp_config: str = field(default="", metadata={"help": "FHDP training config YAML (empty: launch/fhdp.yaml)"})
    rounds: int = field(default=0, metadata={"help": "FL rounds (0: from the FHDP config)"})
    mode: Literal["fhdp", "control_plane"] = field(default="fhdp", metadata={
        "help": "fhdp: train the encoder by FHDP; control_plane: registration, heartbeats and the fleet table only"})
    data: str = field(default="synthetic", metadata={"help": "vehicles' training data root, or 'synthetic'"})
    cloud: bool = field(default=True, metadata={"help": "fleet plan: aggregate through the cloud node"})
    carla_host: str = field(default="localhost", metadata={"help": "CARLA server host (closed_loop_carla)"})
    carla_port: int = field(default=2000, metadata={"help": "CARLA server port (closed_loop_carla)"})
    town: str = field(default="Town01", metadata={"help": "town to load (closed loops)"})
    duration_s: float = field(default=0.0, metadata={
        "help": "closed_loop_embedded: simulated seconds to drive (0: until every route has ended)"})
    waypoint_source: Literal["edge", "encoder_head", "expert"] = field(default="edge", metadata={
        "help": "closed loops: where the controller's waypoints come from (edge waypoint node, the encoder's "
                "own head, or the world's privileged expert for plumbing checks)"})
    objects_file: str = field(default="", metadata={
        "help": "where closed_loop_carla writes the carla_spawn_objects JSON (empty: a temp file / run_dir)"})

    def validate(self) -> None:
        if self.vehicles < 0:
            raise ConfigError("vehicles", f"must be >= 0, got {self.vehicles}")
        if self.rounds < 0:
            raise ConfigError("rounds", f"must be >= 0, got {self.rounds}")
        if self.duration_s < 0:
            raise ConfigError("duration_s", f"must be >= 0, got {self.duration_s}")
        if self.port_base and not 1024 <= self.port_base < 65000:
            raise ConfigError("port_base", f"must be in [1024, 65000), got {self.port_base}")
        if self.edge_address and ("/" in self.edge_address or ":" in self.edge_address):
            raise ConfigError("edge_address",
                              f"give a host name or IP only (no scheme/port), got {self.edge_address!r}")


#: a plan: the launch arguments in, the nodes (and includes, files) to start out
PlanFn = Callable[[PlanArgs], LaunchPlan]


def make_plan(name: str, args: PlanArgs | dict[str, Any] | None, plans: Mapping[str, PlanFn]) -> LaunchPlan:
    """The plan called `name` among `plans`, for `args` (a PlanArgs or a dict of launch-argument
    strings/values, validated)."""
    if name not in plans:
        raise ConfigError("plan", f"unknown plan {name!r} (known: {', '.join(plans)})")
    if not isinstance(args, PlanArgs):
        args = from_dict(PlanArgs, _coerce_launch_args(args or {}), key="launch")
    return plans[name](args)


def _coerce_launch_args(raw: dict[str, Any]) -> dict[str, Any]:
    """Launch arguments arrive as strings (`vehicles:=3`): convert them to PlanArgs' field types."""
    types = {f.name: f.type for f in dataclasses.fields(PlanArgs)}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        kind = types.get(key)
        if isinstance(value, str) and kind in ("int", "bool", "float"):
            with contextlib.suppress(yaml.YAMLError):
                value = yaml.safe_load(value) if value != "" else None
            if value is None:
                continue
        out[key] = value
    return out


# -------------------------------------------------------------------------------------------- plan helpers


def repo_launch_dir() -> Path:
    """`launch/` of this source checkout (installed packages carry a copy in share/<pkg>/launch)."""
    return Path(__file__).resolve().parents[4] / "launch"   # src/flad_vehicle/flad_vehicle/launch/spec.py


def load_plan_fleet(args: PlanArgs) -> FleetConfig:
    """The fleet a plan starts: `args.fleet` (default launch/fleet.yaml), ports renumbered from `port_base`."""
    fleet = load_fleet(args.fleet or repo_launch_dir() / "fleet.yaml")
    if args.port_base:
        fleet = with_port_base(fleet, args.port_base)
    return fleet


def common_parameters(args: PlanArgs) -> dict[str, Any]:
    """Parameters every FLAD role node takes: where the fleet is and how to reach it."""
    params: dict[str, Any] = {}
    if args.fleet:
        params["fleet"] = str(args.fleet)
    if args.port_base:
        params["port_base"] = args.port_base
    if args.run_dir:
        params["run_dir"] = str(args.run_dir)
    return params


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
