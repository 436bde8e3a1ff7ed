"""U-shaped pipelines: the data owner keeps the task heads and the loss, so labels never leave it.

Labels-forward (the default): stages cut the whole layer sequence [0, n); the labels travel with the
activations to the last stage, which runs the heads and the loss.

U-shaped: the layer sequence splits into the *trunk* [0, H) and the *heads* [H, n) (every layer of group
`head` or `loss`, a contiguous suffix of the topological order). The trunk is cut into K stages as usual;
stage 0 (the data owner) also holds the heads. The last trunk stage sends its features back to stage 0
(the "turnaround" hop), stage 0 runs the heads and the loss with its local labels and returns the gradient
of those features to the last trunk stage; the backward then flows up the pipeline as before.

What crosses a trunk cut at e (c1 = end of stage 0's trunk part, c1 <= e <= H):
  * tensors produced before e that a trunk layer at >= e reads (the ordinary activations), and
  * tensors produced by a trunk stage after stage 0 (producer in [c1, e)) that the heads read (they ride
    to the last trunk stage and come back on the turnaround hop).
Tensors produced on stage 0 that only the heads read (e.g. `meas.wp_h0`) stay home ("kept"); so do the
labels and every raw input. A kept tensor that the trunk also reads (e.g. `tl.focus`) is sent *and* kept:
its gradient is the sum of the heads' part (local) and the trunk's part (coming back up the pipeline).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from flad_vehicle.encoder.partition import LayerGraph, Partitioner, PartitionError, Stage

HEAD_GROUPS = ("head", "loss")


def head_start(graph: LayerGraph) -> int:
    """Index H of the first head layer; [H, n) must be exactly the head and loss layers."""
    heads = [i for i, node in enumerate(graph.nodes) if node.group in HEAD_GROUPS]
    if not heads:
        raise PartitionError("the model has no head or loss layers to keep on the data owner")
    h = heads[0]
    if heads != list(range(h, len(graph))):
        raise PartitionError(f"head/loss layers are not a contiguous suffix of the layer order: {heads}")
    if h < graph.min_first_end:
        raise PartitionError(f"heads start at {h}, before the raw-input layers end ({graph.min_first_end})")
    return h


def head_layers(graph: LayerGraph) -> list[str]:
    return graph.names[head_start(graph):]


def _readers(graph: LayerGraph) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, node in enumerate(graph.nodes):
        for r in node.reads:
            out.setdefault(r, []).append(i)
    return out


def live_u(graph: LayerGraph, h: int, c1: int, e: int) -> tuple[str, ...]:
    """Tensors that cross the trunk cut at `e` of a U-shaped pipeline whose stage 0 ends its trunk at `c1`."""
    if not 0 < c1 <= e <= h:
        raise PartitionError(f"trunk cut {e} outside [{c1}, {h}] (stage 0 trunk ends at {c1})")
    readers = _readers(graph)
    finals = set(graph.outputs)
    names = []
    for t, p in graph.producer.items():
        if p >= e:
            continue
        rs = readers.get(t, [])
        trunk_later = any(e <= r < h for r in rs)
        to_heads = c1 <= p and (any(r >= h for r in rs) or t in finals)
        if trunk_later or to_heads:
            names.append(t)
    return tuple(sorted(names, key=lambda t: graph._order[t]))


@dataclass
class HeadPart:
    """What stage 0 of a U-shaped pipeline runs after the turnaround: the heads and the loss."""

    stage: Stage                       # layers [H, n); inputs = live(H), outputs = the model outputs
    from_batch: tuple[str, ...]        # head inputs taken from the local batch (the labels, raw measurements)
    kept: tuple[str, ...]              # head inputs produced by stage 0's own trunk layers (never sent for heads)
    turnaround: tuple[str, ...]        # head inputs that come back from the last trunk stage
    first_sends: tuple[str, ...]       # what stage 0's trunk part sends downstream (its outputs minus head-only)

    def parameters(self):
        return self.stage.parameters()


def u_stages(part: Partitioner, trunk_ranges: Sequence[tuple[int, int]]) -> tuple[list[Stage], HeadPart]:
    """The trunk stages of a U-shaped pipeline (explicit inputs/outputs) and stage 0's head part.

    `trunk_ranges` cover [0, H) contiguously; there must be at least two (a one-stage pipeline has no
    hop to save: it is the whole model on one vehicle)."""
    g = part.graph
    h = head_start(g)
    if len(trunk_ranges) < 2:
        raise PartitionError("a U-shaped pipeline needs at least two trunk stages")
    pos = 0
    for s, e in trunk_ranges:
        if s != pos or e <= s:
            raise PartitionError(f"trunk ranges must be non-empty and contiguous from 0; got {list(trunk_ranges)}")
        pos = e
    if pos != h:
        raise PartitionError(f"trunk ranges end at {pos}, the heads start at {h}")
    c1 = trunk_ranges[0][1]
    if c1 < g.min_first_end:
        raise PartitionError(f"first stage ends at {c1} but layers up to {g.min_first_end - 1} read raw inputs")
    readers = _readers(g)
    stages = []
    for j, (s, e) in enumerate(trunk_ranges):
        st = part.stage((s, e))
        if j == 0:
            st.inputs = tuple(t for t in g.inputs if any(r < h for r in readers.get(t, [])))
        else:
            st.inputs = live_u(g, h, c1, s)
        st.outputs = live_u(g, h, c1, e)
        stages.append(st)
    head = part.stage((h, len(g)))
    from_batch = tuple(t for t in head.inputs if g.producer[t] < 0)
    kept = tuple(t for t in head.inputs if 0 <= g.producer[t] < c1)
    turnaround = tuple(t for t in head.inputs if g.producer[t] >= c1)
    if set(turnaround) != set(stages[-1].outputs):
        raise PartitionError(f"turnaround {turnaround} != last trunk stage outputs {stages[-1].outputs}")
    # stage 0's trunk part also returns the kept tensors (they stay home, for the heads)
    sends = stages[0].outputs
    stages[0].outputs = tuple(sorted(set(sends) | set(kept), key=lambda t: g._order[t]))
    return stages, HeadPart(head, from_batch, kept, turnaround, sends)


def u_profile(profile: dict, graph: LayerGraph) -> dict:
    """The SWIFT model profile of a U-shaped pipeline: the trunk layers only, the heads folded into layer 0.

    * the heads' FLOPs, parameter and memory bytes are charged to layer 0, which is always on the data owner
      (it reads raw inputs), so SWIFT's compute (Eq. 8) and memory checks see them on stage 0;
    * `activation_bytes` of trunk layer i are the bytes per sample crossing a U-shaped cut after it
      (`live_u`, with the first cut at i + 1 itself: no labels, no head-only tensors);
    * approximation (documented): the turnaround hop (last trunk stage -> stage 0, plus the gradient back) is
      not charged, because SWIFT's Eq. 10 charges no link time to a pipeline's last stage. For the tiny
      encoder that hop carries `dec.N` ([31, d] per sample), comparable to one ordinary cut.
    Per-sample tensor sizes come from the profile's `layer_details` (`output_bytes` is per layer, so
    per-tensor sizes are approximated by splitting a layer's output bytes evenly over its outputs)."""
    h = head_start(graph)
    rows = [dict(r) for r in profile["layers"]]
    details = {d["name"]: d for d in profile.get("layer_details", [])}
    size: dict[str, float] = {}
    for node in graph.nodes:
        d = details.get(node.name)
        if d is not None and node.writes:
            for w in node.writes:
                size[w] = d["output_bytes"] / len(node.writes)
    trunk = rows[:h]
    for r in rows[h:]:
        for k in ("flops", "param_bytes", "mem_bytes"):
            trunk[0][k] += r[k]
    c1 = graph.min_first_end
    for i in range(c1 - 1, h):
        # cuts before min_first_end are never planned; c1 = min_first_end counts every trunk tensor the heads
        # read as travelling (an upper bound where stage 0 actually ends later and keeps some of them)
        trunk[i]["activation_bytes"] = int(round(sum(size.get(t, 0.0) for t in live_u(graph, h, c1, i + 1))))
    out = {k: v for k, v in profile.items() if k not in ("layers", "layer_details")}
    out["layers"] = trunk
    out["u_shaped"] = {"head_start": h, "heads": graph.names[h:],
                       "note": "heads folded into layer 0 (the data owner); turnaround hop not charged"}
    return out


__all__ = ["HEAD_GROUPS", "HeadPart", "head_layers", "head_start", "live_u", "u_profile", "u_stages"]
