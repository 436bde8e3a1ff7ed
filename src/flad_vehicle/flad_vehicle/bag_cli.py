"""`flad bag ...`: record rosbag2 (MCAP) bags of embedded-world runs or of a running bus, and inspect them.

Lives in flad_vehicle (not flad_sim) because the `encoder` agent needs the vision encoder; the storage, reader
and run recording are ROS-free code in `flad_sim.bag`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

RECORD_HELP = """\
Record a rosbag2 bag (MCAP storage) that `ros2 bag info/play` and MCAP readers open.

Embedded mode (default): drive the seeded route of --town/--seed for --seconds simulated seconds with the
privileged expert (--agent expert) or with an encoder checkpoint (--agent encoder --checkpoint CKPT: the
encoder's own waypoint head + PID, replanning at every sensor frame) and record the carla-ros-bridge topics
(/carla/<role>/rgb_*/image, lidar, gnss, odometry, speedometer, vehicle_control_cmd), the world bridge's
/carla/<role>/navigation, infraction and driving_score (final RC/IS/DS, the last message), and the labels:
/flad/<role>/traffic_light and expert_waypoints (the ego's actual next 2.5 s, as the dataset labels them),
plus /flad/<role>/features and waypoints when the encoder drives.

--from-bus: subscribe a running ZeroMQ bus (hub addresses from --fleet or --hub-sub) to --topic TOPIC:TYPE
(repeatable; default: the carla-ros-bridge topics of --role) for --seconds wall-clock seconds.

The bag is written to a hidden folder next to --out and renamed into place when complete.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from flad_sim.bag import RecordConfig

    d = RecordConfig()
    parser = subparsers.add_parser("bag", help="record and inspect rosbag2 (MCAP) bags",
                                   description="Record rosbag2 bags with MCAP storage and inspect them.")
    sub = parser.add_subparsers(dest="bag_command", metavar="SUBCOMMAND")
    r = sub.add_parser("record", help="record a run (embedded world or a running bus) to an MCAP bag",
                       description=RECORD_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--out", default="", help="bag folder to create (default runs/<id>/bag)")
    r.add_argument("--agent", choices=("expert", "encoder"), default="expert", help="who drives [%(default)s]")
    r.add_argument("--checkpoint", default="", help="encoder checkpoint (.safetensors) for --agent encoder")
    r.add_argument("--town", default=d.town, help="embedded-world town [%(default)s]")
    r.add_argument("--seed", type=int, default=d.seed, help="world and route seed [%(default)s]")
    r.add_argument("--seconds", type=float, default=d.seconds,
                   help="simulated seconds (embedded) or wall-clock seconds (--from-bus) [%(default)s]")
    r.add_argument("--role", default=d.role, help="ego role name in topic names [%(default)s]")
    r.add_argument("--sensor-every", type=int, default=d.sensor_every,
                   help="sensor frame every N 20 Hz ticks [%(default)s]")
    r.add_argument("--front-size", type=int, default=d.front_size, help="front camera size (square) [%(default)s]")
    r.add_argument("--side-size", type=int, default=d.side_size,
                   help="left/right/rear camera size; 0: front camera only [%(default)s]")
    r.add_argument("--lidar-channels", type=int, default=d.lidar_channels)
    r.add_argument("--lidar-azimuth-steps", type=int, default=d.lidar_azimuth_steps)
    r.add_argument("--threads", type=int, default=1, help="torch threads for the encoder agent [%(default)s]")
    r.add_argument("--from-bus", action="store_true", help="record topics of a running bus instead")
    r.add_argument("--topic", action="append", default=[], metavar="TOPIC:TYPE",
                   help="--from-bus: topic and message type (repeatable)")
    r.add_argument("--fleet", default="", help="--from-bus: fleet YAML giving the bus addresses and security")
    r.add_argument("--hub-sub", default="", help="--from-bus: hub XPUB address (without --fleet)")
    r.add_argument("--hub-pub", default="", help="--from-bus: hub XSUB address (without --fleet)")
    r.add_argument("--runs-dir", default=None, help="runs root (default $FLAD_RUNS_DIR or runs)")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=_record)
    i = sub.add_parser("info", help="topics, types, counts, QoS and time span of a bag (JSON)")
    i.add_argument("bag")
    i.set_defaults(func=_info)

    def _help(_args: argparse.Namespace) -> int:
        parser.print_help()
        return 0

    parser.set_defaults(func=_help)


def _fail(text: str) -> int:
    print(f"flad bag record: {text}", file=sys.stderr)
    return 2


class EncoderTap:
    """Wraps the encoder so the recorder sees what the agent's last forward pass produced (features, head
    waypoints) without changing the agent; it behaves like the encoder for `WaypointAgent`."""

    def __init__(self, encoder: Any) -> None:
        self.encoder = encoder
        self.sensor_inputs = encoder.sensor_inputs
        self.last: dict[str, Any] | None = None

    @property
    def device(self) -> Any:
        """The wrapped encoder's device: the agent puts its batch there."""
        return self.encoder.device

    def eval(self) -> EncoderTap:
        self.encoder.eval()
        return self

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = self.encoder(batch)
        self.last = {k: v.detach().float().cpu() for k, v in out.items()}    # the recorder reads host tensors
        return out


def encoder_extras(agent: Any, tap: EncoderTap, role: str) -> Any:
    """Frame extras for the encoder agent: EncodedFeatures and the plan (nav_msgs/Path, base_link)."""
    from flad_sim.bag import features_msg, flad_topic
    from flad_sim.bridge import path_msg

    def extras(obs: dict[str, Any], t: float, frame: int) -> list[tuple[str, Any]]:
        out, tap.last = tap.last, None
        if out is None or agent.plan is None:
            return []
        feats = out["features"][0].detach().cpu().numpy()
        return [(flad_topic(role, "features"), features_msg(feats, t, role, frame)),
                (flad_topic(role, "waypoints"), path_msg(np.asarray(agent.plan), t, f"{role}/base_link"))]

    return extras


def _record(args: argparse.Namespace) -> int:
    from flad_core.config import ConfigError, from_dict
    from flad_core.runs import RunDir
    from flad_sim.bag import BagError, RecordConfig, record_route

    if args.from_bus:
        return _record_bus(args)
    try:
        cfg = from_dict(RecordConfig, {
            "town": args.town, "seed": args.seed, "seconds": args.seconds, "role": args.role,
            "sensor_every": args.sensor_every, "front_size": args.front_size, "side_size": args.side_size,
            "lidar_channels": args.lidar_channels, "lidar_azimuth_steps": args.lidar_azimuth_steps})
    except ConfigError as exc:
        return _fail(str(exc))
    if args.out and Path(args.out).exists():
        return _fail(f"{args.out} exists already; choose a new --out")
    extras = None
    if args.agent == "encoder":
        made = _encoder_agent(args, cfg)
        if isinstance(made, int):
            return made
        make_agent, extras, cfg = made
        privileged = False
    else:
        from flad_sim.expert import ExpertAgent

        def make_agent(world: Any) -> Any:
            return ExpertAgent(world)
        privileged = True
    run = RunDir.create("bag-record", {**vars(cfg), "agent": args.agent, "checkpoint": args.checkpoint},
                        root=Path(args.runs_dir) if args.runs_dir else None)
    out = Path(args.out) if args.out else run.path / "bag"
    try:
        summary = record_route(cfg, out, make_agent, args.agent, privileged=privileged, extras=extras,
                               progress=not args.no_progress)
    except BagError as exc:
        return _fail(str(exc))
    summary["run"] = str(run.path)
    run.write_json("summary.json", summary)
    print(json.dumps(summary, indent=2))
    return 0


def _encoder_agent(args: argparse.Namespace, cfg: Any) -> Any:
    """(make_agent, extras, rig-adjusted cfg) for `--agent encoder`, or an exit code."""
    import dataclasses

    import torch

    from flad_vehicle.control.agent import WaypointAgent
    from flad_vehicle.encoder.checkpoint import CheckpointError, load_checkpoint

    if not args.checkpoint:
        return _fail("--agent encoder needs --checkpoint CKPT")
    try:
        encoder, _meta = load_checkpoint(args.checkpoint)
    except CheckpointError as exc:
        return _fail(str(exc))
    torch.set_num_threads(max(1, args.threads))
    ecfg = encoder.cfg
    cams = {name: tuple(hw) for name, hw in ecfg.cameras.items()}
    front = cams.get("rgb_front")
    sides = {cams.get(c) for c in ("rgb_left", "rgb_right", "rgb_rear")}
    # the rig follows the checkpoint: its cameras must be the recorder's square front (+ three square sides)
    ok_front = front is not None and front[0] == front[1]
    ok_sides = set(cams) == {"rgb_front"} or (set(cams) == {"rgb_front", "rgb_left", "rgb_right", "rgb_rear"}
                                              and len(sides) == 1 and None not in sides
                                              and next(iter(sides))[0] == next(iter(sides))[1])
    if not (ok_front and ok_sides):
        return _fail(f"checkpoint {args.checkpoint}: cameras {cams} are not a recordable rig "
                     "(square rgb_front, optionally square rgb_left/right/rear of one size)")
    side = next(iter(sides))[0] if len(cams) > 1 else 0
    if args.lidar_channels * args.lidar_azimuth_steps != ecfg.lidar_rays:
        return _fail(f"checkpoint {args.checkpoint} expects {ecfg.lidar_rays} LiDAR rays; --lidar-channels x "
                     f"--lidar-azimuth-steps = {args.lidar_channels * args.lidar_azimuth_steps}")
    cfg = dataclasses.replace(cfg, front_size=front[0], side_size=side)
    tap = EncoderTap(encoder)
    holder: dict[str, Any] = {}

    def make_agent(world: Any) -> Any:
        # it replans at every sensor frame, so each recorded frame carries the features and plan made from it
        agent = WaypointAgent(tap, plan_every=cfg.sensor_every, name="encoder")
        holder["extras"] = encoder_extras(agent, tap, cfg.role)
        return agent

    def extras(obs: dict[str, Any], t: float, frame: int) -> list[tuple[str, Any]]:
        return holder["extras"](obs, t, frame)

    return make_agent, extras, cfg


def _record_bus(args: argparse.Namespace) -> int:
    from flad_core.bus import BusConfig, ZmqBus
    from flad_core.config import ConfigError, from_dict
    from flad_core.runs import RunDir
    from flad_sim.bag import BagError, bridge_topics, parse_topic_spec, record_bus

    try:
        topics = dict(parse_topic_spec(s) for s in args.topic) if args.topic else bridge_topics(args.role)
        security = None
        if args.fleet:
            from flad_core.fleet import load_fleet
            from flad_core.roles import security_for

            fleet = load_fleet(args.fleet)
            bus_cfg, security = fleet.bus, security_for(fleet, "bag-recorder")
        else:
            if not args.hub_sub:
                return _fail("--from-bus needs --fleet FILE or --hub-sub ADDRESS")
            bus_cfg = from_dict(BusConfig, {"hub_sub": args.hub_sub, **({"hub_pub": args.hub_pub}
                                                                       if args.hub_pub else {})})
    except (ConfigError, OSError, ValueError) as exc:
        return _fail(str(exc))
    if not args.seconds > 0:
        return _fail("--seconds must be > 0")
    if args.out and Path(args.out).exists():
        return _fail(f"{args.out} exists already; choose a new --out")
    run = RunDir.create("bag-record-bus", {"topics": topics, "seconds": args.seconds, "hub_sub": bus_cfg.hub_sub},
                        root=Path(args.runs_dir) if args.runs_dir else None)
    out = Path(args.out) if args.out else run.path / "bag"
    bus = ZmqBus("bag-recorder", bus_cfg, security)
    try:
        summary = record_bus(bus, topics, out, args.seconds, progress=not args.no_progress)
    except BagError as exc:
        return _fail(str(exc))
    finally:
        bus.close()
    summary["run"] = str(run.path)
    run.write_json("summary.json", summary)
    print(json.dumps(summary, indent=2))
    return 0


def _info(args: argparse.Namespace) -> int:
    from flad_sim.bag import BagError, bag_info

    try:
        info = bag_info(args.bag)
    except BagError as exc:
        print(f"flad bag info: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(info.to_dict(), indent=2))
    return 0
