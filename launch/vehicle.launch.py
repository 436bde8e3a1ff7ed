"""One vehicle (vehicle_id, role_name, fleet, edge_address): stage_worker_node + encoder_node + controller_node.

Arguments: every `flad_edge.launch.plan.PlanArgs` field; list them with
`ros2 launch flad_vehicle vehicle.launch.py --show-args`.
What starts is decided in flad_edge.launch.plan (ROS-free, tested); `flad launch vehicle` starts
the same nodes without the launch package.
"""

from pathlib import Path

from flad_edge.launch.plan import launch_description


def generate_launch_description():
    return launch_description("vehicle", Path(__file__).resolve().parent)
