"""The import rules `make lint` enforces, shown to bite: layers and cycles.

Dependencies point one way, flad_bench -> flad_edge -> flad_vehicle -> flad_sim -> flad_core, and no modules
import each other in a cycle, lazy imports inside functions included. Checked by import-linter (pyproject.toml
[tool.importlinter]: a `layers` and an `acyclic_siblings` contract) and scripts/check_import_cycles.py (any
cycle between two modules). Each check runs here on a copy of the sources (first on PYTHONPATH) with a
deliberate violation, and on small trees that keep the rules.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("flad_core", "flad_sim", "flad_vehicle", "flad_edge", "flad_bench")
ROS_PACKAGES = PACKAGES[:4]
LINT_IMPORTS = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                "sys.exit(lint_imports_command())", "--config", str(REPO / "pyproject.toml"), "--no-cache", "--no-logo"]
CHECK_CYCLES = [sys.executable, str(REPO / "scripts" / "check_import_cycles.py")]


def _run(cmd: list[str], root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)


def _copy_sources(dst: Path) -> Path:
    for pkg in PACKAGES:
        shutil.copytree(REPO / "src" / pkg / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dst


def _append(path: Path, code: str) -> None:
    path.write_text(path.read_text() + "\n\n" + code)


def _write_tree(root: Path, files: dict[str, str]) -> Path:
    for pkg in PACKAGES:
        (root / pkg).mkdir(parents=True, exist_ok=True)
        (root / pkg / "__init__.py").touch()
    for name, code in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(code)
    return root


#: five tiny packages that keep the rules: downward imports only, some of them lazy, one subpackage
CLEAN_TREE = {
    "flad_core/base.py": "",
    "flad_sim/world.py": "import flad_core.base\n",
    "flad_vehicle/car.py": "from flad_sim import world\n",
    "flad_edge/plans/__init__.py": "",
    "flad_edge/plans/fleet.py": "def f():\n    from flad_vehicle import car\n\n    return car\n",
    "flad_edge/plans/edge.py": "from flad_edge.plans import fleet\n",
    "flad_bench/run.py": "def main():\n    import flad_edge.plans.edge\n",
}


def test_both_checks_pass_on_a_tree_that_keeps_the_rules(tmp_path: Path) -> None:
    root = _write_tree(tmp_path, CLEAN_TREE)
    lint, cycles = _run(LINT_IMPORTS, root), _run(CHECK_CYCLES, root)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "Contracts: 2 kept, 0 broken." in lint.stdout
    assert cycles.returncode == 0, cycles.stdout + cycles.stderr
    assert "no import cycles among" in cycles.stdout


def test_an_upward_import_and_a_cycle_in_the_real_sources_are_named(tmp_path: Path) -> None:
    root = _copy_sources(tmp_path / "copy")
    before = {"lint": _run(LINT_IMPORTS, root), "cycles": _run(CHECK_CYCLES, root)}
    # an upward import (flad_core knowing flad_edge), lazy, and a module-level cycle (bus_factory builds on bus)
    _append(root / "flad_core" / "atomic.py", "def _upward():\n    from flad_edge.launch import plans\n\n"
                                              "    return plans\n")
    _append(root / "flad_core" / "bus.py", "def _cycle():\n    from flad_core.bus_factory import make_bus\n\n"
                                           "    return make_bus\n")
    lint, cycles = _run(LINT_IMPORTS, root), _run(CHECK_CYCLES, root)

    assert lint.returncode != 0, lint.stdout
    assert re.search(r"flad_core is not allowed to import flad_edge:\s+- flad_core\.atomic -> flad_edge\.launch\.plans",
                     lint.stdout), lint.stdout
    assert re.search(r"No cycles are allowed in flad_core\.\n.*\n\n- \.bus(_factory)? -> \.bus(_factory)? ",
                     lint.stdout), lint.stdout
    assert cycles.returncode == 1, cycles.stdout
    component = next(line for line in cycles.stdout.splitlines() if "flad_core.bus_factory" in line
                     and line.startswith("import cycle"))
    assert "flad_core.bus," in component, component
    assert "flad_core.bus -> flad_core.bus_factory (l." in cycles.stdout
    # without the injected lines neither check mentions those modules: what they report is the injection
    for name, out in before.items():
        assert "flad_core.atomic" not in out.stdout and "bus_factory" not in out.stdout, (name, out.stdout)


def test_a_cycle_through_a_package_init_is_caught_by_the_script(tmp_path: Path) -> None:
    """import-linter compares siblings only: a package's `__init__` and its own module importing each other
    is the script's to find."""
    root = _write_tree(tmp_path, {**CLEAN_TREE, "flad_edge/plans/__init__.py": "from flad_edge.plans import edge\n",
                                  "flad_edge/plans/edge.py": "from flad_edge import plans\n"})
    assert _run(LINT_IMPORTS, root).returncode == 0
    cycles = _run(CHECK_CYCLES, root)
    assert cycles.returncode == 1
    assert "import cycle among 2 modules: flad_edge.plans, flad_edge.plans.edge" in cycles.stdout, cycles.stdout


def test_an_indirect_upward_import_breaks_the_layers(tmp_path: Path) -> None:
    """flad_sim importing flad_vehicle, which imports flad_sim: the layers contract and the script both name it."""
    root = _write_tree(tmp_path, {**CLEAN_TREE, "flad_core/base.py": "def f():\n    import flad_sim.world\n"})
    lint, cycles = _run(LINT_IMPORTS, root), _run(CHECK_CYCLES, root)
    assert lint.returncode != 0
    assert "flad_core is not allowed to import flad_sim" in lint.stdout, lint.stdout
    assert "- flad_core.base -> flad_sim.world" in lint.stdout
    assert "import cycle among 2 modules: flad_core.base, flad_sim.world" in cycles.stdout, cycles.stdout


def _declared(package: str) -> set[str]:
    """`package` and the FLAD packages its package.xml depends on (<exec_depend>), transitively."""
    out, todo = set(), [package]
    while todo:
        pkg = todo.pop()
        if pkg not in out:
            out.add(pkg)
            xml = (REPO / "src" / pkg / "package.xml").read_text()
            todo += [d for d in re.findall(r"<exec_depend>(flad_\w+)</exec_depend>", xml) if d in PACKAGES]
    return out


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(*PACKAGES, cache_dir=None)


@pytest.mark.parametrize("package", ROS_PACKAGES)
def test_each_ros_package_xml_declares_the_flad_packages_it_imports(package: str, graph: grimp.ImportGraph) -> None:
    """colcon installs a ROS package with what its package.xml names: each FLAD package it imports, directly
    or through another, must be named there."""
    modules = {package} | graph.find_descendants(package)
    imported = {m.split(".")[0] for mod in modules for m in graph.find_modules_directly_imported_by(mod)}
    assert imported <= _declared(package), f"{package} imports {sorted(imported - _declared(package))}"
