"""The vehicle's launch plan (`launch/vehicle.launch.py`, `flad launch vehicle`): its node kinds and nodes.

  vehicle  one vehicle: stage worker (FHDP) + encoder + PID controller
"""

from __future__ import annotations

from flad_core.config import ConfigError
from flad_core.fleet import FleetConfig
from flad_vehicle.launch.spec import (
    LaunchPlan,
    NodeKind,
    NodeSpec,
    PlanArgs,
    PlanFn,
    common_parameters,
    load_plan_fleet,
    register_node_kinds,
)

register_node_kinds(
    NodeKind("flad_vehicle", "stage_worker_node", "flad_vehicle.nodes.stage_worker",
             "flad_vehicle.nodes.stage_worker:StageWorkerNodeConfig"),
    NodeKind("flad_vehicle", "vehicle_node", "flad_vehicle.nodes.stage_worker",
             "flad_vehicle.nodes.stage_worker:StageWorkerNodeConfig"),
    # helper B1's closed-loop nodes (flad_core.node_main.component_main adapters)
    NodeKind("flad_vehicle", "encoder_node", "flad_vehicle.nodes.encoder_node",
             "flad_vehicle.encoder.stream:EncoderNodeConfig"),
    NodeKind("flad_vehicle", "controller_node", "flad_vehicle.nodes.controller_node",
             "flad_vehicle.control.loop:ControllerConfig"),
)


def vehicle_nodes(args: PlanArgs, fleet: FleetConfig, vehicle_id: str, role_name: str = "",
                  closed_loop: bool = True) -> list[NodeSpec]:
    """One vehicle, in namespace `/<vehicle_id>`: stage worker (+ encoder and PID controller when it drives)."""
    fleet.vehicle(vehicle_id)  # KeyError names an unknown id
    role = role_name or args.role_name or vehicle_id
    worker = {**common_parameters(args), "vehicle_id": vehicle_id, "mode": args.mode, "data": args.data}
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


def plan_vehicle(args: PlanArgs) -> LaunchPlan:
    if not args.vehicle_id:
        raise ConfigError("vehicle_id", "the vehicle plan needs a vehicle id from the fleet file")
    fleet = load_plan_fleet(args)
    return LaunchPlan("vehicle", vehicle_nodes(args, fleet, args.vehicle_id))


#: the plans a vehicle starts on its own (flad_edge.launch.plans.PLANS has every plan)
PLANS: dict[str, PlanFn] = {"vehicle": plan_vehicle}
