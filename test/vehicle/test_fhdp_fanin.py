"""The fan-in schedule (every member's data at once) equals a single-process step on the union of the batches.

Each source trains a replica of the raw-input layers on its own batch; the trunk pipeline trains the rest on
all sources' micro-batches interleaved. Vehicles run in threads of this process and talk only through real
ZeroMQ sockets on loopback, as in test_fhdp_equivalence.py.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import zmq

from flad_core import tensorframe
from flad_vehicle.encoder.config import get_config
from flad_vehicle.encoder.model import LABEL_INPUTS, VisionEncoder, batch_to_torch
from flad_vehicle.encoder.partition import Partitioner
from flad_vehicle.encoder.synthetic import synthetic_batches
from flad_vehicle.fhdp.fanin import SOURCE_GRAD_BASE, SYNC_UP_BASE, FanInPlan, FanInRunner
from flad_vehicle.fhdp.links import Inbox, OutLink, tensor_digest
from flad_vehicle.fhdp.optim import stage_param_groups
from flad_vehicle.fhdp.pipeline import Pipeline, PipelineError

from flad_testing import reference_step

RAW_SENSORS = {"rgb_front", "rgb_left", "rgb_right", "rgb_rear", "lidar"}
SMALL_CAMERAS = {"rgb_front": (64, 64), "rgb_left": (32, 32), "rgb_right": (32, 32), "rgb_rear": (32, 32)}
# the LMDrive-sized encoder's layer structure (42 layers: ResNet-50d + ResNet-18-style LiDAR, 1 encoder and 3 decoder
# layers), thinner and on small images so that a CPU test runs it in seconds; group norm, so that micro-batches
# compute what whole batches do (batch norm would not)
PAPER_STRUCTURE = {"name": "paper", "norm": "group", "d_model": 32, "n_heads": 4, "ffn_dim": 64,
                   "rgb_stem": (8, 8, 16), "rgb_widths": (8, 16, 16, 32), "pillar_channels": 16,
                   "lidar_widths": (16, 16, 32), "gru_hidden": 32, "cameras": SMALL_CAMERAS, "lidar_rays": 2048,
                   "tl_focus_widths": (8, 8, 8)}


def run_fanin(model, batches, plan, schedule, n_micro, clip, port_base, steps=1, codec="fp32"):
    """One thread per vehicle. The hub's replica and every trunk stage are parts of `model`; every other
    source trains its own copy of the replica. Returns results by vehicle, the replicas by vehicle, the links."""
    part = Partitioner(model)
    ctx = zmq.Context()
    members = plan.members
    addrs = {v: f"tcp://127.0.0.1:{port_base + i}" for i, v in enumerate(members)}
    inboxes = {v: Inbox(ctx, addrs[v]) for v in members}
    links = {v: {p: OutLink(ctx, p, addrs[p], i, codec=codec) for p in members if p != v}
             for i, v in enumerate(members)}
    runners, replicas = {}, {}
    for v in members:
        trunk_stage = part.stage((plan.trunk[plan.trunk.stage_of(v)].start, plan.trunk[plan.trunk.stage_of(v)].end)) \
            if v in plan.trunk.members else None
        replica = owner = None
        if v in plan.sources:
            owner = model if v == plan.hub else copy.deepcopy(model)
            replica = Partitioner(owner).stage((0, plan.cut))
            replicas[v] = replica
        owners = [(replica, owner if v in plan.sources else None), (trunk_stage, model)]
        groups = [g for m, o in owners if m is not None
                  for g in stage_param_groups(m, o.param_groups(7.5e-4, 3e-4, 0.05))]
        runners[v] = FanInRunner(v, plan, inbox=inboxes[v], links=links[v], replica=replica, trunk_stage=trunk_stage,
                                 optimizer=torch.optim.AdamW(groups, eps=1e-8), batch_size=len(batches[0]["speed"]),
                                 schedule=schedule, n_micro=n_micro, grad_clip=clip, label_names=LABEL_INPUTS,
                                 timeout_s=60, sync_codec=codec)
    results: dict = {}
    errors: list = []

    def work(v):
        try:
            for step in range(steps):
                feed = None
                if v in plan.sources:
                    b = batches[plan.sources.index(v)]
                    feed = {n: b[n] for n in runners[v].batch_inputs}
                results[v] = runners[v].run_step(step, feed)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(v,)) for v in members]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    all_links = [x for per in links.values() for x in per.values()]
    for x in [*all_links, *inboxes.values()]:
        x.close()
    ctx.term()
    if errors:
        raise errors[0]
    return results, replicas, all_links


def _batches(n_sources, size, seed, cameras=None, lidar_rays=None):
    return [batch_to_torch(next(synthetic_batches(1, size, seed=seed + s, camera_sizes=cameras,
                                                  lidar_rays=lidar_rays))) for s in range(n_sources)]


def _union(batches):
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


@pytest.fixture(scope="module")
def tiny_setup():
    torch.manual_seed(0)
    return VisionEncoder(get_config("tiny"))


@pytest.fixture(scope="module")
def paper_setup():
    torch.manual_seed(0)
    return VisionEncoder(get_config(PAPER_STRUCTURE))


def _check_equivalent(model, plan, schedule, n_micro, port_base, batches, max_zero_grad=0.05):
    ref_model, pipe_model = copy.deepcopy(model), copy.deepcopy(model)
    ref_loss, ref_norm, ref_grads = reference_step(ref_model, _union(batches), clip=1.0)   # clip=1 clips
    results, replicas, links = run_fanin(pipe_model, batches, plan, schedule, n_micro, clip=1.0, port_base=port_base)
    last = plan.trunk[-1].vehicle
    assert [v for v, r in results.items() if r.loss is not None] == [last]
    assert results[last].loss == pytest.approx(ref_loss, rel=1e-5)
    for r in results.values():
        assert r.grad_norm == pytest.approx(ref_norm, rel=1e-4)
        assert not r.dropped
    # weights after the step: as in test_fhdp_equivalence, Adam moves weights whose true gradient is zero by
    # up to lr on rounding noise (here: below 1e-7, or below 1e-2 of the tensor's largest gradient, as in the
    # thin paper-structure layers); every other weight matches tightly
    noise_elems = total_elems = 0
    for (n1, p1), (_, p2) in zip(ref_model.named_parameters(), pipe_model.named_parameters(), strict=True):
        g = ref_grads[n1].abs() if n1 in ref_grads else None
        zero = g < 1e-7 if g is not None else torch.ones_like(p1, dtype=torch.bool)
        noise = zero | (g < 1e-2 * g.max()) if g is not None else zero
        atol = torch.where(noise, torch.tensor(2 * 7.5e-4), torch.tensor(1e-6))
        assert torch.all((p1 - p2).abs() <= atol + 1e-4 * p1.abs()), n1
        noise_elems += int(zero.sum())
        total_elems += noise.numel()
    assert noise_elems < max_zero_grad * total_elems
    # every replica applied the same update: bit-identical to the hub's
    hub_replica = replicas.get(plan.hub) or Partitioner(pipe_model).stage((0, plan.cut))
    for v, rep in replicas.items():
        for (n1, a), (_, b) in zip(hub_replica.named_parameters(), rep.named_parameters(), strict=True):
            assert torch.equal(a, b), (v, n1)
    # raw sensor data never left its source: no raw tensor name, no raw content on any link
    raw = {tensor_digest(c) for b in batches for n in RAW_SENSORS for c in torch.tensor_split(b[n], n_micro)}
    sent = {d for link in links for rec in link.stats.audit for d in rec.digests}
    assert not raw & sent
    assert all(not RAW_SENSORS & set(rec.names) for link in links for rec in link.stats.audit)
    return results, links


# (sources, trunk as (vehicle, start, end) with L = the model's layer count)
TINY_PLANS = [
    (("a", "b"), [("b", 6, None)]),                        # 2 members: the hub is a source, the trunk one stage
    (("a", "b"), [("a", 5, 12), ("b", 12, None)]),         # 2 members: both trunk stages are sources too
    (("a", "b", "c"), [("c", 6, None)]),                   # 3 members, one-stage trunk on a source
    (("a", "b", "c"), [("c", 6, 12), ("b", 12, None)]),    # a remote source (b) that also runs a trunk stage
    (("a", "b", "c"), [("a", 4, 10), ("b", 10, 16), ("c", 16, None)]),
]


def _plan(sources, trunk, n_layers):
    return FanInPlan.of(sources, Pipeline.of((v, s, n_layers if e is None else e) for v, s, e in trunk))


@pytest.mark.parametrize(("sources", "trunk", "schedule"),
                         [(*p, "1f1b") for p in TINY_PLANS] + [(*TINY_PLANS[3], "gpipe")])
def test_fanin_step_equals_single_process_tiny(tiny_setup, port_base, sources, trunk, schedule):
    model = tiny_setup
    plan = _plan(sources, trunk, len(Partitioner(model).graph))
    results, links = _check_equivalent(model, plan, schedule, 2, port_base, _batches(len(sources), 4, seed=11))
    # every source's data went through: the hub received activations from each remote source
    remote = [s for s in sources if s != plan.hub]
    senders = {link.stats.audit[0].to for link in links if link.stats.audit}
    assert plan.hub in senders or not remote
    for s in remote:
        assert results[s].extra["samples"] == 4
    grads_to_sources = [rec for link in links for rec in link.stats.audit
                        if rec.kind == tensorframe.KIND_GRADIENT and rec.micro_batch >= SOURCE_GRAD_BASE]
    assert len(grads_to_sources) == 2 * len(remote)


@pytest.mark.parametrize(("sources", "trunk"), [
    (("a", "b"), [("b", 12, 30), ("a", 30, None)]),
    (("a", "b", "c"), [("c", 8, 20), ("a", 20, 34), ("b", 34, None)]),
])
def test_fanin_step_equals_single_process_paper_structure(paper_setup, port_base, sources, trunk):
    model = paper_setup
    n_layers = len(Partitioner(model).graph)
    assert n_layers == 42                        # the paper preset's layer structure
    plan = _plan(sources, trunk, n_layers)
    _check_equivalent(model, plan, "1f1b", 2, port_base,
                      _batches(len(sources), 2, seed=5, cameras=SMALL_CAMERAS, lidar_rays=2048),
                      max_zero_grad=0.1)   # thin layers on small images: more weights without a gradient


def test_fanin_steps_keep_replicas_identical(tiny_setup, port_base):
    plan = _plan(("a", "b", "c"), [("c", 6, 12), ("b", 12, None)], len(Partitioner(tiny_setup).graph))
    batches = _batches(3, 4, seed=2)
    results, replicas, _ = run_fanin(copy.deepcopy(tiny_setup), batches, plan, "1f1b", 2, clip=1.0,
                                     port_base=port_base, steps=3)
    for rep in replicas.values():
        for a, b in zip(replicas["c"].parameters(), rep.parameters(), strict=True):
            assert torch.equal(a, b)
    assert results["b"].loss is not None and results["b"].step == 2


def test_fanin_plan_rejects_bad_plans(tiny_setup):
    n = len(Partitioner(tiny_setup).graph)
    with pytest.raises(PipelineError, match="twice"):
        FanInPlan.of(("a", "a"), [("a", 5, n)])
    with pytest.raises(PipelineError, match="after the replicated"):
        FanInPlan.of(("a", "b"), [("a", 0, n)])
    with pytest.raises(PipelineError, match="raw sensor data"):
        FanInPlan.of(("a", "b"), [("b", 2, n)]).check_model(n, Partitioner(tiny_setup).graph.min_first_end)
    with pytest.raises(PipelineError, match="trunk ends"):
        FanInPlan.of(("a", "b"), [("b", 6, n - 1)]).check_model(n, 4)
    plan = FanInPlan.of(("a", "b", "c"), [("c", 6, n)])
    assert [plan.source_of(plan.global_mb(s, m)) for m in range(2) for s in range(3)] == \
        [(s, m) for m in range(2) for s in range(3)]


def test_fanin_runner_rejects_wrong_batch(tiny_setup, port_base):
    model = copy.deepcopy(tiny_setup)
    n = len(Partitioner(model).graph)
    plan = _plan(("a", "b"), [("b", 6, None)], n)
    ctx = zmq.Context()
    inbox = Inbox(ctx, f"tcp://127.0.0.1:{port_base}")
    link = OutLink(ctx, "b", f"tcp://127.0.0.1:{port_base + 1}", 0)
    try:
        runner = FanInRunner("a", plan, inbox=inbox, links={"b": link}, replica=Partitioner(model).stage((0, 6)),
                             trunk_stage=None, optimizer=None, batch_size=4, n_micro=2)
        b = _batches(1, 3, seed=0)[0]
        with pytest.raises(ValueError, match="must bring 4"):
            runner.run_step(0, {k: b[k] for k in runner.batch_inputs})
        with pytest.raises(ValueError, match="missing link to b"):
            FanInRunner("a", plan, inbox=inbox, links={}, replica=Partitioner(model).stage((0, 6)),
                        trunk_stage=None, optimizer=None, batch_size=4, n_micro=2)
    finally:
        link.close()
        inbox.close()
        ctx.term()


def test_a_lossy_codec_keeps_the_replicas_identical(tiny_setup, port_base):
    """int8 on every frame, the replica reduction included: the hub applies the sum exactly as the sources decode
    it, so the replicas stay bit-identical; the loss stays close to the exact step's."""
    plan = _plan(("a", "b", "c"), [("c", 6, 12), ("b", 12, None)], len(Partitioner(tiny_setup).graph))
    batches = _batches(3, 4, seed=2)
    exact, _, _ = run_fanin(copy.deepcopy(tiny_setup), batches, plan, "1f1b", 2, clip=1.0, port_base=port_base,
                            steps=2)
    lossy, replicas, links = run_fanin(copy.deepcopy(tiny_setup), batches, plan, "1f1b", 2, clip=1.0,
                                       port_base=port_base + 8, steps=2, codec="int8")
    for rep in replicas.values():
        for a, b in zip(replicas["c"].parameters(), rep.parameters(), strict=True):
            assert torch.equal(a, b)
    assert lossy["b"].loss == pytest.approx(exact["b"].loss, rel=0.02)
    sync = [rec for link in links for rec in link.stats.audit if rec.micro_batch >= SYNC_UP_BASE]
    assert sync and all(any("\x1f" in n for n in rec.names) or rec.nbytes < 1024 for rec in sync)
