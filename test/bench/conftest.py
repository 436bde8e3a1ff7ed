"""The measured seconds of each `flad bench NAME --json -- --quick` run, in the terminal summary."""

from __future__ import annotations


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    times = {}
    for kind in ("passed", "failed"):
        for rep in terminalreporter.stats.get(kind, []):
            for key, value in getattr(rep, "user_properties", []):
                if key == "quick_bench_seconds" and rep.when == "call":
                    times[value[0]] = value[1]
    if times:
        terminalreporter.section("flad bench NAME --json -- --quick: seconds (goal < 60 each)")
        for name, secs in sorted(times.items()):
            terminalreporter.write_line(f"  {name:9s} {secs:6.1f}")
        terminalreporter.write_line(f"  {'total':9s} {sum(times.values()):6.1f}")
