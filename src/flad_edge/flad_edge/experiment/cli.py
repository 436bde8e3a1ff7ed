"""`flad run`: the FLAD experiment end to end (see `flad_edge.experiment.run`)."""

from __future__ import annotations

import argparse
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


def main_run(args: argparse.Namespace) -> int:
    from flad_edge.experiment.run import load_run_config, run_experiment, write_config

    console = Console() if sys.stdout.isatty() else Console(width=140)
    if args.resume is not None:
        path = Path(args.resume)
        if not (path / "config.yaml").exists():
            print(f"flad run: no run to resume at {path} (expected {path / 'config.yaml'})", file=sys.stderr)
            return 2
        if args.experiment or args.set or args.device or args.precision:
            print("flad run: --resume continues a run with its own config; leave out EXPERIMENT, --set, --device "
                  "and --precision", file=sys.stderr)
            return 2
        cfg = load_run_config(path)
        run = RunDir(path)
        from flad_core.runs import setup_logging

        setup_logging(logfile=path / "log.txt")
    else:
        if not args.experiment:
            print(f"flad run: name an experiment file or a preset ({', '.join(PRESETS)}), or --resume RUN",
                  file=sys.stderr)
            return 2
        overrides = list(args.set)
        if args.device:
            overrides += [f"train.device={args.device}", f"driver.device={args.device}"]
        if args.precision:
            overrides.append(f"train.precision={args.precision}")
        cfg = build_config(args.experiment, overrides)
        try:      # a device this host lacks stops the run here, before any process starts
            for where in (cfg.train.device, cfg.driver.device):
                resolve_device(where)
        except DeviceError as exc:
            print(f"flad run: {exc}", file=sys.stderr)
            return 2
        run = RunDir.create(f"run-{cfg.name}", cfg, root=args.runs_dir)
        write_config(run, cfg)
    console.print(f"FLAD experiment {cfg.name!r}: {cfg.fleet.vehicles} vehicles in {len(cfg.fleet.towns)} towns, "
                  f"{cfg.edges.n} edges, {cfg.rounds.rounds} rounds x {cfg.rounds.round_s:.0f} s simulated, "
                  f"{cfg.rounds.clients_per_round} clients per round; records in {run.path}")
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
    p.set_defaults(func=main_run)
