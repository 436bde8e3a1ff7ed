"""Every member's data at once: one cluster step in which all members' data flows through a shared pipeline.

The rotation over essential pipelines (`flad_edge.fhdp.client`) trains one member's data at a time: at any
moment one pipeline runs and most of the cluster idles. In the *fan-in* schedule every member is a *source*:
it runs a replica of the raw-input layers [0, cut) on its own data and sends only their outputs, which enter a
shared *trunk* pipeline of the deeper layers [cut, L). The micro-batches of all sources interleave in the trunk
(global micro-batch g = m * n_sources + s; 1F1B or GPipe over all of them, `schedule.py`; the last trunk stage
takes them in arrival order), so raw sensor data never leaves its owner while every member's data trains the
model in every step.

The replicas stay identical. After the step's backward passes every source sends its replica gradients to the
*hub* (the vehicle of the trunk's first stage), which sums them -- the replica layers' gradient on the union of
the micro-batches -- and adds their squared norm to the trunk's norm reduction, so global clipping and the step
guard (`runner.py`) see the whole model. The hub sends the sum, the clip factor and its drop decision back, and
every replica applies the same update. A source on the hub's own vehicle runs its replica inside the hub's
stage: none of its frames crosses a link. A step therefore equals a single-process step on the union of all
sources' batches (`test/vehicle/test_fhdp_fanin.py`).

Device, precision, host staging and the loss scale work as for a pipeline stage (`runner.py`, `placement.py`):
the last trunk stage owns the loss and its scale; the hub unscales the global norm and folds 1/scale into the
clip factor it sends down the trunk and to the sources.

Frame keys (kind, step, micro-batch) never collide on a vehicle with two roles (a source that also runs a trunk
stage): gradients to a source use micro-batch SOURCE_GRAD_BASE + g, the replica reduction its own indices.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from flad_core import tensorcodec, tensorframe
from flad_core.device import HostStaging
from flad_core.emulation import ComputeDilation, MemoryGuard
from flad_vehicle.fhdp.links import KIND_CONTROL, Inbox, OutLink
from flad_vehicle.fhdp.pipeline import Pipeline, PipelineError
from flad_vehicle.fhdp.placement import DeviceMemoryGuard, LossScale
from flad_vehicle.fhdp.runner import (
    BATCH_KEY,
    CLIP_MB,
    EXPLODE_FACTOR,
    MAX_GRAD_NORM,
    NORM_HISTORY,
    NORM_MB,
    StepResult,
    StepRunner,
    _all_finite,
    _batch_dim,
    _StepState,
)
from flad_vehicle.fhdp.schedule import Schedule, stage_ops

SOURCE_GRAD_BASE = 2**31        # the gradient of source micro-batch g travels as micro-batch SOURCE_GRAD_BASE + g
SYNC_DOWN_MB = 2**32 - 3        # hub -> each source: summed replica gradients, clip factor, drop decision
SYNC_UP_BASE = 2**32 - 4096     # source s -> hub: its replica gradients, as micro-batch SYNC_UP_BASE + s
MAX_SOURCES = SYNC_DOWN_MB - SYNC_UP_BASE


@dataclass(frozen=True)
class FanInPlan:
    """Sources (every member, each with a replica of layers [0, cut)) feeding one trunk pipeline [cut, L)."""

    sources: tuple[str, ...]
    trunk: Pipeline

    def __post_init__(self) -> None:
        sources = tuple(str(s) for s in self.sources)
        object.__setattr__(self, "sources", sources)
        if not sources:
            raise PipelineError("a fan-in plan needs at least one source")
        if len(set(sources)) != len(sources):
            raise PipelineError(f"a source appears twice: {list(sources)}")
        if len(sources) > MAX_SOURCES:
            raise PipelineError(f"{len(sources)} sources; at most {MAX_SOURCES}")
        if self.trunk[0].start < 1:
            raise PipelineError(f"the trunk must start after the replicated raw-input layers, not at layer "
                                f"{self.trunk[0].start}: {self.trunk.describe()}")

    @classmethod
    def of(cls, sources: Sequence[str], trunk: Pipeline | Sequence[Sequence]) -> FanInPlan:
        return cls(tuple(sources), trunk if isinstance(trunk, Pipeline) else Pipeline.of(trunk))

    def check_model(self, n_layers: int, min_first_end: int) -> None:
        """Raise unless the trunk ends at the model's last layer and every raw-input layer is replicated (cut at or
        after `min_first_end`, `LayerGraph.min_first_end`), so no raw sensor tensor crosses the cut."""
        if self.trunk[-1].end != n_layers:
            raise PipelineError(f"the trunk ends at layer {self.trunk[-1].end}; the model has {n_layers}: "
                                f"{self.describe()}")
        if self.cut < min_first_end:
            raise PipelineError(f"cut {self.cut} would send raw sensor data: layers before {min_first_end} read "
                                f"raw inputs and must run on each source: {self.describe()}")

    @property
    def cut(self) -> int:
        """The first layer of the trunk: sources replicate [0, cut)."""
        return self.trunk[0].start

    @property
    def hub(self) -> str:
        """The vehicle of the trunk's first stage: every source sends it activations and replica gradients."""
        return self.trunk.first

    @property
    def members(self) -> list[str]:
        return list(dict.fromkeys([*self.sources, *self.trunk.members]))

    def global_mb(self, source: int, m: int) -> int:
        """The trunk's micro-batch index of source `source`'s local micro-batch `m` (sources interleave)."""
        return m * len(self.sources) + source

    def source_of(self, g: int) -> tuple[int, int]:
        """(source index, local micro-batch) of trunk micro-batch `g`."""
        return g % len(self.sources), g // len(self.sources)

    def describe(self) -> str:
        return f"sources {','.join(self.sources)} [0:{self.cut}) => {self.trunk.describe()}"

    def to_json(self) -> dict[str, object]:
        return {"sources": list(self.sources), "trunk": self.trunk.to_json()}


class FanInRunner(StepRunner):
    """One vehicle's part of a fan-in cluster step: a source (replica on its own data), a trunk stage, or both.

    `links` maps a peer vehicle to the OutLink towards it (one per peer, shared by both roles). `optimizer`
    covers every parameter this vehicle trains (its replica and its trunk stage). `batch_size` is each source's
    batch: the loss of a micro-batch is scaled by its share of the whole step's n_sources x batch_size samples.
    `sync_codec` compresses the replica reduction (`tensorcodec`): the hub applies to its own replica exactly
    what it sends the sources (the same encoded sum, decoded), so the replicas stay identical with any codec;
    fp32 (default) keeps the step exact. `device`, `precision`, `staging` and `loss_scale` as for `StageRunner`.
    """

    def __init__(self, vehicle: str, plan: FanInPlan, *, inbox: Inbox, links: Mapping[str, OutLink],
                 replica: nn.Module | None, trunk_stage: nn.Module | None,
                 optimizer: torch.optim.Optimizer | None, batch_size: int, schedule: Schedule = "1f1b",
                 n_micro: int = 4, grad_clip: float | None = None, label_names: Collection[str] = (),
                 dilation: ComputeDilation | None = None, memory: MemoryGuard | DeviceMemoryGuard | None = None,
                 timeout_s: float = 60.0, loss_key: str = "loss", abort: threading.Event | None = None,
                 max_grad_norm: float | None = MAX_GRAD_NORM, explode_factor: float | None = EXPLODE_FACTOR,
                 sync_codec: str = "fp32", device: str | torch.device = "cpu", precision: str = "fp32",
                 staging: HostStaging | None = None, loss_scale: LossScale | None = None) -> None:
        self.vehicle, self.plan = vehicle, plan
        self.source_index = plan.sources.index(vehicle) if vehicle in plan.sources else None
        self.trunk_index = plan.trunk.stage_of(vehicle) if vehicle in plan.trunk.members else None
        if self.source_index is None and self.trunk_index is None:
            raise PipelineError(f"{vehicle} has no role in {plan.describe()}")
        if (self.source_index is not None) != (replica is not None):
            raise ValueError(f"{vehicle}: a source needs the replica of layers [0, {plan.cut}), nothing else has one")
        if (self.trunk_index is not None) != (trunk_stage is not None):
            raise ValueError(f"{vehicle}: a trunk member needs its trunk stage, nothing else has one")
        if batch_size < n_micro:
            raise ValueError(f"a batch of {batch_size} cannot be split into {n_micro} micro-batches")
        self.replica, self.trunk_stage = replica, trunk_stage
        self.inbox, self.links, self.optimizer = inbox, dict(links), optimizer
        self.batch_size, self.n_micro, self.grad_clip = batch_size, n_micro, grad_clip
        self.label_names = set(label_names)
        self.dilation, self.memory, self.timeout_s = dilation, memory, timeout_s
        self.loss_key, self.abort = loss_key, abort
        self.max_grad_norm, self.explode_factor = max_grad_norm, explode_factor
        if sync_codec not in tensorcodec.CODECS:
            raise ValueError(f"unknown sync codec {sync_codec!r} (known: {', '.join(tensorcodec.CODECS)})")
        self.sync_codec = sync_codec
        self.good_norms: deque[float] = deque(maxlen=NORM_HISTORY)
        self.n_sources, self.n_trunk = len(plan.sources), len(plan.trunk)
        self.total = self.n_sources * batch_size
        n_virtual = self.n_trunk + 1       # the sources are the (replicated) stage 0
        g_count = self.n_sources * n_micro
        self.trunk_ops = stage_ops(schedule, n_virtual, self.trunk_index + 1, g_count) \
            if self.trunk_index is not None else []
        # a source on the hub runs its replica inside the hub's trunk forward: it has no op stream of its own
        self.source_ops = stage_ops(schedule, n_virtual, 0, n_micro) \
            if self.source_index is not None and not self.local_source else []
        needed = [f"link to {p}" for p in self._peers() if p not in self.links]
        if needed:
            raise ValueError(f"{vehicle}: missing {', '.join(needed)}")
        self._place([replica, trunk_stage], device, precision, staging, loss_scale)

    # -- roles --------------------------------------------------------------------------------------------
    @property
    def is_hub(self) -> bool:
        return self.trunk_index == 0

    @property
    def local_source(self) -> bool:
        """A source on the hub's vehicle: its micro-batches enter the trunk without crossing a link."""
        return self.is_hub and self.source_index is not None

    @property
    def is_last(self) -> bool:
        return self.trunk_index == self.n_trunk - 1

    @property
    def batch_inputs(self) -> tuple[str, ...]:
        """The batch fields a source must be given (its replica's inputs, labels included)."""
        return tuple(self.replica.inputs) if self.replica is not None else ()

    def _peers(self) -> list[str]:
        peers = []
        if self.source_index is not None and not self.local_source:
            peers.append(self.plan.hub)
        if self.trunk_index is not None:
            if self.trunk_index > 0:
                peers.append(self.plan.trunk[self.trunk_index - 1].vehicle)
            if not self.is_last:
                peers.append(self.plan.trunk[self.trunk_index + 1].vehicle)
            if self.is_hub:
                peers += [s for s in self.plan.sources if s != self.vehicle]
        return peers

    def parameters(self) -> list[Tensor]:
        params: list[Tensor] = []
        for module in (self.replica, self.trunk_stage):
            if module is not None:
                params += list(module.parameters())
        return params

    # -- helpers --------------------------------------------------------------------------------------------
    def _send(self, peer: str, tensors: Mapping[str, Tensor], *, kind: int, step: int, mb: int, res: StepResult,
              compress: bool = True) -> None:
        res.bytes_sent += self._send_frames(self.links[peer], tensors, kind=kind, step=step, mb=mb, compress=compress)

    def _backward(self, outputs: Mapping[str, Tensor], wire_grads: Mapping[str, Tensor], res: StepResult) -> None:
        """Backward from gradients received off the wire (moved to this vehicle's device first)."""
        pairs = self._grad_pairs(outputs, self.staging.to_device(wire_grads))
        if pairs:
            self._compute(lambda: torch.autograd.backward([a for a, _ in pairs], [g for _, g in pairs]), res)

    # -- one step -----------------------------------------------------------------------------------------------
    def run_step(self, step: int, batch: Mapping[str, Tensor] | None = None) -> StepResult:
        """One cluster step. A source passes its own batch (`batch_inputs`, `batch_size` samples)."""
        res = self._new_result(step)
        t_start = time.perf_counter()
        st = _FanInState()
        if self.source_index is not None:
            if batch is None:
                raise ValueError(f"{self.vehicle} is a source: it needs its batch")
            missing = set(self.batch_inputs) - set(batch)
            if missing:
                raise ValueError(f"batch lacks replica inputs {sorted(missing)}")
            size = int(next(iter(batch.values())).shape[0])
            if size != self.batch_size:
                raise ValueError(f"{self.vehicle}'s batch has {size} samples; every source must bring "
                                 f"{self.batch_size} (the loss is scaled by the step's total)")
            batch = self._on_device({k: batch[k] for k in self.batch_inputs})
            st.chunks = {k: torch.tensor_split(batch[k], self.n_micro) for k in self.batch_inputs}
            res.extra["samples"] = size
        # a last trunk stage takes its micro-batches in arrival order: it forwards and back-propagates each at once
        # (1F1B's steady state), so nothing downstream depends on the order, and a slow source stalls nobody
        any_order = self.is_last and self.trunk_index is not None
        queues = [("T", deque(self.trunk_ops if not any_order else [])), ("S", deque(self.source_ops))]
        unordered = sorted({i for _, i in self.trunk_ops}) if any_order else []
        run = {("T", "F"): self._trunk_forward, ("T", "B"): self._trunk_backward,
               ("S", "F"): self._source_forward, ("S", "B"): self._source_backward}
        while unordered or any(q for _, q in queues):
            waiting = []
            keys = {g: self._needs("T", "F", g, step) for g in unordered}
            g = next((g for g, key in keys.items() if key is None or self.inbox.has(*key)), None)
            if g is not None:
                unordered.remove(g)
                self._trunk_forward(step, g, st, res)
                self._trunk_backward(step, g, st, res)
                continue
            waiting += [key for key in keys.values() if key is not None]
            for part, q in queues:
                if not q:
                    continue
                kind, i = q[0]
                key = self._needs(part, kind, i, step)
                if key is None or self.inbox.has(*key):
                    q.popleft()
                    run[(part, kind)](step, i, st, res)
                    break
                waiting.append(key)
            else:
                if not waiting:
                    raise RuntimeError(f"{self.vehicle}: fan-in schedule deadlock at step {step}")
                t0 = time.perf_counter()
                self.inbox.wait_any(waiting, self.timeout_s, abort=self.abort)
                res.wait_s += time.perf_counter() - t0
        res.peak_in_flight = st.peak_in_flight
        res.grad_norm = self._reduce(step, st, res)
        return self._apply_step(step, st, res, self.is_last, t_start, f"{self.vehicle} (fan-in)")

    def _needs(self, part: str, kind: str, i: int, step: int) -> tuple[int, int, int] | None:
        if part == "S":
            g = self.plan.global_mb(self.source_index, i)
            return None if kind == "F" else (tensorframe.KIND_GRADIENT, step, SOURCE_GRAD_BASE + g)
        if kind == "F":
            if self.local_source and self.plan.source_of(i)[0] == self.source_index:
                return None
            return (tensorframe.KIND_ACTIVATION, step, i)
        return None if self.is_last else (tensorframe.KIND_GRADIENT, step, i)

    def _track(self, st: _FanInState) -> None:
        st.in_flight += 1
        st.peak_in_flight = max(st.peak_in_flight, st.in_flight)
        self._check_memory()

    def _source_forward(self, step: int, m: int, st: _FanInState, res: StepResult) -> None:
        g = self.plan.global_mb(self.source_index, m)
        inputs = {k: st.chunks[k][m] for k in self.batch_inputs}
        with torch.enable_grad(), self._autocast():
            outputs = self._compute(lambda: self.replica(inputs), res)
        send = {**outputs, BATCH_KEY: torch.tensor(self.total, dtype=torch.int64)}
        self._send(self.plan.hub, self._finite(send, st), kind=tensorframe.KIND_ACTIVATION, step=step, mb=g, res=res)
        st.source_saved[m] = outputs
        self._track(st)

    def _source_backward(self, step: int, m: int, st: _FanInState, res: StepResult) -> None:
        g = self.plan.global_mb(self.source_index, m)
        outputs = st.source_saved.pop(m)
        self._backward(outputs, self._recv(tensorframe.KIND_GRADIENT, step, SOURCE_GRAD_BASE + g, res), res)
        st.in_flight -= 1

    def _trunk_forward(self, step: int, g: int, st: _FanInState, res: StepResult) -> None:
        source, m = self.plan.source_of(g)
        local = self.local_source and source == self.source_index
        if local:
            # this vehicle's own micro-batch: replica and trunk stage in one graph, nothing crosses a link
            raw = {k: st.chunks[k][m] for k in self.batch_inputs}
            inputs: dict[str, Tensor] = {}
            total = self.total
            with torch.enable_grad(), self._autocast():
                outputs = self._compute(lambda: self.trunk_stage(self.replica(raw)), res)
        else:
            wire = self._recv(tensorframe.KIND_ACTIVATION, step, g, res)
            bk = wire.pop(BATCH_KEY, None)
            if bk is None:
                raise ValueError(f"{self.vehicle}: trunk micro-batch {g} came without the step's batch size")
            total = int(bk)
            inputs = self._received(self.staging.to_device(wire))
            with torch.enable_grad(), self._autocast():
                outputs = self._compute(lambda: self.trunk_stage(inputs), res)
        if self.is_last:
            scaled = outputs[self.loss_key] * (_batch_dim(raw if local else inputs) / total)
            st.loss_total += float(scaled.detach())
            outputs = {self.loss_key: scaled}
        else:
            send = {**outputs, BATCH_KEY: torch.tensor(total, dtype=torch.int64)}
            self._send(self.plan.trunk[self.trunk_index + 1].vehicle, self._finite(send, st),
                       kind=tensorframe.KIND_ACTIVATION, step=step, mb=g, res=res)
        st.trunk_saved[g] = (inputs, outputs)
        self._track(st)

    def _trunk_backward(self, step: int, g: int, st: _FanInState, res: StepResult) -> None:
        inputs, outputs = st.trunk_saved.pop(g)
        if self.is_last:
            self._compute(lambda: torch.autograd.backward([self._loss_for_backward(outputs[self.loss_key])]), res)
        else:
            self._backward(outputs, self._recv(tensorframe.KIND_GRADIENT, step, g, res), res)
        grads = self._finite(self._grads_to_send(inputs), st)
        if self.trunk_index > 0:
            self._send(self.plan.trunk[self.trunk_index - 1].vehicle, grads, kind=tensorframe.KIND_GRADIENT,
                       step=step, mb=g, res=res)
        elif inputs:    # the hub returns a remote source's gradient (a local one flowed into the replica already)
            source, _ = self.plan.source_of(g)
            self._send(self.plan.sources[source], grads, kind=tensorframe.KIND_GRADIENT, step=step,
                       mb=SOURCE_GRAD_BASE + g, res=res)
        st.in_flight -= 1

    # -- the reduction: replica gradients summed at the hub, global norm, clip and step guard -------------------
    def _replica_grads(self) -> dict[str, Tensor]:
        """This replica's gradients by parameter position (a parameter without a gradient is left out)."""
        return {f"p{i}": p.grad for i, p in enumerate(self.replica.parameters()) if p.grad is not None}

    def _reduce(self, step: int, st: _FanInState, res: StepResult) -> float:
        ctl = {"kind": KIND_CONTROL, "step": step, "res": res, "compress": False}
        remote_source = self.source_index is not None and not self.local_source
        if remote_source:
            grads = self._replica_grads()
            bad = st.nonfinite or ("" if all(_all_finite(g) for g in grads.values()) else "non-finite gradients")
            up = tensorcodec.encode({k: torch.zeros_like(g) for k, g in grads.items()} if bad else grads,
                                    self.sync_codec)
            up["bad"] = torch.tensor(bool(bad))
            self._send(self.plan.hub, up, mb=SYNC_UP_BASE + self.source_index, **ctl)
        norm, coef, drop, reason = math.nan, 1.0, False, ""
        if self.trunk_index is not None:
            norm, coef, drop, reason = self._trunk_reduce(step, st, res, ctl)
        if remote_source:
            down = self._recv(KIND_CONTROL, step, SYNC_DOWN_MB, res)
            drop = bool(down["drop"])
            norm = float(down["norm"]) if bool(down["finite"]) else math.nan
            coef = float(down["coef"])
            reason = reason or (f"dropped by the hub (global gradient norm {norm:.4g})" if drop else "")
            if not drop:
                params = list(self.replica.parameters())
                summed = self.staging.to_device({f"p{i}": down[f"p{i}"] for i in range(len(params)) if f"p{i}" in down})
                for i, p in enumerate(params):
                    p.grad = summed[f"p{i}"].to(p.dtype).clone() if f"p{i}" in summed else None
        res.dropped, res.drop_reason = drop, reason
        self.loss_scale.update(math.isfinite(norm))
        if drop:
            return norm
        if coef != 1.0:
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
        return norm

    def _trunk_reduce(self, step: int, st: _FanInState, res: StepResult, ctl: dict) -> tuple[float, float, bool, str]:
        """The trunk's norm reduction (last stage -> hub, as in `StageRunner._clip`); the hub also sums the
        replicas' gradients, decides, and answers the sources. Returns (norm, clip coefficient, drop, reason)."""
        trunk_params = list(self.trunk_stage.parameters())
        partial = _sq_norm(trunk_params)
        bad = st.nonfinite or ("" if math.isfinite(float(partial)) else "non-finite gradients")
        scale = self.loss_scale.scale if self.is_last else 1.0     # the loss stage's scale rides up to the hub
        if not self.is_last:
            got = self._recv(KIND_CONTROL, step, NORM_MB, res)
            partial = partial + got["sq"]
            bad = bad or ("non-finite values in a downstream stage" if bool(got["bad"]) else "")
            if "scale" in got:
                scale = float(got["scale"])
        if not self.is_hub:
            prev = self.plan.trunk[self.trunk_index - 1].vehicle
            up = {"sq": partial if not bad else torch.zeros((), dtype=torch.float64), "bad": torch.tensor(bool(bad))}
            if scale != 1.0:
                up["scale"] = torch.tensor(scale, dtype=torch.float64)
            self._send(prev, up, mb=NORM_MB, **ctl)
            factor = self._recv(KIND_CONTROL, step, CLIP_MB, res)
            finite = bool(factor["finite"])
            norm = float(factor["norm"]) if finite else math.nan
            coef, drop = float(factor["coef"]), bool(factor["drop"])
            reason = f"dropped by the hub (global gradient norm {norm:.4g})" if drop else ""
        else:
            summed, bad = self._sum_replicas(step, res, bad)
            partial = partial + _sq_norm(summed.values())
            norm = math.nan if bad else math.sqrt(float(partial)) / scale
            reason = f"{bad} in the step" if bad else self._drop_reason(norm)
            drop = bool(reason)
            if not drop:
                self.good_norms.append(norm)
            clip = 1.0 if self.grad_clip is None else min(1.0, self.grad_clip / (norm + 1e-6))
            coef = 0.0 if drop else clip / scale
            verdict = {"norm": torch.tensor(norm if math.isfinite(norm) else 0.0, dtype=torch.float64),
                       "finite": torch.tensor(math.isfinite(norm)), "coef": torch.tensor(coef, dtype=torch.float64),
                       "drop": torch.tensor(drop)}
            down = verdict if drop else {**verdict, **tensorcodec.encode(summed, self.sync_codec)}
            for s in self.plan.sources:
                if s != self.vehicle:
                    self._send(s, down, mb=SYNC_DOWN_MB, **ctl)
        if not self.is_last:
            verdict = {"norm": torch.tensor(norm if math.isfinite(norm) else 0.0, dtype=torch.float64),
                       "finite": torch.tensor(math.isfinite(norm)), "coef": torch.tensor(coef, dtype=torch.float64),
                       "drop": torch.tensor(drop)}
            self._send(self.plan.trunk[self.trunk_index + 1].vehicle, verdict, mb=CLIP_MB, **ctl)
        return norm, coef, drop, reason

    def _sum_replicas(self, step: int, res: StepResult, bad: str) -> tuple[dict[str, Tensor], str]:
        """Hub: the replica gradients of every source summed (and written into the hub's own replica)."""
        summed: dict[str, Tensor] = {}
        if self.local_source:
            summed = {k: g.clone() for k, g in self._replica_grads().items()}
        for s, source in enumerate(self.plan.sources):
            if source == self.vehicle:
                continue
            got = self._recv(KIND_CONTROL, step, SYNC_UP_BASE + s, res)
            if bool(got.pop("bad")):
                bad = bad or f"non-finite gradients at source {source}"
            got = self.staging.to_device(got)
            for k, g in got.items():
                summed[k] = summed[k] + g if k in summed else g.clone()
        if not bad and not all(_all_finite(g) for g in summed.values()):
            bad = "non-finite replica gradients"
        if self.local_source and not bad:
            # what the sources will decode (identical with a lossy sync codec too); copies, because `summed` goes
            # out zero-copy and clipping scales these gradients in place
            applied = summed if self.sync_codec == "fp32" else \
                tensorcodec.decode(tensorcodec.encode(summed, self.sync_codec))
            for i, p in enumerate(self.replica.parameters()):
                p.grad = applied[f"p{i}"].clone() if f"p{i}" in applied else None
        return summed, bad

@dataclass
class _FanInState(_StepState):
    """`_StepState` (chunks, loss, the non-finite mark, in-flight counts) and the two roles' saved tensors."""

    source_saved: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    trunk_saved: dict[int, tuple[dict[str, Tensor], dict[str, Tensor]]] = field(default_factory=dict)


def _sq_norm(tensors) -> Tensor:
    """Squared L2 norm of the gradients of parameters (or of gradient tensors), as a float64 CPU scalar (it
    travels in a control frame)."""
    parts = []
    for t in tensors:
        g = t.grad if isinstance(t, nn.Parameter) else t
        if g is not None:
            parts.append(g.detach().double().pow(2).sum())
    return torch.stack(parts).sum().cpu() if parts else torch.zeros((), dtype=torch.float64)
