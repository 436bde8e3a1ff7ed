"""One pipeline stage's training step: micro-batched forward/backward over ZeroMQ links, then AdamW.

The runner executes its stage's op list (GPipe or 1F1B, see `schedule.py`). Forward inputs come from
the local batch (first stage: the data owner) or the upstream link; backward gradients come from the
local loss (last stage) or the downstream link. Each micro-batch's loss is scaled by its share of the
batch, so the accumulated gradients equal those of one whole-batch step. Gradient clipping uses the
global norm across all stages (partial sums travel upstream, the clip factor travels back down), so
a pipelined step equals a single-process step, clipping included.

Labels travel with the activations to the last stage, which computes the loss (the documented
trade-off: labels, unlike raw sensor data, leave the data owner). Raw sensor tensors never do: the
first stage consumes them, and only its outputs are sent.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from flad_core import tensorframe
from flad_core.emulation import ComputeDilation, MemoryGuard

from .links import KIND_CONTROL, Inbox, OutLink, StepAbortedError
from .schedule import Schedule, stage_ops

log = logging.getLogger(__name__)

BATCH_KEY = "__batch"          # int64 scalar: the whole batch's size, for loss scaling at the last stage
NORM_MB = 2**32 - 1            # micro-batch index of the gradient-norm reduction frames
CLIP_MB = 2**32 - 2            # micro-batch index of the clip-factor broadcast frames


@dataclass
class StepResult:
    step: int
    loss: float | None = None          # whole-batch loss (last stage only)
    grad_norm: float | None = None     # global norm before clipping
    compute_s: float = 0.0             # measured compute on this host
    emulated_compute_s: float = 0.0    # after dilation to the emulated device
    wait_s: float = 0.0                # blocked on the inbox
    wall_s: float = 0.0
    bytes_sent: int = 0
    peak_in_flight: int = 0
    extra: dict = field(default_factory=dict)


class StageRunner:
    """Runs training steps for one stage of one pipeline."""

    def __init__(self, stage, index: int, n_stages: int, *, inbox: Inbox, prev: OutLink | None,
                 next: OutLink | None, optimizer: torch.optim.Optimizer | None, schedule: Schedule = "1f1b",
                 n_micro: int = 4, grad_clip: float | None = None, label_names: Collection[str] = (),
                 dilation: ComputeDilation | None = None, memory: MemoryGuard | None = None,
                 timeout_s: float = 60.0, loss_key: str = "loss", abort: threading.Event | None = None) -> None:
        if (index == 0) != (prev is None) or (index == n_stages - 1) != (next is None):
            raise ValueError("the first stage has no upstream link and the last no downstream link")
        self.stage, self.index, self.n_stages = stage, index, n_stages
        self.inbox, self.prev, self.next = inbox, prev, next
        self.optimizer = optimizer
        self.ops = stage_ops(schedule, n_stages, index, n_micro)
        self.n_micro = n_micro
        self.grad_clip = grad_clip
        self.label_names = set(label_names)
        self.dilation, self.memory = dilation, memory
        self.timeout_s = timeout_s
        self.loss_key = loss_key
        self.abort = abort   # set by the edge when a member left: blocked waits end with StepAbortedError

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.n_stages - 1

    # -- helpers ------------------------------------------------------------------------------------
    def _compute(self, fn: Callable[[], object], res: StepResult) -> object:
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        res.compute_s += dt
        res.emulated_compute_s += self.dilation.stretch(dt) if self.dilation else dt
        return out

    def _recv(self, kind: int, step: int, mb: int, res: StepResult) -> dict[str, Tensor]:
        t0 = time.perf_counter()
        _, tensors = self.inbox.get(kind, step, mb, self.timeout_s, abort=self.abort)
        res.wait_s += time.perf_counter() - t0
        return tensors

    def _received(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Tensors off the wire as leaves; float activations collect gradients, labels do not."""
        out = {}
        for k, t in tensors.items():
            t = t.detach()
            out[k] = t.requires_grad_(True) if t.is_floating_point() and k not in self.label_names else t
        return out

    @staticmethod
    def _grads_to_send(inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: t.grad for k, t in inputs.items() if isinstance(t, Tensor) and t.grad is not None}

    # -- one step -----------------------------------------------------------------------------------
    def run_step(self, step: int, batch: Mapping[str, Tensor] | None = None) -> StepResult:
        """Run one training step. The first stage passes its batch (its stage inputs, labels included)."""
        res = StepResult(step)
        t_start = time.perf_counter()
        if self.is_first:
            if batch is None:
                raise ValueError("the first stage needs the batch")
            missing = set(self.stage.inputs) - set(batch)
            if missing:
                raise ValueError(f"batch lacks stage inputs {sorted(missing)}")
            batch_size = int(next(iter(batch.values())).shape[0])
            if batch_size < self.n_micro:
                raise ValueError(f"batch of {batch_size} cannot be split into {self.n_micro} micro-batches")
            chunks = {k: torch.tensor_split(batch[k], self.n_micro) for k in self.stage.inputs}
        saved: dict[int, tuple[dict, dict]] = {}
        loss_total = 0.0
        in_flight = 0
        for kind, m in self.ops:
            if kind == "F":
                if self.is_first:
                    inputs = {k: chunks[k][m] for k in self.stage.inputs}
                    total = batch_size
                else:
                    wire = self._recv(tensorframe.KIND_ACTIVATION, step, m, res)
                    total = int(wire.pop(BATCH_KEY))
                    inputs = self._received(wire)
                with torch.enable_grad():
                    outputs = self._compute(lambda inputs=inputs: self.stage(inputs), res)
                if self.is_last:
                    mb_size = _batch_dim(inputs)
                    scaled = outputs[self.loss_key] * (mb_size / total)
                    loss_total += float(scaled.detach())
                    outputs = {self.loss_key: scaled}
                else:
                    send = dict(outputs)
                    send[BATCH_KEY] = torch.tensor(total, dtype=torch.int64)
                    res.bytes_sent += self.next.send(send, kind=tensorframe.KIND_ACTIVATION, step=step,
                                                     micro_batch=m, abort=self.abort)
                saved[m] = (inputs, outputs)
                in_flight += 1
                res.peak_in_flight = max(res.peak_in_flight, in_flight)
                if self.memory is not None:
                    self.memory.check()
            else:
                inputs, outputs = saved.pop(m)
                if self.is_last:
                    self._compute(lambda o=outputs: torch.autograd.backward([o[self.loss_key]]), res)
                else:
                    grads = self._recv(tensorframe.KIND_GRADIENT, step, m, res)
                    pairs = [(outputs[k], g) for k, g in grads.items() if k in outputs and outputs[k].requires_grad]
                    if pairs:
                        self._compute(lambda p=pairs: torch.autograd.backward([a for a, _ in p],
                                                                              [g for _, g in p]), res)
                if not self.is_first:
                    res.bytes_sent += self.prev.send(self._grads_to_send(inputs), kind=tensorframe.KIND_GRADIENT,
                                                     step=step, micro_batch=m, abort=self.abort)
                in_flight -= 1
        if self.grad_clip is not None:
            res.grad_norm = self._clip(step, res)
        if self.abort is not None and self.abort.is_set():
            raise StepAbortedError(f"step {step} aborted before its optimizer step")
        if self.optimizer is not None:
            self._compute(self._optimizer_step, res)
        if self.is_last:
            res.loss = loss_total
        res.wall_s = time.perf_counter() - t_start
        return res

    def discard_partial_step(self) -> None:
        """After an abort: drop the partial gradients, so the weights stay as of the last completed step."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        for p in self.stage.parameters():
            p.grad = None

    def _optimizer_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _local_sq_norm(self) -> Tensor:
        grads = [p.grad.detach().double().pow(2).sum() for p in self.stage.parameters() if p.grad is not None]
        return torch.stack(grads).sum() if grads else torch.zeros((), dtype=torch.float64)

    def _clip(self, step: int, res: StepResult) -> float:
        """Global-norm gradient clipping across the pipeline (same result as clip_grad_norm_ on the whole model)."""
        partial = self._local_sq_norm()
        if not self.is_last:
            partial = partial + self._recv(KIND_CONTROL, step, NORM_MB, res)["sq"]
        if not self.is_first:
            self.prev.send({"sq": partial}, kind=KIND_CONTROL, step=step, micro_batch=NORM_MB, compress=False,
                           abort=self.abort)
            factor = self._recv(KIND_CONTROL, step, CLIP_MB, res)
            norm, coef = float(factor["norm"]), float(factor["coef"])
        else:
            norm = math.sqrt(float(partial))
            coef = min(1.0, self.grad_clip / (norm + 1e-6))
        if not self.is_last:
            self.next.send({"norm": torch.tensor(norm, dtype=torch.float64),
                            "coef": torch.tensor(coef, dtype=torch.float64)},
                           kind=KIND_CONTROL, step=step, micro_batch=CLIP_MB, compress=False, abort=self.abort)
        if coef < 1.0:
            for p in self.stage.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
        return norm


def _batch_dim(tensors: Mapping[str, Tensor]) -> int:
    for t in tensors.values():
        if isinstance(t, Tensor) and t.dim() > 0:
            return int(t.shape[0])
    raise ValueError("cannot tell the micro-batch size: no batched tensor among the stage inputs")
