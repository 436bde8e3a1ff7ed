"""`flad demo`: the whole system on one machine, as real processes on loopback ZeroMQ.

Default: a short instance of the FLAD experiment (`flad run quick`, fewer rounds): a moving fleet of 12
vehicles, two edges with coverage, SWIFT clustering and client sampling every round, FHDP on pooled vehicle
processes, FedAvg at the edges and the cloud, departures handed over or recovered, the driver trained and
driven, and the report in runs/<id>/report.md.

--fixed-fleet (implied by the fleet-file options below): the fleet file's vehicles, one process each, with
the clusters fixed in the FHDP config -- the real-fleet path of `flad launch`: a cloud, an edge and the
fleet's vehicles (launch/fleet.yaml: 2 resource-sufficient Jetson AGX, 2 clusters of 2 Nano/NX) start as
separate OS processes. Each vehicle trains the tiny
vision encoder on its own embedded-world data (collected first into the run folder, unless --data
points at a `flad sim collect` output): the AGXs alone, each cluster by pipeline parallelism over its
SWIFT-planned essential pipelines in rotation. The edge FedAvgs the clients each round, the cloud
aggregates the edge, and per-round metrics print as they come. Device speeds are emulated (Table 1).

--control-plane-only: just registration, heartbeats and the edge's fleet table (a few seconds).

Everything exits cleanly, also on Ctrl-C; children never outlive the launcher.

A crashed edge or cloud is noticed within a poll (0.1 s), logged (which process, exit code or signal) and
started again, at most --max-restarts times each: the edge resumes after its last checkpointed round (a round
it was in is redone, each update counted once), the cloud reloads its aggregated rounds, and the vehicles
register again by themselves. The run's `demo_done` record says how many restarts there were.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

import yaml

from flad_core.config import ConfigError, to_dict
from flad_core.fleet import FleetConfig, VehicleSpec, load_fleet, with_port_base
from flad_core.procs import ProcessGroup, Supervisor, describe_exit, python_module_cmd
from flad_core.roles import default_fleet_path
from flad_core.runs import RunDir
from flad_core.security import generate_keypair

log = logging.getLogger(__name__)


def _prepare_fleet(args: argparse.Namespace, run: RunDir) -> FleetConfig:
    fleet = load_fleet(args.fleet or default_fleet_path())
    if args.vehicles is not None:
        base = fleet.vehicles or [VehicleSpec(id="v1")]
        fleet = dataclasses.replace(fleet, vehicles=[
            dataclasses.replace(base[i % len(base)], id=f"v{i + 1}", control="", data="")
            for i in range(args.vehicles)])
    if args.port_base is not None:
        fleet = with_port_base(fleet, args.port_base)
    if args.curve:
        keys, allowed = run.path / "keys", run.path / "keys" / "allowed"
        # the edge's own bus endpoint is a client of its hub, so its key is allowed too
        for name in (fleet.edge.id, fleet.cloud.id, *(v.id for v in fleet.vehicles)):
            generate_keypair(keys, name, allow_dir=allowed)
        fleet = dataclasses.replace(fleet, security=dataclasses.replace(
            fleet.security, curve=True, keys_dir=keys, allow_dir=allowed, server=fleet.edge.id))
    return fleet


def _collect_data(fleet: FleetConfig, run: RunDir, frames: int, seed: int) -> Path:
    from flad_sim.dataset import CollectConfig, collect

    out = run.path / "data"
    print(f"collecting {frames} embedded-world frames for each of {len(fleet.vehicles)} vehicles "
          f"(non-IID: one town per vehicle) into {out}")
    collect(CollectConfig(out=str(out), vehicles=len(fleet.vehicles), frames_per_vehicle=frames, seed=seed,
                          workers=2))
    return out


def _training_inputs_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the FHDP config or the dataset, before any process starts (None: nothing)."""
    from flad_core.config import load_yaml
    from flad_edge.fhdp.config import FhdpConfig
    from flad_sim.dataset import is_fleet_dataset

    try:
        load_yaml(FhdpConfig, args.config)
    except ConfigError as exc:
        return f"bad FHDP config: {exc}"
    if args.data and args.data != "synthetic" and not is_fleet_dataset(args.data):
        return (f"no fleet dataset at {args.data} (make one with `flad sim collect --out {args.data}`, pass "
                "--data synthetic, or leave out --data to collect a small one into the run folder)")
    if args.frames < 1:
        return "--frames must be >= 1"
    return None


#: `flad demo` = the quick preset, shortened so it takes about a minute on 2 cores
DEMO_SETS = ["rounds.rounds=2", "driver.general_steps=10", "driver.distill_steps=10", "driver.lora_steps=10",
             "driver.adm_steps=20"]
#: options of the fixed-fleet demo; any of them (or --fixed-fleet) selects it
FIXED_FLEET_OPTIONS = ("fleet", "config", "data", "recovery", "control_plane_only", "vehicles", "curve", "port_base")
DEFAULT_FHDP_CONFIG = Path(__file__).resolve().parents[3] / "launch" / "fhdp.yaml"


def experiment_demo_argv(args: argparse.Namespace) -> list[str]:
    """The `flad run` command line the experiment demo is."""
    sets = list(DEMO_SETS) + (["rounds.rounds=" + str(args.rounds)] if args.rounds else [])
    argv = ["quick", *[x for s in sets for x in ("--set", s)]]
    if args.runs_dir:
        argv += ["--runs-dir", str(args.runs_dir)]
    if getattr(args, "device", None):
        argv += ["--device", args.device]
    return argv


def run_experiment_demo(args: argparse.Namespace) -> int:
    from flad_edge.experiment.cli import main_run, run_args

    return main_run(run_args(experiment_demo_argv(args)))


def wait_for_edge(sup: Supervisor, timeout: float, poll_s: float = 0.1) -> int | None:
    """The edge's exit code once it finished, or None after `timeout`. Meanwhile `sup` restarts a crashed edge or
    cloud (bounded); one that crashed once too often ends the wait (exit 1 for the cloud, the edge's own code)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ended = sup.check()
        if "edge" in ended:
            return ended["edge"]
        for name, code in ended.items():
            log.error("%s is down for good (%s); stopping the run", name, describe_exit(code))
            return 1
        time.sleep(poll_s)
    return None


def run_demo(args: argparse.Namespace) -> int:
    fixed = args.fixed_fleet or any(getattr(args, k) not in (None, False) for k in FIXED_FLEET_OPTIONS)
    if not fixed:
        return run_experiment_demo(args)
    args.config = args.config or DEFAULT_FHDP_CONFIG
    try:
        probe = load_fleet(args.fleet or default_fleet_path())
    except ConfigError as exc:
        print(f"flad demo: bad fleet file: {exc}", file=sys.stderr)
        return 2
    error = None if args.control_plane_only else _training_inputs_error(args)
    if error:
        print(f"flad demo: {error}", file=sys.stderr)
        return 2
    run = RunDir.create("demo", probe, root=args.runs_dir)
    fleet = _prepare_fleet(args, run)
    fleet_file = run.path / "fleet.yaml"
    fleet_file.write_text(yaml.safe_dump(to_dict(fleet), sort_keys=False))
    common = ["--fleet", str(fleet_file), "--run-dir", str(run.path)]
    training = not args.control_plane_only
    if training and any(not (v.control and v.data) for v in fleet.vehicles):
        print("flad demo: FHDP training needs `control` and `data` addresses for every vehicle in the fleet file "
              "(or use --control-plane-only)", file=sys.stderr)
        return 2
    data = None
    if training:
        data = Path(args.data) if args.data else _collect_data(fleet, run, args.frames, fleet.seed)
    print(f"FLAD demo: {'cloud + ' if training else ''}edge + {len(fleet.vehicles)} vehicle processes on loopback "
          f"({'CURVE-encrypted' if fleet.security.curve else 'plain TCP'}); records in {run.path}")
    started = time.monotonic()
    code = 1
    with ProcessGroup(grace_s=8.0) as group:
        sup = Supervisor(group, services=["cloud"] if training else [], jobs=["edge"], max_restarts=args.max_restarts)
        try:
            if training:
                group.start("cloud", python_module_cmd("flad_edge.fl.cloud", *common))
                edge_cmd = python_module_cmd("flad_edge.fhdp.run", *common, "--config", str(args.config),
                                             "--cloud", *(["--rounds", str(args.rounds)] if args.rounds else []),
                                             *(["--recovery"] if args.recovery else []))
                vehicle_module, vehicle_extra = "flad_vehicle.fhdp.worker", ["--data", str(data)]
            else:
                edge_cmd = python_module_cmd("flad_edge.fl.edge_server", *common, "--duration", str(args.duration))
                vehicle_module, vehicle_extra = "flad_vehicle.agent", []
            group.start("edge", edge_cmd, show_stdout=True)
            for v in fleet.vehicles:
                group.start(v.id, python_module_cmd(vehicle_module, *common, "--id", v.id, *vehicle_extra))
            code = wait_for_edge(sup, args.timeout)
            if code is None:
                log.error("edge did not finish within %.0f s", args.timeout)
                code = 1
            for v in fleet.vehicles:
                vcode = group.wait(v.id, timeout=15)
                if vcode not in (0, None):
                    if args.recovery and code == 0 and vcode < 0:
                        # killed by a signal while the fleet recovered around it: a departure, not a failure
                        print(f"vehicle {v.id} was lost (signal {-vcode}); training recovered without it")
                        continue
                    log.error("vehicle %s exited with %s (see %s)", v.id, vcode, run.path / f"vehicle-{v.id}.log")
                    code = code or 1
        except KeyboardInterrupt:
            print("\ninterrupted: stopping all processes", file=sys.stderr)
            code = 130
        codes = group.stop()
    run.log_metrics({"event": "demo_done", "exit_codes": codes, "seconds": round(time.monotonic() - started, 3),
                     "restarts": dict(sup.restarts), "crashes": sup.events})
    restarted = ("; restarted after a crash: " + ", ".join(f"{n} {k}x" for n, k in sup.restarts.items())
                 if sup.restarts else "")
    if code != 0:
        print(f"demo failed (exit {code}){restarted}; logs in {run.path}", file=sys.stderr)
    else:
        print(f"demo finished in {time.monotonic() - started:.1f} s{restarted}; records in {run.path}")
    return code


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo", help="run the whole system on this machine (cloud, edge and vehicles on loopback)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--fixed-fleet", action="store_true",
                      help="the fleet file's vehicles, one process each, fixed clusters (the real-fleet path)")
    demo.add_argument("--fleet", type=Path, default=None, help="fleet YAML (default: launch/fleet.yaml)")
    demo.add_argument("--config", type=Path, default=None,
                      help="FHDP config YAML (default: launch/fhdp.yaml)")
    demo.add_argument("--rounds", type=int, default=None, help="FL rounds (default: from the FHDP config)")
    demo.add_argument("--data", default=None,
                      help="fleet dataset root (`flad sim collect` output) or 'synthetic'; default: collect a "
                           "small one into the run folder")
    demo.add_argument("--frames", type=int, default=24, help="frames per vehicle when collecting (default 24)")
    demo.add_argument("--recovery", action="store_true",
                      help="train with quick recovery on (try `kill <pid>` on a cluster vehicle while it runs)")
    demo.add_argument("--control-plane-only", action="store_true",
                      help="only registration, heartbeats and the fleet table (no training)")
    demo.add_argument("--vehicles", type=int, default=None,
                      help="control-plane demo: override the number of vehicles")
    demo.add_argument("--duration", type=float, default=4.0,
                      help="control-plane demo: seconds to run once all vehicles are up")
    demo.add_argument("--timeout", type=float, default=900.0, help="give up if the edge has not finished by then")
    demo.add_argument("--max-restarts", type=int, default=3,
                      help="start a crashed edge or cloud again at most this many times each; the edge resumes from "
                           "its last checkpointed round (default 3; 0: a crash ends the demo)")
    demo.add_argument("--port-base", type=int, default=None, help="renumber the fleet's TCP ports from this base")
    demo.add_argument("--curve", action="store_true", help="generate keys and run every link with CURVE")
    demo.add_argument("--runs-dir", type=Path, default=None, help="where runs/<id>/ goes (default: ./runs)")
    demo.add_argument("--device", default=None, metavar="auto|cpu|cuda[:N]",
                      help="the experiment demo: where the vehicles and the driver train (as `flad run --device`)")
    demo.set_defaults(func=run_demo)
