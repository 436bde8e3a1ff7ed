"""The edge: orchestrator_node (registration, SWIFT, FL rounds, aggregation, recovery) + waypoint_node.

Arguments: every `flad_edge.launch.plan.PlanArgs` field; list them with
`ros2 launch flad_edge edge.launch.py --show-args`.
What starts is decided in flad_edge.launch.plan (ROS-free, tested); `flad launch edge` starts
the same nodes without the launch package.
"""

from pathlib import Path

from flad_edge.launch.plan import launch_description


def generate_launch_description():
    return launch_description("edge", Path(__file__).resolve().parent)
