"""Peer baseline (d) of `flad bench pipeline`: `torch.distributed.pipelining` on the same partition.

Three real processes (spawned, one torch thread each) form a gloo process group on loopback; each wraps its
FHDP stage (dict in, dict out) into a tensor-tuple module with a fixed input/output order and runs
`Schedule1F1B` / `ScheduleGPipe` with the same micro-batches, AdamW parameter groups and global-norm clipping
(an all-reduce of squared norms) as FHDP. For a fair comparison the same emulation applies:

* compute dilation: each stage's forward and backward run inside one autograd function whose forward and
  backward time themselves and sleep to the profile's speed (`ComputeDilation`, same host reference);
* link shaping: after a forward (backward) the stage blocks for its output activations' (input gradients')
  bytes at its profile's link rate (`TokenBucket`, like `OutLink.send` blocks the FHDP sender) under the same
  link setting. With `--radio device` (the bench's default, as FHDP's) a rank has one bucket for everything
  it sends and receives, half duplex: it also blocks for the activations (gradients) it received before its
  forward (backward), as FHDP's inbox takes received frames through its vehicle's radio; with `--radio link`
  one bucket per neighbour, as FHDP has one per `OutLink`.

Differences, stated rather than hidden: the labels do not travel through the pipeline here (the last rank
reads them from the same seeded batch stream as `target`), so torch sends fewer bytes; the loss layer runs in
the schedule's `loss_fn`, undilated (it has no parameters and costs microseconds).
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flad_vehicle.fhdp.pipeline import Pipeline

log = logging.getLogger(__name__)


def _tensor_bytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _make_dilated_fn():
    import torch

    class DilatedStage(torch.autograd.Function):
        """Runs `body` on detached leaves under grad; times and dilates forward and backward separately."""

        @staticmethod
        def forward(ctx, emu, dummy, *inputs):
            leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
            if emu.inbound and emu.send_backward and emu.enabled:     # received from the previous rank
                emu.bucket_prev.consume(_tensor_bytes(inputs))
            t0 = time.perf_counter()
            with torch.enable_grad():
                outs = emu.body(*leaves)
            emu.stretch(time.perf_counter() - t0)
            if emu.send_forward and emu.enabled:
                emu.bucket_next.consume(_tensor_bytes(outs))
            ctx.emu, ctx.leaves, ctx.outs = emu, leaves, outs
            ret = tuple(o.detach() for o in outs)
            ctx.mark_non_differentiable(*[o for o in ret if not o.is_floating_point()])
            return ret

        @staticmethod
        def backward(ctx, *grads):
            emu = ctx.emu
            pairs = [(o, g) for o, g in zip(ctx.outs, grads, strict=True) if g is not None and o.requires_grad]
            if emu.inbound and emu.send_forward and emu.enabled:      # received from the next rank
                emu.bucket_next.consume(_tensor_bytes([g for _, g in pairs]))
            t0 = time.perf_counter()
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            emu.stretch(time.perf_counter() - t0)
            in_grads = [leaf.grad if leaf.requires_grad else None for leaf in ctx.leaves]
            if emu.send_backward and emu.enabled:
                emu.bucket_prev.consume(_tensor_bytes(in_grads))
            ctx.leaves = ctx.outs = None
            return (None, None, *in_grads)

    return DilatedStage


class _Emu:
    def __init__(self, body, dilation, bucket_next, bucket_prev, send_forward: bool, send_backward: bool,
                 inbound: bool = False) -> None:
        self.body, self.dilation = body, dilation
        # one per neighbour, as FHDP's OutLinks; the same object twice for a per-device radio
        self.bucket_next, self.bucket_prev = bucket_next, bucket_prev
        self.inbound = inbound       # received bytes also take the (shared, half-duplex) radio
        self.send_forward, self.send_backward = send_forward, send_backward
        self.emulated_s = 0.0
        self.enabled = True          # off for the untimed priming step: no dilation, no link shaping

    def stretch(self, dt: float) -> None:
        if self.enabled:
            self.emulated_s += self.dilation.stretch(dt)


def _tuple_stage(stage, in_names: Sequence[str], out_names: Sequence[str], skip: Sequence[str]):
    """A module: tensors in `in_names` order -> tensors in `out_names` order, running the stage's layers
    except those named in `skip` (the loss layer runs in the schedule's loss_fn)."""
    from torch import nn

    class TupleStage(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = stage

        def body(self, *tensors):
            env = dict(zip(in_names, tensors, strict=True))
            for name in stage.layer_names:
                if name in skip:
                    continue
                layer = stage.layers[name]
                outs = layer(*[env[r] for r in layer.reads])
                for i, w in enumerate(layer.writes):
                    env[w] = outs[i]
            return tuple(env[n] for n in out_names)

    return TupleStage()


def _install_debug_dump(seconds: float | None) -> None:
    """With `debug_dump_s`, dump every thread's stack to stderr and exit after that many seconds (a hang)."""
    if seconds:
        import faulthandler
        import sys

        faulthandler.dump_traceback_later(seconds, exit=True, file=sys.stderr)


@dataclass
class _RankLayout:
    """One rank's share of the partitioned encoder and the tensor interface its stage module exposes."""

    model: Any
    stage: Any
    loss_node: Any
    vehicle: str
    start: int
    end: int
    is_first: bool
    is_last: bool
    in_names: list[str]
    out_names: list[str]
    skip: tuple[str, ...]


def _rank_layout(rank: int, world: int, cmd: dict[str, Any]) -> _RankLayout:
    """Build the seeded encoder, cut this rank's stage and name its inputs and outputs (labels left out; the
    last rank stops before the loss layer, which runs in the schedule's loss_fn)."""
    import torch

    from flad_vehicle.encoder.config import get_config
    from flad_vehicle.encoder.model import LABEL_INPUTS, VisionEncoder
    from flad_vehicle.encoder.partition import Partitioner

    torch.manual_seed(cmd["seed"])
    model = VisionEncoder(get_config(cmd["encoder"]))
    part = Partitioner(model)
    vehicle, start, end = cmd["pipeline"][rank]
    stage = part.stage((start, end))
    loss_node = part.graph.nodes[-1]
    is_first, is_last = rank == 0, rank == world - 1
    in_names = [n for n in stage.inputs if n not in LABEL_INPUTS]
    if is_last:
        out_names = [r for r in loss_node.reads if r not in LABEL_INPUTS]
        skip: tuple[str, ...] = (loss_node.name,)
    else:
        out_names = [n for n in stage.outputs if n not in LABEL_INPUTS]
        skip = ()
    return _RankLayout(model, stage, loss_node, vehicle, start, end, is_first, is_last, in_names, out_names, skip)


def _rank_emu(body, rank: int, cmd: dict[str, Any], lay: _RankLayout) -> _Emu:
    """The rank's emulation: its profile's compute dilation and its radio (one bucket for all it sends and
    receives) or, with `radio: link`, one send bucket per neighbour."""
    from flad_core.emulation import ComputeDilation, TokenBucket

    shared = cmd.get("radio", "device") == "device"
    nxt = TokenBucket.from_mbps(cmd["link_mbps"][rank], cmd["time_scale"])
    prev = nxt if shared else TokenBucket.from_mbps(cmd["link_mbps"][rank], cmd["time_scale"])
    return _Emu(body, ComputeDilation(cmd["tflops"][rank], cmd["time_scale"], cmd["host_tflops"]), nxt, prev,
                send_forward=not lay.is_last, send_backward=not lay.is_first, inbound=shared)


def _dilated_module(mod, emu: _Emu):
    """`mod` behind the dilating autograd function: the module the pipeline stage runs."""
    import torch

    fn = _make_dilated_fn()

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mod = mod

        def forward(self, *tensors):
            dummy = torch.zeros((), requires_grad=True)
            outs = fn.apply(emu, dummy, *tensors)
            return outs if len(outs) > 1 else outs[0]

    return Wrapped()


def _label_fns(lay: _RankLayout):
    """(pack_labels, loss_fn): the last rank packs a batch's labels into one float `target` tensor, and its
    loss_fn unpacks them (shapes and dtypes remembered from the packing) to run the skipped loss layer."""
    import torch

    from flad_vehicle.encoder.model import LABEL_INPUTS

    label_shapes: dict[str, tuple] = {}

    def pack_labels(batch) -> torch.Tensor:
        parts = []
        for n in LABEL_INPUTS:
            t = batch[n]
            label_shapes[n] = (tuple(t.shape[1:]), t.dtype)
            parts.append(t.reshape(t.shape[0], -1).float())
        return torch.cat(parts, dim=1)

    def loss_fn(output, target):
        outs = output if isinstance(output, tuple) else (output,)
        env = dict(zip(lay.out_names, outs, strict=True))
        pos = 0
        for n in LABEL_INPUTS:
            shape, dtype = label_shapes[n]
            size = 1
            for s in shape:
                size *= s
            env[n] = target[:, pos:pos + size].reshape(target.shape[0], *shape).to(dtype)
            pos += size
        layer = lay.stage.layers[lay.loss_node.name]
        res = layer(*[env[r] for r in lay.loss_node.reads])
        return res[list(lay.loss_node.writes).index("loss")]

    return pack_labels, loss_fn


def _rank_schedule(wrapped, rank: int, world: int, cmd: dict[str, Any], loss_fn):
    import torch
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    pstage = PipelineStage(wrapped, rank, world, torch.device("cpu"))
    sched_cls = Schedule1F1B if cmd["schedule"] == "1f1b" else ScheduleGPipe
    # loss_fn on every rank: the schedule reads "has a loss_fn" as "runs backward" (None on the first ranks
    # made them skip backward metadata inference and deadlock the last rank, torch 2.13)
    return sched_cls(pstage, n_microbatches=cmd["n_micro"], loss_fn=loss_fn)


def _step_runner(schedule, lay: _RankLayout, pack_labels):
    """One schedule step on a batch as this rank takes part in it (inputs first, target and losses last)."""

    def run_step(batch, losses: list) -> None:
        if lay.is_first:
            schedule.step(*[batch[n] for n in lay.in_names])
        elif lay.is_last:
            schedule.step(target=pack_labels(batch), losses=losses, return_outputs=False)
        else:
            schedule.step()

    return run_step


def _prime(stage, params: list, emu: _Emu, run_step, batches):
    """torch.distributed.pipelining infers stage metadata on its first step, running the later stages forward
    on uninitialised buffers and backward from ones (torch 2.13): on a stage with parameters that leaves
    garbage -- NaN with the paper encoder -- in .grad and in BatchNorm's running statistics. So one untimed,
    unshaped priming step on the first batch, after which grads and buffers are put back. Returns the batch
    stream with that first batch put back in front."""
    import torch

    first = next(batches)
    saved = {k: v.clone() for k, v in stage.named_buffers()}
    emu.enabled = False
    run_step(first, [])
    emu.enabled = True
    for p in params:
        p.grad = None
    with torch.no_grad():
        for k, v in stage.named_buffers():
            v.copy_(saved[k])
    return itertools.chain([first], batches)


def _clip_global_norm(params: list, max_norm: float = 5.0) -> None:
    """Global-norm clipping across the pipeline, as FHDP does: an all-reduce of the stages' squared norms."""
    import torch
    import torch.distributed as dist

    sq = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is not None:
            sq += p.grad.detach().double().pow(2).sum()
    dist.all_reduce(sq)
    coef = min(1.0, max_norm / (float(sq.sqrt()) + 1e-6))
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)


def _timed_step(batch, emu: _Emu, run_step, params: list, opt) -> dict[str, Any]:
    """One training step (schedule, clipping, optimizer) and its step record."""
    emu.emulated_s = 0.0
    t0 = time.monotonic()
    losses: list = []
    run_step(batch, losses)
    _clip_global_norm(params, 5.0)
    if opt is not None:
        t_opt = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        emu.stretch(time.perf_counter() - t_opt)
    t1 = time.monotonic()
    loss = float(sum(float(x.detach()) for x in losses) / len(losses)) if losses else None
    return {"t0": t0, "t1": t1, "loss": loss, "emulated_compute_s": emu.emulated_s, "compute_s": 0.0,
            "bytes_sent": 0}


def _rank_main(rank: int, world: int, cmd: dict[str, Any], queue) -> None:
    import torch
    import torch.distributed as dist

    from flad_vehicle.fhdp.data import vehicle_batches
    from flad_vehicle.fhdp.optim import stage_adamw

    torch.set_num_threads(1)
    _install_debug_dump(cmd.get("debug_dump_s"))
    try:
        dist.init_process_group("gloo", init_method=cmd["init_method"], rank=rank, world_size=world)
        lay = _rank_layout(rank, world, cmd)
        mod = _tuple_stage(lay.stage, lay.in_names, lay.out_names, lay.skip)
        emu = _rank_emu(mod.body, rank, cmd, lay)
        wrapped = _dilated_module(mod, emu)
        pack_labels, loss_fn = _label_fns(lay)
        schedule = _rank_schedule(wrapped, rank, world, cmd, loss_fn)
        params = list(lay.stage.parameters())
        opt = stage_adamw(lay.stage, lay.model) if params else None
        batches = vehicle_batches(cmd["data"], cmd["data_owner"], cmd["batch_size"], seed=cmd["seed"])
        run_step = _step_runner(schedule, lay, pack_labels)
        batches = _prime(lay.stage, params, emu, run_step, batches)
        steps = [_timed_step(next(batches), emu, run_step, params, opt) for _ in range(cmd["warmup"] + cmd["steps"])]
        queue.put({"rank": rank, "index": rank, "vehicle": lay.vehicle, "range": [lay.start, lay.end],
                   "steps": steps})
        dist.barrier()
        dist.destroy_process_group()
    except Exception as exc:  # reported to the coordinator
        log.exception("torch pipelining rank %d failed", rank)
        queue.put({"rank": rank, "error": f"{type(exc).__name__}: {exc}"})


def run_torch_pipelining(cfg, pipeline: Pipeline, host_tflops: float, time_scale: float
                         ) -> dict[str, Any]:
    """Run baseline (d) on `pipeline`; returns the same figures as an FHDP configuration (emulated)."""
    import torch

    from flad_bench.pipeline_common import free_ports, summarize
    from flad_core.fleet import PAPER_PROFILES, link_mbps

    profiles = dict(cfg.cluster)
    world = len(pipeline)
    cmd = {"init_method": f"tcp://127.0.0.1:{free_ports(1)[0]}", "seed": cfg.seed, "encoder": cfg.encoder,
           "pipeline": [list(p) for p in pipeline], "time_scale": time_scale, "host_tflops": host_tflops,
           "tflops": [PAPER_PROFILES[profiles[v]].tflops for v, _, _ in pipeline],
           "link_mbps": [link_mbps(profiles[v], cfg.link_setting) for v, _, _ in pipeline],
           "radio": cfg.radio,
           "schedule": cfg.schedule, "n_micro": cfg.n_micro, "batch_size": cfg.batch_size, "data": cfg.data,
           "data_owner": cfg.data_owner, "warmup": cfg.warmup, "steps": cfg.steps,
           "debug_dump_s": cfg.extra.get("debug_dump_s")}
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, world, cmd, queue), daemon=True, name=f"torchpp-{r}")
             for r in range(world)]
    for p in procs:
        p.start()
    results, errors = [], []
    deadline = time.monotonic() + 900
    while len(results) + len(errors) < world and time.monotonic() < deadline:
        try:
            r = queue.get(timeout=5)
        except Exception:  # queue.Empty: check whether a rank died without reporting
            if any(p.exitcode not in (None, 0) for p in procs):
                errors.append("a rank exited with " + str([p.exitcode for p in procs]))
                break
            continue
        (errors if "error" in r else results).append(r.get("error", r))
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.terminate()
    if errors or len(results) < world:
        raise RuntimeError(f"torch.distributed.pipelining failed: {errors or 'timeout'}")
    out = summarize(results, cfg.batch_size, cfg.warmup, time_scale)
    out.update({"works": True, "backend": "gloo", "torch": torch.__version__, "schedule": cfg.schedule,
                "n_micro": cfg.n_micro,
                "radio": cfg.radio, "link_setting": cfg.link_setting,
                "notes": "same partition, micro-batches, optimizer, clipping and emulation (dilation inside an "
                         "autograd function; link shaping by blocking for the sent bytes, and with the per-device "
                         "radio for the received bytes too); labels are given to "
                         "the last rank as `target` instead of travelling through the pipeline; bytes not counted"})
    out.pop("bytes_per_sample", None)
    return out
