"""The cloud: cloud_node (second FedAvg tier over edges).

Arguments: every `flad_edge.launch.plan.PlanArgs` field; list them with
`ros2 launch flad_edge cloud.launch.py --show-args`.
What starts is decided in flad_edge.launch.plan (ROS-free, tested); `flad launch cloud` starts
the same nodes without the launch package.
"""

from pathlib import Path

from flad_edge.launch.plan import launch_description


def generate_launch_description():
    return launch_description("cloud", Path(__file__).resolve().parent)
