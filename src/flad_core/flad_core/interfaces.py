"""Message definitions at run time, without ROS.

The `.msg` files under `src/flad_msgs/msg` (and the vendored `carla_msgs`) are the single source of
truth. ROS builds them with rosidl; here the same text is parsed by rosbags into a type store, so the
CDR bytes on a ZeroMQ socket are exactly what rclpy would put on a DDS topic.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from rosbags.typesys import Stores, get_types_from_msg, get_typestore
from rosbags.typesys.store import Typestore

#: interface packages FLAD defines or vendors, in dependency order
PACKAGES = ("carla_msgs", "flad_msgs")


class InterfaceError(RuntimeError):
    """The message definitions could not be found or parsed."""


def _candidate_dirs(package: str) -> list[Path]:
    here = Path(__file__).resolve().parent
    candidates: list[Path] = []
    env = os.environ.get("FLAD_MSGS_PATH")
    if env:
        candidates += [Path(p) / package / "msg" for p in env.split(os.pathsep) if p]
    # source checkout / editable install: src/flad_core/flad_core -> src/
    src = here.parents[1]
    candidates += [src / package / "msg", src / "third_party" / package / "msg"]
    # wheel install: copied next to this module at build time (see the root setup.py)
    candidates.append(here / "_interfaces" / package / "msg")
    # colcon install: share/<package>/msg on the ament prefix path
    for prefix in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        if prefix:
            candidates.append(Path(prefix) / "share" / package / "msg")
    return candidates


def msg_dir(package: str) -> Path:
    """Directory holding `package`'s `.msg` files; raises InterfaceError naming where it looked."""
    tried = _candidate_dirs(package)
    for cand in tried:
        if cand.is_dir() and any(cand.glob("*.msg")):
            return cand
    raise InterfaceError(
        f"no .msg files for {package!r}; looked in: " + ", ".join(str(p) for p in tried)
        + " (set FLAD_MSGS_PATH to a folder containing <package>/msg)"
    )


def load_msg_texts(package: str) -> dict[str, str]:
    """`{'pkg/msg/Name': text}` for every `.msg` file of `package`."""
    return {
        f"{package}/msg/{path.stem}": path.read_text(encoding="utf-8")
        for path in sorted(msg_dir(package).glob("*.msg"))
    }


@functools.lru_cache(maxsize=1)
def typestore() -> Typestore:
    """ROS 2 Jazzy standard types plus FLAD's and the vendored carla_msgs types."""
    store = get_typestore(Stores.ROS2_JAZZY)
    for package in PACKAGES:
        types: dict = {}
        for name, text in load_msg_texts(package).items():
            try:
                types.update(get_types_from_msg(text, name))
            except Exception as exc:  # rosbags raises its own parse errors
                raise InterfaceError(f"cannot parse {name}: {exc}") from exc
        store.register(types)
    return store


def flad_type_names() -> list[str]:
    """Fully-qualified names of every type defined in src/flad_msgs and the vendored carla_msgs."""
    return [name for package in PACKAGES for name in load_msg_texts(package)]
