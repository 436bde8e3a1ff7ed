"""Print the project's pinned runtime dependencies from pyproject.toml, minus the names given.

Container images use it to install FLAD's dependencies without replacing a platform's own build of
a package (JetPack's torch on a Jetson).
"""

import sys
from pathlib import Path

import tomllib

skip = {name.lower() for name in sys.argv[1:]}
deps = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
for dep in deps:
    name = dep.split("==")[0].split(">=")[0].split("[")[0].strip().lower()
    if name not in skip:
        print(dep)
