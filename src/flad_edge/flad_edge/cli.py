"""`flad edge ...`: edge-server commands. SWIFT's are in `register_swift` (plan, templates, train-policy).

JSON in, JSON out, so other tools and tests can drive SWIFT: an infeasible instance is a normal answer
(`feasible: false` + reason, exit 0); malformed input is an error naming what is wrong (exit 2).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2


class InputError(Exception):
    """Input the user must fix; the message names the file and the bad key."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Mount the `edge` group on the `flad` parser."""
    edge = subparsers.add_parser("edge", help="edge server: SWIFT planning and preventive templates",
                                 description="Edge-server commands.")
    esub = edge.add_subparsers(dest="edge_command", metavar="EDGE_COMMAND")
    edge.set_defaults(func=lambda args: _help(edge))
    register_swift(esub)
    from flad_edge.eval.closed_loop import register_closed_loop

    register_closed_loop(esub)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 0


def register_swift(esub: argparse._SubParsersAction) -> None:
    """SWIFT subcommands: `plan`, `templates`, `train-policy`."""
    from flad_edge.swift.planners import METHODS, OBJECTIVES

    p = esub.add_parser(
        "plan", help="plan one training pipeline for a cluster (SWIFT, §4.1)",
        description="Plan a pipeline: vehicles in stage order and each one's contiguous layer range. "
                    "cluster.json: {\"vehicles\": [{\"id\", \"mem_bytes\", \"tflops\", \"link_mbps\", \"stability\"}], "
                    "\"mu\", \"nu\", \"n_batch\"}; profile.json: {\"layers\": [{\"name\", \"flops\", \"param_bytes\", "
                    "\"activation_bytes\", \"mem_bytes\"}]}. Infeasible instances give feasible: false (exit 0).")
    p.add_argument("--cluster", required=True, help="cluster JSON file")
    p.add_argument("--profile", required=True, help="model profile JSON file")
    p.add_argument("--method", choices=METHODS, default="swift")
    p.add_argument("--first", help="vehicle id that must be the first stage (the data owner)")
    p.add_argument("--objective", choices=OBJECTIVES, default="path",
                   help="minimise t_path (Eq. 10) or the bottleneck stage")
    p.add_argument("--policy", help="DQN policy file (default: $FLAD_SWIFT_POLICY_DIR or ~/.cache/flad/swift)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_plan_cmd)

    t = esub.add_parser("templates", help="preventive templates for every cluster left after up to f departures",
                        description="Build the preventive pipeline templates (§4.2) and print them as JSON.")
    t.add_argument("--cluster", required=True)
    t.add_argument("--profile", required=True)
    t.add_argument("-f", "--failures", type=int, default=1, help="departures to prepare for (default 1)")
    t.add_argument("--method", choices=("swift", "exact", "greedy"), default="swift")
    t.add_argument("--objective", choices=OBJECTIVES, default="path")
    t.add_argument("--policy")
    t.add_argument("--out", help="also write the templates JSON to this file (atomically)")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=_templates_cmd)

    r = esub.add_parser("train-policy", help="train SWIFT's Phase-2 Double DQN and save it (safetensors)")
    r.add_argument("--episodes", type=int, default=800)
    r.add_argument("--objective", choices=OBJECTIVES, default="path")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", help="policy file (default: the default policy path for the objective)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=_train_cmd)


def _writable(path: str | Path, what: str) -> None:
    """Make `path`'s folder now, so a bad output path fails before the work rather than after it."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{what} {path}: cannot create its folder ({exc.strerror or exc})") from exc
    if Path(path).is_dir():
        raise InputError(f"{what} {path}: is a folder, expected a file path")


def _read_json(path: str, what: str) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{what} file {path}: cannot read ({exc.strerror or exc})") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{what} file {path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") \
            from exc


def _load_inputs(args: argparse.Namespace) -> tuple[Any, Any]:
    from flad_core.config import ConfigError
    from flad_edge.swift.model import load_cluster, load_profile

    cdata = _read_json(args.cluster, "cluster")
    pdata = _read_json(args.profile, "profile")
    try:
        cluster = load_cluster(cdata)
    except ConfigError as exc:
        raise InputError(f"cluster file {args.cluster}: {exc}") from exc
    try:
        profile = load_profile(pdata)
    except ConfigError as exc:
        raise InputError(f"profile file {args.profile}: {exc}") from exc
    return cluster, profile


def _check_policy(path: str | None) -> None:
    """An explicit --policy must be a DQN policy if it exists (a missing one is trained and saved there)."""
    if not path or not Path(path).exists():
        return
    from flad_edge.swift.dqn import DQNPolicy

    try:
        DQNPolicy.load(path)
    except Exception as exc:   # safetensors raises its own error type for a foreign file
        raise InputError(f"--policy {path}: not a usable DQN policy ({type(exc).__name__}: {exc}); "
                         "`flad edge train-policy --out FILE` makes one") from exc


def _fail(cmd: str, msg: str) -> int:
    print(f"flad edge {cmd}: error: {msg}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _plan_cmd(args: argparse.Namespace) -> int:
    from flad_edge.swift.planners import PlannerError, plan

    try:
        cluster, profile = _load_inputs(args)
        if args.first is not None:
            try:
                cluster.index_of(args.first)
            except KeyError as exc:
                raise InputError(f"--first: {exc.args[0]}") from exc
        if args.method in ("dqn", "swift"):
            _check_policy(args.policy)
        result = plan(cluster, profile, args.method, args.first, args.objective, policy_path=args.policy)
    except (InputError, PlannerError) as exc:
        return _fail("plan", str(exc))
    out = result.to_json()
    if args.json:
        print(json.dumps(out))
    elif result.feasible:
        print(f"{result.method}: t_path {result.t_path_s:.3f} s, bottleneck {result.bottleneck_s:.3f} s, "
              f"planned in {result.plan_time_s * 1e3:.2f} ms")
        for vid, (a, b) in zip(result.path, result.ranges, strict=True):
            print(f"  {vid}: layers [{a}, {b})")
    else:
        print(f"{result.method}: infeasible: {result.reason}")
    return 0


def _templates_cmd(args: argparse.Namespace) -> int:
    from flad_core.atomic import atomic_write_json
    from flad_edge.swift.templates import PreventiveTemplates

    if args.failures < 1:
        return _fail("templates", f"--failures must be >= 1, got {args.failures}")
    try:
        cluster, profile = _load_inputs(args)
        if args.method == "swift":
            _check_policy(args.policy)
        if args.out:
            _writable(args.out, "--out")
    except InputError as exc:
        return _fail("templates", str(exc))
    policy = None
    if args.method == "swift":
        from flad_edge.swift.dqn import load_or_train

        policy = load_or_train(args.policy, args.objective)
    pt = PreventiveTemplates(cluster, profile, f=args.failures, method=args.method, objective=args.objective,
                             policy=policy)
    pt.generate()
    out = {"method": args.method, "failures": args.failures, "objective": args.objective,
           "n_templates": len(pt.templates), "generation_time_s": pt.generation_time_s,
           "templates": [pt.templates[s].to_json() for s in pt.subsets]}
    if args.out:
        atomic_write_json(args.out, out)
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{len(pt.templates)} templates ({args.method}, f={args.failures}) in {pt.generation_time_s:.3f} s")
        for s in pt.subsets:
            tpl = pt.templates[s]
            best = tpl.best
            desc = f"t_path {best.t_path_s:.3f} s via {best.path}" if tpl.feasible else f"infeasible: {best.reason}"
            print(f"  without {sorted({str(v.id) for v in cluster.vehicles} - s)}: {desc}")
    return 0


def _train_cmd(args: argparse.Namespace) -> int:
    from flad_edge.swift.dqn import default_policy_path, train

    if args.episodes < 1:
        return _fail("train-policy", f"--episodes must be >= 1, got {args.episodes}")
    path = Path(args.out) if args.out else default_policy_path(args.objective)
    try:
        _writable(path, "--out")
    except InputError as exc:
        return _fail("train-policy", str(exc))
    pol = train(args.episodes, args.objective, args.seed)
    pol.save(path)
    info = {"path": str(path), **pol.meta}
    print(json.dumps(info) if args.json else f"saved DQN policy to {path} ({pol.meta.get('episodes')} episodes)")
    return 0
