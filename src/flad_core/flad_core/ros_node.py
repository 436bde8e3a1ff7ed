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
import faulthandler
import logging
import os
import signal
import sys
import threading
import time
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

import rclpy
import rclpy.executors
import yaml
from rcl_interfaces.msg import ParameterDescriptor, ParameterType
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions

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


# Shutdown. rclpy is initialised WITHOUT its own signal handlers: those run rclpy's "deferred signal handler"
# C++ thread, which on SIGINT/SIGTERM triggers every executor's guard condition through raw pointers and shuts
# every context down, concurrently with the orderly teardown below. When that teardown destroyed an executor's
# guard condition first, the thread dereferenced freed memory (SIGSEGV in rcl_trigger_guard_condition, seen in
# the tier); when it won, the context died under the component's feet (ExternalShutdownException, failed
# publishes). Our handlers only set an Event; the main thread then tears down in order.
SHUTDOWN_DEADLINE_S = 15.0   # the whole teardown (component, bus, node, context, threads); past it: forced exit
THREAD_JOIN_S = 5.0          # of that, how long threads still running after the teardown may take to finish
EXIT_DEADLINE_S = 10.0       # the interpreter's own exit (atexit, finalization) after run_node returned
FORCED_EXIT_CODE = 3         # exit code of a process whose teardown hung (never 0: a hang is a bug to look at)
WATCHDOG_MARK = "ros shutdown watchdog"   # the log line a forced exit writes (grep/count it)


class ShutdownWatchdog:
    """The bounded fallback of a teardown: unless `disarm()`ed within `deadline_s`, log it (WATCHDOG_MARK, every
    thread's stack) and end the process with FORCED_EXIT_CODE. It never fires on an orderly teardown."""

    fired = 0   # times a watchdog fired in this process (at most once: firing ends it); the log has each one

    def __init__(self, what: str, deadline_s: float = SHUTDOWN_DEADLINE_S) -> None:
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(what, deadline_s), name="ros-shutdown-watchdog",
                                        daemon=True)
        self._thread.start()

    def _watch(self, what: str, deadline_s: float) -> None:
        if self._done.wait(deadline_s):
            return
        ShutdownWatchdog.fired += 1
        log.error("%s: %s: teardown still running after %.0f s; every thread's stack follows; forcing exit %d",
                  WATCHDOG_MARK, what, deadline_s, FORCED_EXIT_CODE)
        for handler in logging.getLogger().handlers:
            handler.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(FORCED_EXIT_CODE)

    def disarm(self) -> None:
        self._done.set()
        self._thread.join()


def join_threads(budget_s: float = THREAD_JOIN_S) -> list[str]:
    """Wait up to `budget_s` in all for this process's other Python threads; the names of those still running.

    A daemon thread still running when the interpreter finalizes is killed by pthread_exit the moment it needs
    the GIL; one that held the last reference to a torch tensor then aborted the process ("terminate called
    without an active exception", SIGABRT, seen in the tier), so the teardown waits for threads that are ending.
    """
    end = time.monotonic() + budget_s
    me = threading.current_thread()
    for t in threading.enumerate():
        if t is not me and t.name != "ros-shutdown-watchdog":
            t.join(max(0.0, end - time.monotonic()))
    return [t.name for t in threading.enumerate() if t is not me and t.is_alive()
            and t.name != "ros-shutdown-watchdog"]


def run_node(make: Callable[[], Node], args: list[str] | None = None,
             on_shutdown: Callable[[Node], None] | None = None,
             done: Callable[[], bool] | None = None) -> int:
    """`rclpy.init`, build the node, spin until SIGINT/SIGTERM or `done()`, then tear down in order.

    Clean shutdown matters: launch sends SIGINT, then SIGTERM; sockets, worker threads and files must close
    on either, and the exit code says whether the node stopped by request (0) or failed (1). Either signal
    only sets a flag (a second one is logged and ignored); the main thread then: stops spinning, shuts its
    executor down (nothing spins it any more), runs `on_shutdown(node)` (the component stops accepting work
    and closes its threads and bus), destroys the node, shuts the context down once, and waits for the
    threads still ending. A watchdog bounds that teardown (SHUTDOWN_DEADLINE_S) and then the interpreter's
    exit (EXIT_DEADLINE_S): past either, every thread's stack is dumped and the process exits non-zero
    (FORCED_EXIT_CODE, or 1 from faulthandler's timer at exit). SIGUSR1 dumps every thread's stack
    (ProcessGroup sends it before killing a process that ignored SIGTERM).
    """
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if stop.is_set():
            log.info("%s: already stopping", signal.Signals(signum).name)
            return
        log.info("%s: stopping", signal.Signals(signum).name)
        stop.set()

    def own_signals() -> None:
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    own_signals()   # before rclpy.init: a signal while the node is built is kept, and handled once it is
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    node: Node | None = None
    executor: rclpy.executors.Executor | None = None
    rc = 0
    try:
        node = make()
        own_signals()   # make() may have installed its own (role_node: SIGINT as KeyboardInterrupt)
        # Single-threaded: FLAD's callbacks only decode and hand over (heavy work runs on the components' own
        # threads); rclpy's MultiThreadedExecutor.spin_once added up to ~1 s delivery stalls under load.
        executor = rclpy.executors.SingleThreadedExecutor()
        executor.add_node(node)
        while not stop.is_set() and not (done is not None and done()) and rclpy.ok():
            executor.spin_once(timeout_sec=0.1)
    except KeyboardInterrupt:
        pass
    except Exception:
        log.exception("node failed")
        rc = 1
    return _teardown(node, executor, on_shutdown, rc)


def _teardown(node: Node | None, executor: rclpy.executors.Executor | None,
              on_shutdown: Callable[[Node], None] | None, rc: int) -> int:
    """run_node's ordered teardown (its docstring), under a watchdog; each step runs even if one before failed."""
    name = node.get_fully_qualified_name() if node is not None else "node"
    watchdog = ShutdownWatchdog(name)
    t0 = time.monotonic()

    def step(what: str, fn: Callable[[], object]) -> None:
        nonlocal rc
        try:
            fn()
        except Exception:
            log.exception("%s: shutdown step %r failed", name, what)
            rc = rc or 1

    if executor is not None:      # not spinning: this thread was its only spinner
        step("executor", lambda: (node is not None and executor.remove_node(node), executor.shutdown()))
    if node is not None:
        if on_shutdown is not None:
            step("on_shutdown", lambda: on_shutdown(node))
        step("destroy node", node.destroy_node)
    step("context", lambda: rclpy.shutdown() if rclpy.ok() else None)
    left = join_threads()
    if left:
        log.warning("%s: threads still running after the teardown (an exit while they run may crash): %s",
                    name, ", ".join(left))
    watchdog.disarm()
    log.debug("%s: teardown took %.2f s", name, time.monotonic() - t0)
    # the interpreter's exit follows (the callers return this code to sys.exit): bound it too
    faulthandler.dump_traceback_later(EXIT_DEADLINE_S, exit=True)
    return rc
