"""`world_bridge` node: the embedded world as a synchronous carla-ros-bridge (flad_sim.closed_loop.ClosedLoopWorld).

    ros2 run flad_sim world_bridge --ros-args -p town:=Town01 -p roles:="[hero]" -p duration_s:=30.0
    python -m flad_sim.nodes.world_bridge [--transport zmq --host-hub] --ros-args -p ...

Ends by itself when every route has ended (or after duration_s), with the scores on
/carla/<role>/driving_score (final) and, with result_path, in a JSON file.
"""

from __future__ import annotations

import sys

from flad_core.node_main import component_main
from flad_sim.closed_loop import ClosedLoopWorld, WorldBridgeConfig


def main(argv: list[str] | None = None) -> int:
    return component_main("world_bridge", WorldBridgeConfig, ClosedLoopWorld, argv)


if __name__ == "__main__":
    sys.exit(main())
