"""The real-ROS 2 tier (`make test-ros`): runs in the environment of scripts/ros_tier.sh (.ros-ws/env.sh).

This tier exists to run real rclpy, so a missing rclpy or an unbuilt workspace is an error that stops
the run at collection, never a skip. The helpers shared with the main tier (message strategies) come
from test/core.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "test" / "core"))   # msg_strategies, shared with the main tier

_HOW = "set it up and run it with `make test-ros` (or: scripts/ros_tier.sh && source .ros-ws/env.sh)"
try:
    import carla_msgs.msg  # noqa: F401
    import rclpy

    import flad_msgs.msg  # noqa: F401
except ImportError as exc:  # fail loudly: skipping would let this tier pass without running ROS at all
    raise pytest.UsageError(f"the real-ROS tier needs rclpy and the colcon-built flad_msgs/carla_msgs "
                            f"({type(exc).__name__}: {exc}); {_HOW}") from exc

for var, want in (("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp"), ("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")):
    if os.environ.get(var) != want:
        raise pytest.UsageError(f"{var}={os.environ.get(var)!r}, expected {want!r}: {_HOW}")
if "ROS_DOMAIN_ID" not in os.environ:
    raise pytest.UsageError(f"ROS_DOMAIN_ID is not set (each run takes its own domain): {_HOW}")


def pytest_report_header(config: pytest.Config) -> str:
    return (f"real ROS 2: rclpy from {Path(rclpy.__file__).parent}, RMW {os.environ['RMW_IMPLEMENTATION']}, "
            f"ROS_DOMAIN_ID {os.environ['ROS_DOMAIN_ID']}")


def pytest_configure(config: pytest.Config) -> None:
    # lark-parser 0.12 (a rosidl dependency, pinned by the ROS wheels) imports modules Python 3.11 deprecates
    config.addinivalue_line("filterwarnings", "ignore:module 'sre_(parse|constants)' is deprecated:DeprecationWarning")
