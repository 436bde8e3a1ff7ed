"""ament_python build of flad_vehicle for colcon; plain pip users install the repository root instead."""

import os
from glob import glob

from setuptools import find_packages, setup

package_name = "flad_vehicle"
# Launch files live once, in the repository's top-level launch/; each package installs its own.
LAUNCH_DIR = os.path.join("..", "..", "launch")
LAUNCH_PATTERNS = ['vehicle*.launch.py']

setup(
    name=package_name,
    version="0.1.0",
    packages=find_packages(exclude=["test"]),
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
        ("share/" + package_name, ["package.xml"]),
        (
            "share/" + package_name + "/launch",
            [f for pat in LAUNCH_PATTERNS for f in sorted(glob(os.path.join(LAUNCH_DIR, pat)))]
            + [os.path.join(LAUNCH_DIR, "fleet.yaml")],
        ),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="FLAD developers",
    maintainer_email="dev@flad.invalid",
    description="Vehicle layer: vision encoder, partitioner, stage worker, trainer, PID controller, nodes.",
    license="Apache-2.0",
    entry_points={"console_scripts": [
        "stage_worker_node = flad_vehicle.nodes.stage_worker:main",
        "vehicle_node = flad_vehicle.nodes.stage_worker:main",
        "encoder_node = flad_vehicle.nodes.encoder_node:main",
        "controller_node = flad_vehicle.nodes.controller_node:main",
    ]},
)
