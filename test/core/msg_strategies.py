"""Hypothesis strategies for any ROS message type, generated from its definition in the type store."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from rosbags.typesys.base import Nodetype

from flad_core.interfaces import typestore

_INT_RANGES = {
    "int8": (-(2**7), 2**7 - 1), "uint8": (0, 2**8 - 1), "byte": (0, 255), "char": (0, 255),
    "int16": (-(2**15), 2**15 - 1), "uint16": (0, 2**16 - 1), "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1), "int64": (-(2**63), 2**63 - 1), "uint64": (0, 2**64 - 1),
}
_NP = {"int8": np.int8, "uint8": np.uint8, "byte": np.uint8, "char": np.uint8, "int16": np.int16,
       "uint16": np.uint16, "int32": np.int32, "uint32": np.uint32, "int64": np.int64, "uint64": np.uint64,
       "float32": np.float32, "float64": np.float64, "bool": np.bool_}


def _base(name: str) -> st.SearchStrategy:
    if name in _INT_RANGES:
        lo, hi = _INT_RANGES[name]
        return st.integers(lo, hi)
    if name == "bool":
        return st.booleans()
    if name == "float32":
        return st.floats(width=32, allow_nan=False)
    if name == "float64":
        return st.floats(allow_nan=False)
    if name == "string":
        return st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=20)
    raise ValueError(name)


def _node(node: tuple, max_len: int) -> st.SearchStrategy:
    kind, spec = node
    if kind == Nodetype.BASE:
        return _base(spec[0])
    if kind == Nodetype.NAME:
        return message(spec, max_len)
    inner, length = spec
    if inner[0] == Nodetype.BASE and inner[1][0] in _NP:
        dtype = _NP[inner[1][0]]
        size = st.just(length) if kind == Nodetype.ARRAY else st.integers(0, max_len)
        return size.flatmap(lambda n: st.lists(_base(inner[1][0]), min_size=n, max_size=n)).map(
            lambda xs: np.array(xs, dtype=dtype))
    size_min, size_max = (length, length) if kind == Nodetype.ARRAY else (0, min(max_len, 3))
    return st.lists(_node(inner, max_len), min_size=size_min, max_size=size_max)


def message(typename: str, max_len: int = 16) -> st.SearchStrategy:
    """Random valid instances of `typename` (sequences up to `max_len` items)."""
    store = typestore()
    cls = store.types[typename]
    _, fields = store.fielddefs[typename]
    return st.fixed_dictionaries({name: _node(node, max_len) for name, node in fields}).map(lambda kw: cls(**kw))


def assert_equal(a, b, path: str = "msg") -> None:
    """Deep equality for rosbags messages (numpy arrays compared by value, floats bit-exact)."""
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), path
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_equal(x, y, f"{path}[{i}]")
    elif hasattr(a, "__dataclass_fields__"):
        for name in a.__dataclass_fields__:
            assert_equal(getattr(a, name), getattr(b, name), f"{path}.{name}")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"
