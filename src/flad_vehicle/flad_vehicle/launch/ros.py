"""A launch plan on ROS 2: as `launch_ros` actions (`ros2 launch`), or as a plain process's `--ros-args`.

`launch_description` is what every `launch/*.launch.py` returns; `plan_actions` turns a plan into
`launch_ros.actions.Node`s (and included launch files). `ros_args`, `params_yaml` and `node_command` start
the same node without the launch package (`python -m <node module> --ros-args ...`, as `flad launch` does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from flad_vehicle.launch.spec import LaunchPlan, NodeSpec, PlanArgs, PlanFn, make_plan


def launch_description(plan_name: str, plans: Mapping[str, PlanFn], launch_dir: str | Path | None = None) -> Any:
    """The LaunchDescription a `.launch.py` file returns: every PlanArgs field as a launch argument (typed
    default, description), and the nodes/includes of `plans[plan_name]` built at launch time from their values.
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
        return plan_actions(make_plan(plan_name, values, plans))

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


# -------------------------------------------------------------------------------------------- plain processes


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
