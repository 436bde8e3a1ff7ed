"""One typed description of an FHDP pipeline, and a typed view of the `PipelineAssignment` message.

A pipeline is the ordered list of stages that train one copy of the encoder together: stage i runs layers
[start, end) on one vehicle, stage 0 owns the data. SWIFT plans pipelines at the edge, the edge sends them
to vehicles inside `flad_msgs/PipelineAssignment`, quick recovery diffs them; all of them use these types.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, NamedTuple, overload

from flad_core import codec
from flad_core.device import PRECISIONS


class Stage(NamedTuple):
    """One vehicle's part of a pipeline: encoder layers [start, end).

    A NamedTuple rather than a plain dataclass so that a stage unpacks (`vehicle, start, end = stage`) and
    serialises to JSON as the `[vehicle, start, end]` triple that run logs and benchmark reports carry."""

    vehicle: str
    start: int
    end: int


class PipelineError(ValueError):
    """A pipeline that cannot run: empty, inverted layer ranges, gaps or overlaps, a vehicle twice."""


@dataclass(frozen=True)
class Pipeline:
    """Stages in order; contiguous layer ranges from the first stage's start, each vehicle at most once."""

    stages: tuple[Stage, ...]

    def __post_init__(self) -> None:
        stages = tuple(Stage(str(v), int(s), int(e)) for v, s, e in self.stages)
        object.__setattr__(self, "stages", stages)
        if not stages:
            raise PipelineError("a pipeline needs at least one stage")
        for prev, cur in pairwise(stages):
            if cur.start != prev.end:
                raise PipelineError(f"stages must be contiguous: {cur.vehicle} starts at layer {cur.start}, the "
                                    f"previous stage ends at {prev.end}: {self.describe()}")
        for st in stages:
            if st.start < 0 or st.end < st.start:
                raise PipelineError(f"stage {st.vehicle} has layers [{st.start}, {st.end}): {self.describe()}")
        if len({st.vehicle for st in stages}) != len(stages):
            raise PipelineError(f"a vehicle appears twice: {self.describe()}")

    @classmethod
    def of(cls, stages: Iterable[Sequence[Any]]) -> Pipeline:
        """From (vehicle, start, end) triples (a JSON list, a plan's rows)."""
        return cls(tuple(Stage(*st) for st in stages))

    @classmethod
    def from_plan(cls, path: Sequence[Any], ranges: Sequence[tuple[int, int]]) -> Pipeline:
        """From a SWIFT plan's vehicle path and layer ranges."""
        return cls(tuple(Stage(str(v), int(s), int(e)) for v, (s, e) in zip(path, ranges, strict=True)))

    @classmethod
    def whole(cls, vehicle: str, n_layers: int) -> Pipeline:
        """One vehicle training the whole model (a resource-sufficient vehicle, or a one-stage plan)."""
        return cls((Stage(vehicle, 0, n_layers),))

    # -- reading ---------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Stage]:
        return iter(self.stages)

    def __len__(self) -> int:
        return len(self.stages)

    @overload
    def __getitem__(self, i: int) -> Stage: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[Stage, ...]: ...
    def __getitem__(self, i: int | slice) -> Stage | tuple[Stage, ...]:
        return self.stages[i]

    @property
    def first(self) -> str:
        """The data owner: the vehicle whose data this pipeline trains on."""
        return self.stages[0].vehicle

    @property
    def members(self) -> list[str]:
        return [st.vehicle for st in self.stages]

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return [(st.start, st.end) for st in self.stages]

    @property
    def n_layers(self) -> int:
        return self.stages[-1].end

    def owners(self, n_layers: int | None = None) -> list[str]:
        """Owner of each layer; raises if the pipeline does not cover [0, n_layers)."""
        n = self.n_layers if n_layers is None else n_layers
        if self.stages[0].start != 0 or self.stages[-1].end != n:
            raise PipelineError(f"pipeline covers [{self.stages[0].start}, {self.stages[-1].end}), "
                                f"the model has {n} layers: {self.describe()}")
        return [st.vehicle for st in self.stages for _ in range(st.start, st.end)]

    def stage_of(self, vehicle: str) -> int:
        for i, st in enumerate(self.stages):
            if st.vehicle == vehicle:
                return i
        raise PipelineError(f"{vehicle} is not in pipeline {self.describe()}")

    def describe(self) -> str:
        return " -> ".join(f"{v}[{s}:{e})" for v, s, e in self.stages)

    __str__ = describe

    def to_json(self) -> list[list[Any]]:
        return [list(st) for st in self.stages]

    # -- the message form -----------------------------------------------------------------------------
    def to_template_msg(self, cluster_id: str, method: str) -> Any:
        stages = [codec.new("flad_msgs/msg/StageAssignment", vehicle_id=v, stage_index=i, layer_start=s, layer_end=e)
                  for i, (v, s, e) in enumerate(self.stages)]
        return codec.new("flad_msgs/msg/PipelineTemplate", header=codec.header(), cluster_id=cluster_id,
                         method=method, stages=stages)

    @classmethod
    def from_template_msg(cls, msg: Any) -> Pipeline:
        ordered = sorted(msg.stages, key=lambda s: s.stage_index)
        if [s.stage_index for s in ordered] != list(range(len(ordered))):
            raise PipelineError(f"stage indices {[s.stage_index for s in ordered]} are not 0..{len(ordered) - 1}")
        return cls(tuple(Stage(s.vehicle_id, int(s.layer_start), int(s.layer_end)) for s in ordered))


def pipeline_from_owners(owners: Sequence[str]) -> Pipeline | None:
    """The pipeline whose stages are the runs of equal layer owners (None if a vehicle owns two runs)."""
    runs: list[Stage] = []
    for i, o in enumerate(owners):
        if runs and runs[-1].vehicle == o and runs[-1].end == i:
            runs[-1] = Stage(o, runs[-1].start, i + 1)
        else:
            runs.append(Stage(o, i, i + 1))
    try:
        return Pipeline(tuple(runs))
    except PipelineError:
        return None


@dataclass
class Assignment:
    """Typed view of `flad_msgs/PipelineAssignment` (see the .msg for each field's meaning)."""

    pipeline_id: str
    round: int
    cluster_id: str
    method: str
    pipeline: Pipeline
    members: dict[str, str]              # every cluster member -> its control address
    inboxes: list[str]                   # stage order
    layer_owner: list[str]
    schedule: str = "1f1b"
    codec: str = "fp32"
    n_micro: int = 1
    batch_size: int = 4
    steps: int = 1
    first_step: int = 0
    time_scale: float = 1.0
    backup_every: int = 0
    link_timeout_s: float = 0.0
    publish_progress: bool = False
    u_shaped: bool = False
    fanin_sources: list[str] = field(default_factory=list)     # the fan-in schedule's sources (empty: none)
    fanin_inboxes: list[str] = field(default_factory=list)     # their tensor-frame inboxes (same order)
    precision: str = "fp32"              # every stage's training precision (fp32, bf16, fp16)

    @property
    def is_fanin(self) -> bool:
        """Every source's data in every step (`fhdp.fanin`); the pipeline is then the trunk."""
        return bool(self.fanin_sources)

    @property
    def participants(self) -> list[str]:
        """The vehicles that take part: the pipeline's stages, and with fan-in its sources first."""
        return list(dict.fromkeys([*self.fanin_sources, *self.pipeline.members]))

    def inbox_of(self, vehicle: str) -> str:
        """The tensor-frame inbox address of a participant."""
        by_vehicle = dict(zip(self.fanin_sources, self.fanin_inboxes, strict=True))
        by_vehicle.update(zip(self.pipeline.members, self.inboxes, strict=True))
        if vehicle not in by_vehicle:
            raise PipelineError(f"{vehicle} takes no part in {self.pipeline_id}")
        return by_vehicle[vehicle]

    @property
    def loss_stage(self) -> int:
        """Index of the stage that computes (and reports) the loss: stage 0 when U-shaped, else the last."""
        return 0 if self.runs_u_shaped else len(self.pipeline) - 1

    @property
    def runs_u_shaped(self) -> bool:
        """A multi-stage pipeline runs U-shaped when asked (one stage has no hop: it is the whole model)."""
        return self.u_shaped and len(self.pipeline) > 1

    def to_msg(self) -> Any:
        return codec.new(
            "flad_msgs/msg/PipelineAssignment", header=codec.header(), pipeline_id=self.pipeline_id,
            round=self.round, pipeline_template=self.pipeline.to_template_msg(self.cluster_id, self.method),
            member_ids=list(self.members), member_control_addresses=list(self.members.values()),
            stage_inbox_addresses=list(self.inboxes), layer_owner=list(self.layer_owner), schedule=self.schedule,
            codec=self.codec, n_micro=self.n_micro, batch_size=self.batch_size, steps=self.steps,
            first_step=self.first_step, time_scale=self.time_scale, backup_every=self.backup_every,
            link_timeout_s=self.link_timeout_s, publish_progress=self.publish_progress, u_shaped=self.u_shaped,
            fanin_sources=list(self.fanin_sources), fanin_source_inboxes=list(self.fanin_inboxes),
            precision=self.precision)

    @classmethod
    def from_msg(cls, msg: Any) -> Assignment:
        """Checks what a vehicle relies on: one address per member and one inbox per stage."""
        if len(msg.member_ids) != len(msg.member_control_addresses):
            raise PipelineError(f"{msg.pipeline_id}: {len(msg.member_ids)} members but "
                                f"{len(msg.member_control_addresses)} control addresses")
        pipeline = Pipeline.from_template_msg(msg.pipeline_template)
        if len(msg.stage_inbox_addresses) != len(pipeline):
            raise PipelineError(f"{msg.pipeline_id}: {len(pipeline)} stages but "
                                f"{len(msg.stage_inbox_addresses)} inbox addresses")
        if len(msg.fanin_sources) != len(msg.fanin_source_inboxes):
            raise PipelineError(f"{msg.pipeline_id}: {len(msg.fanin_sources)} fan-in sources but "
                                f"{len(msg.fanin_source_inboxes)} source inbox addresses")
        if msg.fanin_sources and msg.u_shaped:
            raise PipelineError(f"{msg.pipeline_id}: the fan-in schedule does not run U-shaped")
        precision = msg.precision or "fp32"
        if precision not in PRECISIONS:
            raise PipelineError(f"{msg.pipeline_id}: precision {precision!r} is none of {', '.join(PRECISIONS)}")
        return cls(pipeline_id=msg.pipeline_id, round=int(msg.round), cluster_id=msg.pipeline_template.cluster_id,
                   method=msg.pipeline_template.method, pipeline=pipeline,
                   members=dict(zip(msg.member_ids, msg.member_control_addresses, strict=True)),
                   inboxes=list(msg.stage_inbox_addresses), layer_owner=list(msg.layer_owner),
                   schedule=msg.schedule or "1f1b", codec=msg.codec or "fp32", n_micro=max(1, int(msg.n_micro)),
                   batch_size=int(msg.batch_size), steps=int(msg.steps), first_step=int(msg.first_step),
                   time_scale=float(msg.time_scale) if msg.time_scale > 0 else 1.0,
                   backup_every=int(msg.backup_every), link_timeout_s=float(msg.link_timeout_s),
                   publish_progress=bool(msg.publish_progress), u_shaped=bool(msg.u_shaped),
                   fanin_sources=list(msg.fanin_sources), fanin_inboxes=list(msg.fanin_source_inboxes),
                   precision=precision)
