"""Run a FLAD role (edge, cloud, vehicle) as an rclpy node: parameters in, the ROS-free job on a RosBus, clean exit.

The role classes (EdgeServer, CloudServer, FhdpVehicle, ...) block in their own loops, so the node runs
the job on a worker thread while `ros_node.run_node` spins the node in the main thread. When the job ends
by itself the node shuts down with the job's exit code; on SIGINT/SIGTERM the job is asked to stop, its
sockets are closed and the process exits 0. Nothing here imports rclpy until `run_role_node` is called,
so node modules (and their config dataclasses) import on machines without ROS.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from flad_core.fleet import FleetConfig, load_fleet, with_port_base
from flad_core.roles import default_fleet_path

log = logging.getLogger(__name__)
C = TypeVar("C")


class RoleJob(Protocol):
    """What a node runs: `run` blocks until done (exit code), `stop` asks it to finish, `close` frees sockets."""

    def run(self) -> int: ...

    def stop(self) -> None: ...

    def close(self) -> None: ...


def load_role_fleet(path: str, port_base: int = 0) -> FleetConfig:
    """The fleet file a node parameter names ("" = launch/fleet.yaml), ports renumbered if asked."""
    fleet = load_fleet(Path(path) if path else default_fleet_path())
    return with_port_base(fleet, port_base) if port_base else fleet


def run_role_node(node_name: str, config_cls: type[C], start: Callable[[Any, C], RoleJob],
                  argv: list[str] | None = None, join_s: float = 10.0) -> int:
    """Start node `node_name` (remappable with `--ros-args -r __node:=...`), declare `config_cls` as its
    parameters, build the job with `start(node, config)` and run it; return the process exit code."""
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node

    from flad_core.ros_node import declare_config, run_node
    from flad_core.runs import setup_logging

    setup_logging(logging.INFO)
    state: dict[str, Any] = {"code": 0, "stopping": False}
    done = threading.Event()

    def on_sigint(_signum: int, _frame: object) -> None:
        if state.get("interrupted"):
            log.info("%s: already stopping", node_name)
            return
        state["interrupted"] = True
        raise KeyboardInterrupt

    def make() -> Node:
        # rclpy's own SIGINT handler shuts the context down at once, so the job's goodbye (a vehicle's
        # LEAVING heartbeat, the edge's STOP) could no longer be published. A plain KeyboardInterrupt instead:
        # run_node catches it and stops the job while the node still works. Later SIGINTs (a launcher's, while
        # the job already ends by itself) must not interrupt that clean-up.
        signal.signal(signal.SIGINT, on_sigint)
        node = Node(node_name)
        cfg = declare_config(node, config_cls)
        log.info("%s: %s", node.get_fully_qualified_name(), cfg)
        job = start(node, cfg)
        state["job"] = job

        def work() -> None:
            try:
                code = job.run()
            except Exception:
                log.exception("%s failed", node_name)
                code = 1
            if not state["stopping"]:
                state["code"] = int(code or 0)
                log.info("%s finished (exit %s); shutting the node down", node_name, state["code"])
            done.set()
            if not state["stopping"]:
                os.kill(os.getpid(), signal.SIGINT)   # ends run_node's spin loop like Ctrl-C would

        state["thread"] = threading.Thread(target=work, name=f"{node_name}-job", daemon=True)
        state["thread"].start()
        return node

    def on_shutdown(node: Node) -> None:
        job = state.get("job")
        if job is None:
            return
        if not done.is_set():
            state["stopping"] = True
            log.info("%s: stop requested", node_name)
            # run_node no longer spins: keep the node's subscriptions served while the job winds down
            # (the edge waits for its vehicles' goodbyes after broadcasting STOP)
            executor = SingleThreadedExecutor()
            executor.add_node(node)
            spinner = threading.Thread(target=lambda: [executor.spin_once(timeout_sec=0.05)
                                                       for _ in iter(done.is_set, True)], daemon=True)
            spinner.start()
            job.stop()
            state["thread"].join(join_s)
            if state["thread"].is_alive():
                log.warning("%s: job still running after %.0f s; closing its sockets anyway", node_name, join_s)
            done.set()
            spinner.join(2.0)
            executor.remove_node(node)
            executor.shutdown()
        job.close()

    rc = run_node(make, args=argv, on_shutdown=on_shutdown)
    # the node is down and the process is leaving: a late SIGINT (a launcher stopping everything while this
    # node already ended by itself) must not turn a clean exit into "killed by SIGINT" during finalization
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return rc or state["code"]
