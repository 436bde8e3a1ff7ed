"""Point the ROS wheels' exported CMake targets at this machine's Python and numpy headers.

Why this exists: the ROS 2 Jazzy wheels on PyPI were built in a manylinux container whose Python
lived in /opt/python/cp311-cp311. Each message package exports a CMake target
`<pkg>__rosidl_generator_py` (share/<pkg>/cmake/export_<pkg>__rosidl_generator_pyExport.cmake)
whose INTERFACE_INCLUDE_DIRECTORIES still name that container's Python include directory and its
numpy include directory. When `colcon build` generates the Python bindings of *our* interface
packages (flad_msgs, carla_msgs depend on std_msgs/geometry_msgs), CMake links against those
targets and stops with "Imported target ... includes non-existent path". Replacing the two paths
with the ones of the interpreter running this script (the tier's venv) fixes that. Idempotent.

Usage: <venv>/bin/python ros/fix_cmake_exports.py <venv prefix>
"""

import logging
import re
import sys
import sysconfig
from pathlib import Path

import numpy

log = logging.getLogger("fix_cmake_exports")

# Any absolute Python include dir ("/.../include/python3.11") and numpy include dir in a CMake list.
PY_INCLUDE = re.compile(r'[^;"\s]*/include/python3\.\d+(?=[;"])')
NUMPY_INCLUDE = re.compile(r'[^;"\s]*/numpy/(?:_core|core)/include(?=[;"])')


def patch_file(path: Path, py_include: str, numpy_include: str) -> bool:
    """Rewrite one export file in place; return True when it changed."""
    text = path.read_text()
    new = PY_INCLUDE.sub(lambda _m: py_include, text)
    new = NUMPY_INCLUDE.sub(lambda _m: numpy_include, new)
    if new == text:
        return False
    path.write_text(new)
    return True


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if len(argv) != 1:
        log.error("usage: fix_cmake_exports.py <venv prefix>")
        return 2
    prefix = Path(argv[0])
    py_include = sysconfig.get_paths()["include"]
    numpy_include = numpy.get_include()
    for required in (Path(py_include) / "Python.h", Path(numpy_include) / "numpy" / "arrayobject.h"):
        if not required.is_file():
            log.error("missing header %s: this Python cannot build ROS message bindings", required)
            return 1
    files = sorted((prefix / "share").glob("*/cmake/export_*__rosidl_generator_pyExport*.cmake"))
    if not files:
        log.error("no *__rosidl_generator_pyExport*.cmake under %s/share: are the ROS wheels installed?", prefix)
        return 1
    changed = sum(patch_file(f, py_include, numpy_include) for f in files)
    log.info("%d of %d export files patched (python: %s, numpy: %s)", changed, len(files), py_include, numpy_include)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
