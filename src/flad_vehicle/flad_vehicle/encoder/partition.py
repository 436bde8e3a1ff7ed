"""Layer-sequence partitioner: DAG → topological layer order → contiguous stages with explicit live tensors.

How the DAG is obtained
-----------------------
1. **torch.fx** (`method="fx"`): the model's layer loop is symbolically traced with a tracer that treats
   every `Layer` as a leaf, so the fx graph has one `call_module` node per layer and its edges are the real
   data dependencies of the traced program (which layer output feeds which layer). Layer internals (pillar
   scatter, the GRU loop, per-camera loops) are never traced, which side-steps the failures the paper hit
   when fx meets dynamic control flow and multimodal inputs. (An op-level `fx.symbolic_trace` of the whole
   encoder does fail, with torch 2.13: "TraceError: Proxy object cannot be iterated" in the per-camera
   loop / shape-dependent code — the failure mode the paper reports.)
2. **Declared fallback** (`method="declared"`): every `Layer` names the tensors it reads and writes; the DAG
   is built from those declarations. `method="auto"` (default) tries fx and falls back to this on any
   tracing error, logging why; `LayerGraph.method` / `.note` say which one was used. When fx succeeds its
   edges are checked against the declarations, so a wrong declaration cannot go unnoticed.

The DAG is sorted with Kahn's algorithm; among ready layers, those reading raw inputs (sensors and
measurements) go first, then declaration order. So every raw-input reader sits at the front and the
first stage can hold all of them: `LayerGraph.min_first_end` is the smallest allowed end of stage 0.

Stages
------
A cut at position k (between layer k-1 and layer k) carries `LayerGraph.live(k)`: every tensor produced
before k (or a model input) that a layer at ≥ k reads, or that is a final output. `Stage(start, end)` takes
exactly `live(start)` and returns exactly `live(end)`; tensors that only pass through are forwarded unchanged.
With the loss layer included, the labels (`bev`, `tl_state`, `waypoints`) are live at every cut, i.e.
they travel with the activations to the last stage; raw sensor tensors never cross a valid cut.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx
from torch import Tensor, nn

from flad_vehicle.encoder.layers import Layer
from flad_vehicle.encoder.model import LABEL_INPUTS, VisionEncoder

log = logging.getLogger(__name__)

Method = Literal["auto", "fx", "declared"]


class PartitionError(ValueError):
    """Invalid cut points, a stage given the wrong tensors, or an inconsistent layer graph."""


@dataclass(frozen=True)
class LayerNode:
    name: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    kind: str
    group: str


class LayerGraph:
    """A topologically sorted layer sequence with the liveness of every named tensor."""

    def __init__(self, nodes: list[LayerNode], inputs: tuple[str, ...], outputs: tuple[str, ...],
                 raw_inputs: tuple[str, ...], method: str, note: str = "") -> None:
        self.nodes = nodes
        self.names = [n.name for n in nodes]
        self.inputs = inputs
        self.outputs = outputs
        self.raw_inputs = raw_inputs
        self.method = method
        self.note = note
        self.producer: dict[str, int] = {name: -1 for name in inputs}
        self.last_use: dict[str, int] = {}
        for i, node in enumerate(nodes):
            for r in node.reads:
                if r not in self.producer:
                    raise PartitionError(f"layer {node.name!r} reads {r!r}, which no earlier layer writes")
                self.last_use[r] = i
            for w in node.writes:
                if w in self.producer:
                    raise PartitionError(f"tensor {w!r} is written twice (again by {node.name!r})")
                self.producer[w] = i
        for o in outputs:
            if o not in self.producer:
                raise PartitionError(f"output {o!r} is not produced by any layer")
            self.last_use[o] = len(nodes)
        raw_readers = [i for i, n in enumerate(nodes) if set(n.reads) & set(raw_inputs)]
        self.min_first_end = (max(raw_readers) + 1) if raw_readers else 1
        self._order = {name: (self.producer[name], j) for j, name in enumerate(self._all_names())}

    def _all_names(self) -> list[str]:
        out = list(self.inputs)
        for n in self.nodes:
            out.extend(n.writes)
        return out

    def __len__(self) -> int:
        return len(self.nodes)

    def index(self, name: str) -> int:
        return self.names.index(name)

    def live(self, k: int) -> tuple[str, ...]:
        """Tensors that cross a cut placed before layer k (k = 0: model inputs used; k = n: outputs)."""
        if not 0 <= k <= len(self.nodes):
            raise PartitionError(f"cut {k} outside [0, {len(self.nodes)}]")
        names = [t for t, p in self.producer.items() if p < k and self.last_use.get(t, -2) >= k]
        return tuple(sorted(names, key=lambda t: self._order[t]))

    def check_ranges(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Ranges must be non-empty, contiguous, cover [0, n) in order, and keep raw inputs in stage 0."""
        n = len(self.nodes)
        if not ranges:
            raise PartitionError("no stages")
        pos = 0
        for s, e in ranges:
            if s != pos or e <= s or e > n:
                raise PartitionError(f"stage ranges must be non-empty, contiguous and cover [0, {n}); "
                                     f"got {list(ranges)}")
            pos = e
        if pos != n:
            raise PartitionError(f"stage ranges end at {pos}, not at {n}")
        if len(ranges) > 1 and ranges[0][1] < self.min_first_end:
            raw = [t for t in self.live(ranges[0][1]) if t in self.raw_inputs]
            raise PartitionError(f"first stage ends at {ranges[0][1]} but layers up to {self.min_first_end - 1} read "
                                 f"raw inputs; the cut would send {raw} off the data-owning vehicle")

    def ranges_from_cuts(self, cuts: Sequence[int]) -> list[tuple[int, int]]:
        bounds = [0, *cuts, len(self.nodes)]
        return [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


class Stage(nn.Module):
    """Layers `[start, end)` as a runnable module: dict of the live tensors at `start` in, dict at `end` out.

    The layers are shared with (not copied from) the model they come from, and keep the model's parameter
    names (`layers.<layer name>.*`), so a stage's `state_dict()` is a slice of the model's.
    """

    def __init__(self, graph: LayerGraph, layers: Mapping[str, Layer], start: int, end: int) -> None:
        super().__init__()
        if not 0 <= start < end <= len(graph):
            raise PartitionError(f"bad layer range [{start}, {end}) for {len(graph)} layers")
        self.start, self.end = start, end
        self.layer_names = tuple(graph.names[start:end])
        self.layers = nn.ModuleDict({n: layers[n] for n in self.layer_names})
        self.inputs: tuple[str, ...] = graph.live(start)
        self.outputs: tuple[str, ...] = graph.live(end)
        self.is_first = start == 0
        self.is_last = end == len(graph)

    def extra_repr(self) -> str:
        return f"[{self.start}, {self.end}): in={list(self.inputs)} out={list(self.outputs)}"

    def forward(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Runs the stage. `inputs` must hold exactly `self.inputs`; returns exactly `self.outputs`."""
        got = set(inputs)
        if got != set(self.inputs):
            raise PartitionError(f"stage [{self.start}, {self.end}) expects {sorted(self.inputs)}; "
                                 f"missing {sorted(set(self.inputs) - got)}, "
                                 f"unexpected {sorted(got - set(self.inputs))}")
        env = dict(inputs)
        for name in self.layer_names:
            layer = self.layers[name]
            outs = layer(*[env[r] for r in layer.reads])
            for i, w in enumerate(layer.writes):
                env[w] = outs[i]
        return {n: env[n] for n in self.outputs}

    stage_forward = forward

    @staticmethod
    def receive(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """What a downstream stage does with tensors off the wire: detach, and let float ones collect grads."""
        out = {}
        for k, t in tensors.items():
            t = t.detach()
            out[k] = t.requires_grad_(True) if t.is_floating_point() else t
        return out

    @staticmethod
    def backward(inputs: Mapping[str, Tensor], outputs: Mapping[str, Tensor],
                 grad_outputs: Mapping[str, Tensor | None] | None = None, loss_key: str = "loss"
                 ) -> dict[str, Tensor]:
        """Backward through one stage. Last stage: `grad_outputs=None` backpropagates `outputs[loss_key]`.
        Otherwise each output with a gradient gets it. Returns the gradients of the (received) inputs, to be
        sent upstream; inputs without a gradient (labels, integer tensors, unused) are left out."""
        if grad_outputs is None:
            tensors, grads = [outputs[loss_key]], [None]
        else:
            tensors, grads = [], []
            for k, g in grad_outputs.items():
                if g is not None and outputs[k].requires_grad:
                    tensors.append(outputs[k])
                    grads.append(g)
        if tensors:
            torch.autograd.backward(tensors, grads)
        return {k: t.grad for k, t in inputs.items() if isinstance(t, Tensor) and t.grad is not None}


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Layer) or super().is_leaf_module(m, qualname)


class _Runner(nn.Module):
    """The layer loop in traceable form (a dict of named inputs → tuple of outputs)."""

    def __init__(self, layers: list[tuple[str, Layer]], outputs: tuple[str, ...]) -> None:
        super().__init__()
        self.layers = nn.ModuleDict(dict(layers))
        self.outputs = outputs

    def forward(self, inputs: dict) -> tuple:
        env = {}
        for layer in self.layers.values():
            args = [env[r] if r in env else inputs[r] for r in layer.reads]
            outs = layer(*args)
            for i, w in enumerate(layer.writes):
                env[w] = outs[i]
        return tuple(env[o] for o in self.outputs)


def _fx_edges(layers: list[tuple[str, Layer]], outputs: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Per layer, the tensor names it reads according to the fx graph of the traced layer loop."""
    graph = _LeafTracer().trace(_Runner(layers, outputs))
    by_target = dict(layers)
    reads: dict[str, tuple[str, ...]] = {}
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        name = str(node.target).removeprefix("layers.")
        if name not in by_target:
            raise PartitionError(f"fx: unexpected module call {node.target}")
        names = []
        for a in node.args:
            if not (isinstance(a, fx.Node) and a.op == "call_function" and len(a.args) == 2):
                raise PartitionError(f"fx: layer {name} has an argument that is not a named tensor: {a}")
            src, key = a.args
            if src.op == "placeholder":
                names.append(str(key))
            elif src.op == "call_module":
                names.append(by_target[str(src.target).removeprefix("layers.")].writes[int(key)])
            else:
                raise PartitionError(f"fx: cannot resolve argument {a} of layer {name}")
        reads[name] = tuple(names)
    return reads


def build_graph(model: VisionEncoder, include_loss: bool = True, method: Method = "auto") -> LayerGraph:
    """Topologically sorted `LayerGraph` of `model` (see the module docstring for fx vs declared)."""
    layers = model.layer_list(include_loss)
    outputs = model.output_names(include_loss)
    inputs = model.input_names + (LABEL_INPUTS if include_loss else ())
    used, note = "declared", ""
    reads = {n: layer.reads for n, layer in layers}
    if method in ("auto", "fx"):
        try:
            traced = _fx_edges(layers, outputs)
            bad = [n for n, _ in layers if traced.get(n) != reads[n]]
            if bad:
                raise PartitionError(f"fx data flow disagrees with the declared reads of {bad}")
            reads, used = traced, "fx"
        except Exception as exc:
            if method == "fx":
                raise
            note = f"fx tracing failed, used declared reads/writes: {type(exc).__name__}: {exc}"
            log.warning("layer graph: %s", note)
    raw = model.input_names
    order = _toposort([(n, reads[n], layer.writes) for n, layer in layers], set(inputs), set(raw))
    by_name = dict(layers)
    nodes = [LayerNode(n, reads[n], by_name[n].writes, by_name[n].kind, by_name[n].group) for n in order]
    return LayerGraph(nodes, inputs, outputs, raw, used, note)


def _toposort(layers: list[tuple[str, tuple[str, ...], tuple[str, ...]]], inputs: set[str], raw: set[str]
              ) -> list[str]:
    """Kahn's algorithm; ready layers that read raw inputs first, then declaration order."""
    producer = {w: i for i, (_, _, writes) in enumerate(layers) for w in writes}
    deps: list[set[int]] = []
    for name, reads, _ in layers:
        d = set()
        for r in reads:
            if r in producer:
                d.add(producer[r])
            elif r not in inputs:
                raise PartitionError(f"layer {name!r} reads {r!r}, which is neither an input nor written by a layer")
        deps.append(d)
    users: list[list[int]] = [[] for _ in layers]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    indeg = [len(d) for d in deps]
    ready = [((0 if set(layers[i][1]) & raw else 1), i) for i in range(len(layers)) if indeg[i] == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(layers[i][0])
        for u in users[i]:
            indeg[u] -= 1
            if indeg[u] == 0:
                heapq.heappush(ready, ((0 if set(layers[u][1]) & raw else 1), u))
    if len(order) != len(layers):
        raise PartitionError("layer graph has a cycle")
    return order


class Partitioner:
    """Cuts a `VisionEncoder` into pipeline stages.

    >>> p = Partitioner(model)                # include_loss=True: the last stage computes the loss
    >>> p.graph.names                         # the layer sequence (topological order)
    >>> s = p.stage((0, 8))                   # a Stage over layers [0, 8)
    >>> out = s.stage_forward({n: batch[n] for n in s.inputs})
    >>> stages = p.stages([8, 20])            # three stages: [0,8), [8,20), [20,n)
    """

    def __init__(self, model: VisionEncoder, include_loss: bool = True, method: Method = "auto") -> None:
        self.model = model
        self.graph = build_graph(model, include_loss, method)
        self._layers = dict(model.layer_list(include_loss))

    def stage(self, layer_range: tuple[int, int]) -> Stage:
        start, end = layer_range
        return Stage(self.graph, self._layers, start, end)

    def stages(self, cuts: Sequence[int]) -> list[Stage]:
        ranges = self.graph.ranges_from_cuts(cuts)
        self.graph.check_ranges(ranges)
        return [self.stage(r) for r in ranges]

    def stages_from_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[Stage]:
        self.graph.check_ranges(ranges)
        return [self.stage(r) for r in ranges]


def make_stage(cfg, layer_range: tuple[int, int], include_loss: bool = True,
               state_dict: Mapping[str, Tensor] | None = None) -> Stage:
    """A stage built from a config alone (what a pipeline worker holding only its partition needs).

    The layers outside `layer_range` are built and dropped; `state_dict` may be a whole-model or a stage
    state dict (keys `layers.<layer>.*`); only this stage's keys are loaded, and all of them must be there.
    """
    part = Partitioner(VisionEncoder(cfg), include_loss)
    stage = part.stage(layer_range)
    if state_dict is not None:
        own = stage.state_dict()
        missing = [k for k in own if k not in state_dict]
        if missing:
            raise PartitionError(f"state dict lacks {len(missing)} tensor(s) of stage {layer_range}, "
                                 f"e.g. {missing[:3]}")
        stage.load_state_dict({k: state_dict[k] for k in own})
    return stage
