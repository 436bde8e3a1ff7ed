#!/usr/bin/env python3
"""Fail on any import cycle between modules of FLAD's five packages (part of `make lint`).

Builds the import graph of flad_core, flad_sim, flad_vehicle, flad_edge and flad_bench with grimp -- every
import statement counts, the lazy ones inside functions and those under `if TYPE_CHECKING:` included -- and
reports each strongly connected component of more than one module, with the imports that close it.
import-linter (pyproject.toml [tool.importlinter]) checks the layers and cycles between sibling packages;
this catches the rest, e.g. a package's `__init__` and one of its modules importing each other.

The packages are found through the import system: run it in the project's venv, or put other copies first
on PYTHONPATH (test/core/test_import_rules.py does). Exit status: 0 clean, 1 cycles found.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable

import grimp

PACKAGES = ("flad_core", "flad_sim", "flad_vehicle", "flad_edge", "flad_bench")


def strongly_connected(graph: grimp.ImportGraph) -> list[list[str]]:
    """The import graph's strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            module, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.find_modules_directly_imported_by(nxt)))))
                    break
                if nxt in on_stack:
                    low[module] = min(low[module], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[module])
                if low[module] == index[module]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == module:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))
    return sorted(out)


def describe(graph: grimp.ImportGraph, component: Iterable[str]) -> list[str]:
    """The imports between members of one component, one line each: `importer -> imported (l.N: statement)`."""
    members = set(component)
    lines = []
    for importer in sorted(members):
        for imported in sorted(graph.find_modules_directly_imported_by(importer) & members):
            details = graph.get_import_details(importer=importer, imported=imported) or [{}]
            for d in details:
                where = f"l.{d['line_number']}" if "line_number" in d else "line unknown"
                lines.append(f"  {importer} -> {imported} ({where}: {d.get('line_contents', '?')})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("packages", nargs="*", default=list(PACKAGES), help="root packages (default: all five)")
    args = parser.parse_args(argv)
    graph = grimp.build_graph(*args.packages, cache_dir=None)
    cycles = strongly_connected(graph)
    for component in cycles:
        print(f"import cycle among {len(component)} modules: {', '.join(component)}")
        print("\n".join(describe(graph, component)))
    if cycles:
        print(f"check_import_cycles: {len(cycles)} cycle(s) in {', '.join(args.packages)}")
        return 1
    print(f"check_import_cycles: no import cycles among {len(graph.modules)} modules of {', '.join(args.packages)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
