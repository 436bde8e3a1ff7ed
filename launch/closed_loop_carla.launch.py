"""CARLA closed loop: carla_ros_bridge (synchronous, 20 Hz) + carla_spawn_objects with our rig + FLAD vehicle + edge.

Needs a running CARLA server (carla_host, carla_port) and the carla_ros_bridge / carla_spawn_objects packages.
The objects.json for carla_spawn_objects is written from flad_sim's rig at launch time (objects_file).

Arguments: every `flad_vehicle.launch.spec.PlanArgs` field; list them with
`ros2 launch flad_edge closed_loop_carla.launch.py --show-args`.
What starts is decided in flad_edge.launch.plans (ROS-free, tested); `flad launch closed_loop_carla` starts
the same nodes without the launch package.
"""

from pathlib import Path

from flad_edge.launch.plans import PLANS
from flad_vehicle.launch.ros import launch_description


def generate_launch_description():
    return launch_description("closed_loop_carla", PLANS, Path(__file__).resolve().parent)
