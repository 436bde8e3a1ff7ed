"""Embedded-world closed loop: world_bridge + N vehicles (vehicles:=N) + the edge.

Arguments: every `flad_vehicle.launch.spec.PlanArgs` field; list them with
`ros2 launch flad_edge closed_loop_embedded.launch.py --show-args`.
What starts is decided in flad_edge.launch.plans (ROS-free, tested); `flad launch closed_loop_embedded` starts
the same nodes without the launch package.
"""

from pathlib import Path

from flad_edge.launch.plans import PLANS
from flad_vehicle.launch.ros import launch_description


def generate_launch_description():
    return launch_description("closed_loop_embedded", PLANS, Path(__file__).resolve().parent)
