"""`waypoint_node`: /flad/<vid>/features of the served vehicles -> CELLAdapt model -> /flad/<vid>/waypoints.

    ros2 run flad_edge waypoint_node --ros-args -p vehicle_ids:="[v0, v1]" -p model_dir:=runs/adm
    python -m flad_edge.nodes.waypoint_node [--transport zmq] --ros-args -p vehicle_ids:="[v0]"

The topic front end of the same predictor the request/reply WaypointService serves
(flad_edge.celladapt.stream.WaypointStream). Without model_dir: a tiny random ADM, logged as such.
`device` (auto | cpu | cuda[:N]; auto: CUDA when present) is where the model runs, `dtype` its precision
(auto: fp16 on CUDA, fp32 on the CPU), `max_batch` 0 the device's default (16 on the CPU, 32 on CUDA):

    ros2 run flad_edge waypoint_node --ros-args -p vehicle_ids:="[v0, v1]" -p device:=cuda:0
"""

from __future__ import annotations

import sys

from flad_core.node_main import component_main
from flad_edge.celladapt.stream import WaypointNodeConfig, WaypointStream


def main(argv: list[str] | None = None) -> int:
    return component_main("waypoint_node", WaypointNodeConfig, WaypointStream, argv)


if __name__ == "__main__":
    sys.exit(main())
