"""One pipeline stage's training step: micro-batched forward/backward over ZeroMQ links, then AdamW.

The runner executes its stage's op list (GPipe or 1F1B, see `schedule.py`). Forward inputs come from
the local batch (first stage: the data owner) or the upstream link; backward gradients come from the
local loss (last stage) or the downstream link. Each micro-batch's loss is scaled by its share of the
batch, so the accumulated gradients equal those of one whole-batch step. Gradient clipping uses the
global norm across all stages (partial sums travel upstream, the clip factor travels back down), so
a pipelined step equals a single-process step, clipping included.

The same reduction guards the step (with or without clipping): if the global norm is NaN/inf, or above
an explosion bound, the first stage -- the only one that knows the whole norm -- sends a drop decision
down with the clip factor, and every stage zeroes its gradients and skips its optimizer step, so weights
and optimizer state stay as they were (`StepResult.dropped`). One stage with NaN (or blown-up) gradients
thus costs the pipeline one step instead of poisoning every stage's weights.

Labels-forward (default): labels travel with the activations to the last stage, which computes the loss
(the documented trade-off: labels, unlike raw sensor data, leave the data owner). U-shaped (`ushape.py`):
the data owner also holds the heads and the loss; the last trunk stage returns its features to it, so
labels never leave it either. Raw sensor tensors never leave in either mode: the first stage consumes
them, and only its outputs are sent.

Each stage runs on its own device (`device`: cpu, cuda[:N], auto; `placement.py`) in its own training precision
(`precision`: fp32, or bf16/fp16 autocast): its modules, optimizer state and batch live there; frames stay CPU
tensors, leaving through host staging buffers and entering through them (`flad_core.device.HostStaging`). Under
autocast an activation is sent in the dtype autocast gave it (bf16 stays bf16 on the wire, as it would flow in one
process), and a gradient received for it is cast to that activation's dtype before backward.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from flad_core import tensorframe
from flad_core.device import HostStaging, autocast, check_precision, resolve_device, synchronize, to_device
from flad_core.emulation import ComputeDilation, MemoryGuard
from flad_vehicle.fhdp.links import KIND_CONTROL, Inbox, OutLink, StepAbortedError
from flad_vehicle.fhdp.placement import DeviceMemoryGuard, LossScale, move_optimizer_state
from flad_vehicle.fhdp.schedule import Schedule, stage_ops
from flad_vehicle.fhdp.ushape import HeadPart

log = logging.getLogger(__name__)

BATCH_KEY = "__batch"          # int64 scalar: the whole batch's size, for loss scaling at the last stage
NORM_MB = 2**32 - 1            # micro-batch index of the gradient-norm reduction frames
CLIP_MB = 2**32 - 2            # micro-batch index of the clip-factor broadcast frames

# The explosion bound (a step whose global gradient norm exceeds it is dropped, like a NaN one):
#: absolute: a float32 model whose gradient norm is above this is numerically broken at any learning rate
MAX_GRAD_NORM = 1e6
#: relative: more than this x the median norm of the recent good steps. Honest steps vary by a small factor
#: step to step (and clipping tames those spikes); a stage sending scaled or garbage gradients is off by
#: orders of magnitude. Applied once NORM_HISTORY_MIN good steps are known (early norms fall fast); the history
#: is the first stage's runner's, i.e. one pipeline assignment's, so short assignments rely on the absolute bound.
EXPLODE_FACTOR = 100.0
NORM_HISTORY = 32
NORM_HISTORY_MIN = 8


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
    dropped: bool = False              # the step's gradients were non-finite or exploded: no stage applied them
    drop_reason: str = ""
    device: str = ""                   # where this stage ran (cpu, cuda:0, ...)
    precision: str = ""                # fp32, bf16 or fp16
    extra: dict = field(default_factory=dict)


class StepRunner:
    """What every runner of a pipelined step shares: timed compute (dilated to the emulated device), inbox waits,
    wire tensors as autograd leaves, finite-only sends, the step guard's verdict, and applying or discarding the
    step; where the stage runs (`_place`): its device, precision, host staging and loss scale. Subclasses set the
    attributes used here and define `parameters()`."""

    device: torch.device = torch.device("cpu")
    precision: str = "fp32"
    staging: HostStaging
    loss_scale: LossScale
    dilation: ComputeDilation | None
    memory: MemoryGuard | DeviceMemoryGuard | None
    inbox: Inbox
    timeout_s: float
    abort: threading.Event | None
    label_names: set[str]
    optimizer: torch.optim.Optimizer | None
    max_grad_norm: float | None
    explode_factor: float | None
    good_norms: deque[float]

    def parameters(self) -> list[Tensor]:
        raise NotImplementedError

    def _place(self, modules: Iterable[nn.Module | None], device: str | torch.device, precision: str,
               staging: HostStaging | None, loss_scale: LossScale | None) -> None:
        """Put `modules` and the optimizer's state on `device` (a bad device or precision raises
        `flad_core.device.DeviceError`, naming the choices), and set up the host staging and the loss scale."""
        self.device = resolve_device(device)
        self.precision = check_precision(precision)
        for module in modules:
            if module is not None:
                module.to(self.device)
        if self.optimizer is not None:
            # moving a module keeps its Parameter objects (their data moves), except between incompatible tensor
            # kinds (to meta), where it makes new ones: an optimizer built before then no longer sees the stage
            elsewhere = {str(p.device) for g in self.optimizer.param_groups for p in g["params"]
                         if p.device.type != self.device.type}
            if elsewhere:
                raise ValueError(f"the optimizer holds parameters on {', '.join(sorted(elsewhere))}, the stage runs "
                                 f"on {self.device}: build it over the stage once the stage is there")
        move_optimizer_state(self.optimizer)
        if staging is not None and staging.device.type != self.device.type:
            raise ValueError(f"host staging for {staging.device} given to a stage on {self.device}")
        self.staging = staging if staging is not None else HostStaging(self.device)
        self.loss_scale = loss_scale if loss_scale is not None else LossScale(self.device, self.precision)

    def _new_result(self, step: int) -> StepResult:
        return StepResult(step, device=str(self.device), precision=self.precision)

    def _autocast(self) -> AbstractContextManager:
        """The forward's mixed-precision context (nothing for fp32)."""
        return autocast(self.device, self.precision)

    def _on_device(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return to_device(batch, self.device)

    def _loss_for_backward(self, loss: Tensor) -> Tensor:
        """The loss times the pipeline's loss scale (fp16 on CUDA; the loss itself otherwise)."""
        return loss if self.loss_scale.scale == 1.0 else loss * self.loss_scale.scale

    def _check_memory(self) -> None:
        if self.memory is not None:
            self.memory.check()

    def _compute(self, fn: Callable[[], object], res: StepResult) -> object:
        t0 = time.perf_counter()
        out = fn()
        synchronize(self.device)     # CUDA runs kernels asynchronously: time the work, not its launch
        dt = time.perf_counter() - t0
        res.compute_s += dt
        res.emulated_compute_s += self.dilation.stretch(dt) if self.dilation else dt
        return out

    def _recv(self, kind: int, step: int, mb: int, res: StepResult) -> dict[str, Tensor]:
        t0 = time.perf_counter()
        _, tensors = self.inbox.get(kind, step, mb, self.timeout_s, abort=self.abort)
        res.wait_s += time.perf_counter() - t0
        return tensors

    def _send_frames(self, link: OutLink, tensors: Mapping[str, Tensor], *, kind: int, step: int, mb: int,
                     compress: bool = True) -> int:
        """Send tensors from this stage's device as a CPU frame, through the host staging buffers. A frame that
        aliases those buffers is copied as it is sent: ZeroMQ would otherwise read it later, from its own thread,
        after the next `to_host` may have refilled them."""
        before = self.staging.copies
        host = self.staging.to_host(tensors)
        copy = {"copy": True} if self.staging.copies != before else {}
        return link.send(host, kind=kind, step=step, micro_batch=mb, compress=compress, abort=self.abort, **copy)

    @staticmethod
    def _grad_pairs(outputs: Mapping[str, Tensor], grads: Mapping[str, Tensor]) -> list[tuple[Tensor, Tensor]]:
        """(output, gradient) pairs for backward. Each gradient takes its output's dtype: a neighbour in another
        precision, or a codec, may deliver an fp32 gradient for a bf16 activation (or the reverse)."""
        pairs = []
        for k, g in grads.items():
            out = outputs.get(k)
            if out is not None and out.requires_grad:
                pairs.append((out, g if g.dtype == out.dtype else g.to(out.dtype)))
        return pairs

    def _received(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Tensors off the wire as leaves; float activations collect gradients, labels do not."""
        out = {}
        for k, t in tensors.items():
            t = t.detach()
            out[k] = t.requires_grad_(True) if t.is_floating_point() and k not in self.label_names else t
        return out

    @staticmethod
    def _finite(tensors: dict[str, Tensor], st: _StepState) -> dict[str, Tensor]:
        """What may be sent: a peer's inbox refuses NaN/inf frames (it would wait out its link timeout), so
        non-finite values go as zeros and the step is marked bad -- the step guard then drops it everywhere."""
        bad = [k for k, t in tensors.items() if t.is_floating_point() and not _all_finite(t)]
        if not bad:
            return tensors
        st.nonfinite = st.nonfinite or f"non-finite values in {', '.join(sorted(bad))}"
        return {k: torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0) if k in bad else t for k, t in tensors.items()}

    @staticmethod
    def _grads_to_send(inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: t.grad for k, t in inputs.items() if isinstance(t, Tensor) and t.grad is not None}

    def _drop_reason(self, norm: float) -> str:
        """The deciding runner: why a step with global gradient norm `norm` must not be applied ("" if it may)."""
        if not math.isfinite(norm):
            return f"non-finite gradient norm {norm}"
        if self.max_grad_norm is not None and norm > self.max_grad_norm:
            return f"gradient norm {norm:.4g} above the bound {self.max_grad_norm:g}"
        if self.explode_factor is not None and len(self.good_norms) >= NORM_HISTORY_MIN:
            median = sorted(self.good_norms)[(len(self.good_norms) - 1) // 2]
            if norm > self.explode_factor * median:
                return f"gradient norm {norm:.4g} above {self.explode_factor:g} x the recent median {median:.4g}"
        return ""

    def discard_partial_step(self) -> None:
        """After an abort or a dropped step: drop the gradients, so the weights (and the optimizer state) stay
        as of the last completed step."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        for p in self.parameters():
            p.grad = None

    def _optimizer_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _apply_step(self, step: int, st: _StepState, res: StepResult, owns_loss: bool, t_start: float,
                    who: str) -> StepResult:
        """After the reduction: apply the step (or discard it when the guard dropped it), and finish `res`."""
        if self.abort is not None and self.abort.is_set():
            raise StepAbortedError(f"step {step} aborted before its optimizer step")
        if res.dropped:
            self.discard_partial_step()
            log.warning("%s: step %d dropped, not applied: %s", who, step, res.drop_reason)
        elif self.optimizer is not None:
            self._compute(self._optimizer_step, res)
        if owns_loss:
            res.loss = st.loss_total
        res.wall_s = time.perf_counter() - t_start
        return res


class StageRunner(StepRunner):
    """Runs training steps for one stage of one pipeline.

    Labels-forward (default): the last stage computes the loss. U-shaped (`u_shaped=True`): no trunk stage
    computes it; the first stage also gets `head` (the heads and the loss, see `ushape.py`) and a `turn`
    link to the last trunk stage, which gets a `turn` link back to the first. The schedule is that of a
    pipeline with one more (virtual) stage, the heads, which the first stage runs on its own thread of ops.

    `device` (default cpu; auto picks CUDA when present) is where the stage, the heads and the optimizer state are
    moved and the step runs; `precision` is fp32, bf16 or fp16 (autocast; fp16 with the pipeline's `loss_scale`,
    which the loss-owning stage holds); `staging` carries the frames between the device and the wire (default: a
    `HostStaging` for `device`).
    """

    def __init__(self, stage, index: int, n_stages: int, *, inbox: Inbox, prev: OutLink | None,
                 next: OutLink | None, optimizer: torch.optim.Optimizer | None, schedule: Schedule = "1f1b",
                 n_micro: int = 4, grad_clip: float | None = None, label_names: Collection[str] = (),
                 dilation: ComputeDilation | None = None, memory: MemoryGuard | DeviceMemoryGuard | None = None,
                 timeout_s: float = 60.0, loss_key: str = "loss", abort: threading.Event | None = None,
                 u_shaped: bool = False, head: HeadPart | None = None, turn: OutLink | None = None,
                 max_grad_norm: float | None = MAX_GRAD_NORM, explode_factor: float | None = EXPLODE_FACTOR,
                 device: str | torch.device = "cpu", precision: str = "fp32", staging: HostStaging | None = None,
                 loss_scale: LossScale | None = None) -> None:
        if (index == 0) != (prev is None) or (index == n_stages - 1) != (next is None):
            raise ValueError("the first stage has no upstream link and the last no downstream link")
        if u_shaped:
            if n_stages < 2:
                raise ValueError("a U-shaped pipeline needs at least two stages")
            if (index == 0) != (head is not None):
                raise ValueError("in a U-shaped pipeline exactly the first stage holds the heads")
            if (index in (0, n_stages - 1)) != (turn is not None):
                raise ValueError("in a U-shaped pipeline the first and the last stage need the turnaround link")
        elif head is not None or turn is not None:
            raise ValueError("heads and a turnaround link belong to U-shaped pipelines only")
        self.stage, self.index, self.n_stages = stage, index, n_stages
        self.inbox, self.prev, self.next = inbox, prev, next
        self.u_shaped, self.head, self.turn = u_shaped, head, turn
        self.optimizer = optimizer
        n_virtual = n_stages + 1 if u_shaped else n_stages
        self.ops = stage_ops(schedule, n_virtual, index, n_micro)
        self.head_ops = stage_ops(schedule, n_virtual, n_stages, n_micro) if head is not None else []
        self.n_micro = n_micro
        self.grad_clip = grad_clip
        # the step guard (module docstring); only the first stage's settings and history decide
        self.max_grad_norm, self.explode_factor = max_grad_norm, explode_factor
        self.good_norms: deque[float] = deque(maxlen=NORM_HISTORY)
        self.label_names = set(label_names)
        self.dilation, self.memory = dilation, memory
        self.timeout_s = timeout_s
        self.loss_key = loss_key
        self.abort = abort   # set by the edge when a member left: blocked waits end with StepAbortedError
        # what the forward sends downstream (a U-shaped first stage keeps its head-only tensors home)
        self.send_names = tuple(head.first_sends) if head is not None else None   # None: every output
        self._place([stage, head.stage if head is not None else None], device, precision, staging, loss_scale)

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.n_stages - 1

    @property
    def owns_loss(self) -> bool:
        """This stage computes the loss: the last stage, or the data owner of a U-shaped pipeline."""
        return self.head is not None if self.u_shaped else self.is_last

    def parameters(self) -> list[Tensor]:
        """Every parameter this stage trains (a U-shaped first stage: its trunk layers and the heads)."""
        params = list(self.stage.parameters())
        if self.head is not None:
            params += list(self.head.parameters())
        return params

    @property
    def batch_inputs(self) -> tuple[str, ...]:
        """The batch fields the first stage must be given (a U-shaped one also needs the labels)."""
        names = tuple(self.stage.inputs)
        if self.head is not None:
            names += tuple(n for n in self.head.from_batch if n not in names)
        return names

    def _needs(self, part: str, kind: str, m: int, step: int) -> tuple[int, int, int] | None:
        """The frame an op waits for: (frame kind, step, micro-batch), or None when it needs no frame."""
        if part == "H":      # heads: F takes the turnaround features, B starts from the local loss
            return (tensorframe.KIND_ACTIVATION, step, m) if kind == "F" else None
        if kind == "F":
            return None if self.is_first else (tensorframe.KIND_ACTIVATION, step, m)
        return None if (self.owns_loss and self.head is None) else (tensorframe.KIND_GRADIENT, step, m)

    # -- one step -----------------------------------------------------------------------------------
    def run_step(self, step: int, batch: Mapping[str, Tensor] | None = None) -> StepResult:
        """Run one training step. The first stage passes its batch (its stage inputs, labels included)."""
        res = self._new_result(step)
        t_start = time.perf_counter()
        st = _StepState()
        if self.is_first:
            if batch is None:
                raise ValueError("the first stage needs the batch")
            needed = set(self.batch_inputs)
            missing = needed - set(batch)
            if missing:
                raise ValueError(f"batch lacks stage inputs {sorted(missing)}")
            st.batch_size = int(next(iter(batch.values())).shape[0])
            if st.batch_size < self.n_micro:
                raise ValueError(f"batch of {st.batch_size} cannot be split into {self.n_micro} micro-batches")
            batch = self._on_device({k: batch[k] for k in sorted(needed)})
            st.chunks = {k: torch.tensor_split(batch[k], self.n_micro) for k in sorted(needed)}
        queues = [("H", deque(self.head_ops)), ("T", deque(self.ops))] if self.head is not None \
            else [("T", deque(self.ops))]
        run = {("T", "F"): self._trunk_forward, ("T", "B"): self._trunk_backward,
               ("H", "F"): self._head_forward, ("H", "B"): self._head_backward}
        while any(q for _, q in queues):
            waiting = []
            for part, q in queues:
                if not q:
                    continue
                kind, m = q[0]
                if part == "T" and kind == "B" and self.head is not None and m not in st.kept_grads:
                    continue     # the data owner's trunk backward needs its heads' backward of m first
                key = self._needs(part, kind, m, step)
                if key is None or self.inbox.has(*key):
                    q.popleft()
                    run[(part, kind)](step, m, st, res)
                    break
                waiting.append(key)
            else:
                if not waiting:
                    raise RuntimeError(f"stage {self.index}: schedule deadlock at step {step}")
                t0 = time.perf_counter()
                self.inbox.wait_any(waiting, self.timeout_s, abort=self.abort)
                res.wait_s += time.perf_counter() - t0
        res.peak_in_flight = st.peak_in_flight
        res.grad_norm = self._clip(step, st, res)
        return self._apply_step(step, st, res, self.owns_loss, t_start, f"stage {self.index}")

    def _trunk_forward(self, step: int, m: int, st: _StepState, res: StepResult) -> None:
        if self.is_first:
            inputs = {k: st.chunks[k][m] for k in self.stage.inputs}
            total = st.batch_size
        else:
            wire = self._recv(tensorframe.KIND_ACTIVATION, step, m, res)
            bk = wire.pop(BATCH_KEY, None)
            total = int(bk) if bk is not None else None
            inputs = self._received(self.staging.to_device(wire))
        with torch.enable_grad(), self._autocast():
            outputs = self._compute(lambda inputs=inputs: self.stage(inputs), res)
        if self.owns_loss and self.head is None:
            if total is None:
                raise ValueError("the loss stage got no batch size with its activations")
            scaled = outputs[self.loss_key] * (_batch_dim(inputs) / total)
            st.loss_total += float(scaled.detach())
            outputs = {self.loss_key: scaled}
        elif self.u_shaped and self.is_last:
            # the turnaround: the trunk's features go back to the data owner, which holds heads and labels
            res.bytes_sent += self._send_frames(self.turn, self._finite(dict(outputs), st),
                                                kind=tensorframe.KIND_ACTIVATION, step=step, mb=m)
        else:
            send = dict(outputs) if self.send_names is None else {k: outputs[k] for k in self.send_names}
            if not self.u_shaped:
                send[BATCH_KEY] = torch.tensor(total, dtype=torch.int64)
            res.bytes_sent += self._send_frames(self.next, self._finite(send, st), kind=tensorframe.KIND_ACTIVATION,
                                                step=step, mb=m)
        st.saved[m] = (inputs, outputs)
        st.in_flight += 1
        st.peak_in_flight = max(st.peak_in_flight, st.in_flight)
        self._check_memory()

    def _trunk_backward(self, step: int, m: int, st: _StepState, res: StepResult) -> None:
        inputs, outputs = st.saved.pop(m)
        if self.owns_loss and self.head is None:
            self._compute(lambda o=outputs: torch.autograd.backward([self._loss_for_backward(o[self.loss_key])]), res)
        else:
            grads = self.staging.to_device(self._recv(tensorframe.KIND_GRADIENT, step, m, res))
            if self.head is not None:
                # a tensor both sent down the trunk and read by the heads gets both gradients
                for k, g in st.kept_grads.pop(m).items():
                    grads[k] = grads[k] + g if k in grads else g
            pairs = self._grad_pairs(outputs, grads)
            if pairs:
                self._compute(lambda p=pairs: torch.autograd.backward([a for a, _ in p], [g for _, g in p]), res)
        if not self.is_first:
            res.bytes_sent += self._send_frames(self.prev, self._finite(self._grads_to_send(inputs), st),
                                                kind=tensorframe.KIND_GRADIENT, step=step, mb=m)
        st.in_flight -= 1

    def _head_forward(self, step: int, m: int, st: _StepState, res: StepResult) -> None:
        turned = self._received(self.staging.to_device(self._recv(tensorframe.KIND_ACTIVATION, step, m, res)))
        _, trunk_out = st.saved[m]
        kept = {k: trunk_out[k].detach().requires_grad_(trunk_out[k].is_floating_point()) for k in self.head.kept}
        local = {k: st.chunks[k][m] for k in self.head.from_batch}
        with torch.enable_grad(), self._autocast():
            out = self._compute(lambda: self.head.stage({**local, **kept, **turned}), res)
        mb_size = int(st.chunks[self.stage.inputs[0]][m].shape[0])
        scaled = out[self.loss_key] * (mb_size / st.batch_size)
        st.loss_total += float(scaled.detach())
        st.head_saved[m] = (kept, turned, scaled)

    def _head_backward(self, step: int, m: int, st: _StepState, res: StepResult) -> None:
        kept, turned, scaled = st.head_saved.pop(m)
        self._compute(lambda: torch.autograd.backward([self._loss_for_backward(scaled)]), res)
        res.bytes_sent += self._send_frames(self.turn, self._finite(self._grads_to_send(turned), st),
                                            kind=tensorframe.KIND_GRADIENT, step=step, mb=m)
        st.kept_grads[m] = self._grads_to_send(kept)

    def _local_sq_norm(self) -> Tensor:
        """This stage's squared gradient norm, as a float64 CPU scalar (it travels in a control frame)."""
        grads = [p.grad.detach().double().pow(2).sum() for p in self.parameters() if p.grad is not None]
        return torch.stack(grads).sum().cpu() if grads else torch.zeros((), dtype=torch.float64)

    def _clip(self, step: int, st: _StepState, res: StepResult) -> float:
        """Global-norm gradient clipping across the pipeline (same result as clip_grad_norm_ on the whole model),
        and the step guard: the first stage decides whether the step is dropped, every stage learns it here.

        Frames must be finite (the inbox refuses NaN/inf), so a non-finite partial norm travels upstream as a
        `bad` flag, and a non-finite global norm downstream as `finite` = false.

        With a loss scale (fp16, `placement.py`) every gradient is the scale times the true one: the loss stage's
        scale travels upstream with the partial norms (`scale`, only when not 1), the first stage unscales the norm
        and sends down `coef` / scale, which every stage multiplies its gradients by."""
        partial = self._local_sq_norm()
        bad = st.nonfinite or ("" if math.isfinite(float(partial)) else "non-finite gradients")
        scale = self.loss_scale.scale if self.owns_loss else 1.0
        if not self.is_last:
            got = self._recv(KIND_CONTROL, step, NORM_MB, res)
            partial = partial + got["sq"]
            bad = bad or ("non-finite values in a downstream stage" if "bad" in got and bool(got["bad"]) else "")
            if "scale" in got:
                scale = float(got["scale"])
        if not self.is_first:
            up = {"sq": partial if not bad else torch.zeros((), dtype=torch.float64), "bad": torch.tensor(bool(bad))}
            if scale != 1.0:
                up["scale"] = torch.tensor(scale, dtype=torch.float64)
            self.prev.send(up, kind=KIND_CONTROL, step=step, micro_batch=NORM_MB, compress=False, abort=self.abort)
            factor = self._recv(KIND_CONTROL, step, CLIP_MB, res)
            finite = "finite" not in factor or bool(factor["finite"])
            norm, coef = float(factor["norm"]) if finite else math.nan, float(factor["coef"])
            drop = "drop" in factor and bool(factor["drop"])
            reason = f"dropped by the first stage (global gradient norm {norm:.4g})" if drop else ""
        else:
            norm = math.nan if bad else math.sqrt(float(partial)) / scale
            reason = f"{bad} in the step" if bad else self._drop_reason(norm)
            drop = bool(reason)
            if not drop:
                self.good_norms.append(norm)
            clip = 1.0 if self.grad_clip is None else min(1.0, self.grad_clip / (norm + 1e-6))
            coef = 0.0 if drop else clip / scale
        if not self.is_last:
            self.next.send({"norm": torch.tensor(norm if math.isfinite(norm) else 0.0, dtype=torch.float64),
                            "finite": torch.tensor(math.isfinite(norm)),
                            "coef": torch.tensor(coef, dtype=torch.float64),
                            "drop": torch.tensor(drop)},
                           kind=KIND_CONTROL, step=step, micro_batch=CLIP_MB, compress=False, abort=self.abort)
        res.dropped, res.drop_reason = drop, reason
        self.loss_scale.update(math.isfinite(norm))
        if drop:
            return norm
        if coef != 1.0:
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
        return norm


@dataclass
class _StepState:
    """Per-step bookkeeping shared by a stage's op handlers."""

    batch_size: int = 0
    chunks: dict[str, tuple[Tensor, ...]] = field(default_factory=dict)
    saved: dict[int, tuple[dict, dict]] = field(default_factory=dict)
    head_saved: dict[int, tuple[dict, dict, Tensor]] = field(default_factory=dict)
    kept_grads: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    loss_total: float = 0.0
    nonfinite: str = ""          # set when this stage had to zero NaN/inf values out of what it sent
    in_flight: int = 0
    peak_in_flight: int = 0


def _all_finite(t: Tensor) -> bool:
    """No NaN/inf in `t`: a finite sum proves it cheaply; only a non-finite sum pays for the exact check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _batch_dim(tensors: Mapping[str, Tensor]) -> int:
    for t in tensors.values():
        if isinstance(t, Tensor) and t.dim() > 0:
            return int(t.shape[0])
    raise ValueError("cannot tell the micro-batch size: no batched tensor among the stage inputs")
