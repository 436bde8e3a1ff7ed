"""One vehicle (vehicle_id, role_name, fleet, edge_address): stage_worker_node + encoder_node + controller_node.

Arguments: every `flad_vehicle.launch.spec.PlanArgs` field; list them with
`ros2 launch flad_vehicle vehicle.launch.py --show-args`.
What starts is decided in flad_vehicle.launch.vehicle (ROS-free, tested); `flad launch vehicle` starts
the same nodes without the launch package.
"""

from pathlib import Path

from flad_vehicle.launch.ros import launch_description
from flad_vehicle.launch.vehicle import PLANS


def generate_launch_description():
    return launch_description("vehicle", PLANS, Path(__file__).resolve().parent)
