"""`controller_node`: LMDrive's PID on waypoints + odometry -> CarlaEgoVehicleControl (flad_vehicle.control.loop).

    ros2 run flad_vehicle controller_node --ros-args -p vehicle_id:=v0 -p role_name:=hero
    python -m flad_vehicle.nodes.controller_node [--transport zmq] --ros-args -p waypoint_source:=expert
"""

from __future__ import annotations

import sys

from flad_core.node_main import component_main
from flad_vehicle.control.loop import ControllerConfig, ControllerLoop


def main(argv: list[str] | None = None) -> int:
    return component_main("controller_node", ControllerConfig, ControllerLoop, argv)


if __name__ == "__main__":
    sys.exit(main())
