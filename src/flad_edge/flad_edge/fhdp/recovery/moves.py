"""Quick recovery planning (paper §4.2): which layers move where when vehicles leave a pipeline.

Given the running pipeline, the departed vehicles and the replacement pipeline (a SWIFT preventive
template for the survivors), every layer keeps its owner if that owner keeps it; otherwise it moves,
from its surviving owner, or from the edge backup when its owner departed. Nothing else moves, so the
bytes moved are those of the reassigned layers only -- the accounting here is exact and is what the
recovery benchmark compares against the whole model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flad_core.protocol import BACKUP_OWNER
from flad_edge.swift.cost import bottleneck, stage_costs, validate_plan
from flad_vehicle.fhdp.pipeline import Pipeline, Stage

PipelineLike = Pipeline | Iterable[Sequence[Any]]   # a Pipeline, or (vehicle, start, end) triples in stage order


def as_pipeline(pipeline: PipelineLike) -> Pipeline:
    return pipeline if isinstance(pipeline, Pipeline) else Pipeline.of(pipeline)


@dataclass(frozen=True)
class Move:
    layer: str
    source: str      # a surviving vehicle, or BACKUP_OWNER
    dest: str
    nbytes: int


def owners(pipeline: PipelineLike, n_layers: int) -> list[str]:
    """Owner of each layer; raises ValueError if the pipeline does not cover [0, n_layers) contiguously."""
    return as_pipeline(pipeline).owners(n_layers)


def plan_moves(old: PipelineLike, new: PipelineLike, departed: set[str], layer_names: Sequence[str],
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
        source = BACKUP_OWNER if before[i] in departed else before[i]
        moves.append(Move(name, source, after[i], int(layer_bytes.get(name, 0))))
    return moves


def moved_bytes(moves: Sequence[Move]) -> int:
    return sum(m.nbytes for m in moves)


def departed_share(old: PipelineLike, departed: set[str], layer_names: Sequence[str],
                   layer_bytes: Mapping[str, int]) -> int:
    """Bytes of the layers the departed vehicles held (the lower bound on what must move)."""
    held = owners(old, len(layer_names))
    return sum(int(layer_bytes.get(name, 0)) for name, owner in zip(layer_names, held, strict=True)
               if owner in departed)


def keep_in_place(current: Pipeline, departed: set[str], template: Pipeline, cluster: Any, profile: Any,
                  max_slowdown: float) -> Pipeline | None:
    """The running pipeline with each departed stage's layers joined to its upstream neighbour, when that
    fits in memory and is at most `max_slowdown` x the template's bottleneck (Eq. 8/9 cost model)."""
    if max_slowdown <= 0:
        return None
    out: list[Stage] = []
    for st in current:
        if st.vehicle in departed:
            if not out:
                return None          # the data owner left: there is no pipeline to keep
            out[-1] = Stage(out[-1].vehicle, out[-1].start, st.end)
        else:
            out.append(st)
    kept = Pipeline(tuple(out))
    path, ranges = kept.members, kept.ranges
    if validate_plan(path, ranges, cluster.subset(path), profile, require_all=True, first=path[0]):
        return None
    mine = bottleneck(stage_costs(path, ranges, cluster.subset(path), profile))
    theirs = bottleneck(stage_costs(template.members, template.ranges, cluster.subset(template.members), profile))
    return kept if mine <= max_slowdown * theirs else None
