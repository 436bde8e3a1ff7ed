"""`flad edge closed-loop`: the embedded-world closed loop as separate node processes, on ROS 2 topics or ZeroMQ.

Starts the world bridge and, per vehicle, the chain of the chosen waypoint source, each as its own process
(the `nodes/` modules, the same command line on both transports; see flad_core.node_main):

  expert        world_bridge -> controller_node                                  (plumbing: should score like
                                                                                  the privileged expert)
  encoder_head  world_bridge -> encoder_node (own waypoint head) -> controller_node
  edge          world_bridge -> encoder_node -> waypoint_node (CELLAdapt, shared) -> controller_node

waits for the world bridge to finish (routes ended or --duration-s simulated seconds), stops the others
(SIGTERM), and prints one JSON object: the leaderboard scores (RC/IS/DS per ego and their means), the
transport, every process's exit code, and the run folder (runs/<id>/, with each process's log). `--device`
(flad_core.device) is where the encoder and waypoint nodes run their models; each node's log says which device
it got.
Lives in flad_edge because it composes all layers (edge -> vehicle -> sim).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from flad_core.config import ConfigError, from_dict

log = logging.getLogger(__name__)

Source = Literal["expert", "encoder_head", "edge"]


@dataclass
class ClosedLoopRunConfig:
    transport: Literal["ros", "zmq"] = "zmq"
    source: Source = "expert"
    town: str = "Town01"
    seed: int = 0
    vehicles: int = 1
    route_length_m: float = 200.0
    duration_s: float = 0.0
    sensors_every: int = 10            # learned sources: 2 Hz sensors/plans at 20 Hz control
    tick_timeout_s: float = 10.0
    startup_timeout_s: float = 180.0
    encoder_checkpoint: str = ""
    model_dir: str = ""
    threads: int = 1
    timeout_s: float = 900.0           # wall-clock limit of the whole run
    device: str = "auto"               # the encoder and waypoint nodes' models: auto | cpu | cuda[:N]

    def validate(self) -> None:
        from flad_core.device import DeviceError, check_device_spec

        try:
            check_device_spec(self.device)
        except DeviceError as exc:
            raise ConfigError("device", str(exc)) from exc
        if self.vehicles < 1:
            raise ConfigError("vehicles", f"must be >= 1, got {self.vehicles}")
        if self.source != "expert" and self.sensors_every < 1:
            raise ConfigError("sensors_every", "learned sources need sensors (>= 1)")
        if self.timeout_s <= 0:
            raise ConfigError("timeout_s", "must be > 0")


def _p(**params: Any) -> list[str]:
    """`-p name:=value` pairs; lists and booleans in YAML flow style, as `ros2 run` takes them."""
    out = []
    for k, v in params.items():
        if isinstance(v, bool):
            text = "true" if v else "false"
        elif isinstance(v, (list, tuple)):
            text = "[" + ", ".join(str(x) for x in v) + "]"
        else:
            text = str(v)
        out += ["-p", f"{k}:={text}"]
    return out


def plan_processes(cfg: ClosedLoopRunConfig, result_path: Path, hub: tuple[str, str] | None
                   ) -> list[tuple[str, list[str]]]:
    """(name, argv after `python -m`) of every process of the run, world bridge first."""
    roles = ["hero"] if cfg.vehicles == 1 else [f"hero{i}" for i in range(cfg.vehicles)]
    vids = [f"v{i}" for i in range(cfg.vehicles)]

    def transport(name: str, host: bool = False) -> list[str]:
        if cfg.transport == "ros":
            return ["--ros-args", "-r", f"__node:={name}"]
        assert hub is not None
        return ["--transport", "zmq", "--hub-pub", hub[0], "--hub-sub", hub[1], *(["--host-hub"] if host else []),
                "--ros-args"]

    learned = cfg.source != "expert"
    # the nodes' own default is auto: a device is passed only when one is chosen
    device = _p(device=cfg.device) if cfg.device.strip().lower() != "auto" else []
    procs = [("world_bridge", ["flad_sim.nodes.world_bridge", *transport("world_bridge", host=True), *_p(
        town=cfg.town, seed=cfg.seed, roles=roles, route_length_m=float(cfg.route_length_m),
        duration_s=float(cfg.duration_s), sensors_every=cfg.sensors_every if learned else 0,
        expert_waypoints=not learned, tick_timeout_s=float(cfg.tick_timeout_s),
        startup_timeout_s=float(cfg.startup_timeout_s), result_path=str(result_path))])]
    if cfg.source == "edge":
        procs.append(("waypoint_node", ["flad_edge.nodes.waypoint_node", *transport("waypoint_node"), *_p(
            vehicle_ids=vids, threads=cfg.threads), *device, *(_p(model_dir=cfg.model_dir) if cfg.model_dir else [])]))
    period = cfg.sensors_every * 0.05 if learned else 0.05
    for vid, role in zip(vids, roles, strict=True):
        if learned:
            procs.append((f"encoder_{vid}", ["flad_vehicle.nodes.encoder_node", *transport(f"encoder_{vid}"), *_p(
                vehicle_id=vid, role_name=role, waypoint_source=cfg.source, threads=cfg.threads), *device,
                *(_p(checkpoint=cfg.encoder_checkpoint) if cfg.encoder_checkpoint else [])]))
        procs.append((f"controller_{vid}", ["flad_vehicle.nodes.controller_node", *transport(f"controller_{vid}"),
                                            *_p(vehicle_id=vid, role_name=role, waypoint_source=cfg.source,
                                                sync_plan_period_s=round(period, 3),
                                                max_waypoint_age_s=round(max(1.0, 2 * period), 3))]))
    return procs


def run_closed_loop(cfg: ClosedLoopRunConfig, runs_dir: Path | None = None) -> dict[str, Any]:
    """Start the processes, wait for the world bridge, stop the rest; the scores and exit codes."""
    from flad_core.procs import ProcessGroup, free_port_base, python_module_cmd
    from flad_core.runs import RunDir

    if cfg.transport == "ros":
        try:
            import rclpy  # noqa: F401
        except ImportError as exc:
            raise RuntimeError(f"--transport ros needs rclpy in this environment ({exc}); run it in the ROS tier "
                               "environment (scripts/ros_tier.sh) or use --transport zmq") from exc
    run = RunDir.create(f"closed-loop-{cfg.transport}-{cfg.source}", cfg, root=runs_dir)
    result_path = run.path / "scores.json"
    hub = None
    if cfg.transport == "zmq":
        base = free_port_base(2)
        hub = (f"tcp://127.0.0.1:{base}", f"tcp://127.0.0.1:{base + 1}")
    procs = plan_processes(cfg, result_path, hub)
    t0 = time.monotonic()
    with ProcessGroup(grace_s=15.0) as group:
        for name, argv in procs:
            group.start(name, python_module_cmd(*argv), log_path=run.path / f"{name}.log")
        rc_world = group.wait("world_bridge", timeout=cfg.timeout_s)
        early = {n: group.procs[n].poll() for n in group.procs if n != "world_bridge"}
        codes = group.stop()
    wall = time.monotonic() - t0
    out: dict[str, Any] = {"transport": cfg.transport, "source": cfg.source, "run": str(run.path),
                           "wall_s": round(wall, 1), "exit_codes": codes,
                           "exited_early": sorted(n for n, c in early.items() if c is not None)}
    if rc_world is None:
        out["error"] = f"world bridge still running after timeout_s={cfg.timeout_s:.0f} s (killed)"
    elif not result_path.is_file():
        out["error"] = f"world bridge exited {rc_world} without scores; see {run.path}/world_bridge.log"
    else:
        scores = json.loads(result_path.read_text(encoding="utf-8"))
        scores["world_wall_s"] = scores.pop("wall_s", None)
        out.update(scores)
    run.write_json("summary.json", out)
    return out


def _inputs_error(cfg: ClosedLoopRunConfig) -> str | None:
    """Inputs the node processes would only fail on after start-up (None: all usable)."""
    from flad_core.device import DeviceError, resolve_device
    from flad_sim.towns import TOWNS

    try:
        resolve_device(cfg.device)
    except DeviceError as exc:
        return f"--device: {exc}"
    if cfg.town not in TOWNS:
        return f"--town {cfg.town}: unknown town; towns: {', '.join(TOWNS)}"
    if cfg.encoder_checkpoint:
        from flad_vehicle.encoder.checkpoint import CheckpointError, read_checkpoint

        try:
            read_checkpoint(cfg.encoder_checkpoint)
        except CheckpointError as exc:
            return f"--encoder-checkpoint: {exc} (`flad vehicle train` makes one)"
    if cfg.model_dir and not (Path(cfg.model_dir) / "celladapt.json").is_file():
        return (f"--model-dir {cfg.model_dir}: not a saved CELLAdapt model (no celladapt.json); `flad llm train` "
                "writes runs/<id>/models/adm")
    return None


def _cmd(args: argparse.Namespace) -> int:
    try:
        cfg = from_dict(ClosedLoopRunConfig, {
            "transport": args.transport, "source": args.source, "town": args.town, "seed": args.seed,
            "vehicles": args.vehicles, "route_length_m": args.route_length_m, "duration_s": args.duration_s,
            "sensors_every": args.sensors_every, "tick_timeout_s": args.tick_timeout_s,
            "encoder_checkpoint": args.encoder_checkpoint, "model_dir": args.model_dir, "timeout_s": args.timeout_s,
            "device": args.device})
        error = _inputs_error(cfg)
        if error:
            raise ConfigError("", error)
        out = run_closed_loop(cfg, Path(args.runs_dir) if args.runs_dir else None)
    except (ConfigError, RuntimeError) as exc:
        print(f"flad edge closed-loop: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2))
    if "error" in out:
        print(f"flad edge closed-loop: {out['error']}", file=sys.stderr)
        return 1
    return 0


def register_closed_loop(esub: argparse._SubParsersAction) -> None:
    """`flad edge closed-loop`."""
    from flad_core.device import add_device_argument

    c = esub.add_parser(
        "closed-loop", help="drive the embedded world with the node processes (ROS 2 topics or ZeroMQ); print RC/IS/DS",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--transport", choices=("ros", "zmq"), default="zmq",
                   help="ros: real rclpy topics (ROS tier environment); zmq: the ZeroMQ bus (default)")
    c.add_argument("--source", choices=("expert", "encoder_head", "edge"), default="expert",
                   help="waypoint source (default: %(default)s)")
    c.add_argument("--town", default="Town01")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--vehicles", type=int, default=1, help="egos in the same world (default: %(default)s)")
    c.add_argument("--route-length-m", type=float, default=200.0)
    c.add_argument("--duration-s", type=float, default=0.0,
                   help="simulated seconds to drive (0: until every route ends)")
    c.add_argument("--sensors-every", type=int, default=10, help="learned sources: world ticks per sensor frame")
    c.add_argument("--tick-timeout-s", type=float, default=10.0)
    c.add_argument("--encoder-checkpoint", default="", help="encoder checkpoint (default: tiny random, logged)")
    c.add_argument("--model-dir", default="", help="CELLAdapt save_pretrained dir (default: tiny random ADM)")
    c.add_argument("--timeout-s", type=float, default=900.0, help="wall-clock limit of the run")
    add_device_argument(c, what="the encoder and waypoint nodes' models")
    c.add_argument("--runs-dir", default=None, help="where the run folder goes (default: runs/ or $FLAD_RUNS_DIR)")
    c.add_argument("--json", action="store_true", help="(the output is always one JSON object)")
    c.set_defaults(func=_cmd)
