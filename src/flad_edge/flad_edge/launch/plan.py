"""What each FLAD launch file starts, as plain data: the logic behind `launch/*.launch.py` and `flad launch`.

`ros2 launch` needs the `launch`/`launch_ros` packages, which are not installable everywhere (not on this
project's CI host, for one). So the decisions -- which nodes, names, namespaces, parameters and
remappings, read from `launch/fleet.yaml` -- live here, ROS-free and tested; each `.launch.py` file only
turns a plan into `launch_ros.actions.Node`s, and `flad launch PLAN` starts the same plan as plain
processes (`python -m <node module> --ros-args ...`) for machines without the launch package.

Plans:
  vehicle               one vehicle: stage worker (FHDP) + encoder + PID controller
  edge                  the edge: orchestrator (registration, SWIFT, FL rounds, aggregation, recovery) + waypoints
  cloud                 the cloud aggregator
  fleet                 cloud + orchestrator + every vehicle's stage worker: `flad demo` over ROS topics
  closed_loop_embedded  embedded-world bridge + N vehicles + edge
  closed_loop_carla     carla_ros_bridge (synchronous) + carla_spawn_objects (our rig) + FLAD vehicle + edge
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from flad_core.config import ConfigError, from_dict
from flad_core.fleet import FleetConfig, load_fleet, with_port_base

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeKind:
    """One node executable: its ROS package, console-script name, `python -m` module and config dataclass."""

    package: str
    executable: str
    module: str
    config: str        # "module:Class" of the dataclass whose fields are the node's ROS parameters


#: every node a plan may start (executable name -> kind). The config class is what `declare_config` declares.
NODE_KINDS: dict[str, NodeKind] = {k.executable: k for k in (
    NodeKind("flad_edge", "orchestrator_node", "flad_edge.nodes.orchestrator",
             "flad_edge.nodes.orchestrator:OrchestratorNodeConfig"),
    NodeKind("flad_edge", "cloud_node", "flad_edge.nodes.cloud", "flad_edge.nodes.cloud:CloudNodeConfig"),
    NodeKind("flad_vehicle", "stage_worker_node", "flad_vehicle.nodes.stage_worker",
             "flad_vehicle.nodes.stage_worker:StageWorkerNodeConfig"),
    NodeKind("flad_vehicle", "vehicle_node", "flad_vehicle.nodes.stage_worker",
             "flad_vehicle.nodes.stage_worker:StageWorkerNodeConfig"),
    # helper B1's closed-loop nodes (flad_core.node_main.component_main adapters)
    NodeKind("flad_sim", "world_bridge", "flad_sim.nodes.world_bridge", "flad_sim.closed_loop:WorldBridgeConfig"),
    NodeKind("flad_vehicle", "encoder_node", "flad_vehicle.nodes.encoder_node",
             "flad_vehicle.encoder.stream:EncoderNodeConfig"),
    NodeKind("flad_vehicle", "controller_node", "flad_vehicle.nodes.controller_node",
             "flad_vehicle.control.loop:ControllerConfig"),
    NodeKind("flad_edge", "waypoint_node", "flad_edge.nodes.waypoint_node",
             "flad_edge.celladapt.stream:WaypointNodeConfig"),
)}


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


# -------------------------------------------------------------------------------------------- helpers


def repo_launch_dir() -> Path:
    """`launch/` of this source checkout (installed packages carry a copy in share/<pkg>/launch)."""
    return Path(__file__).resolve().parents[3] / "launch"


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _fleet(args: PlanArgs) -> FleetConfig:
    fleet = load_fleet(args.fleet or repo_launch_dir() / "fleet.yaml")
    if args.port_base:
        fleet = with_port_base(fleet, args.port_base)
    return fleet


def _common(args: PlanArgs) -> dict[str, Any]:
    """Parameters every FLAD role node takes: where the fleet is and how to reach it."""
    params: dict[str, Any] = {}
    if args.fleet:
        params["fleet"] = str(args.fleet)
    if args.port_base:
        params["port_base"] = args.port_base
    if args.run_dir:
        params["run_dir"] = str(args.run_dir)
    return params


def _pick_vehicles(fleet: FleetConfig, n: int, default: int) -> list[str]:
    ids = [v.id for v in fleet.vehicles]
    n = n or default or len(ids)
    if n > len(ids):
        raise ConfigError("vehicles", f"fleet {fleet.name!r} has {len(ids)} vehicles, {n} requested")
    return ids[:n]


# -------------------------------------------------------------------------------------------- plans


def vehicle_nodes(args: PlanArgs, fleet: FleetConfig, vehicle_id: str, role_name: str = "",
                  closed_loop: bool = True) -> list[NodeSpec]:
    """One vehicle, in namespace `/<vehicle_id>`: stage worker (+ encoder and PID controller when it drives)."""
    fleet.vehicle(vehicle_id)  # KeyError names an unknown id
    role = role_name or args.role_name or vehicle_id
    worker = {**_common(args), "vehicle_id": vehicle_id, "mode": args.mode, "data": args.data}
    if args.edge_address:
        worker["edge_address"] = args.edge_address
    nodes = [NodeSpec("stage_worker_node", "stage_worker", vehicle_id, worker)]
    if closed_loop:
        encoder = {"vehicle_id": vehicle_id, "role_name": role}
        if args.waypoint_source == "encoder_head":
            encoder["waypoint_source"] = "encoder_head"
        controller = {"vehicle_id": vehicle_id, "role_name": role}
        if args.waypoint_source != "edge":
            controller["waypoint_source"] = args.waypoint_source
        nodes.append(NodeSpec("encoder_node", "encoder", vehicle_id, encoder))
        nodes.append(NodeSpec("controller_node", "controller", vehicle_id, controller))
    return nodes


def edge_nodes(args: PlanArgs, fleet: FleetConfig, vehicle_ids: list[str] | None = None,
               use_cloud: bool = False, waypoints: bool = True, serve_forever: bool = False) -> list[NodeSpec]:
    """The edge: orchestrator (+ the waypoint node for the vehicles it serves)."""
    orch: dict[str, Any] = {**_common(args), "mode": args.mode, "cloud": use_cloud}
    if args.fhdp_config:
        orch["fhdp_config"] = str(args.fhdp_config)
    if args.rounds:
        orch["rounds"] = args.rounds
    if vehicle_ids is not None and len(vehicle_ids) != len(fleet.vehicles):
        orch["expect"] = len(vehicle_ids)
    if serve_forever:
        orch["duration_s"] = 0.0
    nodes = [NodeSpec("orchestrator_node", "orchestrator", "", orch)]
    if waypoints:
        ids = vehicle_ids if vehicle_ids is not None else [v.id for v in fleet.vehicles]
        nodes.append(NodeSpec("waypoint_node", "waypoint", "", {"vehicle_ids": list(ids)}))
    return nodes


def cloud_nodes(args: PlanArgs, fleet: FleetConfig) -> list[NodeSpec]:
    return [NodeSpec("cloud_node", "cloud", "", _common(args))]


def plan_vehicle(args: PlanArgs) -> LaunchPlan:
    if not args.vehicle_id:
        raise ConfigError("vehicle_id", "the vehicle plan needs a vehicle id from the fleet file")
    fleet = _fleet(args)
    return LaunchPlan("vehicle", vehicle_nodes(args, fleet, args.vehicle_id))


def plan_edge(args: PlanArgs) -> LaunchPlan:
    fleet = _fleet(args)
    return LaunchPlan("edge", edge_nodes(args, fleet, use_cloud=args.cloud and args.mode == "fhdp"))


def plan_cloud(args: PlanArgs) -> LaunchPlan:
    return LaunchPlan("cloud", cloud_nodes(args, _fleet(args)))


def plan_fleet(args: PlanArgs) -> LaunchPlan:
    """Training on ROS: cloud + orchestrator + a stage worker per vehicle (what `flad demo` starts, over ROS)."""
    fleet = _fleet(args)
    ids = _pick_vehicles(fleet, args.vehicles, 0)
    use_cloud = args.cloud and args.mode == "fhdp"
    nodes = cloud_nodes(args, fleet) if use_cloud else []
    nodes += edge_nodes(args, fleet, ids, use_cloud=use_cloud, waypoints=False)
    for vid in ids:
        nodes += vehicle_nodes(args, fleet, vid, closed_loop=False)
    return LaunchPlan("fleet", nodes)


def plan_closed_loop_embedded(args: PlanArgs) -> LaunchPlan:
    """The embedded world on carla-ros-bridge topics, N driving vehicles (role = vehicle id) and the edge."""
    fleet = _fleet(args)
    ids = _pick_vehicles(fleet, args.vehicles, 1)
    roles = [args.role_name] if args.role_name and len(ids) == 1 else list(ids)
    world: dict[str, Any] = {"roles": roles, "town": args.town, "seed": fleet.seed}
    if args.duration_s:
        world["duration_s"] = float(args.duration_s)
    if args.run_dir:
        world["result_path"] = str(Path(args.run_dir) / "closed_loop_result.json")
    bridge = NodeSpec("world_bridge", "world_bridge", "", world)
    cp = dataclasses.replace(args, mode="control_plane")
    nodes = [bridge]
    for vid, role in zip(ids, roles, strict=True):
        nodes += vehicle_nodes(cp, fleet, vid, role_name=role)
    nodes += edge_nodes(cp, fleet, ids, serve_forever=True)
    return LaunchPlan("closed_loop_embedded", nodes)


def plan_closed_loop_carla(args: PlanArgs) -> LaunchPlan:
    """CARLA through its own ROS bridge (synchronous, 20 Hz), our rig spawned by carla_spawn_objects, and FLAD."""
    fleet = _fleet(args)
    vid = args.vehicle_id or _pick_vehicles(fleet, 1, 1)[0]
    role = args.role_name or "hero"
    objects_file = args.objects_file or str(Path(args.run_dir or "/tmp") / f"flad_objects_{role}.json")
    includes = [
        IncludeSpec("carla_ros_bridge", "carla_ros_bridge.launch.py", {
            "host": args.carla_host, "port": str(args.carla_port), "town": args.town, "timeout": "20",
            "synchronous_mode": "True", "synchronous_mode_wait_for_vehicle_control_command": "True",
            "fixed_delta_seconds": "0.05", "passive": "False"}),
        IncludeSpec("carla_spawn_objects", "carla_spawn_objects.launch.py",
                    {"objects_definition_file": objects_file}),
    ]
    cp = dataclasses.replace(args, mode="control_plane")
    nodes = vehicle_nodes(cp, fleet, vid, role_name=role) + edge_nodes(cp, fleet, [vid], serve_forever=True)
    return LaunchPlan("closed_loop_carla", nodes, includes,
                      files={objects_file: carla_objects_json(role)})


PLANS = {
    "vehicle": plan_vehicle,
    "edge": plan_edge,
    "cloud": plan_cloud,
    "fleet": plan_fleet,
    "closed_loop_embedded": plan_closed_loop_embedded,
    "closed_loop_carla": plan_closed_loop_carla,
}


def make_plan(name: str, args: PlanArgs | dict[str, Any] | None = None) -> LaunchPlan:
    """The named plan for `args` (a PlanArgs or a dict of launch-argument strings/values, validated)."""
    if name not in PLANS:
        raise ConfigError("plan", f"unknown plan {name!r} (known: {', '.join(PLANS)})")
    if not isinstance(args, PlanArgs):
        args = from_dict(PlanArgs, _coerce_launch_args(args or {}), key="launch")
    return PLANS[name](args)


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


# -------------------------------------------------------------------------------------------- CARLA


def carla_objects(role: str = "hero", rig: Any = None, blueprint: str = "vehicle.lincoln.mkz_2020") -> dict[str, Any]:
    """carla_spawn_objects' `objects.json` for one ego with our rig (flad_sim.sensors.RigConfig).

    Sensor `spawn_point`s are in the ROS frame of the vehicle (x forward, y LEFT, z up, yaw CCW in degrees)
    relative to CARLA's vehicle origin (bounding-box centre): carla_spawn_objects converts to CARLA itself.
    The sensor ids become the topic names: /carla/<role>/rgb_front/image, /carla/<role>/lidar, ...
    """
    from flad_sim.carla_adapter import DT, REAR_AXLE_TO_CENTER_M
    from flad_sim.sensors import RigConfig

    rig = rig or RigConfig()
    hz = 1.0 / DT
    sensors: list[dict[str, Any]] = []
    for c in rig.cameras:
        sensors.append({"type": "sensor.camera.rgb", "id": c.name,
                        "spawn_point": _spawn(c.x - REAR_AXLE_TO_CENTER_M, c.y, c.z, c.yaw_deg),
                        "image_size_x": c.width, "image_size_y": c.height, "fov": float(c.fov_deg),
                        "sensor_tick": DT})
    lc = rig.lidar
    sensors.append({"type": "sensor.lidar.ray_cast", "id": "lidar",
                    "spawn_point": _spawn(lc.x - REAR_AXLE_TO_CENTER_M, lc.y, lc.z, 0.0),
                    "range": float(lc.range_m), "channels": lc.channels,
                    "points_per_second": int(round(lc.channels * lc.azimuth_steps * hz)),
                    "upper_fov": float(lc.upper_fov_deg), "lower_fov": float(lc.lower_fov_deg),
                    "rotation_frequency": hz, "noise_stddev": float(lc.noise_std_m), "sensor_tick": DT})
    sensors.append({"type": "sensor.other.gnss", "id": "gnss", "spawn_point": _spawn(0.0, 0.0, 0.0, 0.0),
                    "noise_alt_stddev": 0.0, "noise_lat_stddev": 0.0, "noise_lon_stddev": 0.0,
                    "noise_alt_bias": 0.0, "noise_lat_bias": 0.0, "noise_lon_bias": 0.0, "sensor_tick": DT})
    sensors.append({"type": "sensor.other.imu", "id": "imu", "spawn_point": _spawn(0.0, 0.0, 0.0, 0.0),
                    "sensor_tick": DT})
    for pseudo, sid in (("speedometer", "speedometer"), ("odom", "odometry"), ("tf", "tf"),
                        ("objects", "objects"), ("control", "control")):
        sensors.append({"type": f"sensor.pseudo.{pseudo}", "id": sid})
    return {"objects": [{"type": blueprint, "id": role, "sensors": sensors}]}


def carla_objects_json(role: str = "hero") -> str:
    """`carla_objects(role)` as the text of an objects.json file (launch/carla_objects.json is this for 'hero')."""
    return json.dumps(carla_objects(role), indent=2) + "\n"


def _spawn(x: float, y: float, z: float, yaw: float) -> dict[str, float]:
    return {"x": round(float(x), 4), "y": round(float(y), 4), "z": round(float(z), 4), "roll": 0.0, "pitch": 0.0,
            "yaw": round(float(yaw), 4)}


# -------------------------------------------------------------------------------------------- ros2 launch


def launch_description(plan_name: str, launch_dir: str | Path | None = None) -> Any:
    """The LaunchDescription a `.launch.py` file returns: every PlanArgs field as a launch argument (typed
    default, description), and the plan's nodes/includes built at launch time from their values.
    `launch_dir` is the launch file's folder: its `fleet.yaml` is the default fleet (installed share/ copy)."""
    from launch.actions import DeclareLaunchArgument, OpaqueFunction

    from launch import LaunchDescription

    defaults = {f.name: f.default for f in dataclasses.fields(PlanArgs)}
    if launch_dir is not None and (Path(launch_dir) / "fleet.yaml").is_file():
        defaults["fleet"] = str(Path(launch_dir) / "fleet.yaml")
    declared = [DeclareLaunchArgument(f.name, default_value=str(defaults[f.name]), description=f.metadata["help"])
                for f in dataclasses.fields(PlanArgs)]

    def build(context: Any) -> list[Any]:
        values = {k: v for k, v in context.launch_configurations.items() if k in defaults}
        return plan_actions(make_plan(plan_name, values))

    return LaunchDescription([*declared, OpaqueFunction(function=build)])


def plan_actions(plan: LaunchPlan) -> list[Any]:
    """launch_ros Nodes (and included launch files) for a plan; writes the files the plan needs."""
    import os

    from ament_index_python.packages import get_package_share_directory
    from launch.actions import IncludeLaunchDescription
    from launch.launch_description_sources import PythonLaunchDescriptionSource
    from launch_ros.actions import Node

    from flad_core.atomic import atomic_write_text

    for path, content in plan.files.items():
        atomic_write_text(Path(path), content)
    actions: list[Any] = []
    for inc in plan.includes:
        path = os.path.join(get_package_share_directory(inc.package), "launch", inc.launch_file)
        actions.append(IncludeLaunchDescription(PythonLaunchDescriptionSource(path),
                                                launch_arguments=list(inc.arguments.items())))
    for spec in plan.nodes:
        actions.append(Node(package=spec.package, executable=spec.executable, name=spec.name,
                            namespace=spec.namespace or "", parameters=[spec.flat_parameters()],
                            remappings=list(spec.remappings), output="screen"))
    return actions


# -------------------------------------------------------------------------------------------- flad launch


def ros_args(spec: NodeSpec, params_file: Path | None) -> list[str]:
    """`--ros-args` for starting `spec` as a plain process (what launch_ros would pass)."""
    out = ["--ros-args", "-r", f"__node:={spec.name}"]
    if spec.namespace.strip("/"):
        out += ["-r", f"__ns:=/{spec.namespace.strip('/')}"]
    for src, dst in spec.remappings:
        out += ["-r", f"{src}:={dst}"]
    if params_file is not None:
        out += ["--params-file", str(params_file)]
    return out


def params_yaml(spec: NodeSpec) -> str:
    """A ROS 2 parameter file for one node (nested keys are dotted parameter names)."""
    return yaml.safe_dump({spec.fqn: {"ros__parameters": spec.parameters}}, sort_keys=False)


def node_command(spec: NodeSpec, params_file: Path | None) -> list[str]:
    from flad_core.procs import python_module_cmd

    return python_module_cmd(spec.kind.module, *ros_args(spec, params_file))


def _parse_set(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition(":=")
        if not sep:
            key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError("launch", f"expected NAME:=VALUE, got {item!r}")
        out[key.strip()] = value
    return out


def run_launch(args: argparse.Namespace) -> int:
    """`flad launch PLAN [name:=value ...]`: start a plan's nodes as processes; stop them all on Ctrl-C/exit."""
    from flad_core.atomic import atomic_write_text
    from flad_core.procs import ProcessGroup
    from flad_core.runs import RunDir

    try:
        raw = _parse_set(args.arguments)
        if args.run_dir is None and "run_dir" not in raw:
            raw["run_dir"] = str(RunDir.create(f"launch-{args.plan}", None, root=args.runs_dir).path)
        elif args.run_dir is not None:
            raw["run_dir"] = str(args.run_dir)
        plan = make_plan(args.plan, raw)
    except (ConfigError, KeyError) as exc:
        print(f"flad launch: {exc}", file=sys.stderr)
        return 2
    if plan.includes and not args.skip_includes:
        names = ", ".join(f"{i.package}/{i.launch_file}" for i in plan.includes)
        print(f"flad launch: plan {plan.name!r} includes other packages' launch files ({names}); those need "
              "`ros2 launch`. Use --skip-includes to start only FLAD's nodes (e.g. with the bridge already running).",
              file=sys.stderr)
        return 2
    run_dir = Path(raw["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    for path, content in plan.files.items():
        atomic_write_text(Path(path), content)
    for spec in plan.nodes:
        atomic_write_text(_params_file(run_dir, spec), params_yaml(spec))
    if args.dry_run:
        for spec in plan.nodes:
            print(" ".join(node_command(spec, _params_file(run_dir, spec))))
        return 0
    print(f"flad launch {plan.name}: {len(plan.nodes)} node(s); logs in {run_dir}", flush=True)
    code = 0
    with ProcessGroup(grace_s=args.grace) as group:
        try:
            for spec in plan.nodes:
                group.start(spec.fqn, node_command(spec, _params_file(run_dir, spec)),
                            log_path=run_dir / f"node{spec.fqn.replace('/', '_')}.log")
            missing = _wait_until_up(group, plan, args.startup_timeout)
            if missing:
                log.warning("not up (failed, or still starting after %.0f s): %s", args.startup_timeout,
                            ", ".join(missing))
            code = _supervise(group, plan, args.timeout)
        except KeyboardInterrupt:
            print("flad launch: interrupted, stopping every node", file=sys.stderr)
            code = 130
        finally:
            codes = _stop_in_order(group, plan, args.grace)
    failed = {n: c for n, c in codes.items() if c != 0}
    print(json.dumps({"plan": plan.name, "exit_codes": codes, "run_dir": str(run_dir)}), flush=True)
    if failed and code == 0:
        code = 1
    return code


def _params_file(run_dir: Path, spec: NodeSpec) -> Path:
    return run_dir / f"params{spec.fqn.replace('/', '_')}.yaml"


#: nodes whose normal exit ends a plan: the orchestrator after its rounds, the world bridge after its routes
PLAN_ENDERS = ("orchestrator_node", "world_bridge")


def _wait_until_up(group: Any, plan: LaunchPlan, timeout: float) -> list[str]:
    """Wait until every node of the plan answers on its parameter service (or one fails, or `timeout`);
    return those not up. A node answers only once it spins, i.e. after its set-up (model loading) is done,
    so a plan that ends early (a short closed loop) does not SIGINT a node still building itself.
    Without rclpy in this interpreter there is nothing to ask: nothing to wait for.
    """
    try:
        import rclpy
        from rcl_interfaces.srv import ListParameters
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.signals import SignalHandlerOptions
    except ImportError:
        return []
    missing = {spec.fqn for spec in plan.nodes}
    ctx = rclpy.Context()
    rclpy.init(args=[], context=ctx, signal_handler_options=SignalHandlerOptions.NO)
    t0 = time.monotonic()
    try:
        probe = rclpy.create_node(f"flad_launch_{os.getpid()}", context=ctx)
        executor = SingleThreadedExecutor(context=ctx)
        executor.add_node(probe)
        clients = {fqn: probe.create_client(ListParameters, f"{fqn}/list_parameters") for fqn in missing}
        pending: dict[str, Any] = {}
        while missing and time.monotonic() - t0 < timeout:
            if any(p.poll() not in (None, 0) for p in group.procs.values()):
                break   # a node failed: _supervise ends the plan (one that finished fine waits for the rest)
            for fqn in sorted(missing):
                if group.procs[fqn].poll() is not None:
                    missing.discard(fqn)     # finished already (a quick plan's end): nothing left to wait for
                    continue
                if fqn not in pending and clients[fqn].service_is_ready():
                    pending[fqn] = clients[fqn].call_async(ListParameters.Request(depth=1))
            executor.spin_once(timeout_sec=0.2)
            for fqn, future in list(pending.items()):
                if future.done():
                    missing.discard(fqn)
                    del pending[fqn]
        executor.shutdown()
        probe.destroy_node()
    finally:
        rclpy.shutdown(context=ctx)
    if not missing:
        print(f"all {len(plan.nodes)} node(s) up after {time.monotonic() - t0:.1f} s", flush=True)
    return sorted(missing)


def _supervise(group: Any, plan: LaunchPlan, timeout: float | None) -> int:
    """Wait until a node that ends the plan (orchestrator done, or any node failing) exits, or the timeout."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while deadline is None or time.monotonic() < deadline:
        for spec in plan.nodes:
            rc = group.procs[spec.fqn].poll()
            if rc is None:
                continue
            if rc != 0:
                log.error("%s exited with %s; stopping the plan", spec.fqn, rc)
                return 1
            if spec.executable in PLAN_ENDERS:
                log.info("%s finished; stopping the plan", spec.fqn)
                return 0
        if not group.alive():
            return 0
        time.sleep(0.2)
    log.error("plan still running after %.0f s; stopping it", timeout)
    return 1


def _stop_in_order(group: Any, plan: LaunchPlan, grace: float) -> dict[str, int | None]:
    """SIGINT every node (what `ros2 launch` sends first), wait; then ProcessGroup's SIGTERM/SIGKILL."""
    import signal
    import subprocess

    for name in group.alive():
        with contextlib.suppress(ProcessLookupError):
            group.procs[name].send_signal(signal.SIGINT)
    end = time.monotonic() + grace
    for proc in group.procs.values():
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.0, end - time.monotonic()))
    return group.stop()


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "launch", help="start a launch plan's ROS 2 nodes as processes (no `ros2 launch` needed)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("plan", choices=list(PLANS), help="which plan")
    p.add_argument("arguments", nargs="*", metavar="NAME:=VALUE",
                   help="launch arguments, as for ros2 launch: "
                        + ", ".join(f.name for f in dataclasses.fields(PlanArgs)))
    p.add_argument("--run-dir", type=Path, default=None, help="node logs and parameter files (default: runs/<id>/)")
    p.add_argument("--runs-dir", type=Path, default=None, help="where runs/<id>/ goes (default: ./runs)")
    p.add_argument("--timeout", type=float, default=None, help="stop the plan after this many seconds")
    p.add_argument("--grace", type=float, default=10.0, help="seconds each node gets to stop after SIGINT")
    p.add_argument("--startup-timeout", type=float, default=180.0,
                   help="seconds to wait for every node to appear in the ROS graph before supervising the plan")
    p.add_argument("--skip-includes", action="store_true",
                   help="start only FLAD's nodes of a plan that includes other packages' launch files")
    p.add_argument("--dry-run", action="store_true", help="print the node commands and exit")
    p.set_defaults(func=run_launch)
