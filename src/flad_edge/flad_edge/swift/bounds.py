"""Bounds on what any pipeline of a cluster can do, without running one (SWIFT's sanity checks on a plan).

* `ideal_step_s`: a synchronous pipeline's step from its stages' step times (fill + (M - 1) x slowest + drain).
* `cut_traffic`: the bytes per sample that cross each allowed cut of the encoder, per stage-traffic codec.
* `link_floor`: the links alone -- the cheapest cut on the fastest link bounds every pipeline.
* `pipeline_floor`: every vehicle order and pair of cuts, with FLOP-share compute and every directed link.
`flad bench pipeline` reports them next to the measured throughput.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch

from flad_core import tensorcodec
from flad_core.fleet import PAPER_PROFILES
from flad_vehicle.encoder.config import get_config
from flad_vehicle.encoder.model import LABEL_INPUTS, VisionEncoder
from flad_vehicle.encoder.partition import Partitioner
from flad_vehicle.fhdp.data import vehicle_batches

CODECS = ("fp32", "fp16", "bf16", "int8", "int4")


def ideal_step_s(stage_step_s: Sequence[float], n_micro: int) -> float:
    """Ideal synchronous pipeline step: fill + (M - 1) x slowest + drain, from per-stage per-step times.

    Each stage spends t_s = stage_step_s / M per micro-batch (forward + backward). The first micro-batch
    crosses every stage (fill and drain: sum of t_s), the other M - 1 follow at the slowest stage's pace.
    Communication and synchronisation are free in this bound.
    """
    if n_micro < 1 or not stage_step_s:
        raise ValueError("need at least one stage and one micro-batch")
    per_mb = [t / n_micro for t in stage_step_s]
    return sum(per_mb) + (n_micro - 1) * max(per_mb)


def cut_traffic(encoder: str, data: str, owner: str, codecs: Sequence[str] = CODECS) -> list[dict[str, Any]]:
    """Bytes per sample crossing each allowed cut, per codec, from one forward pass on one real sample.

    `forward`: every tensor live across the cut (activations, and the labels riding to the last stage);
    `backward`: the gradients of its trainable float activations; `labels`: the labels' share of `forward`,
    raw (fp32 sends them so) and packed (what the compressing codecs send). Payload bytes only (no frame
    headers): what any pipeline with a cut there must move, whatever the scheduler."""
    model = VisionEncoder(get_config(encoder)).eval()
    graph = Partitioner(model).graph
    env = {k: torch.as_tensor(v) for k, v in next(vehicle_batches(data, owner, 1, 0)).items()}
    with torch.no_grad():
        for _, layer in model.layer_list(True):
            outs = layer(*[env[r] for r in layer.reads])
            env.update(zip(layer.writes, outs, strict=True))
    layers = dict(model.layer_list(True))
    last_trained = max(i for i, n in enumerate(graph.names) if any(True for _ in layers[n].parameters()))
    # a layer feeds the loss if it is the loss or one of its outputs is read by a layer that does; only tensors
    # read by such layers after the cut get a gradient back (e.g. what only the LLM feature head reads gets none)
    feeds_loss = [False] * len(graph.nodes)
    needed = set(graph.nodes[-1].reads)
    feeds_loss[-1] = True
    for i in range(len(graph.nodes) - 2, -1, -1):
        if needed & set(graph.nodes[i].writes):
            feeds_loss[i] = True
            needed |= set(graph.nodes[i].reads)
    rows = []
    for k in range(graph.min_first_end, len(graph.names)):
        live = {t: env[t] for t in graph.live(k)}
        grads = {t: v for t, v in live.items() if v.is_floating_point() and t not in LABEL_INPUTS
                 and any(feeds_loss[r] and t in graph.nodes[r].reads for r in range(k, len(graph.nodes)))}
        labels = {t: v for t, v in live.items() if t in LABEL_INPUTS}
        rows.append({"cut_before": k, "layer": graph.names[k], "trained_layers_after": k <= last_trained,
                     "forward": {c: tensorcodec.wire_bytes(tensorcodec.encode(live, c, LABEL_INPUTS)) for c in codecs},
                     "backward": {c: tensorcodec.wire_bytes(tensorcodec.encode(grads, c)) for c in codecs},
                     "labels": {"raw": tensorcodec.wire_bytes(labels),
                                "packed": tensorcodec.wire_bytes(tensorcodec.encode(labels, "int8", LABEL_INPUTS))}})
    return rows


def link_floor(cluster: Sequence[tuple[str, str]], codecs: Sequence[str], traffic: list[dict[str, Any]],
               standalone_sps: float) -> dict[str, Any]:
    """How fast any pipeline of this cluster could train, bounded by its links alone (emulated rates).

    A pipeline with a cut moves that cut's forward bytes one way and its gradients back, each direction on
    its own link; per sample that takes at least max(forward, backward) / rate. Only cuts with trained layers
    after them count (a stage holding just the parameter-free tail -- pooling, the loss -- adds no compute).
    With the cheapest such cut on the fastest link this bounds every pipeline that shares compute; ratio > 1
    means links alone need not stop a pipeline from matching standalone, < 1 that no partition can.
    `cluster`: (vehicle, device profile name) pairs."""
    rates = sorted({PAPER_PROFILES[p].link_mbps for _, p in cluster})
    out: dict[str, Any] = {"standalone_s_per_sample": 1.0 / standalone_sps if standalone_sps else None,
                           "link_mbps": {"slowest": rates[0], "fastest": rates[-1]}, "codecs": {}}
    useful = [r for r in traffic if r["trained_layers_after"]] or traffic
    for c in codecs:
        best = min(useful, key=lambda r: max(r["forward"][c], r["backward"][c]))
        nbytes = max(best["forward"][c], best["backward"][c])
        row: dict[str, Any] = {"cheapest_cut_before": best["cut_before"], "layer": best["layer"],
                               "forward_bytes_per_sample": best["forward"][c],
                               "backward_bytes_per_sample": best["backward"][c]}
        for name, mbps in (("fastest", rates[-1]), ("slowest", rates[0])):
            link_s = nbytes * 8 / (mbps * 1e6)
            row[f"link_s_per_sample_{name}"] = link_s
            row[f"max_pipeline_vs_standalone_{name}_link"] = (out["standalone_s_per_sample"] / link_s
                                                              if out["standalone_s_per_sample"] else None)
        out["codecs"][c] = row
    return out


def pipeline_floor(cluster: Sequence[tuple[str, str]], codecs: Sequence[str], traffic: list[dict[str, Any]],
                   profile: dict, standalone_sps: float) -> dict[str, Any]:
    """The best any partition of this cluster could do, and the best in which every member trains, per codec.

    An estimate, not a run: each stage's compute is the standalone AGX time per sample times the stage's share
    of the encoder's FLOPs (the layer profile), stretched by AGX TFLOPS / its device's TFLOPS; every directed
    link (forward: the cut's `forward` bytes at the sender's rate, backward: its gradients at the receiver's)
    is its own resource, as in the emulation. A pipeline's time per sample is its busiest resource (no fill,
    drain or overlap losses, so real pipelines do worse). Every vehicle order and every pair of allowed cuts
    is tried; `useful` keeps only partitions whose every stage holds a layer with parameters (a Nano that
    holds only pooling or the loss shares no training work). Answers whether the throughput goal vs standalone
    is reachable at all with this model on this cluster, whatever the scheduler."""
    if not standalone_sps:
        return {"error": "no standalone throughput"}
    if len(cluster) < 2:
        return {"error": "a one-vehicle cluster has no pipeline to bound"}
    layers = profile["layers"]
    n = len(layers)
    flops = [float(layer["flops"]) for layer in layers]
    total = sum(flops) or 1.0
    trained = [float(layer["param_bytes"]) > 0 for layer in layers]
    by_cut = {r["cut_before"]: r for r in traffic}
    prof = {v: PAPER_PROFILES[p] for v, p in cluster}
    fastest = max(d.tflops for d in prof.values())
    t_alone = 1.0 / standalone_sps
    k = len(cluster)
    out: dict[str, Any] = {"standalone_s_per_sample": t_alone, "estimate": True, "codecs": {}}
    for codec in codecs:
        best: dict[str, Any] = {}
        for order in itertools.permutations([v for v, _ in cluster]):
            for cuts in itertools.combinations(sorted(by_cut), k - 1):
                bounds = [0, *cuts, n]
                ranges = list(itertools.pairwise(bounds))
                compute = [t_alone * sum(flops[a:b]) / total * fastest / prof[v].tflops
                           for v, (a, b) in zip(order, ranges, strict=True)]
                links = []
                for i, c in enumerate(cuts):
                    row = by_cut[c]
                    links.append(row["forward"][codec] * 8 / (prof[order[i]].link_mbps * 1e6))
                    links.append(row["backward"][codec] * 8 / (prof[order[i + 1]].link_mbps * 1e6))
                step = max(*compute, *links)
                useful = all(any(trained[a:b]) for a, b in ranges)
                for kind in ("any", "useful") if useful else ("any",):
                    if kind not in best or step < best[kind]["s_per_sample"]:
                        best[kind] = {"vs_standalone": t_alone / step, "s_per_sample": step,
                                      "pipeline": [[v, a, b] for v, (a, b) in zip(order, ranges, strict=True)],
                                      "bound_by": "link" if max(links) >= max(compute) else "compute",
                                      "stage_flops_share": [round(sum(flops[a:b]) / total, 4) for a, b in ranges]}
        out["codecs"][codec] = best
    return out
