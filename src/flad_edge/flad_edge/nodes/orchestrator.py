"""`orchestrator_node`: the edge as a ROS 2 node -- what `flad demo`'s edge process runs, on ROS topics.

Registration and the FHDP control services stay ZeroMQ request/reply (docs/architecture.md, "Transports");
heartbeats, status, round control and training progress travel as ROS topics (`/flad/heartbeat`, `/flad/status`,
`/flad/round`, `/flad/fhdp/progress`) through a RosBus on this node. In `fhdp` mode the node waits for
the fleet, plans SWIFT clusters and essential pipelines, runs the FL rounds (optionally through the cloud
node, optionally with quick recovery), saves the global encoder and exits 0; in `control_plane` mode it
keeps the fleet table (registration, heartbeats, liveness) for `duration_s` (0: until stopped).

Run: `ros2 run flad_edge orchestrator_node --ros-args -p rounds:=1` or
`python -m flad_edge.nodes.orchestrator --ros-args --params-file p.yaml`.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from flad_core.config import ConfigError

log = logging.getLogger("flad_edge.nodes.orchestrator")


@dataclass
class OrchestratorNodeConfig:
    """ROS parameters of the orchestrator node (one typed, described parameter per field)."""

    fleet: str = field(default="", metadata={"help": "fleet YAML (empty: launch/fleet.yaml)"})
    port_base: int = field(default=0, metadata={"help": "renumber the fleet's TCP ports from this base (0: keep)"})
    run_dir: str = field(default="", metadata={"help": "folder for records: metrics, global encoder, summary"})
    mode: Literal["fhdp", "control_plane"] = field(default="fhdp", metadata={
        "help": "fhdp: run FL rounds with FHDP; control_plane: registration, heartbeats and the fleet table only"})
    fhdp_config: str = field(default="", metadata={
        "help": "FHDP config YAML (empty: fhdp.yaml beside the fleet file if present, else built-in defaults)"})
    rounds: int = field(default=0, metadata={"help": "FL rounds (0: from the FHDP config)"})
    cloud: bool = field(default=False, metadata={"help": "aggregate each round through the cloud node"})
    recovery: bool = field(default=False, metadata={"help": "quick recovery: clusters survive departures"})
    duration_s: float = field(default=5.0, metadata={
        "help": "control_plane: seconds to serve once the fleet is up (0: until the node is stopped)"})
    expect: int = field(default=-1, metadata={"help": "control_plane: vehicles to wait for (-1: the whole fleet)"})
    host_zmq_hub: bool = field(default=False, metadata={
        "help": "also host the ZeroMQ pub/sub hub (only for vehicles that run without ROS)"})

    def validate(self) -> None:
        if self.rounds < 0:
            raise ConfigError("rounds", f"must be >= 0, got {self.rounds}")
        if self.duration_s < 0:
            raise ConfigError("duration_s", f"must be >= 0, got {self.duration_s}")
        if self.expect < -1:
            raise ConfigError("expect", f"must be >= -1, got {self.expect}")
        if self.port_base and not 1024 <= self.port_base < 65000:
            raise ConfigError("port_base", f"must be in [1024, 65000), got {self.port_base}")
        if self.fhdp_config and not Path(self.fhdp_config).is_file():
            raise ConfigError("fhdp_config", f"no such file: {self.fhdp_config}")


def fhdp_config_path(cfg: OrchestratorNodeConfig) -> str | None:
    """The FHDP config to use: the parameter, else fhdp.yaml next to the fleet file, else None (built-in)."""
    if cfg.fhdp_config:
        return cfg.fhdp_config
    from flad_core.roles import default_fleet_path

    beside = (Path(cfg.fleet) if cfg.fleet else default_fleet_path()).parent / "fhdp.yaml"
    return str(beside) if beside.is_file() else None


class OrchestratorJob:
    """EdgeServer (+ FhdpEdge rounds) on a RosBus bound to `node`."""

    def __init__(self, node: Any, cfg: OrchestratorNodeConfig) -> None:
        from flad_core.bus_ros import RosBus
        from flad_core.role_node import load_role_fleet
        from flad_core.roles import security_for
        from flad_edge.fl.edge_server import EdgeServer

        self.cfg = cfg
        self.fleet = load_role_fleet(cfg.fleet, cfg.port_base)
        bus = RosBus(self.fleet.edge.id, self.fleet.bus, security_for(self.fleet, self.fleet.edge.id), node=node)
        self.edge = EdgeServer(self.fleet, host_hub=cfg.host_zmq_hub, bus=bus)
        self._closed = False

    def run(self) -> int:
        from rich.console import Console

        from flad_core.bus import BusError
        from flad_core.runs import RunDir

        cfg = self.cfg
        run_dir = Path(cfg.run_dir) if cfg.run_dir else None
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
        console = Console(file=sys.stdout, width=120)
        if cfg.mode == "control_plane":
            expect = len(self.fleet.vehicles) if cfg.expect < 0 else cfg.expect
            return self.edge.run(cfg.duration_s or math.inf, expect=expect, run_dir=run_dir, console=console)
        from flad_edge.fhdp.checkpoint import CheckpointError
        from flad_edge.fhdp.run import load_fhdp_config, run_training

        fcfg = load_fhdp_config(fhdp_config_path(cfg))
        if cfg.rounds:
            fcfg.rounds = cfg.rounds
        try:
            summaries = run_training(self.fleet, fcfg, RunDir(run_dir) if run_dir else None, console,
                                     use_cloud=cfg.cloud, recovery=cfg.recovery, edge=self.edge)
        except CheckpointError as exc:     # a restart would only repeat it: exit 2, which is not restarted
            log.error("FHDP training cannot resume: %s", exc)
            return 2
        except (TimeoutError, RuntimeError, BusError) as exc:
            log.error("FHDP training failed: %s", exc)
            return 1
        finally:
            self._closed = True   # run_training closes the edge (and so the bus)
        log.info("FHDP: %d round(s) done", len(summaries))
        return 0

    def stop(self) -> None:
        self.edge.stop.set()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.edge.close()


def main(argv: list[str] | None = None) -> int:
    from flad_core.role_node import run_role_node

    return run_role_node("orchestrator", OrchestratorNodeConfig, OrchestratorJob,
                         argv if argv is not None else sys.argv)


if __name__ == "__main__":
    sys.exit(main())
