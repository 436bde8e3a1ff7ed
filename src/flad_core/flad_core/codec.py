"""CDR encode/decode for every bus message, with errors that name the type and the fault.

Serialization itself is rosbags' (the same CDR rclpy produces); this module adds the checks that a
network-facing decoder needs: unknown types, truncated or trailing bytes, wrong field types, and
non-finite floats where the caller forbids them.
"""

from __future__ import annotations

import math
import time
from dataclasses import fields, is_dataclass
from typing import Any

import numpy as np
from rosbags.typesys.base import Nodetype

from flad_core.interfaces import typestore

#: messages larger than this are refused before decoding (bytes); sensors stay far below it
MAX_MESSAGE_BYTES = 256 * 1024 * 1024

_BASE_DEFAULTS: dict[str, Any] = {"string": "", "bool": False, "float32": 0.0, "float64": 0.0}
_NUMPY_DTYPES = {
    "bool": np.bool_, "byte": np.uint8, "char": np.uint8, "int8": np.int8, "uint8": np.uint8,
    "int16": np.int16, "uint16": np.uint16, "int32": np.int32, "uint32": np.uint32,
    "int64": np.int64, "uint64": np.uint64, "float32": np.float32, "float64": np.float64,
}


class CodecError(ValueError):
    """A message could not be encoded or decoded; the text names the type and what was wrong."""

    def __init__(self, typename: str, reason: str) -> None:
        super().__init__(f"{typename}: {reason}")
        self.typename = typename
        self.reason = reason


def normalize_type(typename: str) -> str:
    """Accept `pkg/Name` or `pkg/msg/Name`; return the canonical `pkg/msg/Name`."""
    parts = typename.split("/")
    if len(parts) == 2:
        return f"{parts[0]}/msg/{parts[1]}"
    return typename


def message_class(typename: str) -> type:
    """The rosbags dataclass for `typename`; CodecError if the type is unknown."""
    name = normalize_type(typename)
    store = typestore()
    if name not in store.types:
        raise CodecError(name, "unknown message type")
    return store.types[name]


def _default_for(node: tuple, store) -> Any:
    kind, spec = node
    if kind == Nodetype.BASE:
        base = spec[0]
        if base in _BASE_DEFAULTS:
            return _BASE_DEFAULTS[base]
        return 0
    if kind == Nodetype.NAME:
        return new(spec)
    if kind in (Nodetype.ARRAY, Nodetype.SEQUENCE):
        inner, length = spec
        count = length if kind == Nodetype.ARRAY else 0
        if inner[0] == Nodetype.BASE and inner[1][0] in _NUMPY_DTYPES and inner[1][0] != "string":
            return np.zeros(count, dtype=_NUMPY_DTYPES[inner[1][0]])
        return [_default_for(inner, store) for _ in range(count)]
    raise CodecError(str(spec), f"unsupported field node {kind}")


#: Default values declared in .msg files (`float64 w 1`), which rosbags' parser drops. Listed by hand because no
#: library exposes them; among the types FLAD uses only Quaternion has one (test_ros checks against rclpy).
_MSG_DEFAULTS: dict[str, dict[str, Any]] = {"geometry_msgs/msg/Quaternion": {"w": 1.0}}


def new(typename: str, **values: Any) -> Any:
    """Build a message with every field defaulted (the .msg default, else zeros, empty strings and sequences)
    except `values`."""
    name = normalize_type(typename)
    cls = message_class(name)
    store = typestore()
    _, field_defs = store.fielddefs[name]
    known = {fname for fname, _ in field_defs}
    unknown = set(values) - known
    if unknown:
        raise CodecError(name, f"unknown field(s) {sorted(unknown)}; fields are {sorted(known)}")
    declared = _MSG_DEFAULTS.get(name, {})
    kwargs = {fname: values[fname] if fname in values else declared.get(fname, _default_for(node, store))
              for fname, node in field_defs}
    return cls(**kwargs)


def encode(msg: Any, typename: str | None = None) -> bytes:
    """CDR (little-endian) bytes of `msg`; `typename` defaults to the message's own type."""
    return bytes(encode_view(msg, typename))


def encode_view(msg: Any, typename: str | None = None) -> memoryview:
    """Like `encode`, without the final copy (for senders that hand the buffer straight to a socket)."""
    name = normalize_type(typename or getattr(msg, "__msgtype__", "") or "<unknown>")
    cls = message_class(name)
    if not isinstance(msg, cls):
        raise CodecError(name, f"expected a {name} message, got {type(msg).__name__}")
    try:
        return memoryview(typestore().serialize_cdr(msg, name))
    except Exception as exc:
        raise CodecError(name, f"cannot encode: {type(exc).__name__}: {exc}") from exc


def decode(data: bytes | bytearray | memoryview, typename: str, *, finite: bool = False) -> Any:
    """Decode CDR bytes into a `typename` message.

    Raises CodecError on unknown type, oversized, truncated or trailing bytes, a bad encapsulation
    header, or (with `finite=True`) any NaN/inf float field.
    """
    name = normalize_type(typename)
    message_class(name)
    raw = data if isinstance(data, bytes) else bytes(data)
    if len(raw) > MAX_MESSAGE_BYTES:
        raise CodecError(name, f"{len(raw)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    if len(raw) < 4:
        raise CodecError(name, f"truncated: {len(raw)} bytes, need at least the 4-byte CDR header")
    if raw[0] != 0 or raw[1] not in (0, 1):
        raise CodecError(name, f"bad CDR encapsulation header {raw[:4].hex()}")
    try:
        # rosbags checks the encapsulation and that the buffer length matches the message exactly
        msg = typestore().deserialize_cdr(raw, name)
    except Exception as exc:
        raise CodecError(name, f"malformed or truncated CDR ({type(exc).__name__}: {exc})") from exc
    if finite:
        bad = _first_nonfinite(msg)
        if bad is not None:
            raise CodecError(name, f"non-finite value in field {bad}")
    return msg


def _first_nonfinite(value: Any, path: str = "") -> str | None:
    if isinstance(value, float):
        return None if math.isfinite(value) else path or "<value>"
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            return path
        return None
    if isinstance(value, list):
        for i, item in enumerate(value):
            bad = _first_nonfinite(item, f"{path}[{i}]")
            if bad:
                return bad
        return None
    if is_dataclass(value):
        for f in fields(value):
            bad = _first_nonfinite(getattr(value, f.name), f"{path}.{f.name}" if path else f.name)
            if bad:
                return bad
    return None


def header(t: float | None = None, frame_id: str = "") -> Any:
    """A std_msgs/Header stamped with `t` (default: wall-clock now)."""
    t = time.time() if t is None else t
    sec = int(t)
    return new("std_msgs/msg/Header", frame_id=frame_id,
               stamp=new("builtin_interfaces/msg/Time", sec=sec, nanosec=int((t - sec) * 1e9)))
