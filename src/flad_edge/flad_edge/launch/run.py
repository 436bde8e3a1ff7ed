"""What each FLAD launch file starts, as plain processes: `flad launch PLAN` for machines without `ros2 launch`.

`ros2 launch` needs the `launch`/`launch_ros` packages, which are not installable everywhere (not on this
project's CI host, for one). So the decisions -- which nodes, names, namespaces, parameters and
remappings, read from `launch/fleet.yaml` -- live in ROS-free, tested plans (flad_vehicle.launch,
flad_edge.launch.plans); each `.launch.py` file only turns a plan into `launch_ros.actions.Node`s, and
`flad launch PLAN` starts the same plan as plain processes (`python -m <node module> --ros-args ...`).

The plans: see flad_edge.launch.plans (`flad launch --help` lists them).

A crashed cloud node or orchestrator (the edge) is noticed within a poll (0.2 s), logged (which node, exit
code or signal) and started again with the same parameters, at most --max-restarts times each: both keep
their state in the run dir (the orchestrator resumes after its last checkpointed round, the cloud reloads
its aggregated rounds) and the vehicles register again by themselves. The final JSON line counts the restarts.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from flad_core.config import ConfigError
from flad_core.procs import Supervisor
from flad_edge.launch import plans
from flad_edge.launch.plans import PLANS, make_plan
from flad_vehicle.launch.ros import node_command, params_yaml
from flad_vehicle.launch.spec import LaunchPlan, NodeSpec, PlanArgs

log = logging.getLogger(__name__)


def _parse_set(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition(":=")
        if not sep:
            key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError("launch", f"expected NAME:=VALUE, got {item!r}")
        out[key.strip()] = value
    return out


def _is_assignment(item: str) -> bool:
    """Whether a command-line word is a launch argument (NAME:=VALUE, or NAME=VALUE as `_parse_set` takes it)."""
    if item.startswith("-"):
        return False
    key, sep, _ = item.partition(":=")
    if not sep:
        key, sep, _ = item.partition("=")
    return bool(sep and key.strip())


class _LaunchParser(argparse.ArgumentParser):
    """`flad launch`'s parser: NAME:=VALUE launch arguments anywhere, before, between or after the options.

    argparse fills the `arguments` positional only from the words right after the plan; NAME:=VALUE words
    after an option come back as extras, which the top-level `flad` parser would reject ("unrecognized
    arguments"). Here they join `arguments` in command-line order; any other extra word is kept in
    `unrecognized` for `run_launch` to refuse in one line (exit 2)."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        namespace, extras = super().parse_known_args(args, namespace)
        if hasattr(namespace, "arguments"):
            namespace.arguments = [*(namespace.arguments or []), *(a for a in extras if _is_assignment(a))]
            namespace.unrecognized = [*getattr(namespace, "unrecognized", []),
                                      *(a for a in extras if not _is_assignment(a))]
            extras = []
        return namespace, extras


def _missing_paths(raw: dict[str, Any]) -> str | None:
    """A dry run's check of the path arguments a plan hands its nodes: `data:=PATH` (unless 'synthetic') and
    `fhdp_config:=PATH` (unless empty, the default) must exist. One line naming the first that does not."""
    for name, default in (("data", "synthetic"), ("fhdp_config", "")):
        value = raw.get(name)
        if value is None or value == default:
            continue
        if not Path(value).expanduser().exists():
            return f"{name}:={value}: no such file or directory"
    return None


def run_launch(args: argparse.Namespace) -> int:
    """`flad launch PLAN [name:=value ...]`: start a plan's nodes as processes; stop them all on Ctrl-C/exit."""
    from flad_core.atomic import atomic_write_text
    from flad_core.procs import ProcessGroup
    from flad_core.runs import RunDir

    unrecognized = getattr(args, "unrecognized", None)
    if unrecognized:
        print(f"flad launch: unrecognized argument(s) {' '.join(unrecognized)}: expected an option "
              "(see flad launch --help) or a launch argument NAME:=VALUE", file=sys.stderr)
        return 2
    try:
        raw = _parse_set(args.arguments)
        missing = _missing_paths(raw) if args.dry_run else None
        if missing:
            print(f"flad launch: {missing}", file=sys.stderr)
            return 2
        if args.run_dir is None and "run_dir" not in raw:
            raw["run_dir"] = str(RunDir.create(f"launch-{args.plan}", None, root=args.runs_dir).path)
        elif args.run_dir is not None:
            raw["run_dir"] = str(args.run_dir)
        plan = make_plan(args.plan, raw)
    except (ConfigError, KeyError) as exc:
        print(f"flad launch: {exc}", file=sys.stderr)
        return 2
    if plan.includes and not args.skip_includes:
        names = ", ".join(f"{i.package}/{i.launch_file}" for i in plan.includes)
        print(f"flad launch: plan {plan.name!r} includes other packages' launch files ({names}); those need "
              "`ros2 launch`. Use --skip-includes to start only FLAD's nodes (e.g. with the bridge already running).",
              file=sys.stderr)
        return 2
    run_dir = Path(raw["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    for path, content in plan.files.items():
        atomic_write_text(Path(path), content)
    for spec in plan.nodes:
        atomic_write_text(_params_file(run_dir, spec), params_yaml(spec))
    if args.dry_run:
        for spec in plan.nodes:
            print(" ".join(node_command(spec, _params_file(run_dir, spec))))
        return 0
    print(f"flad launch {plan.name}: {len(plan.nodes)} node(s); logs in {run_dir}", flush=True)
    code = 0
    with ProcessGroup(grace_s=args.grace) as group:
        sup = restart_supervisor(group, plan, args.max_restarts)
        try:
            for spec in plan.nodes:
                group.start(spec.fqn, node_command(spec, _params_file(run_dir, spec)),
                            log_path=run_dir / f"node{spec.fqn.replace('/', '_')}.log")
            missing = _wait_until_up(group, plan, args.startup_timeout)
            if missing:
                log.warning("not up (failed, or still starting after %.0f s): %s", args.startup_timeout,
                            ", ".join(missing))
            code = _supervise(group, plan, args.timeout, sup)
        except KeyboardInterrupt:
            print("flad launch: interrupted, stopping every node", file=sys.stderr)
            code = 130
        finally:
            codes = _stop_in_order(group, plan, args.grace)
    failed = {n: c for n, c in codes.items() if c != 0}
    print(json.dumps({"plan": plan.name, "exit_codes": codes, "run_dir": str(run_dir), "restarts": dict(sup.restarts)}),
          flush=True)
    if failed and code == 0:
        code = 1
    return code


def _params_file(run_dir: Path, spec: NodeSpec) -> Path:
    return run_dir / f"params{spec.fqn.replace('/', '_')}.yaml"


#: nodes whose normal exit ends a plan: the orchestrator after its rounds, the world bridge after its routes
PLAN_ENDERS = ("orchestrator_node", "world_bridge")
#: nodes started again when they crash, as a service (any exit is a crash) or a job (exit 0: done); both
#: resume from their state in the run dir
RESTARTABLE = {"cloud_node": "service", "orchestrator_node": "job"}


def restart_supervisor(group: Any, plan: LaunchPlan, max_restarts: int) -> Supervisor:
    """The supervisor of a plan's restartable nodes (RESTARTABLE)."""
    kinds = {spec.fqn: RESTARTABLE.get(spec.executable) for spec in plan.nodes}
    return Supervisor(group, services=[n for n, k in kinds.items() if k == "service"],
                      jobs=[n for n, k in kinds.items() if k == "job"], max_restarts=max_restarts)


def _wait_until_up(group: Any, plan: LaunchPlan, timeout: float) -> list[str]:
    """Wait until every node of the plan answers on its parameter service (or one fails, or `timeout`);
    return those not up. A node answers only once it spins, i.e. after its set-up (model loading) is done,
    so a plan that ends early (a short closed loop) does not SIGINT a node still building itself.
    Without rclpy in this interpreter there is nothing to ask: nothing to wait for.
    """
    try:
        import rclpy
        from rcl_interfaces.srv import ListParameters
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.signals import SignalHandlerOptions
    except ImportError:
        return []
    missing = {spec.fqn for spec in plan.nodes}
    ctx = rclpy.Context()
    rclpy.init(args=[], context=ctx, signal_handler_options=SignalHandlerOptions.NO)
    t0 = time.monotonic()
    try:
        probe = rclpy.create_node(f"flad_launch_{os.getpid()}", context=ctx)
        executor = SingleThreadedExecutor(context=ctx)
        executor.add_node(probe)
        clients = {fqn: probe.create_client(ListParameters, f"{fqn}/list_parameters") for fqn in missing}
        pending: dict[str, Any] = {}
        while missing and time.monotonic() - t0 < timeout:
            if any(p.poll() not in (None, 0) for p in group.procs.values()):
                break   # a node failed: _supervise ends the plan (one that finished fine waits for the rest)
            for fqn in sorted(missing):
                if group.procs[fqn].poll() is not None:
                    missing.discard(fqn)     # finished already (a quick plan's end): nothing left to wait for
                    continue
                if fqn not in pending and clients[fqn].service_is_ready():
                    pending[fqn] = clients[fqn].call_async(ListParameters.Request(depth=1))
            executor.spin_once(timeout_sec=0.2)
            for fqn, future in list(pending.items()):
                if future.done():
                    missing.discard(fqn)
                    del pending[fqn]
        executor.shutdown()
        probe.destroy_node()
    finally:
        rclpy.shutdown(context=ctx)
    if not missing:
        print(f"all {len(plan.nodes)} node(s) up after {time.monotonic() - t0:.1f} s", flush=True)
    return sorted(missing)


def _supervise(group: Any, plan: LaunchPlan, timeout: float | None, sup: Supervisor | None = None,
               poll_s: float = 0.2) -> int:
    """Wait until a node that ends the plan (orchestrator done, or any node failing) exits, or the timeout.
    With `sup`, a crashed restartable node is started again instead (bounded), and the plan goes on."""
    deadline = None if timeout is None else time.monotonic() + timeout
    watched = set(sup.services) | set(sup.jobs) if sup is not None else set()
    while deadline is None or time.monotonic() < deadline:
        ended = sup.check() if sup is not None else {}
        for spec in plan.nodes:
            rc = ended.get(spec.fqn) if spec.fqn in watched else group.procs[spec.fqn].poll()
            if rc is None:
                continue
            if rc != 0:
                log.error("%s exited with %s; stopping the plan", spec.fqn, rc)
                return 1
            if spec.executable in PLAN_ENDERS:
                log.info("%s finished; stopping the plan", spec.fqn)
                return 0
        if not group.alive():
            return 0
        time.sleep(poll_s)
    log.error("plan still running after %.0f s; stopping it", timeout)
    return 1


def _stop_in_order(group: Any, plan: LaunchPlan, grace: float) -> dict[str, int | None]:
    """SIGINT every node (what `ros2 launch` sends first), wait; then ProcessGroup's SIGTERM/SIGKILL."""
    import signal
    import subprocess

    for name in group.alive():
        with contextlib.suppress(ProcessLookupError):
            group.procs[name].send_signal(signal.SIGINT)
    end = time.monotonic() + grace
    for proc in group.procs.values():
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.0, end - time.monotonic()))
    return group.stop()


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "launch", help="start a launch plan's ROS 2 nodes as processes (no `ros2 launch` needed)",
        description=f"{__doc__}\n{plans.__doc__}", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.__class__ = _LaunchParser     # NAME:=VALUE after options too (add_parser has no per-parser class)
    p.add_argument("plan", choices=list(PLANS), help="which plan")
    p.add_argument("arguments", nargs="*", metavar="NAME:=VALUE",
                   help="launch arguments, as for ros2 launch (before or after the options): "
                        + ", ".join(f.name for f in dataclasses.fields(PlanArgs)))
    p.add_argument("--run-dir", type=Path, default=None, help="node logs and parameter files (default: runs/<id>/)")
    p.add_argument("--runs-dir", type=Path, default=None, help="where runs/<id>/ goes (default: ./runs)")
    p.add_argument("--timeout", type=float, default=None, help="stop the plan after this many seconds")
    p.add_argument("--grace", type=float, default=10.0, help="seconds each node gets to stop after SIGINT")
    p.add_argument("--startup-timeout", type=float, default=180.0,
                   help="seconds to wait for every node to appear in the ROS graph before supervising the plan")
    p.add_argument("--skip-includes", action="store_true",
                   help="start only FLAD's nodes of a plan that includes other packages' launch files")
    p.add_argument("--dry-run", action="store_true", help="print the node commands and exit")
    p.add_argument("--max-restarts", type=int, default=3,
                   help="start a crashed cloud node or orchestrator again at most this many times each (they resume "
                        "from their state in the run dir; default 3, 0: a crash stops the plan)")
    p.set_defaults(func=run_launch, unrecognized=[])
