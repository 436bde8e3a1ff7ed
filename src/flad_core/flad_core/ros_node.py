"""What every FLAD rclpy node shares: typed parameters from a config dataclass, and a clean spin/shutdown.

A node's settings are one of FLAD's config dataclasses (the same one the ZeroMQ/CLI path loads from
YAML), so there is one source of truth for names, types, defaults and validation. Each field becomes a
ROS parameter with its type and a description (the field's `metadata["help"]`, else its name); the values
the launch file or command line set are read back and validated by `flad_core.config.from_dict`, so a
wrong parameter fails with the same `key: reason` error as a wrong YAML key.

Nested dataclasses flatten to dotted names (`pid.kp`), the ROS convention. Fields of other types
(dicts, optional values, lists of mixed types) are passed as YAML strings.

Imports rclpy: only usable in the real-ROS tier or on a ROS machine.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

import rclpy
import rclpy.executors
import yaml
from rcl_interfaces.msg import ParameterDescriptor, ParameterType
from rclpy.node import Node

from flad_core.config import from_dict

T = TypeVar("T")
log = logging.getLogger(__name__)

_SCALARS: dict[Any, int] = {
    bool: ParameterType.PARAMETER_BOOL,
    int: ParameterType.PARAMETER_INTEGER,
    float: ParameterType.PARAMETER_DOUBLE,
    str: ParameterType.PARAMETER_STRING,
}
_LISTS: dict[Any, int] = {
    bool: ParameterType.PARAMETER_BOOL_ARRAY,
    int: ParameterType.PARAMETER_INTEGER_ARRAY,
    float: ParameterType.PARAMETER_DOUBLE_ARRAY,
    str: ParameterType.PARAMETER_STRING_ARRAY,
}


def _ros_type(hint: Any) -> int | None:
    """The ROS parameter type for a field's type hint; None means 'pass it as a YAML string'."""
    if hint in _SCALARS:
        return _SCALARS[hint]
    origin = get_origin(hint)
    if origin is typing.Literal:
        kinds = {type(a) for a in get_args(hint)}
        return _SCALARS.get(kinds.pop()) if len(kinds) == 1 else None
    if origin in (list, tuple):
        args = [a for a in get_args(hint) if a is not Ellipsis]
        kinds = set(args)
        return _LISTS.get(kinds.pop()) if len(kinds) == 1 else None
    return None


def _fields(cls: type, prefix: str = "") -> Iterator[tuple[str, Any, dataclasses.Field, Any]]:
    """(dotted name, type hint, field, default) for every leaf field, nested dataclasses flattened."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        hint = hints[f.name]
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if dataclasses.is_dataclass(hint) and isinstance(hint, type):
            yield from _fields(hint, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hint, f, default


def _optional_inner(hint: Any) -> Any:
    if get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return None


def declare_config(node: Node, cls: type[T], overrides: dict[str, Any] | None = None) -> T:
    """Declare one typed, described ROS parameter per field of `cls`; return the validated config.

    `overrides` replaces defaults (e.g. values from a fleet file) before the launch/CLI values apply.
    """
    overrides = overrides or {}
    values: dict[str, Any] = {}
    for name, hint, f, default in _fields(cls):
        default = overrides.get(name, default)
        description = f.metadata.get("help", name) if f.metadata else name
        ros_type = _ros_type(hint)
        if ros_type is None and _optional_inner(hint) is not None and default is None:
            ros_type = ParameterType.PARAMETER_STRING  # optional: "" means unset
        if ros_type is None:
            ros_type = ParameterType.PARAMETER_STRING
            as_yaml = True
        else:
            as_yaml = False
        if default is dataclasses.MISSING:
            shown = None
        elif as_yaml:
            shown = yaml.safe_dump(default, default_flow_style=True).strip()
        elif default is None:
            shown = ""
        elif isinstance(default, tuple):
            shown = list(default)
        else:
            shown = default
        descriptor = ParameterDescriptor(name=name, type=ros_type, description=description)
        if shown is None:  # required: rclpy cannot type a parameter without a value, so type-check it ourselves
            descriptor = ParameterDescriptor(name=name, description=f"{description} (required)", dynamic_typing=True)
            value = node.declare_parameter(name, None, descriptor).value
            if value is None:
                continue  # required field left unset: from_dict names it
        else:
            value = node.declare_parameter(name, shown, descriptor).value
        if as_yaml and isinstance(value, str):
            value = yaml.safe_load(value)
        elif value == "" and _optional_inner(hint) is not None:
            value = None
        elif isinstance(value, list) and get_origin(hint) is tuple:
            value = tuple(value)
        _set_dotted(values, name, value)
    return from_dict(cls, values, key=node.get_name())


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        tree = tree.setdefault(part, {})
    tree[parts[-1]] = value


def run_node(make: Callable[[], Node], args: list[str] | None = None,
             on_shutdown: Callable[[Node], None] | None = None) -> int:
    """`rclpy.init`, build the node, spin until SIGINT/SIGTERM or `rclpy.shutdown`, then clean up.

    Clean shutdown matters: launch sends SIGINT, then SIGTERM; sockets, worker threads and files must
    close on either, and the exit code says whether the node stopped by request (0) or failed (1).
    """
    rclpy.init(args=args)
    node: Node | None = None
    stop = threading.Event()
    try:
        node = make()

        def _stop(*_: object) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, _stop)
        # Single-threaded: FLAD's callbacks only decode and hand over (heavy work runs on the components' own
        # threads); rclpy's MultiThreadedExecutor.spin_once added up to ~1 s delivery stalls under load.
        executor = rclpy.executors.SingleThreadedExecutor()
        executor.add_node(node)
        while rclpy.ok() and not stop.is_set():
            executor.spin_once(timeout_sec=0.1)
        return 0
    except KeyboardInterrupt:
        return 0
    except Exception:
        log.exception("node failed")
        return 1
    finally:
        if node is not None:
            if on_shutdown is not None:
                on_shutdown(node)
            node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
