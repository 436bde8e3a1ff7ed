"""Print the project's pinned runtime dependencies from pyproject.toml, minus the names given.

Container images use it to install FLAD's dependencies without replacing a platform's own build of
a package (JetPack's torch on a Jetson). `--extra NAME` (repeatable) adds an optional-dependency group,
e.g. `--extra ray` for an image that joins a Ray cluster (`flad run --engine ray`).
"""

import argparse
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:     # Python 3.10 (the ROS 2 Humble images): the same parser, as a package
    import tomli as tomllib

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("skip", nargs="*", help="dependency names to leave out")
parser.add_argument("--extra", action="append", default=[], help="optional-dependency group to add")
args = parser.parse_args()
skip = {name.lower() for name in args.skip}
project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
deps = list(project["dependencies"])
for extra in args.extra:
    if extra not in project["optional-dependencies"]:
        parser.error(f"no extra {extra!r} (extras: {', '.join(project['optional-dependencies'])})")
    deps += project["optional-dependencies"][extra]
for dep in deps:
    name = dep.split("==")[0].split(">=")[0].split("[")[0].strip().lower()
    if name not in skip:
        print(dep)
