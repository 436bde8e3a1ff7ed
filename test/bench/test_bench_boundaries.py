"""flad_bench is a harness over the product packages' public API: no bench imports or reaches into a `_private`
member of flad_core, flad_sim, flad_vehicle or flad_edge (nor of another object than its own `self`/`cls`).
Import layering and cycles are `make lint`'s (import-linter, scripts/check_import_cycles.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import flad_bench

PRODUCT = ("flad_core", "flad_sim", "flad_vehicle", "flad_edge")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_benches_use_no_private_members_of_product_packages():
    found = []
    for path in sorted(Path(flad_bench.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PRODUCT:
                found += [f"{path.name}:{node.lineno}: from {node.module} import {a.name}"
                          for a in node.names if _private(a.name)]
            elif isinstance(node, ast.Attribute) and _private(node.attr):
                owner = node.value.id if isinstance(node.value, ast.Name) else None
                if owner not in ("self", "cls"):
                    found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "private members used by benches:\n" + "\n".join(found)
