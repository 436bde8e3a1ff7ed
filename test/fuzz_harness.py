"""Fuzzing every network entry point over real loopback sockets (test/*/test_fuzz_*.py share this).

A `Campaign` feeds one listener (a `Harness`: how to start it, send it raw frames, probe it with a valid
request and read its rejection counter) batches of inputs: random frames, mutations of valid frames
(`Mutator`), hypothesis-generated messages and raw TCP garbage. After every batch it checks that the
listener still answers a valid request correctly (the probe goes over the same connection as the fuzz
inputs, so it is answered only after all of them were handled) and that its thread is alive. A failure is
recorded (crash: the listener died or raised; hang: it stopped answering), the listener restarted, and the
batch replayed one input at a time to name the culprit.

Counts scale with FLAD_FUZZ_EXAMPLES (a multiplier, default 1 = the CI budget; 10 for a long run).
FLAD_FUZZ_REPORT=path appends one JSON record per campaign (entry point, inputs tried, crashes, hangs,
rejected count, findings) to the JSON list in that file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import socket
import struct
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zmq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from rosbags.typesys.base import Nodetype

from flad_core import codec, tensorframe
from flad_core import weights as wts
from flad_core.interfaces import typestore

SCALE = float(os.environ.get("FLAD_FUZZ_EXAMPLES", "1") or 1)
REPORT = os.environ.get("FLAD_FUZZ_REPORT", "")
#: loggers muted (to CRITICAL) while a campaign runs: every rejection logs a warning, thousands of them
NOISY_LOGGERS = ("flad_core.bus", "flad_vehicle.fhdp.links", "flad_edge.celladapt.service", "flad_edge.fl.cloud",
                 "flad_edge.fl.edge_server", "flad_vehicle.fhdp.worker", "flad_edge.fhdp.recovery.backups")


def scaled(n: int) -> int:
    """`n` inputs at the default budget, times FLAD_FUZZ_EXAMPLES."""
    return max(1, round(n * SCALE))


# -- CDR layout: where a valid message keeps its length prefixes and floats --------------------------------------
_SIZES = {"bool": 1, "int8": 1, "uint8": 1, "byte": 1, "char": 1, "int16": 2, "uint16": 2, "int32": 4, "uint32": 4,
          "float32": 4, "int64": 8, "uint64": 8, "float64": 8}
_NP = {"int8": np.int8, "uint8": np.uint8, "byte": np.uint8, "char": np.uint8, "int16": np.int16,
       "uint16": np.uint16, "int32": np.int32, "uint32": np.uint32, "int64": np.int64, "uint64": np.uint64,
       "float32": np.float32, "float64": np.float64, "bool": np.bool_}
_INT_RANGES = {"int8": 7, "byte": 7, "int16": 15, "int32": 31, "int64": 63}


@dataclass
class CdrLayout:
    lengths: list[int] = field(default_factory=list)                 # offsets of u32 string/sequence lengths
    floats: list[tuple[int, int]] = field(default_factory=list)      # (offset, 4 | 8) of float fields


class _Walker:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos, self.out = data, 4, CdrLayout()

    def align(self, n: int) -> None:
        self.pos += (-(self.pos - 4)) % n

    def u32(self) -> int:
        self.align(4)
        (n,) = struct.unpack_from("<I", self.data, self.pos)
        self.out.lengths.append(self.pos)
        self.pos += 4
        return n

    def base(self, t: str) -> None:
        if t == "string":
            n = self.u32()
            self.pos += n
            return
        size = _SIZES[t]
        self.align(size)
        if t.startswith("float"):
            self.out.floats.append((self.pos, size))
        self.pos += size

    def node(self, node: tuple) -> None:
        kind, spec = node
        if kind == Nodetype.BASE:
            self.base(spec[0])
        elif kind == Nodetype.NAME:
            self.message(spec)
        else:
            inner, length = spec
            n = length if kind == Nodetype.ARRAY else self.u32()
            if n > len(self.data) - self.pos:      # every element takes a byte at least: not a valid message
                raise struct.error(f"sequence of {n} at {self.pos}")
            if inner[0] == Nodetype.BASE and inner[1][0] in _SIZES and not inner[1][0].startswith("float"):
                if n:
                    self.align(_SIZES[inner[1][0]])
                    self.pos += n * _SIZES[inner[1][0]]
                return
            for _ in range(n):
                self.node(inner)

    def message(self, typename: str) -> None:
        for _, node in typestore().fielddefs[typename][1]:
            self.node(node)


def cdr_layout(data: bytes, typename: str) -> CdrLayout:
    """Offsets of the length prefixes and floats of a valid little-endian CDR message (empty if it cannot tell)."""
    walker = _Walker(data)
    try:
        walker.message(codec.normalize_type(typename))
    except (struct.error, KeyError):
        return CdrLayout()
    return walker.out if walker.pos == len(data) else CdrLayout()


# -- random valid messages of any type (valid CDR of the wrong type) ---------------------------------------------
def _rand_base(t: str, rng: random.Random) -> Any:
    if t == "string":
        return "".join(rng.choice("abcXYZ/_.-é漢0") for _ in range(rng.randint(0, 12)))
    if t == "bool":
        return rng.random() < 0.5
    if t.startswith("float"):
        return rng.choice([0.0, 1.0, -2.5, 1e-40, 3.0e38 if t == "float32" else 1e308, rng.uniform(-1e3, 1e3)])
    bits = _INT_RANGES.get(t)
    if bits is not None:
        return rng.choice([0, -(2**bits), 2**bits - 1, rng.randint(-(2**bits), 2**bits - 1)])
    top = 2 ** (8 * _SIZES[t]) - 1
    return rng.choice([0, top, rng.randint(0, top)])


def _rand_node(node: tuple, rng: random.Random, depth: int) -> Any:
    kind, spec = node
    if kind == Nodetype.BASE:
        return _rand_base(spec[0], rng)
    if kind == Nodetype.NAME:
        return random_message(spec, rng, depth + 1)
    inner, length = spec
    n = length if kind == Nodetype.ARRAY else (rng.randint(0, 3) if depth < 4 else 0)
    if inner[0] == Nodetype.BASE and inner[1][0] in _NP:
        return np.array([_rand_base(inner[1][0], rng) for _ in range(n)], dtype=_NP[inner[1][0]])
    return [_rand_node(inner, rng, depth) for _ in range(n)]


def random_message(typename: str, rng: random.Random, depth: int = 0) -> Any:
    """A valid `typename` message with random field values."""
    store = typestore()
    cls = store.types[typename]
    return cls(**{name: _rand_node(node, rng, depth) for name, node in store.fielddefs[typename][1]})


def wrong_type_bodies(rng: random.Random, exclude: Iterable[str] = (), n: int = 40) -> list[tuple[str, bytes]]:
    """(typename, valid CDR) of `n` random message types other than `exclude`."""
    names = sorted(set(typestore().types) - {codec.normalize_type(t) for t in exclude})
    out = []
    for name in rng.sample(names, min(n, len(names))):
        try:
            out.append((name, codec.encode(random_message(name, rng), name)))
        except (codec.CodecError, ValueError, TypeError, OverflowError):
            continue
    return out


# -- mutations of valid frames --------------------------------------------------------------------------------------
@dataclass
class Seed:
    """A valid multipart message: which frame holds the type name and which the CDR body (-1: none)."""

    frames: list[bytes]
    typename_idx: int = -1
    body_idx: int = -1
    body_type: str = ""
    layout: CdrLayout = field(default_factory=CdrLayout)

    def __post_init__(self) -> None:
        self.frames = [bytes(f) for f in self.frames]
        if self.body_type and 0 <= self.body_idx < len(self.frames) and not self.layout.lengths:
            self.layout = cdr_layout(self.frames[self.body_idx], self.body_type)


HUGE_U32 = (0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, 0x10000000, 0x00FFFFFF, 0)
NONFINITE32 = (struct.pack("<f", float("nan")), struct.pack("<f", float("inf")), struct.pack("<f", float("-inf")))
NONFINITE64 = (struct.pack("<d", float("nan")), struct.pack("<d", float("inf")), struct.pack("<d", float("-inf")))


def _bitflip(rng: random.Random, b: bytes) -> bytes:
    if not b:
        return bytes([rng.randrange(256)])
    out = bytearray(b)
    for _ in range(rng.choice([1, 1, 2, 4, 8])):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def _truncate(rng: random.Random, b: bytes) -> bytes:
    return b[:rng.randrange(len(b))] if b else b


def _extend(rng: random.Random, b: bytes) -> bytes:
    tail = rng.choice([b"\0" * rng.randint(1, 16), rng.randbytes(rng.randint(1, 64)), b[: rng.randint(1, 64)]])
    return b + tail


def _interesting(rng: random.Random, b: bytes) -> bytes:
    if not b:
        return b"\xff"
    out = bytearray(b)
    for _ in range(rng.randint(1, 4)):
        out[rng.randrange(len(out))] = rng.choice([0x00, 0xFF, 0x7F, 0x80, 0x01])
    return bytes(out)


def _splice(rng: random.Random, b: bytes) -> bytes:
    if len(b) < 2:
        return b + b
    i, j = sorted(rng.sample(range(len(b) + 1), 2))
    return b[:i] + b[i:j] * rng.randint(2, 4) + b[j:] if rng.random() < 0.5 else b[:i] + b[j:]


BYTE_OPS: dict[str, Callable[[random.Random, bytes], bytes]] = {
    "bitflip": _bitflip, "truncate": _truncate, "extend": _extend, "interesting": _interesting, "splice": _splice}


class Mutator:
    """Random frames and mutations of `seeds` (bit flips, truncation, extension, swapped / duplicated / dropped
    frames, wrong type names, huge declared lengths, valid CDR of the wrong type, NaN/inf floats, oversize)."""

    def __init__(self, rng: random.Random, seeds: list[Seed], *, max_frame_bytes: int, codec_limit: int = 0,
                 prefix: Callable[[random.Random], list[bytes]] | None = None) -> None:
        self.rng, self.seeds = rng, seeds
        self.max_frame_bytes, self.codec_limit = max_frame_bytes, codec_limit
        self.prefix = prefix
        self.wrong = wrong_type_bodies(rng, {s.body_type for s in seeds if s.body_type})
        valid = sorted({s.body_type for s in seeds if s.body_type})
        self.typenames = [t.encode() for t, _ in self.wrong[:10]] + [
            b"", b"\xff\xfe\x00", b"flad_msgs", b"x" * 4096, b"../../etc/passwd",
            *[v.replace("/msg/", "/").encode() for v in valid], *[v.upper().encode() for v in valid],
            *[v.encode() + b"\0" for v in valid], *[v.encode() + b"/extra" for v in valid]]
        self.ops: list[tuple[str, Callable[[Seed], list[bytes]], int]] = [
            ("bytes", self._bytes_op, 30), ("huge_length", self._huge_length, 12), ("nonfinite", self._nonfinite, 10),
            ("wrong_body", self._wrong_body, 8), ("wrong_typename", self._wrong_typename, 8),
            ("cdr_header", self._cdr_header, 4), ("random_body", self._random_body, 5),
            ("drop_frame", self._drop, 4), ("dup_frame", self._dup, 4), ("swap_frames", self._swap, 4),
            ("insert_frame", self._insert, 4), ("empty_frame", self._empty, 3), ("cross_seed", self._cross, 3),
            ("oversize", self._oversize, 1)]
        self._weights = [w for _, _, w in self.ops]

    # -- random frames --------------------------------------------------------------------------------------
    def random_frames(self) -> tuple[str, list[bytes]]:
        rng = self.rng
        n = rng.choice([1, 1, 2, 3, 3, 4, 5, 5, 6, 7, 8, rng.randint(9, 40)])
        frames = [rng.randbytes(rng.choice([0, 1, 4, 8, rng.randint(0, 64), rng.randint(0, 4096)])) for _ in range(n)]
        if self.prefix is not None and rng.random() < 0.8:
            frames = self.prefix(rng) + frames[1:]
        return "random", frames

    # -- mutations ---------------------------------------------------------------------------------------------
    def mutate(self) -> tuple[str, list[bytes]]:
        seed = self.rng.choice(self.seeds)
        names, frames = [], list(seed.frames)
        for _ in range(self.rng.choice([1, 1, 1, 2, 3])):
            name, op, _ = self.rng.choices(self.ops, self._weights)[0]
            frames = op(Seed(frames, seed.typename_idx, seed.body_idx, seed.body_type, seed.layout))
            names.append(name)
            if name == "oversize":
                break
        return "+".join(names), frames

    def _pick(self, s: Seed) -> int:
        if 0 <= s.body_idx < len(s.frames) and self.rng.random() < 0.6:
            return s.body_idx
        return self.rng.randrange(len(s.frames))

    def _bytes_op(self, s: Seed) -> list[bytes]:
        frames, i = list(s.frames), self._pick(s)
        frames[i] = self.rng.choice(list(BYTE_OPS.values()))(self.rng, frames[i])
        return frames

    def _body(self, s: Seed, body: bytes) -> list[bytes]:
        frames = list(s.frames)
        if s.body_idx < 0 or s.body_idx >= len(frames):
            return frames
        frames[s.body_idx] = body
        return frames

    def _huge_length(self, s: Seed) -> list[bytes]:
        if s.body_idx < 0 or s.body_idx >= len(s.frames):
            return self._bytes_op(s)
        body = bytearray(s.frames[s.body_idx])
        offsets = [o for o in s.layout.lengths if o + 4 <= len(body)] or list(range(4, max(5, len(body) - 3), 4))
        off = self.rng.choice(offsets)
        if off + 4 > len(body):
            return self._bytes_op(s)
        value = self.rng.choice([*HUGE_U32, len(body), len(body) + 1, len(body) - off])
        struct.pack_into("<I", body, off, value & 0xFFFFFFFF)
        return self._body(s, bytes(body))

    def _nonfinite(self, s: Seed) -> list[bytes]:
        if s.body_idx < 0 or not s.layout.floats or s.body_idx >= len(s.frames):
            return self._huge_length(s)
        body = bytearray(s.frames[s.body_idx])
        for off, size in self.rng.sample(s.layout.floats, min(len(s.layout.floats), self.rng.choice([1, 1, 2]))):
            if off + size <= len(body):
                body[off:off + size] = self.rng.choice(NONFINITE32 if size == 4 else NONFINITE64)
        return self._body(s, bytes(body))

    def _wrong_body(self, s: Seed) -> list[bytes]:
        return self._body(s, self.rng.choice(self.wrong)[1]) if self.wrong else self._bytes_op(s)

    def _wrong_typename(self, s: Seed) -> list[bytes]:
        frames = list(s.frames)
        if 0 <= s.typename_idx < len(frames):
            if self.wrong and self.rng.random() < 0.4:   # a consistent pair of another type: valid, but not asked for
                name, body = self.rng.choice(self.wrong)
                frames[s.typename_idx] = name.encode()
                return self._body(Seed(frames, s.typename_idx, s.body_idx), body)
            frames[s.typename_idx] = self.rng.choice(self.typenames)
        return frames

    def _cdr_header(self, s: Seed) -> list[bytes]:
        if s.body_idx < 0 or s.body_idx >= len(s.frames):
            return self._bytes_op(s)
        body = s.frames[s.body_idx]
        head = self.rng.choice([b"\x00\x00\x00\x00", b"\x00\x01\xff\xff", b"\x01\x00\x00\x00", b"\x00\x02\x00\x00",
                                b"\xff\xff\xff\xff", b"\x00\x01"])
        return self._body(s, head + body[4:] if self.rng.random() < 0.8 else head)

    def _random_body(self, s: Seed) -> list[bytes]:
        body = b"\x00\x01\x00\x00" + self.rng.randbytes(self.rng.randint(0, 256))
        return self._body(s, body if self.rng.random() < 0.7 else body[4:])

    def _drop(self, s: Seed) -> list[bytes]:
        frames = list(s.frames)
        if len(frames) > 1:
            del frames[self.rng.randrange(len(frames))]
        return frames

    def _dup(self, s: Seed) -> list[bytes]:
        frames = list(s.frames)
        i = self.rng.randrange(len(frames))
        frames.insert(i, frames[i])
        return frames

    def _swap(self, s: Seed) -> list[bytes]:
        frames = list(s.frames)
        if len(frames) > 1:
            i, j = self.rng.sample(range(len(frames)), 2)
            frames[i], frames[j] = frames[j], frames[i]
        return frames

    def _insert(self, s: Seed) -> list[bytes]:
        frames = list(s.frames)
        frames.insert(self.rng.randint(0, len(frames)), self.rng.randbytes(self.rng.randint(0, 32)))
        return frames

    def _empty(self, s: Seed) -> list[bytes]:
        frames = list(s.frames)
        frames[self.rng.randrange(len(frames))] = b""
        return frames

    def _cross(self, s: Seed) -> list[bytes]:
        other = self.rng.choice(self.seeds)
        if other.body_idx < 0 or s.body_idx < 0:
            return self._bytes_op(s)
        return self._body(s, other.frames[other.body_idx])

    def _oversize(self, s: Seed) -> list[bytes]:
        """A body just past the codec's limit (rejected after the socket took it) or past the socket's
        MAXMSGSIZE (libzmq drops the connection)."""
        limits = [x for x in (self.codec_limit, self.max_frame_bytes) if x]
        size = self.rng.choice(limits) + self.rng.randint(1, 4096)
        i = s.body_idx if 0 <= s.body_idx < len(s.frames) else self._pick(s)
        frames = list(s.frames)
        frames[i] = (frames[i] + b"\0" * size)[:size]
        return frames


# -- weight payloads (safetensors inside WeightChunks, with a valid SHA-256) ----------------------------------------
ST_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "U16", "U32", "U64", "C64",
             "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "E8M0", "I4", "X", ""]


def mutate_safetensors(rng: random.Random, payload: bytes, names: list[str]) -> tuple[str, bytes]:
    """A damaged safetensors payload: dtype, shape, offsets, metadata, tensor names, NaN data, header length,
    or raw bytes."""
    (n,) = struct.unpack_from("<Q", payload)
    header, data = json.loads(payload[8:8 + n]), payload[8 + n:]
    keys = [k for k in header if k != "__metadata__"]
    op = rng.choice(["dtype", "retype", "retype", "shape", "offsets", "metadata", "name", "nan", "header_len", "bytes",
                     "bytes"])
    if op == "retype":
        return op, _retyped(rng, rng.choice(keys) if keys else "t")
    if op == "header_len":
        return op, struct.pack("<Q", rng.choice([0, n + 1, max(0, n - 1), 2**63, 2**64 - 1])) + payload[8:]
    if op == "bytes" or not keys:
        return "bytes", rng.choice(list(BYTE_OPS.values()))(rng, payload)
    k = rng.choice(keys)
    if op == "dtype":
        header[k]["dtype"] = rng.choice(ST_DTYPES)
    elif op == "shape":
        header[k]["shape"] = rng.choice([[], [0], [2**31], [2**63], [-1], [1] * 9, [3, 2**40], "x", [1.5], None])
    elif op == "offsets":
        header[k]["data_offsets"] = rng.choice([[0, 2**63], [8, 0], [0, len(data) + 8], [-1, 4], [0], "x"])
    elif op == "metadata":
        header["__metadata__"] = rng.choice([{"a": 1}, {"a": None}, [], "x", {"round": "1" * 10000}])
    elif op == "name":
        header[rng.choice(names)] = header.pop(k)
    else:
        data = b"\xff" * len(data)          # NaN in every float dtype
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    return op, struct.pack("<Q", len(body)) + body + data


ST_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8, "BOOL": 8,
           "U16": 16, "U32": 32, "U64": 64, "C64": 64, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "E8M0": 8, "F4": 4,
           "F6_E2M3": 6, "F6_E3M2": 6, "I4": 4}


def _retyped(rng: random.Random, name: str) -> bytes:
    """A self-consistent payload (sizes match) of one tensor in any dtype safetensors knows, filled with ones,
    NaN-ish 0xFF or random bytes: it passes safetensors' checks and reaches the dtype mapping and finiteness."""
    dtype = rng.choice(sorted(ST_BITS))
    n = rng.choice([8, 16])
    nbytes = n * ST_BITS[dtype] // 8
    data = rng.choice([b"\x01" * nbytes, b"\xff" * nbytes, rng.randbytes(nbytes)])
    body = json.dumps({name: {"dtype": dtype, "shape": [n], "data_offsets": [0, nbytes]}}).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body + data


class WeightsFuzzer:
    """Inputs for a WeightChunk service: damaged safetensors payloads chunked like a real transfer (consistent
    chunk fields and SHA-256), so the damage reaches `weights.from_bytes` and the handler behind it."""

    def __init__(self, rng: random.Random, service: str, payload: bytes, names: list[str], **fields: Any) -> None:
        self.rng, self.service, self.payload, self.names, self.fields = rng, service, payload, names, fields
        self._queue: list[tuple[str, list[bytes]]] = []

    def __call__(self) -> tuple[str, list[bytes]]:
        if not self._queue:
            op, payload = mutate_safetensors(self.rng, self.payload, self.names)
            chunks = wts.chunk_messages(payload, update_id=f"fuzz-{self.rng.getrandbits(40):x}",
                                        chunk_bytes=self.rng.choice([wts.DEFAULT_CHUNK_BYTES, 64]), **self.fields)
            typename = "flad_msgs/msg/WeightChunk"
            self._queue = [(f"weights_{op}", [b"", b"w", self.service.encode(), typename.encode(),
                                              codec.encode(c, typename)]) for c in chunks[:8]]
        return self._queue.pop(0)


# -- tensor frames (the stage inbox) --------------------------------------------------------------------------------
@dataclass
class Entry:
    name: bytes
    code: int
    shape: tuple[int, ...]
    nbytes: int
    crc: int


def build_header(entries: list[Entry], *, kind: int = 0, step: int = 0, micro_batch: int = 0, stage: int = 0,
                 flags: int = tensorframe.FLAG_CHECKSUM, n: int | None = None, version: int = tensorframe.VERSION,
                 magic: bytes = tensorframe.MAGIC) -> bytes:
    """A tensor-frame header with any field values (consistent or not)."""
    parts = [struct.pack("<4sBBHQIII", magic, version & 0xFF, kind & 0xFF, (len(entries) if n is None else n) & 0xFFFF,
                         step & (2**64 - 1), micro_batch & 0xFFFFFFFF, stage & 0xFFFFFFFF, flags & 0xFFFFFFFF)]
    for e in entries:
        parts += [struct.pack("<H", len(e.name) & 0xFFFF), e.name,
                  struct.pack("<BB", e.code & 0xFF, len(e.shape) & 0xFF),
                  struct.pack(f"<{len(e.shape)}I", *(d & 0xFFFFFFFF for d in e.shape)),
                  struct.pack("<QQ", e.nbytes & (2**64 - 1), e.crc & (2**64 - 1))]
    return b"".join(parts)


def parse_entries(header: bytes) -> tuple[tensorframe.FrameHeader, list[Entry]]:
    fh, entries = tensorframe.parse_header(header)
    return fh, [Entry(e.name.encode(), tensorframe._DTYPE_CODE[e.dtype], e.shape, e.nbytes, e.checksum)
                for e in entries]


class FrameMutator(Mutator):
    """Mutations of valid tensor frames: the generic ones plus header fields (shape, nbytes, dtype, counts, flags),
    overflowing shapes, and corrupted buffers with the checksum recomputed or switched off (so the damage reaches
    the finiteness and codec checks)."""

    GENERIC = ("bytes", "huge_length", "drop_frame", "dup_frame", "swap_frames", "insert_frame", "empty_frame",
               "cross_seed", "oversize")

    def __init__(self, rng: random.Random, seeds: list[Seed], *, max_frame_bytes: int, max_tensor_bytes: int) -> None:
        super().__init__(rng, seeds, max_frame_bytes=max_frame_bytes)
        self.max_tensor_bytes = max_tensor_bytes
        self.ops = [op for op in self.ops if op[0] in self.GENERIC] + [
            ("header_field", self._header_field, 12), ("overflow_shape", self._overflow_shape, 8),
            ("rechecksum", self._rechecksum, 12), ("nonfinite_tensor", self._nonfinite_tensor, 8),
            ("big_tensor", self._big_tensor, 1)]
        self._weights = [w for _, _, w in self.ops]

    def _big_tensor(self, s: Seed) -> list[bytes]:
        """A consistent frame whose tensor is just past the receiver's frame limit."""
        buf = bytes(self.max_tensor_bytes + self.rng.randint(1, 4096))
        entry = Entry(b"big", tensorframe._DTYPE_CODE[torch.uint8], (len(buf),), len(buf),
                      tensorframe.checksum_of(memoryview(buf)))
        return [build_header([entry]), buf]

    def _parsed(self, s: Seed) -> tuple[tensorframe.FrameHeader, list[Entry]] | None:
        try:
            return parse_entries(s.frames[0])
        except (tensorframe.FrameError, IndexError, KeyError):
            return None

    def _header_field(self, s: Seed) -> list[bytes]:
        parsed = self._parsed(s)
        if parsed is None:
            return self._bytes_op(s)
        fh, entries = parsed
        kw: dict[str, Any] = {"kind": fh.kind, "step": fh.step, "micro_batch": fh.micro_batch, "stage": fh.stage,
                              "flags": int(fh.checksum)}
        rng = self.rng
        field_ = rng.choice(["kind", "step", "n", "version", "magic", "flags", "dtype", "ndim", "nbytes", "name"])
        if field_ in ("kind", "step", "flags"):
            kw[field_] = rng.choice([0, 1, 3, 4, 255, 2**31, 2**64 - 1])
        elif field_ == "n":
            kw["n"] = rng.choice([0, len(entries) + 1, max(0, len(entries) - 1), 257, 0xFFFF])
        elif field_ == "version":
            kw["version"] = rng.choice([0, 1, 3, 255])
        elif field_ == "magic":
            kw["magic"] = rng.choice([b"FLTX", b"\0\0\0\0", b"fltf"])
        elif entries:
            e = rng.choice(entries)
            if field_ == "dtype":
                e.code = rng.choice([len(tensorframe._DTYPES), 255, rng.randrange(len(tensorframe._DTYPES))])
            elif field_ == "ndim":
                e.shape = e.shape + (1,) * rng.choice([1, 8]) if rng.random() < 0.5 else e.shape[:-1]
            elif field_ == "nbytes":
                e.nbytes = rng.choice([0, e.nbytes + 1, max(0, e.nbytes - 1), 2**63, 2**64 - 1])
            else:
                e.name = rng.choice([b"", b"\xff\xfe", entries[0].name, b"x" * 300, e.name + b"\x1f"])
        return [build_header(entries, **kw), *s.frames[1:]]

    def _overflow_shape(self, s: Seed) -> list[bytes]:
        """Dimensions whose product overflows int64 (wrapping to a small or zero byte count) or is huge."""
        parsed = self._parsed(s)
        if parsed is None or not parsed[1]:
            return self._bytes_op(s)
        fh, entries = parsed
        i = self.rng.randrange(len(entries))
        e = entries[i]
        e.shape = self.rng.choice([(65536,) * 4, (2**32 - 1,) * 3, (2**32 - 1, 2**32 - 1, 0), (2**31, 2**31, 4),
                                   (0x10000, 0x10000, 0x10000, 0x10000, 2), (2**32 - 1,)])
        wrapped = int(np.prod(np.array(e.shape, dtype=np.int64), dtype=np.int64)) * torch_elsize(e.code)
        e.nbytes = wrapped & (2**64 - 1)
        frames = [build_header(entries, kind=fh.kind, step=fh.step, micro_batch=fh.micro_batch, stage=fh.stage,
                               flags=self.rng.choice([0, 1])), *s.frames[1:]]
        if e.nbytes == 0 and i + 1 < len(frames):
            frames[i + 1] = b""
        return frames

    def _rechecksum(self, s: Seed) -> list[bytes]:
        """Corrupt a tensor buffer and fix up its checksum, or switch checksums off."""
        parsed = self._parsed(s)
        if parsed is None or len(s.frames) < 2:
            return self._bytes_op(s)
        fh, entries = parsed
        frames = list(s.frames)
        i = self.rng.randrange(1, len(frames))
        frames[i] = self.rng.choice([_bitflip, _interesting])(self.rng, frames[i])
        if i - 1 < len(entries):
            entries[i - 1].crc = tensorframe.checksum_of(memoryview(frames[i]))
        flags = int(fh.checksum) if self.rng.random() < 0.7 else 0
        return [build_header(entries, kind=fh.kind, step=fh.step, micro_batch=fh.micro_batch, stage=fh.stage,
                             flags=flags), *frames[1:]]

    def _nonfinite_tensor(self, s: Seed) -> list[bytes]:
        parsed = self._parsed(s)
        if parsed is None:
            return self._bytes_op(s)
        fh, entries = parsed
        floats = [(i, e) for i, e in enumerate(entries) if e.code in (0, 1, 2, 3) and e.nbytes]
        if not floats:
            return self._rechecksum(s)
        i, e = self.rng.choice(floats)
        size = torch_elsize(e.code)
        if i + 1 >= len(s.frames) or len(s.frames[i + 1]) < size:
            return self._rechecksum(s)
        buf = bytearray(s.frames[i + 1])
        pos = self.rng.randrange(len(buf) // size) * size
        bad = {4: NONFINITE32, 8: NONFINITE64, 2: (b"\x00\x7e", b"\x00\x7c", b"\x80\x7f", b"\xc0\x7f")}[size]
        buf[pos:pos + size] = self.rng.choice(bad)[:size]
        e.crc = tensorframe.checksum_of(memoryview(bytes(buf)))
        frames = list(s.frames)
        frames[i + 1] = bytes(buf)
        header = build_header(entries, kind=fh.kind, step=fh.step, micro_batch=fh.micro_batch, stage=fh.stage)
        return [header, *frames[1:]]


def torch_elsize(code: int) -> int:
    return torch.empty((), dtype=tensorframe._DTYPES[code % len(tensorframe._DTYPES)]).element_size()


# -- raw sockets -----------------------------------------------------------------------------------------------------
class ProbeTimeoutError(AssertionError):
    """The listener did not answer a valid request in time."""


ZMTP_GREETING = (b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\x00" + b"\0" * 31)


def zmtp_ready(socket_type: bytes) -> bytes:
    body = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", len(socket_type)) + socket_type
    return b"\x04" + bytes([len(body)]) + body


def raw_tcp_garbage(rng: random.Random, socket_type: bytes) -> bytes:
    """Bytes for a plain TCP connection: pure noise, or a valid ZMTP greeting followed by broken or huge frames."""
    greeting, ready = ZMTP_GREETING, zmtp_ready(socket_type)
    return rng.choice([
        rng.randbytes(rng.randint(1, 512)),
        _bitflip(rng, greeting) + rng.randbytes(64),
        greeting + rng.randbytes(rng.randint(1, 256)),
        greeting + ready + b"\x02" + struct.pack(">Q", rng.choice([2**63 - 1, 2**40, 2**31])) + rng.randbytes(32),
        greeting + ready + b"\x01\xff" + rng.randbytes(16),
        greeting + _bitflip(rng, ready) + b"\x00\x03abc",
        greeting + ready + b"\x04\x05" + rng.randbytes(5),
    ])


def send_raw_tcp(address: str, payload: bytes) -> None:
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1.0) as s:
            s.sendall(payload)
            s.settimeout(0.05)
            with contextlib.suppress(OSError):
                s.recv(256)
    except OSError:
        pass


_EXC_NAME = re.compile(r"([A-Za-z_][A-Za-z0-9_]*(?:Error|Exception|Exit)|StopIteration|KeyboardInterrupt): ")


class RawDealer:
    """A DEALER that sends arbitrary frames to a ROUTER and asks it valid requests over the same connection."""

    def __init__(self, ctx: zmq.Context, address: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 10000)
        self.sock.setsockopt(zmq.RCVHWM, 100000)
        self.sock.connect(address)
        self.replies = Counter()          # status of every reply to a fuzz input (b"ok", b"err", other)
        self.exceptions = Counter()       # exception type named by an error reply ("KeyError: ...")
        self.examples: dict[str, str] = {}
        self._n = 0

    def summary(self) -> dict[str, Any]:
        return {"fuzz_replies": {k.decode(errors="replace"): v for k, v in self.replies.items()},
                "handler_exceptions": dict(self.exceptions), "handler_exception_examples": self.examples}

    def send(self, frames: list[bytes]) -> bool:
        try:
            self.sock.send_multipart(frames, flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def request(self, service: str, msg: Any, response_type: str, timeout_s: float = 5.0, attempts: int = 2) -> Any:
        """A valid request; returns the decoded reply, raises AssertionError on an error reply.

        Asked again once after `timeout_s`, as a real client would: a request sent right behind an oversize
        message is lost with the connection that libzmq drops for it (that is no hang of the listener)."""
        typename = codec.normalize_type(msg.__msgtype__)
        body = codec.encode(msg, typename)
        for _ in range(attempts):
            self._n += 1
            req_id = f"probe-{self._n}-{random.getrandbits(32)}".encode()
            self.sock.send_multipart([b"", req_id, service.encode(), typename.encode(), body])
            frames = self._await(req_id, timeout_s)
            if frames is not None:
                _, _, status, rtype, reply = frames
                assert status == b"ok", f"{service}: error reply to a valid request: {reply[:300]!r}"
                assert rtype.decode() == codec.normalize_type(response_type), rtype
                return codec.decode(reply, response_type)
        raise ProbeTimeoutError(f"no reply to {service} within {attempts} x {timeout_s} s")

    def _await(self, req_id: bytes, timeout_s: float) -> list[bytes] | None:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000) + 1):
                return None
            frames = self.sock.recv_multipart()
            if len(frames) == 5 and frames[1] == req_id:
                return frames
            self._record(frames)

    def _record(self, frames: list[bytes]) -> None:
        status = frames[2] if len(frames) == 5 else b"malformed"
        self.replies[status] += 1
        if status == b"err":
            text = frames[4].decode(errors="replace")
            match = _EXC_NAME.match(text.removeprefix("prediction failed: "))
            if match:                          # a handler raised (the listener caught it and answered)
                self.exceptions[match.group(1)] += 1
                self.examples.setdefault(match.group(1), text[:300])

    def close(self) -> None:
        self.sock.close(0)


class Harness:
    """One listener under fuzz. Subclasses start it (on fresh ports each time), send frames, probe it."""

    name = "listener"
    socket_type = b"DEALER"      # what a raw TCP peer claims to be

    def start(self) -> None: ...
    def stop(self) -> None: ...

    def send(self, frames: list[bytes]) -> bool:
        raise NotImplementedError

    def probe(self) -> None:
        """Ask a valid request over the fuzz connection and check the answer (AssertionError otherwise)."""
        raise NotImplementedError

    def alive(self) -> bool:
        return True

    def rejected(self) -> int:
        return 0

    def addresses(self) -> list[str]:
        """TCP addresses for raw-socket garbage."""
        return []

    def extra(self) -> dict[str, Any]:
        return {}


@dataclass
class Finding:
    kind: str            # crash | hang
    phase: str
    detail: str
    culprit_op: str = ""
    culprit: list[str] = field(default_factory=list)     # hex of each frame (first 96 bytes)
    batch_ops: list[str] = field(default_factory=list)   # what the batch that broke it held


    def signature(self) -> str:
        """kind, the mutation that did it and the last line of the error: one per distinct bug, roughly."""
        last = self.detail.strip().splitlines()[-1] if self.detail.strip() else ""
        return f"{self.kind} | {self.culprit_op or 'not reproduced alone'} | {re.sub(r'[0-9]+', 'N', last)[:160]}"


def _hex(frames: list[bytes]) -> list[str]:
    return [f"{len(f)}:{bytes(f[:96]).hex()}" for f in frames]


class Campaign:
    """Feeds one harness; see the module docstring."""

    def __init__(self, entry: str, harness: Harness, *, seed: int = 0, batch: int = 25) -> None:
        self.entry, self.h, self.batch = entry, harness, batch
        self.rng = random.Random(seed)
        self.inputs = Counter()
        self.findings: list[Finding] = []
        self.rejected_before = 0
        self.blocked = 0
        self.probes = 0
        self._thread_errors: list[str] = []
        self._t0 = 0.0
        self._hook: Any = None
        self._levels: dict[str, int] = {}

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def __enter__(self) -> Campaign:
        self._t0 = time.monotonic()
        self._hook = threading.excepthook
        threading.excepthook = self._on_thread_error
        for name in NOISY_LOGGERS:
            logger = logging.getLogger(name)
            self._levels[name] = logger.level
            logger.setLevel(logging.CRITICAL)
        self.h.start()
        self.h.probe()                       # the listener works before any fuzz
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.h.stop()
        finally:
            threading.excepthook = self._hook
            for name, level in self._levels.items():
                logging.getLogger(name).setLevel(level)
            self.report()

    def _on_thread_error(self, args: threading.ExceptHookArgs) -> None:
        text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
        self._thread_errors.append(f"thread {args.thread.name if args.thread else '?'}: {text[-1500:]}")

    # -- results -----------------------------------------------------------------------------------------------
    @property
    def crashes(self) -> int:
        return sum(f.kind == "crash" for f in self.findings)

    @property
    def hangs(self) -> int:
        return sum(f.kind == "hang" for f in self.findings)

    @property
    def rejected(self) -> int:
        return self.rejected_before + self.h.rejected()

    def summary(self) -> str:
        lines = [f"{self.entry}: {sum(self.inputs.values())} inputs, {self.crashes} crashes, {self.hangs} hangs"]
        for f in self.findings[:5]:
            lines.append(f"  {f.kind} in {f.phase}: {f.detail[-800:]}\n    culprit {f.culprit_op}: {f.culprit}")
        return "\n".join(lines)

    def report(self) -> dict[str, Any]:
        rec = {"entry_point": self.entry, "inputs": sum(self.inputs.values()), "by_phase": dict(self.inputs),
               "crashes": self.crashes, "hangs": self.hangs, "rejected": self.rejected, "probes": self.probes,
               "send_blocked": self.blocked, "seconds": round(time.monotonic() - self._t0, 2), "scale": SCALE,
               "finding_signatures": dict(Counter(f.signature() for f in self.findings)),
               "findings": [asdict(f) for f in self.findings[:20]], **self.h.extra()}
        if REPORT:
            path = Path(REPORT)
            data = json.loads(path.read_text()) if path.exists() and path.stat().st_size else []
            data.append(rec)
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(json.dumps(data, indent=1))
            tmp.replace(path)
        return rec

    def assert_clean(self, *, min_rejected: int = 1) -> None:
        assert not self.findings, self.summary()
        assert self.rejected >= min_rejected, f"{self.entry}: only {self.rejected} rejections counted"

    # -- health --------------------------------------------------------------------------------------------------
    def _health(self) -> tuple[str, str] | None:
        """None if the listener answers a valid request correctly and is alive; else (crash | hang, detail)."""
        self.probes += 1
        try:
            self.h.probe()
        except ProbeTimeoutError as exc:
            errors = self._drain_thread_errors()
            return ("crash" if errors or not self.h.alive() else "hang"), f"{exc}; {errors}"
        except Exception as exc:      # the listener raised, or answered wrongly
            where = traceback.format_exc()[-1500:]
            return "crash", f"{type(exc).__name__}: {exc}\n{where}{self._drain_thread_errors()}"
        errors = self._drain_thread_errors()
        if errors or not self.h.alive():
            return "crash", f"listener thread died: {errors}"
        return None

    def _drain_thread_errors(self) -> str:
        errors, self._thread_errors = self._thread_errors, []
        return "\n".join(errors)

    def _restart(self) -> None:
        self.rejected_before += self.h.rejected()
        self.h.stop()
        self.h.start()

    def _send(self, frames: list[bytes]) -> bool:
        if self.h.send(frames):
            return True
        self.blocked += 1
        return False

    def _check(self, phase: str, batch: list[tuple[str, list[bytes]]]) -> bool:
        failure = self._health()
        if failure is None:
            return True
        kind, detail = failure
        finding = Finding(kind, phase, detail, batch_ops=sorted({op for op, _ in batch}))
        self._restart()
        for op, frames in batch:              # replay one by one on a fresh listener: which input did it
            self._send(frames)
            again = self._health()
            if again is not None:
                finding.culprit_op, finding.culprit = op, _hex(frames)
                finding.detail = again[1]
                self._restart()
                break
        self.findings.append(finding)
        return False

    # -- phases ----------------------------------------------------------------------------------------------------
    def feed(self, phase: str, generate: Callable[[], tuple[str, list[bytes]]], n: int) -> None:
        """`n` generated inputs, a health check after every batch."""
        batch: list[tuple[str, list[bytes]]] = []
        for i in range(n):
            op, frames = generate()
            self.inputs[phase] += 1
            batch.append((op, frames))
            sent = self._send(frames)
            if len(batch) >= self.batch or i == n - 1 or not sent:
                self._check(phase, batch)
                batch = []

    def feed_hypothesis(self, phase: str, strategy: st.SearchStrategy, n: int) -> None:
        """`n` hypothesis examples, each a list of inputs (lists of frames) followed by a health check.
        Hypothesis only generates here (deterministically); failures are recorded like the other phases."""

        @settings(max_examples=n, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(strategy)
        def one(inputs: list[list[bytes]]) -> None:
            batch = []
            for frames in inputs:
                self.inputs[phase] += 1
                batch.append(("hypothesis", frames))
                self._send(frames)
            self._check(phase, batch)

        one()

    def raw_tcp(self, n: int) -> None:
        """Plain TCP connections that send noise or broken ZMTP to every address of the listener."""
        for i in range(n):
            for address in self.h.addresses():
                send_raw_tcp(address, raw_tcp_garbage(self.rng, self.h.socket_type))
                self.inputs["raw_tcp"] += 1
            if i % 5 == 4 or i == n - 1:
                self._check("raw_tcp", [])


def frames_strategy(max_frames: int = 8, max_bytes: int = 256) -> st.SearchStrategy:
    return st.lists(st.binary(max_size=max_bytes), min_size=1, max_size=max_frames)
