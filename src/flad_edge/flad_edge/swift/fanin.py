"""SWIFT for the fan-in schedule (every member's data at once, `flad_vehicle.fhdp.fanin`): where to cut, which
trunk, which stage-traffic codec -- planned from per-layer times (measured, or the paper's FLOP model).

Every member is a source (a replica of layers [0, cut) on its own data); the trunk is one stage [cut, L) or two
[cut, c2), [c2, L) on any members. A step of S sources x B samples (M micro-batches each) keeps each device busy
with its compute (replica work on its B samples, trunk work on all S x B) and its radio (everything it sends
and receives, one budget per device as `flad_core.emulation.Radio`, half duplex), and ends with the replica
reduction (each remote source's replica gradients to the hub and the sum back, which nothing overlaps).

    step = max over devices of max(compute, radio) + fill + replica reduction

where fill is one micro-batch's trip through the pipeline (the 1F1B bubble). Layer times come in seconds per
sample on a reference device of `ref_tflops`; a device of t TFLOPS takes ref_tflops / t of that (how the
emulation dilates compute, so a plan made from host measurements predicts the emulated step).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

FWD_BWD_FLOPS = 3.0     # the FLOP model: a backward pass costs about twice the forward


@dataclass(frozen=True)
class Device:
    id: str
    tflops: float
    link_mbps: float

    @property
    def bytes_per_s(self) -> float:
        return self.link_mbps * 1e6 / 8


@dataclass
class FanInCandidate:
    sources: tuple[str, ...]
    trunk: list[tuple[str, int, int]]
    codec: str
    step_s: float
    breakdown: dict[str, Any] = field(default_factory=dict)

    @property
    def samples_per_step(self) -> int:
        return int(self.breakdown["samples_per_step"])

    def to_json(self) -> dict[str, Any]:
        return {"sources": list(self.sources), "trunk": [list(t) for t in self.trunk], "codec": self.codec,
                "predicted_step_s": self.step_s,
                "predicted_samples_per_s": self.samples_per_step / self.step_s, **self.breakdown}


def flop_layer_seconds(flops_per_sample: Sequence[float]) -> tuple[list[float], float]:
    """The paper's cost model (Eq. 8 without its fitted factors): forward FLOPs x 3 at peak TFLOPS. Returns
    per-layer seconds per sample on a 1-TFLOPS reference device, and that reference (1.0)."""
    return [f * FWD_BWD_FLOPS / 1e12 for f in flops_per_sample], 1.0


def predict(devices: Mapping[str, Device], layer_s: Sequence[float], ref_tflops: float,
            traffic: Mapping[int, Mapping[str, float]], replica_bytes: float, sources: Sequence[str],
            trunk: Sequence[tuple[str, int, int]], batch: int, n_micro: int) -> tuple[float, dict[str, Any]]:
    """Predicted step time of one fan-in plan, and what bounds it.

    `traffic[cut]`: forward and backward bytes per sample crossing a cut (`{"forward": b, "backward": b}`, for the
    codec in use); `replica_bytes`: the replica's gradient bytes (each remote source sends them, gets the sum back)."""
    n_src = len(sources)
    total = n_src * batch
    cut = trunk[0][1]

    def secs(v: str, a: int, b: int) -> float:
        return sum(layer_s[a:b]) * ref_tflops / devices[v].tflops

    compute = dict.fromkeys(devices, 0.0)
    radio = dict.fromkeys(devices, 0.0)
    hub = trunk[0][0]
    for s in sources:
        compute[s] += batch * secs(s, 0, cut)
        if s != hub:
            nbytes = batch * (traffic[cut]["forward"] + traffic[cut]["backward"])
            radio[s] += nbytes
            radio[hub] += nbytes
            radio[s] += 2 * replica_bytes
            radio[hub] += 2 * replica_bytes
    for i, (v, a, b) in enumerate(trunk):
        compute[v] += total * secs(v, a, b)
        if i + 1 < len(trunk):
            nbytes = total * (traffic[b]["forward"] + traffic[b]["backward"])
            radio[v] += nbytes
            radio[trunk[i + 1][0]] += nbytes
    radio_s = {v: radio[v] / devices[v].bytes_per_s for v in devices}
    busy = {v: max(compute[v], radio_s[v]) for v in devices}
    bottleneck = max(busy, key=lambda v: busy[v])
    mb = batch / n_micro
    # fill: one micro-batch from the slowest source through the trunk (compute and transfers on its way)
    slow_src = max(sources, key=lambda s: secs(s, 0, cut))
    fill = mb * secs(slow_src, 0, cut)
    if slow_src != hub:
        fill += mb * traffic[cut]["forward"] / min(devices[slow_src].bytes_per_s, devices[hub].bytes_per_s)
    for i, (v, a, b) in enumerate(trunk):
        fill += mb * secs(v, a, b)
        if i + 1 < len(trunk):
            fill += mb * traffic[b]["forward"] / min(devices[v].bytes_per_s, devices[trunk[i + 1][0]].bytes_per_s)
    # the replica reduction runs after the last backward: the hub's radio carries every remote source's share
    remote = [s for s in sources if s != hub]
    reduction = 2 * replica_bytes * len(remote) / devices[hub].bytes_per_s if remote else 0.0
    step = busy[bottleneck] + fill + reduction
    return step, {"samples_per_step": total, "bottleneck": bottleneck, "bottleneck_s": busy[bottleneck],
                  "fill_s": fill, "replica_reduction_s": reduction,
                  "compute_s": compute, "radio_s": radio_s}


def plan_fanin(devices: Sequence[Device], layer_s: Sequence[float], ref_tflops: float,
               traffic: Mapping[str, Mapping[int, Mapping[str, float]]],
               replica_param_bytes: Sequence[float] | Mapping[str, Sequence[float]],
               min_first_end: int, batch: int, n_micro: int, codecs: Sequence[str] = ("fp32",),
               max_trunk_stages: int = 2) -> list[FanInCandidate]:
    """Every fan-in plan of this cluster (every member a source; every cut; trunks of 1..`max_trunk_stages`
    stages on any members in any order; each codec), best predicted samples/s first.

    `traffic[codec][cut]`: bytes per sample across a cut; `replica_param_bytes[c]`: the gradient bytes of layers
    [0, c) that the replica reduction moves when the cut is c, one list for every codec or one per codec (the
    reduction travels in the plan's codec)."""
    by_id = {d.id: d for d in devices}
    sources = tuple(d.id for d in devices)
    n_layers = len(layer_s)
    out: list[FanInCandidate] = []
    for codec in codecs:
        cuts = traffic[codec]
        replica = replica_param_bytes[codec] if isinstance(replica_param_bytes, Mapping) else replica_param_bytes
        for cut in range(max(1, min_first_end), n_layers):
            if cut not in cuts:
                continue
            for k in range(1, max_trunk_stages + 1):
                for order in itertools.permutations(sources, k):
                    for inner in itertools.combinations(range(cut + 1, n_layers), k - 1):
                        if any(c not in cuts for c in inner):
                            continue
                        bounds = [cut, *inner, n_layers]
                        trunk = [(order[i], bounds[i], bounds[i + 1]) for i in range(k)]
                        # the hub's own data first: it trains while the other sources' first activations arrive
                        srcs = (order[0], *(s for s in sources if s != order[0]))
                        step, why = predict(by_id, layer_s, ref_tflops, cuts, replica[cut], srcs,
                                            trunk, batch, n_micro)
                        out.append(FanInCandidate(srcs, trunk, codec, step, why))
    out.sort(key=lambda c: c.step_s / c.samples_per_step)
    return out


def codec_byte_ratio(codec: str, numel: int = 65536) -> float:
    """Wire bytes of `codec` over fp32 bytes for a dense activation-like tensor (tensorcodec's own packing, scales
    included): what the edge's fan-in plan scales its profile's fp32 cut bytes by."""
    import torch

    from flad_core import tensorcodec

    x = {"x": torch.randn(numel, generator=torch.Generator().manual_seed(0))}
    return tensorcodec.wire_bytes(tensorcodec.encode(x, codec)) / tensorcodec.wire_bytes(tensorcodec.encode(x, "fp32"))


def plan_from_profile(devices: Sequence[Device], profile: Mapping[str, Any], batch: int, n_micro: int,
                      codec: str = "fp32") -> FanInCandidate:
    """The edge's fan-in plan: `plan_fanin` on the paper's FLOP model, with the encoder profile's per-sample cut
    bytes (`profile_model`: live tensors after each layer, labels included) and parameter bytes (the replica
    reduction carries the gradients of layers [0, cut)), both scaled to `codec`. Raises when nothing fits."""
    rows = profile["layers"]
    ratio = codec_byte_ratio(codec)
    traffic = {codec: {c: {"forward": rows[c - 1]["activation_bytes"] * ratio,
                           "backward": rows[c - 1]["activation_bytes"] * ratio} for c in range(1, len(rows))}}
    replica = list(itertools.accumulate((r["param_bytes"] * ratio for r in rows), initial=0.0))
    layer_s, ref = flop_layer_seconds([r["flops"] for r in rows])
    cands = plan_fanin(devices, layer_s, ref, traffic, replica, int(profile["min_first_stage_end"]), batch, n_micro,
                       codecs=(codec,))
    if not cands:
        raise ValueError(f"no fan-in plan for {[d.id for d in devices]} ({len(rows)} layers, codec {codec})")
    return cands[0]
