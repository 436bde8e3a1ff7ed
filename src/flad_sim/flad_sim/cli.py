"""`flad sim ...`: collect fleet datasets, look at frames, check datasets."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

COLLECT_HELP = """\
Drive an expert through seeded routes of the embedded world and write one dataset shard per vehicle.

The split is non-IID by town, as in the paper (which splits by CARLA town): by default each vehicle drives
ONE town, towns assigned round-robin. With --dirichlet-alpha A each vehicle's frames are spread over the
towns by a Dirichlet(A) draw instead (small A: nearly one town each; large A: close to IID).

A frame (4 cameras, LiDAR, BEV, labels, instruction/notice text) is recorded every --record-every world
ticks (20 Hz ticks; default 5 = 4 frames per simulated second). Defaults (50 vehicles x 60 frames = 3000
samples, ~1 GB) finish in a few minutes on 2 cores; raise --frames-per-vehicle for real training data.

Output: OUT/manifest.json (fleet) and OUT/vehicles/<id>/ (one .npy per field, memory-mappable, with a
manifest of shapes, dtypes and sha256 checksums). The whole dataset is written to a temporary folder and
renamed into place, so an interrupted run never leaves a half-written dataset. Read it with
flad_sim.dataset.FleetDataset.open(OUT) and iter_batches(...).

On-policy data (flad_sim.onpolicy), labelled with the expert's plan from the state the ego is in:
  --noise                         the expert drives with seeded steering / throttle / brake perturbations
  --dagger-learner MOD:FUNC       a learner drives (DAgger), e.g.
                                  flad_vehicle.control.learners:encoder_head_agent with
                                  --dagger-kwargs '{"checkpoint": "runs/<id>/encoder.safetensors"}', or
                                  flad_edge.celladapt.agents:adllm_agent (checkpoint + model_dir)
"""


def _collect(args: argparse.Namespace) -> int:
    from flad_core.config import ConfigError, from_dict
    from flad_core.runs import RunDir, seed_everything
    from flad_sim.dataset import CollectConfig, available_towns, collect

    towns = [t for t in (args.towns or "").split(",") if t]
    known = available_towns()
    if args.source == "world":
        unknown = [t for t in towns if t not in known]
        if unknown:
            print(f"flad sim collect: unknown town(s) {unknown}; available: {', '.join(known)}", file=sys.stderr)
            return 2
    try:
        cfg = from_dict(CollectConfig, {
            "out": args.out, "vehicles": args.vehicles, "frames_per_vehicle": args.frames_per_vehicle,
            "towns": towns, "dirichlet_alpha": args.dirichlet_alpha, "seed": args.seed, "workers": args.workers,
            "record_every": args.record_every, "front_size": args.front_size, "side_size": args.side_size,
            "lidar_channels": args.lidar_channels, "lidar_azimuth_steps": args.lidar_azimuth_steps})
    except ConfigError as exc:
        print(f"flad sim collect: {exc}", file=sys.stderr)
        return 2
    try:
        source = _source(args)
    except ValueError as exc:
        print(f"flad sim collect: {exc}", file=sys.stderr)
        return 2
    seed_everything(cfg.seed)
    run = RunDir.create("sim-collect", cfg, root=Path(args.runs_dir) if args.runs_dir else None)
    t0 = time.perf_counter()
    manifest = collect(cfg, source=source, progress=not args.no_progress)
    secs = time.perf_counter() - t0
    summary = {"out": cfg.out, "vehicles": len(manifest["vehicles"]), "samples": manifest["total"],
               "town_counts": manifest["town_counts"], "seconds": round(secs, 2),
               "samples_per_s": round(manifest["total"] / max(secs, 1e-9), 2), "workers": cfg.workers,
               "source": manifest["source"], "run": str(run.path)}
    if "onpolicy" in manifest:
        summary["onpolicy"] = manifest["onpolicy"]
    run.log_metrics(summary)
    run.write_json("summary.json", summary)
    print(json.dumps(summary, indent=2))
    return 0


def _source(args: argparse.Namespace) -> Any:
    """The sample source the flags ask for: a name, or an on-policy source (ValueError names a bad flag)."""
    if not (args.noise or args.dagger_learner):
        return args.source
    if args.noise and args.dagger_learner:
        raise ValueError("--noise and --dagger-learner exclude each other")
    from flad_sim.onpolicy import OnPolicyConfig, OnPolicySource

    if args.noise:
        op = OnPolicyConfig(mode="noise", noise_steer=args.noise_steer)
    else:
        try:
            kwargs = json.loads(args.dagger_kwargs)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--dagger-kwargs is not JSON: {exc}") from exc
        if not isinstance(kwargs, dict):
            raise ValueError("--dagger-kwargs must be a JSON object")
        op = OnPolicyConfig(mode="dagger", learner=args.dagger_learner, learner_kwargs=kwargs, beta=args.beta)
    op.validate()
    return OnPolicySource(op)


def _show(args: argparse.Namespace) -> int:
    from flad_sim.dataset import available_towns
    from flad_sim.show import show

    towns = [t for t in (args.town or "").split(",") if t] or [available_towns()[0]]
    unknown = [t for t in towns if t != "synthetic" and t not in available_towns()]
    if unknown:
        print(f"flad sim show: unknown town(s) {unknown}; available: {', '.join(available_towns())} or synthetic",
              file=sys.stderr)
        return 2
    if args.frames < 1 or args.warmup < 0:
        print("flad sim show: --frames must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    paths = []
    for town in towns:
        paths += show(Path(args.out), town=town, seed=args.seed, frames=args.frames, warmup_steps=args.warmup)
    for p in paths:
        print(p)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from flad_sim.dataset import FleetDataset, ShardError, loader_throughput

    try:
        ds = FleetDataset.open(args.root, verify=args.verify)
    except ShardError as exc:
        print(f"flad sim inspect: {exc}", file=sys.stderr)
        return 1
    out = {"root": str(ds.root), "vehicles": len(ds.shards), "samples": len(ds),
           "town_counts": ds.manifest.get("town_counts"), "verified_checksums": bool(args.verify),
           "fields": {k: f"{a.dtype}{list(a.shape[1:])}" for k, a in next(iter(ds.shards.values())).fields.items()}
           if ds.shards else {}}
    if args.throughput:
        out["loader"] = loader_throughput(list(ds.shards.values()), args.batch_size, seconds=args.throughput)
    print(json.dumps(out, indent=2))
    return 0


def _bridge(args: argparse.Namespace) -> int:
    from flad_core.bus import BusConfig, BusHub
    from flad_core.bus_factory import make_bus
    from flad_core.config import ConfigError, from_dict
    from flad_sim.bridge import WorldBridge, topic
    from flad_sim.route import seeded_routes
    from flad_sim.world import World

    try:
        cfg = from_dict(BusConfig, {"hub_pub": args.hub_pub, "hub_sub": args.hub_sub})
        world = World(args.town, seed=args.seed)
    except (ConfigError, KeyError) as exc:
        print(f"flad sim bridge: {exc.args[0] if isinstance(exc, KeyError) and exc.args else exc}", file=sys.stderr)
        return 2
    hub = BusHub(cfg) if args.host_hub else None
    bus = make_bus("sim", cfg, transport=args.transport)
    route = seeded_routes(world.town, args.seed, 1)[0]
    ego = world.spawn_ego(route)
    br = WorldBridge(bus, world, ego, role=args.role, sensors_every=args.sensors_every)
    print(f"world {world.town.name} seed {args.seed}: ego {ego} as /carla/{args.role}/..., obeying "
          f"{topic(args.role, 'vehicle_control_cmd')}; Ctrl-C stops", file=sys.stderr)
    period = world.dt / args.speed if args.speed > 0 else 0.0
    t_next = time.monotonic()
    try:
        while args.ticks <= 0 or br.ticks < args.ticks:
            br.tick()
            if period:
                t_next += period
                time.sleep(max(0.0, t_next - time.monotonic()))
    finally:
        bus.close()
        if hub is not None:
            hub.close()
    print(json.dumps({"ticks": br.ticks, "commands": br.commands, "time_s": world.time_s}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from flad_sim.dataset import DEFAULT_ROOT

    sim = subparsers.add_parser("sim", help="the embedded driving world: datasets and pictures",
                                description="The embedded driving world (CARLA stand-in): collect non-IID fleet "
                                            "datasets, render frames to PNG, check datasets.")
    sub = sim.add_subparsers(dest="sim_command", metavar="SUBCOMMAND")
    sim.set_defaults(func=lambda a: (sim.print_help(), 0)[1])

    c = sub.add_parser("collect", help="write per-vehicle dataset shards for a fleet", description=COLLECT_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--out", default=str(DEFAULT_ROOT), help="dataset root (default: %(default)s)")
    c.add_argument("--vehicles", type=int, default=50, help="fleet size (default: %(default)s)")
    c.add_argument("--frames-per-vehicle", type=int, default=60, help="samples per vehicle (default: %(default)s)")
    c.add_argument("--towns", default="", help="comma-separated towns (default: all towns of the world)")
    c.add_argument("--dirichlet-alpha", type=float, default=None,
                   help="spread each vehicle's frames over towns by Dirichlet(alpha) (default: one town each)")
    c.add_argument("--seed", type=int, default=0, help="seed for routes, traffic and the split (default: 0)")
    c.add_argument("--workers", type=int, default=2, help="parallel processes (default: %(default)s)")
    c.add_argument("--record-every", type=int, default=5, help="world ticks between frames (default: %(default)s)")
    c.add_argument("--front-size", type=int, default=128, help="front camera H=W pixels (default: %(default)s)")
    c.add_argument("--side-size", type=int, default=64, help="left/right/rear camera pixels (default: %(default)s)")
    c.add_argument("--lidar-channels", type=int, default=32, help="default: %(default)s")
    c.add_argument("--lidar-azimuth-steps", type=int, default=512, help="default: %(default)s")
    c.add_argument("--source", choices=("world", "synthetic"), default="world",
                   help="'world' drives the embedded world; 'synthetic' renders a fixed crossroads (tests)")
    c.add_argument("--noise", action="store_true",
                   help="noise injection: the expert drives with perturbed controls, labels are its plan")
    c.add_argument("--noise-steer", type=float, default=0.3, help="--noise: peak steering perturbation [0.3]")
    c.add_argument("--dagger-learner", default="", metavar="MODULE:FUNCTION",
                   help="DAgger: this learner drives (an Agent factory), the expert labels what it visits")
    c.add_argument("--dagger-kwargs", default="{}", metavar="JSON", help="keyword arguments of the learner")
    c.add_argument("--beta", type=float, default=0.0,
                   help="DAgger: probability that the expert drives a 2 s segment instead [0]")
    c.add_argument("--runs-dir", default=None, help="where the run record goes (default: runs/ or $FLAD_RUNS_DIR)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.set_defaults(func=_collect)

    s = sub.add_parser("show", help="write PNGs of a frame (4 cameras, LiDAR BEV, map with route and actors)",
                       description="Render frames of the embedded world to PNG so a person can see them: "
                                   "<town>_<seed>_<frame>_cameras.png (left | front | right, rear below), one PNG "
                                   "per camera, _lidar_bev.png (LiDAR points from above + BEV label) and _map.png.")
    s.add_argument("--town", default="", help="town name(s), comma-separated, or 'synthetic' (default: the first)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--frames", type=int, default=1, help="frames per town (default: %(default)s)")
    s.add_argument("--warmup", type=int, default=100, help="world ticks driven before the first frame")
    s.add_argument("--out", default="runs/sim-show", help="output folder (default: %(default)s)")
    s.set_defaults(func=_show)

    i = sub.add_parser("inspect", help="open a dataset, check it against its manifests, print a summary",
                       description="Open a fleet dataset (sizes/shapes always checked; --verify also checks every "
                                   "sha256) and print a JSON summary; --throughput S measures the loader.")
    i.add_argument("root", nargs="?", default=str(DEFAULT_ROOT))
    i.add_argument("--verify", action="store_true", help="check all sha256 checksums (reads everything)")
    i.add_argument("--throughput", type=float, default=0.0, help="measure loader samples/s for this many seconds")
    i.add_argument("--batch-size", type=int, default=32)
    i.set_defaults(func=_inspect)

    b = sub.add_parser("bridge", help="run the world as a carla-ros-bridge stand-in on the bus",
                       description="Step the embedded world with one ego and publish its sensors on carla-ros-bridge "
                                   "topics (/carla/<role>/rgb_front/image, /lidar, /odometry, /speedometer, /gnss); "
                                   "the ego obeys /carla/<role>/vehicle_control_cmd, so the vehicle stack runs "
                                   "unchanged against it or against CARLA + carla-ros-bridge.")
    b.add_argument("--town", default="Town01")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--role", default="hero", help="ego role name in the topic names (default: %(default)s)")
    b.add_argument("--hub-pub", default="tcp://127.0.0.1:7100", help="bus hub address publishers connect to")
    b.add_argument("--hub-sub", default="tcp://127.0.0.1:7101", help="bus hub address subscribers connect to")
    b.add_argument("--host-hub", action="store_true", help="also host the bus hub in this process")
    b.add_argument("--transport", choices=("auto", "zmq", "ros"), default="zmq")
    b.add_argument("--ticks", type=int, default=0, help="stop after this many 20 Hz ticks (0: run until Ctrl-C)")
    b.add_argument("--speed", type=float, default=1.0, help="x real time (0: as fast as possible)")
    b.add_argument("--sensors-every", type=int, default=1, help="publish sensors every N ticks")
    b.set_defaults(func=_bridge)
