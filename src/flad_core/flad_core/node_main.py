"""One command line for a bus component, run as a ROS 2 node (rclpy topics) or as a plain ZeroMQ process.

The closed-loop components (world bridge, encoder, waypoint predictor, PID controller) are ROS-free classes
that take a `Bus`; each `nodes/<name>.py` is a thin adapter calling `component_main` with its config dataclass
and a builder. The same arguments work on both transports, so `flad bench ros` and the closed-loop runner
can compare them process for process:

    python -m flad_vehicle.nodes.controller_node --ros-args -p vehicle_id:=v0 -p pid.turn_kp:=1.25
    python -m flad_vehicle.nodes.controller_node --transport zmq --hub-pub tcp://127.0.0.1:7100 \
        --hub-sub tcp://127.0.0.1:7101 --ros-args -p vehicle_id:=v0

With `--transport ros` (the default) parameters are declared on the node, typed and described
(`flad_core.ros_node.declare_config`), and set by launch files or `--ros-args -p`; with `--transport zmq` the
same `-p name:=value` pairs (values read as YAML, as ROS reads them) fill the same dataclass. A bad value
fails before the component starts, naming the parameter, with a non-zero exit (1 on ROS, 2 on ZeroMQ).
A component that finishes on its own (the world bridge at the end of its routes) ends the process; SIGINT
or SIGTERM stop it cleanly (exit 0).
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Callable
from typing import Any, Protocol

import yaml

from flad_core.config import ConfigError, from_dict

log = logging.getLogger(__name__)


class Component(Protocol):
    """What a node adapter runs: `start()` (non-blocking), `close()`, `done` set when it finished by itself."""

    done: threading.Event
    exit_code: int

    def start(self) -> None: ...

    def close(self) -> None: ...


Build = Callable[[Any, Any], Component]     # (bus, config) -> component


def parse_params(ros_args: list[str]) -> dict[str, Any]:
    """`-p a.b:=v` / `--param a.b:=v` pairs (after `--ros-args`) -> nested dict, values parsed as YAML."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(ros_args):
        arg = ros_args[i]
        if arg in ("-p", "--param") and i + 1 < len(ros_args):
            item = ros_args[i + 1]
            if ":=" not in item:
                raise ConfigError(item, "expected name:=value")
            name, text = item.split(":=", 1)
            try:
                value = yaml.safe_load(text) if text != "" else ""
            except yaml.YAMLError as exc:
                raise ConfigError(name, f"cannot read value {text!r}: {exc}") from exc
            tree = out
            parts = name.split(".")
            for part in parts[:-1]:
                tree = tree.setdefault(part, {})
            tree[parts[-1]] = value
            i += 2
        else:
            i += 1
    return out


def _split(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(add_help=True, description=__doc__.split("\n\n")[0])
    parser.add_argument("--transport", choices=("ros", "zmq"), default="ros")
    parser.add_argument("--hub-pub", default="tcp://127.0.0.1:7100", help="zmq: hub address publishers connect to")
    parser.add_argument("--hub-sub", default="tcp://127.0.0.1:7101", help="zmq: hub address subscribers connect to")
    parser.add_argument("--host-hub", action="store_true", help="zmq: host the bus hub in this process")
    if "--ros-args" in argv:
        k = argv.index("--ros-args")
        own, ros = argv[:k], argv[k:]
    else:
        own, ros = argv, []
    return parser.parse_args(own), ros


def component_main(name: str, cfg_cls: type, build: Build, argv: list[str] | None = None) -> int:
    """Parse the command line, build the component on the chosen bus, run until done or signalled."""
    from flad_core.runs import setup_logging

    setup_logging(logging.INFO)
    argv = sys.argv[1:] if argv is None else argv
    args, ros_args = _split(argv)
    if args.transport == "ros":
        return _run_ros(name, cfg_cls, build, ros_args)
    return _run_zmq(name, cfg_cls, build, args, ros_args)


def _run_ros(name: str, cfg_cls: type, build: Build, ros_args: list[str]) -> int:
    try:
        from rclpy.node import Node

        from flad_core.bus_ros import RosBus
        from flad_core.ros_node import declare_config, run_node
    except ImportError as exc:
        print(f"{name}: --transport ros needs rclpy, which does not import here ({exc}); use the ROS tier "
              "environment or --transport zmq", file=sys.stderr)
        return 2
    held: dict[str, Any] = {}

    def make() -> Node:
        # run_node owns SIGINT/SIGTERM (rclpy's own handlers are not installed): either only asks it to stop,
        # and the component is closed before the node and the context go
        node = Node(name)
        cfg = declare_config(node, cfg_cls)
        bus = RosBus(name, node=node)
        held["bus"] = bus
        comp = build(bus, cfg)
        held["comp"] = comp
        comp.start()
        return node

    def finished() -> bool:   # a component that finished by itself ends the node as a signal would
        return "comp" in held and held["comp"].done.is_set()

    def on_shutdown(_node: Node) -> None:
        try:
            if "comp" in held:
                held["comp"].close()     # stops its threads: nothing publishes past this point
        finally:
            if "bus" in held:
                held["bus"].close()      # ZeroMQ, then the publishers and subscriptions it made on the node

    rc = run_node(make, args=[name, *ros_args], on_shutdown=on_shutdown, done=finished)
    comp = held.get("comp")
    return rc or (comp.exit_code if comp is not None else 1)


def _run_zmq(name: str, cfg_cls: type, build: Build, args: argparse.Namespace, ros_args: list[str]) -> int:
    from flad_core.bus import BusConfig, BusHub, ZmqBus
    from flad_core.procs import install_stop_handlers

    try:
        cfg = from_dict(cfg_cls, parse_params(ros_args), key=name)
        bus_cfg = from_dict(BusConfig, {"hub_pub": args.hub_pub, "hub_sub": args.hub_sub})
    except ConfigError as exc:
        print(f"{name}: bad parameter: {exc}", file=sys.stderr)
        return 2
    hub = BusHub(bus_cfg) if args.host_hub else None
    bus = ZmqBus(name, bus_cfg)
    comp = None
    stop = threading.Event()
    install_stop_handlers(stop)
    try:
        comp = build(bus, cfg)
        comp.start()
        while not stop.is_set() and not comp.done.is_set():
            stop.wait(0.1)
        return comp.exit_code
    except Exception:
        log.exception("%s failed", name)
        return 1
    finally:
        if comp is not None:
            comp.close()
        bus.close()
        if hub is not None:
            hub.close()
