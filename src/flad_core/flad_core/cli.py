"""The `flad` command. Subcommands are plugins (entry points), so flad_core depends on nothing above it.

Groups register through the `flad.commands` entry-point group; benchmarks through `flad.benchmarks`
(see pyproject.toml). `flad bench NAME --json` prints exactly one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points

log = logging.getLogger(__name__)

DESCRIPTION = """\
FLAD: federated learning for LLM-based autonomous driving across vehicles, edge servers and a cloud.

Everything runs on one machine by default (embedded driving world, tiny models, loopback ZeroMQ,
emulated device profiles); the same commands drive a real fleet when launch/fleet.yaml points at it.
"""


def _benchmarks() -> dict:
    return {ep.name: ep for ep in entry_points(group="flad.benchmarks")}


def _bench(args: argparse.Namespace) -> int:
    benches = _benchmarks()
    if args.list or not args.name:
        for name in sorted(benches):
            print(f"{name:12s} {benches[name].value}")
        return 0
    if args.name not in benches:
        print(f"flad bench: unknown benchmark {args.name!r}; available: {', '.join(sorted(benches))}",
              file=sys.stderr)
        return 2
    try:
        fn = benches[args.name].load()
    except ImportError as exc:
        print(f"flad bench {args.name}: not available in this install ({exc})", file=sys.stderr)
        return 2
    return int(fn(bench_argv(args.rest, args.json)) or 0)


def bench_argv(rest: list[str], json_flag: bool) -> list[str]:
    """The benchmark's own argv from what followed its name: `flad bench NAME --json -- --quick` and
    `flad bench --json NAME -- --quick` both give `["--json", "--quick"]` (the first `--` only separates)."""
    argv = list(rest)
    if "--" in argv:
        argv.remove("--")
    if json_flag and "--json" not in argv:
        argv.insert(0, "--json")
    return argv


def _input_error_text(exc: BaseException) -> str | None:
    """One line for an error that says an input is missing or unusable (not a bug), else None."""
    from flad_core.config import ConfigError

    if isinstance(exc, ConfigError):
        return str(exc)
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        if exc.filename is not None:
            return f"{exc.filename}: {exc.strerror or exc}"
        return str(exc)
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flad", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench = sub.add_parser(
        "bench", help="run a benchmark and print its figures",
        description="Run a named benchmark. With --json it prints one JSON object with the figures and "
                    "the conditions they were measured under. Extra arguments go to the benchmark "
                    "(try `flad bench NAME -- --help`). Every benchmark takes `-- --quick`: a smoke run in under a "
                    "minute from a fresh clone (every figure there, none meaningful). A benchmark that needs a "
                    "dataset collects it on demand or names the command that makes it.")
    bench.add_argument("name", nargs="?", help="benchmark name (see --list)")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.add_argument("--list", action="store_true", help="list available benchmarks")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    bench.set_defaults(func=_bench)
    unavailable = []
    for ep in sorted(entry_points(group="flad.commands"), key=lambda e: e.name):
        try:
            register = ep.load()
        except ImportError as exc:
            unavailable.append(f"{ep.name} ({exc.name or exc})")
            continue
        register(sub)
    if unavailable:
        parser.epilog = "not available in this install: " + ", ".join(unavailable)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from flad_core.runs import setup_logging

    setup_logging(logging.WARNING - 10 * min(args.verbose, 2) if args.verbose else logging.INFO)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # A missing or unreadable input is the user's to fix: one line, no traceback (-vv logs it).
        text = _input_error_text(exc)
        if text is None:
            raise
        log.debug("input error", exc_info=True)
        print(f"{_command_name(args)}: {text}", file=sys.stderr)
        return 2


def _command_name(args: argparse.Namespace) -> str:
    """`flad bench llm`, `flad sim show`, ... for error messages."""
    words = ["flad", args.command]
    if args.command == "bench" and getattr(args, "name", None):
        words.append(args.name)
    else:
        for key, value in vars(args).items():
            if key.endswith("command") and key != "command" and isinstance(value, str):
                words.append(value)
                break
    return " ".join(words)


if __name__ == "__main__":
    sys.exit(main())
