"""Quick recovery planning (paper §4.2): which layers move where when vehicles leave a pipeline.

Given the running pipeline, the departed vehicles and the replacement pipeline (a SWIFT preventive
template for the survivors), every layer keeps its owner if that owner keeps it; otherwise it moves,
from its surviving owner, or from the edge backup when its owner departed. Nothing else moves, so the
bytes moved are those of the reassigned layers only -- the accounting here is exact and is what the
recovery benchmark compares against the whole model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

BACKUP = "backup"

Pipeline = Sequence[tuple[str, int, int]]   # (vehicle, start, end) in stage order


@dataclass(frozen=True)
class Move:
    layer: str
    source: str      # a surviving vehicle, or BACKUP
    dest: str
    nbytes: int


def owners(pipeline: Pipeline, n_layers: int) -> list[str]:
    """Owner of each layer; raises if the pipeline does not cover [0, n_layers) contiguously."""
    out = [""] * n_layers
    pos = 0
    for vehicle, start, end in pipeline:
        if start != pos or end <= start:
            raise ValueError(f"pipeline ranges must be contiguous and non-empty, got {list(pipeline)}")
        for i in range(start, end):
            out[i] = vehicle
        pos = end
    if pos != n_layers:
        raise ValueError(f"pipeline covers [0, {pos}) of {n_layers} layers")
    return out


def plan_moves(old: Pipeline, new: Pipeline, departed: set[str], layer_names: Sequence[str],
               layer_bytes: Mapping[str, int]) -> list[Move]:
    """The layer moves that turn `old` into `new` after `departed` left."""
    n = len(layer_names)
    before, after = owners(old, n), owners(new, n)
    stranded = departed & set(after)
    if stranded:
        raise ValueError(f"the new pipeline still uses departed vehicle(s) {sorted(stranded)}")
    moves = []
    for i, name in enumerate(layer_names):
        if before[i] == after[i]:
            continue
        source = BACKUP if before[i] in departed else before[i]
        moves.append(Move(name, source, after[i], int(layer_bytes.get(name, 0))))
    return moves


def moved_bytes(moves: Sequence[Move]) -> int:
    return sum(m.nbytes for m in moves)


def departed_share(old: Pipeline, departed: set[str], layer_names: Sequence[str],
                   layer_bytes: Mapping[str, int]) -> int:
    """Bytes of the layers the departed vehicles held (the lower bound on what must move)."""
    held = owners(old, len(layer_names))
    return sum(int(layer_bytes.get(name, 0)) for name, owner in zip(layer_names, held, strict=True)
               if owner in departed)
