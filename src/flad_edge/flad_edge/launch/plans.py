"""What the edge's launch files start, as plain data: the edge, cloud, fleet and closed-loop plans.

Built on flad_vehicle.launch (the plan data types and the vehicle plan); `PLANS` is every plan, the
vehicle's included, as `launch/*.launch.py` and `flad launch` know them:

  vehicle               one vehicle: stage worker (FHDP) + encoder + PID controller
  edge                  the edge: orchestrator (registration, SWIFT, FL rounds, aggregation, recovery) + waypoints
  cloud                 the cloud aggregator
  fleet                 cloud + orchestrator + every vehicle's stage worker: `flad demo` over ROS topics
  closed_loop_embedded  embedded-world bridge + N vehicles + edge
  closed_loop_carla     carla_ros_bridge (synchronous) + carla_spawn_objects (our rig) + FLAD vehicle + edge
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from flad_core.config import ConfigError
from flad_core.fleet import FleetConfig
from flad_edge.launch.carla import carla_objects_json
from flad_vehicle.launch import spec
from flad_vehicle.launch.spec import (
    IncludeSpec,
    LaunchPlan,
    NodeKind,
    NodeSpec,
    PlanArgs,
    PlanFn,
    common_parameters,
    load_plan_fleet,
    register_node_kinds,
)
from flad_vehicle.launch.vehicle import PLANS as VEHICLE_PLANS
from flad_vehicle.launch.vehicle import vehicle_nodes

register_node_kinds(
    NodeKind("flad_edge", "orchestrator_node", "flad_edge.nodes.orchestrator",
             "flad_edge.nodes.orchestrator:OrchestratorNodeConfig"),
    NodeKind("flad_edge", "cloud_node", "flad_edge.nodes.cloud", "flad_edge.nodes.cloud:CloudNodeConfig"),
    # helper B1's closed-loop nodes (flad_core.node_main.component_main adapters)
    NodeKind("flad_sim", "world_bridge", "flad_sim.nodes.world_bridge", "flad_sim.closed_loop:WorldBridgeConfig"),
    NodeKind("flad_edge", "waypoint_node", "flad_edge.nodes.waypoint_node",
             "flad_edge.celladapt.stream:WaypointNodeConfig"),
)


def _pick_vehicles(fleet: FleetConfig, n: int, default: int) -> list[str]:
    ids = [v.id for v in fleet.vehicles]
    n = n or default or len(ids)
    if n > len(ids):
        raise ConfigError("vehicles", f"fleet {fleet.name!r} has {len(ids)} vehicles, {n} requested")
    return ids[:n]


def edge_nodes(args: PlanArgs, fleet: FleetConfig, vehicle_ids: list[str] | None = None,
               use_cloud: bool = False, waypoints: bool = True, serve_forever: bool = False) -> list[NodeSpec]:
    """The edge: orchestrator (+ the waypoint node for the vehicles it serves)."""
    orch: dict[str, Any] = {**common_parameters(args), "mode": args.mode, "cloud": use_cloud}
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
    return [NodeSpec("cloud_node", "cloud", "", common_parameters(args))]


def plan_edge(args: PlanArgs) -> LaunchPlan:
    fleet = load_plan_fleet(args)
    return LaunchPlan("edge", edge_nodes(args, fleet, use_cloud=args.cloud and args.mode == "fhdp"))


def plan_cloud(args: PlanArgs) -> LaunchPlan:
    return LaunchPlan("cloud", cloud_nodes(args, load_plan_fleet(args)))


def plan_fleet(args: PlanArgs) -> LaunchPlan:
    """Training on ROS: cloud + orchestrator + a stage worker per vehicle (what `flad demo` starts, over ROS)."""
    fleet = load_plan_fleet(args)
    ids = _pick_vehicles(fleet, args.vehicles, 0)
    use_cloud = args.cloud and args.mode == "fhdp"
    nodes = cloud_nodes(args, fleet) if use_cloud else []
    nodes += edge_nodes(args, fleet, ids, use_cloud=use_cloud, waypoints=False)
    for vid in ids:
        nodes += vehicle_nodes(args, fleet, vid, closed_loop=False)
    return LaunchPlan("fleet", nodes)


def plan_closed_loop_embedded(args: PlanArgs) -> LaunchPlan:
    """The embedded world on carla-ros-bridge topics, N driving vehicles (role = vehicle id) and the edge."""
    fleet = load_plan_fleet(args)
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
    fleet = load_plan_fleet(args)
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


#: every plan, by the name `launch/*.launch.py` and `flad launch` give it
PLANS: dict[str, PlanFn] = {
    **VEHICLE_PLANS,
    "edge": plan_edge,
    "cloud": plan_cloud,
    "fleet": plan_fleet,
    "closed_loop_embedded": plan_closed_loop_embedded,
    "closed_loop_carla": plan_closed_loop_carla,
}


def make_plan(name: str, args: PlanArgs | dict[str, Any] | None = None) -> LaunchPlan:
    """The named plan (any of `PLANS`) for `args` (a PlanArgs or a dict of launch-argument strings/values,
    validated)."""
    return spec.make_plan(name, args, PLANS)
