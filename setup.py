"""Root build hook: ship the `.msg` files inside the flad_core wheel.

The message definitions live once, in src/flad_msgs/msg and src/third_party/carla_msgs/msg (the
ROS interface packages). A non-editable `pip install .` copies them to flad_core/_interfaces so the
codec finds them without ROS; editable installs and colcon installs read the originals.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
INTERFACES = {"flad_msgs": ROOT / "src" / "flad_msgs" / "msg",
              "carla_msgs": ROOT / "src" / "third_party" / "carla_msgs" / "msg"}


class BuildPyWithInterfaces(build_py):
    def run(self) -> None:
        super().run()
        for package, source in INTERFACES.items():
            target = Path(self.build_lib) / "flad_core" / "_interfaces" / package / "msg"
            target.mkdir(parents=True, exist_ok=True)
            for msg in sorted(source.glob("*.msg")):
                shutil.copy2(msg, target / msg.name)


setup(cmdclass={"build_py": BuildPyWithInterfaces})
