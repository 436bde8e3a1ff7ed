"""Per-layer profile of the encoder, exported as the JSON model profile SWIFT reads.

Every figure is measured on a real forward pass, not guessed:

- `flops`: forward FLOPs **per sample**, counted with `torch.utils.flop_counter.FlopCounterMode` (matmul,
  conv, bmm and addmm at 2 FLOPs per multiply-accumulate; elementwise ops, norms, softmax, pooling and
  scatter are not counted by it — they are memory-bound and small).
- `param_bytes`: bytes of the layer's parameters (buffers excluded).
- `activation_bytes`: bytes **per sample** of the tensors live across a cut placed right after this layer
  (`LayerGraph.live`), i.e. what a pipeline stage ending here sends downstream (the same again flows back
  as gradients for the float tensors). For a chain this is the layer's output; in the DAG it also counts
  skip tensors still in flight and the labels travelling to the loss.
- `mem_bytes`: training-memory estimate for the layer at the profile's `batch_size`:
  4 × param_bytes (weights + grads + Adam m + Adam v) + batch_size × (bytes autograd saves for backward
  per sample, captured with `saved_tensors_hooks`, each storage counted once, parameters excluded).
- measured peaks (in `layer_details` and `measured`): memory of a real fwd+bwd (per layer) or
  fwd+bwd+AdamW step (whole model), plus the parameters resident before the step. On the CPU from the torch
  profiler's CPU allocation/free events (`profile_memory=True`, timeline-ordered running sum); on a CUDA
  device from the caching allocator's own counter (`torch.cuda.max_memory_allocated` above what was
  allocated before the step).

The model profiles where it is (`model.device`): the batch is moved there, and the profile says which device
ran (`device`).
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import saved_tensors_hooks
from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile
from torch.utils.flop_counter import FlopCounterMode

from flad_core.device import device_info, peak_memory_bytes, reset_peak_memory, synchronize, to_device
from flad_vehicle.encoder.model import VisionEncoder
from flad_vehicle.encoder.partition import build_graph

log = logging.getLogger(__name__)

FORMAT = "flad-model-profile/1"
UNITS = {
    "flops": "forward FLOPs per sample (torch FlopCounterMode; 2 per multiply-accumulate; elementwise ops, "
             "norms, softmax, pooling, scatter not counted)",
    "param_bytes": "bytes of parameters (buffers excluded)",
    "activation_bytes": "bytes per sample of all tensors live across a cut right after this layer (what a "
                        "stage ending here sends downstream; float ones also return as gradients)",
    "mem_bytes": "training-memory estimate at batch_size: 4 x param_bytes (weights, grads, Adam m, v) + "
                 "batch_size x per-sample bytes saved by autograd for backward",
}


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


class _SavedCounter:
    """Counts bytes autograd saves for backward, once per storage, ignoring parameters and buffers."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.skip |= {b.untyped_storage().data_ptr() for b in model.buffers()}
        self.seen: set[int] = set()
        self.bytes = 0

    def pack(self, t: Tensor) -> Tensor:
        st = t.untyped_storage()
        key = st.data_ptr()
        if key not in self.skip and key not in self.seen and st.device.type != "meta":
            self.seen.add(key)
            self.bytes += st.nbytes()
        return t


def measure_peak(fn, device: torch.device | str = "cpu") -> int:
    """Peak bytes newly allocated on `device` while `fn()` runs: the CUDA allocator's peak counter on a GPU,
    the torch profiler's CPU memory events on the CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        reset_peak_memory(dev)
        fn()
        return int((peak_memory_bytes(dev) or 0) - base)
    with torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    for e in prof.events():
        b = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        if b:
            events.append((e.time_range.start, b))
    events.sort()
    cur = peak = 0
    for _, b in events:
        cur += b
        peak = max(peak, cur)
    return int(peak)


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(_nbytes(p) for p in module.parameters())


def profile_model(model: VisionEncoder, batch: Mapping[str, Tensor], include_loss: bool = True,
                  measure: bool = True) -> dict[str, Any]:
    """Profiles every layer of `model` on `batch` (its batch size is the profile's `batch_size`)."""
    graph = build_graph(model, include_loss)
    layers = dict(model.layer_list(include_loss))
    batch = to_device(batch, model.device)
    B = int(next(iter(batch.values())).shape[0])
    env: dict[str, Tensor] = {n: batch[n] for n in graph.inputs}
    was_training = model.training
    model.train()
    counter = _SavedCounter(model)
    rows, details = [], []
    for i, node in enumerate(graph.nodes):
        layer = layers[node.name]
        before = counter.bytes
        with saved_tensors_hooks(counter.pack, lambda t: t), FlopCounterMode(display=False) as fc:
            outs = layer(*[env[r] for r in node.reads])
        for j, w in enumerate(node.writes):
            env[w] = outs[j]
        saved = (counter.bytes - before) / B
        pbytes = _param_bytes(layer)
        cut = sum(_nbytes(env[t]) for t in graph.live(i + 1)) / B
        flops = fc.get_total_flops() / B
        mem = 4 * pbytes + B * saved
        rows.append({"name": node.name, "flops": int(round(flops)), "param_bytes": int(pbytes),
                     "activation_bytes": int(round(cut)), "mem_bytes": int(round(mem))})
        details.append({"name": node.name, "index": i, "group": node.group, "kind": node.kind,
                        "reads": list(node.reads), "writes": list(node.writes),
                        "params": sum(p.numel() for p in layer.parameters()),
                        "output_bytes": int(round(sum(_nbytes(o) for o in outs) / B)),
                        "saved_activation_bytes": int(round(saved)),
                        "live_after": list(graph.live(i + 1))})
    if measure:
        for d in details:
            d["measured_peak_bytes"] = _layer_peak(layers[d["name"]], env, graph.nodes[d["index"]].reads,
                                                   model.device)
    totals = {k: sum(r[k] for r in rows) for k in ("flops", "param_bytes", "mem_bytes")}
    totals["params"] = sum(p.numel() for p in model.parameters())
    totals["saved_activation_bytes"] = int(round(counter.bytes / B))
    whole = whole_model_figures(model, batch, include_loss)
    out: dict[str, Any] = {
        "format": FORMAT, "units": UNITS, "model": model.cfg.name, "config": model.cfg.to_dict(),
        "batch_size": B, "include_loss": include_loss, "graph_method": graph.method, "graph_note": graph.note,
        "min_first_stage_end": graph.min_first_end,
        "input_bytes": int(round(sum(_nbytes(batch[t]) for t in graph.live(0)) / B)),
        "layers": rows, "layer_details": details, "totals": totals, "whole_model": whole,
        "host": {"machine": platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "device": device_info(model.device),
    }
    if measure:
        peak = measure_train_step_peak(model, batch)
        where = ("torch.cuda.max_memory_allocated" if model.device.type == "cuda"
                 else "torch.profiler CPU memory events")
        out["measured"] = {
            "train_step_peak_bytes": peak,
            "estimate_bytes": totals["mem_bytes"],
            "estimate_rel_error": round((totals["mem_bytes"] - peak) / peak, 4) if peak else None,
            "method": f"{where} over one fwd+bwd+AdamW step (first step: Adam state allocated inside), plus "
                      f"resident parameter bytes",
        }
    model.train(was_training)
    return out


def whole_model_figures(model: VisionEncoder, batch: Mapping[str, Tensor], include_loss: bool = True
                        ) -> dict[str, Any]:
    """FLOPs and saved-activation bytes per sample of one whole-model forward (to check the per-layer sums)."""
    B = int(next(iter(batch.values())).shape[0])
    counter = _SavedCounter(model)
    with saved_tensors_hooks(counter.pack, lambda t: t), FlopCounterMode(display=False) as fc:
        out = model.forward_train(batch) if include_loss else model(batch)
    del out
    pbytes = _param_bytes(model)
    return {"flops": int(round(fc.get_total_flops() / B)), "param_bytes": pbytes,
            "saved_activation_bytes": int(round(counter.bytes / B)),
            "mem_bytes_estimate": int(round(4 * pbytes + counter.bytes))}


def _layer_peak(layer: torch.nn.Module, env: Mapping[str, Tensor], reads: tuple[str, ...],
                device: torch.device | str = "cpu") -> int:
    ins = [env[r].detach().requires_grad_(env[r].is_floating_point()) for r in reads]

    def step() -> None:
        outs = layer(*ins)
        tensors = [o for o in outs if o.requires_grad]
        if tensors:
            torch.autograd.backward(tensors, [torch.ones_like(o) for o in tensors])

    peak = measure_peak(step, device)
    layer.zero_grad(set_to_none=True)
    return peak + _param_bytes(layer)


def measure_train_step_peak(model: VisionEncoder, batch: Mapping[str, Tensor]) -> int:
    """Peak CPU bytes of one full training step on a copy of the model (the original is left untouched)."""
    import copy

    m = copy.deepcopy(model)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    batch = to_device(batch, m.device)

    def step() -> None:
        out = m.forward_train(batch)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return measure_peak(step, m.device) + _param_bytes(m)


def swift_profile(profile: Mapping[str, Any]) -> dict[str, Any]:
    """Just the part SWIFT needs: `{"layers": [{name, flops, param_bytes, activation_bytes, mem_bytes}]}`."""
    return {"layers": [dict(r) for r in profile["layers"]], "units": profile["units"]}


def measure_layer_seconds(model: VisionEncoder, batch: Mapping[str, Tensor], repeats: int = 3,
                          include_loss: bool = True) -> list[float]:
    """Measured forward + backward seconds **per sample** of each layer on this host (graph order), the median
    of `repeats` timings after one warm-up, on the calling thread's torch settings.

    What SWIFT plans from when it plans from measurements: a layer's FLOPs say little about its time when it is
    memory-bound (norms, pooling, scatter) or too small to fill the device. Each layer runs on its own, its
    inputs detached (so its backward stops at them), its float outputs back-propagated with ones."""
    import statistics
    import time

    graph = build_graph(model, include_loss)
    layers = dict(model.layer_list(include_loss))
    batch = to_device(batch, model.device)
    dev = model.device
    size = int(next(iter(batch.values())).shape[0])
    env: dict[str, Tensor] = {n: batch[n] for n in graph.inputs}
    was_training = model.training
    model.train()
    out: list[float] = []
    try:
        for node in graph.nodes:
            layer = layers[node.name]
            times = []
            outs: tuple = ()
            for i in range(repeats + 1):
                ins = [env[r].detach().requires_grad_(env[r].is_floating_point()) for r in node.reads]
                synchronize(dev)
                t0 = time.perf_counter()
                outs = layer(*ins)
                tensors = [o for o in outs if isinstance(o, Tensor) and o.requires_grad]
                if tensors:
                    torch.autograd.backward(tensors, [torch.ones_like(o) for o in tensors])
                synchronize(dev)
                if i:
                    times.append(time.perf_counter() - t0)
            layer.zero_grad(set_to_none=True)
            for j, w in enumerate(node.writes):
                env[w] = outs[j].detach()
            out.append(statistics.median(times) / size)
    finally:
        model.train(was_training)
    return out
