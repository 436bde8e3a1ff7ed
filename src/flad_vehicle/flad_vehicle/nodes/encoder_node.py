"""`encoder_node`: sensors -> vision encoder -> /flad/<vid>/features (flad_vehicle.encoder.stream.EncoderLoop).

    ros2 run flad_vehicle encoder_node --ros-args -p vehicle_id:=v0 -p checkpoint:=runs/enc/encoder.safetensors
    python -m flad_vehicle.nodes.encoder_node [--transport zmq] --ros-args -p waypoint_source:=encoder_head

Without a checkpoint it runs a tiny randomly initialised encoder and says so in its log (tests only).
"""

from __future__ import annotations

import sys

from flad_core.node_main import component_main
from flad_vehicle.encoder.stream import EncoderLoop, EncoderNodeConfig


def main(argv: list[str] | None = None) -> int:
    return component_main("encoder_node", EncoderNodeConfig, EncoderLoop, argv)


if __name__ == "__main__":
    sys.exit(main())
