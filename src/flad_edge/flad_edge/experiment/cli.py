"""`flad run`: the FLAD experiment end to end (see `flad_edge.experiment.run`)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from flad_core.config import ConfigError, from_dict, to_dict
from flad_core.device import DeviceError, resolve_device
from flad_core.runs import RunDir
from flad_edge.experiment.config import PRESETS, ExperimentConfig, load_experiment

DESCRIPTION = """Run the FLAD experiment: a moving fleet in the embedded world, edges with coverage, SWIFT
clustering and client sampling every round, FHDP training on pooled vehicle processes, FedAvg at the edges
and the cloud, quick recovery of departures, then CELLAdapt and a closed-loop evaluation of the driver.

EXPERIMENT is a preset (paper: the paper's §6 setup, 50 vehicles; quick: a few minutes on 2 cores) or a YAML
file (see launch/experiments/*.yaml; keys left out keep their defaults). Everything goes to runs/<id>/:
report.md with plots, metrics.jsonl, events.jsonl, TensorBoard events (tb/), checkpoint.pt after every round.

  flad run quick                       # a few minutes
  flad run paper                       # the paper's setup
  flad run my.yaml --set rounds.rounds=4 --set fleet.vehicles=20
  flad run --resume runs/<id>          # continue a run that crashed or was stopped
  flad run quick --engine ray --address HOST:6379   # edges, cloud and vehicle slots as actors on a Ray cluster

Engines: `local` (default) runs the edges in this process and the cloud and vehicle slots as its child
processes; `ray` (pip install '.[ray]') runs them as Ray actors spread over a cluster's nodes, each with the
resource share of `engine.*_cpus` / `engine.slot_gpus` (docs/ray.md). Same seed, same numbers on either engine.
"""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`--set a.b=value` (value parsed as YAML) into the config mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "--set takes KEY=VALUE (e.g. rounds.rounds=4)")
        key, raw = item.split("=", 1)
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(key, f"{p} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def build_config(source: str, overrides: list[str]) -> ExperimentConfig:
    cfg = load_experiment(source)
    if not overrides:
        return cfg
    return from_dict(ExperimentConfig, apply_overrides(to_dict(cfg), overrides))


class UsageError(Exception):
    """A command line `flad run` cannot act on; the message is printed and the exit code is 2."""


def resumed_config(args: argparse.Namespace) -> tuple[ExperimentConfig, RunDir]:
    """`--resume RUN`: the run's own config (with `--address`, where its Ray cluster is now)."""
    from flad_core.runs import setup_logging
    from flad_edge.experiment.run import load_run_config

    path = Path(args.resume)
    if not (path / "config.yaml").exists():
        raise UsageError(f"no run to resume at {path} (expected {path / 'config.yaml'})")
    if args.experiment or args.set or args.device or args.precision or args.engine:
        raise UsageError("--resume continues a run with its own config; leave out EXPERIMENT, --set, --device, "
                         "--precision and --engine")
    cfg = load_run_config(path)
    if args.address:       # the run's Ray cluster may have been started again at another address
        if cfg.engine.name != "ray":
            raise UsageError(f"--address is for runs on the ray engine; {path} ran on {cfg.engine.name}")
        cfg.engine.address = args.address
    setup_logging(logfile=path / "log.txt")
    return cfg, RunDir(path)


def new_config(args: argparse.Namespace) -> tuple[ExperimentConfig, RunDir]:
    """EXPERIMENT with the command line's overrides, checked before any process starts; a new run folder."""
    from flad_edge.experiment.run import write_config

    if not args.experiment:
        raise UsageError(f"name an experiment file or a preset ({', '.join(PRESETS)}), or --resume RUN")
    overrides = list(args.set)
    if args.device:
        overrides += [f"train.device={args.device}", f"driver.device={args.device}"]
    if args.precision:
        overrides.append(f"train.precision={args.precision}")
    if args.engine:
        overrides.append(f"engine.name={args.engine}")
    if args.address:
        if (args.engine or "ray") != "ray":
            raise UsageError("--address names a Ray cluster; it goes with --engine ray")
        overrides += ["engine.name=ray", f"engine.address={args.address}"]
    cfg = build_config(args.experiment, overrides)
    try:      # a device this host lacks stops the run here, before any process starts
        for where in (cfg.train.device, cfg.driver.device):
            resolve_device(where)
    except DeviceError as exc:
        raise UsageError(str(exc)) from exc
    if cfg.engine.name == "ray" and importlib.util.find_spec("ray") is None:
        raise UsageError("the ray engine needs Ray: pip install '.[ray]' (ray==2.60.0)")
    run = RunDir.create(f"run-{cfg.name}", cfg, root=args.runs_dir)
    write_config(run, cfg)
    return cfg, run


def main_run(args: argparse.Namespace) -> int:
    from flad_edge.experiment.run import run_experiment

    console = Console() if sys.stdout.isatty() else Console(width=140)
    try:
        cfg, run = resumed_config(args) if args.resume is not None else new_config(args)
    except UsageError as exc:
        print(f"flad run: {exc}", file=sys.stderr)
        return 2
    console.print(f"FLAD experiment {cfg.name!r}: {cfg.fleet.vehicles} vehicles in {len(cfg.fleet.towns)} towns, "
                  f"{cfg.edges.n} edges, {cfg.rounds.rounds} rounds x {cfg.rounds.round_s:.0f} s simulated, "
                  f"{cfg.rounds.clients_per_round} clients per round"
                  + (f", on Ray ({cfg.engine.address or 'a new local instance'})" if cfg.engine.name == "ray" else "")
                  + f"; records in {run.path}")
    try:
        summary = run_experiment(cfg, run, console, resume=args.resume is not None)
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with `flad run --resume {run.path}`", file=sys.stderr)
        return 130
    driver = summary.get("driver") or {}
    console.print(f"done in {summary['wall_s']:.0f} s: {summary['updates_committed']} updates committed"
                  + (f"; driver RC {driver.get('RC', float('nan')):.1f} IS {driver.get('IS', float('nan')):.2f} "
                     f"DS {driver.get('DS', float('nan')):.1f}" if driver else ""))
    return 0


def run_args(argv: list[str]) -> argparse.Namespace:
    """`flad run ARGV` parsed exactly as the command line is (what `flad demo` runs through `main_run`)."""
    parser = argparse.ArgumentParser(prog="flad")
    register(parser.add_subparsers())
    return parser.parse_args(["run", *argv])


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="run the FLAD experiment end to end (presets: paper, quick)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", nargs="?", default=None, help=f"experiment YAML or a preset ({', '.join(PRESETS)})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set rounds.rounds=4 (repeatable)")
    p.add_argument("--resume", type=Path, default=None, metavar="RUN", help="continue runs/<id> after a crash")
    p.add_argument("--runs-dir", type=Path, default=None, help="where runs/<id>/ goes (default: ./runs)")
    p.add_argument("--device", default=None, metavar="auto|cpu|cuda[:N]",
                   help="where the vehicle processes train and the driver trains and drives (sets train.device and "
                        "driver.device; default: the config's, auto = CUDA when present)")
    p.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"),
                   help="stage training precision (sets train.precision; default: the config's, fp32)")
    p.add_argument("--engine", default=None, choices=("local", "ray"),
                   help="where the edges, the cloud and the vehicle slots run (sets engine.name; default: the "
                        "config's, local)")
    p.add_argument("--address", default=None, metavar="HOST:PORT",
                   help="the Ray cluster to run on (implies --engine ray; `ray start --head` prints it; default: a "
                        "new Ray instance on this machine). With --resume: where the run's cluster is now")
    p.set_defaults(func=main_run)
