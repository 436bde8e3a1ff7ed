"""`cloud_node`: the cloud aggregator (second FedAvg tier over edges) as a ROS 2 node.

Edge uploads and the global model travel over ZeroMQ request/reply (`cloud/upload`, `cloud/global`, where
weights travel per docs/architecture.md, "Transports"), so the node's RosBus carries no topics today; the node
gives the cloud a ROS identity, typed parameters and a clean lifecycle under `ros2 launch`. It serves until
stopped.

CELLAdapt's cloud distillation (general LLM -> AD-LLM) is not run by this node: in the existing code it
is one phase of `flad llm train` (flad_edge.celladapt.pipeline.run_pipeline, cloud and edge phases in one
offline job), which needs extracted encoder features and minutes of CPU; run that command on the cloud
machine. Wiring it as a node parameter would duplicate the pipeline's phase logic here.

Run: `ros2 run flad_edge cloud_node` or `python -m flad_edge.nodes.cloud --ros-args -p edges:=edge-0`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flad_core.config import ConfigError


@dataclass
class CloudNodeConfig:
    """ROS parameters of the cloud node."""

    fleet: str = field(default="", metadata={"help": "fleet YAML (empty: launch/fleet.yaml)"})
    port_base: int = field(default=0, metadata={"help": "renumber the fleet's TCP ports from this base (0: keep)"})
    run_dir: str = field(default="", metadata={
        "help": "folder for this node's records: cloud_state/ there keeps the aggregated rounds across a restart"})
    edges: str = field(default="", metadata={
        "help": "comma-separated edge ids whose uploads make a round (empty: the fleet's edge)"})
    deadline_s: float = field(default=600.0, metadata={
        "help": "seconds a round waits for every edge before aggregating what arrived"})

    def validate(self) -> None:
        if self.deadline_s <= 0:
            raise ConfigError("deadline_s", f"must be positive, got {self.deadline_s}")
        if self.port_base and not 1024 <= self.port_base < 65000:
            raise ConfigError("port_base", f"must be in [1024, 65000), got {self.port_base}")

    def edge_ids(self, default: str) -> list[str]:
        ids = [e.strip() for e in self.edges.split(",") if e.strip()]
        return ids or [default]


class CloudJob:
    """CloudServer with a RosBus identity; serves until stopped."""

    def __init__(self, node: Any, cfg: CloudNodeConfig) -> None:
        from flad_core.bus_ros import RosBus
        from flad_core.role_node import load_role_fleet
        from flad_core.roles import security_for
        from flad_edge.fl.cloud import CloudServer

        fleet = load_role_fleet(cfg.fleet, cfg.port_base)
        bus = RosBus(fleet.cloud.id, fleet.bus, security_for(fleet, fleet.cloud.id), node=node)
        self.cloud = CloudServer(fleet, cfg.edge_ids(fleet.edge.id), cfg.deadline_s, bus=bus,
                                 state_dir=Path(cfg.run_dir) / "cloud_state" if cfg.run_dir else None)

    def run(self) -> int:
        self.cloud.stop.wait()
        return 0

    def stop(self) -> None:
        self.cloud.stop.set()

    def close(self) -> None:
        self.cloud.close()


def main(argv: list[str] | None = None) -> int:
    from flad_core.role_node import run_role_node

    return run_role_node("cloud", CloudNodeConfig, CloudJob, argv if argv is not None else sys.argv)


if __name__ == "__main__":
    sys.exit(main())
