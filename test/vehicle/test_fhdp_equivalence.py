"""A pipelined step equals a single-process step: same weights, same batch -> same gradients and weights.

Stages run in threads of this process but talk only through real ZeroMQ sockets on loopback, exactly
as worker processes do (the multi-process run is tested in test_fhdp_processes.py).
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
from flad_vehicle.fhdp.links import Inbox, OutLink, tensor_digest
from flad_vehicle.fhdp.optim import stage_adamw
from flad_vehicle.fhdp.runner import StageRunner
from flad_vehicle.fhdp.ushape import head_start, u_stages

from flad_testing import reference_step

RAW_SENSORS = {"rgb_front", "rgb_left", "rgb_right", "rgb_rear", "lidar"}
LABELS = set(LABEL_INPUTS)


def _split(part, cuts, u_shaped):
    """(stages, head): the pipeline's stages for `cuts`; U-shaped, the cuts cut the trunk and `head` is the heads."""
    if not u_shaped:
        return part.stages(cuts), None
    bounds = [0, *cuts, head_start(part.graph)]
    return u_stages(part, [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)])


def _capture_grads(opt, named, grads):
    """Make `opt.step` copy the gradients of the `named` parameters into `grads` just before it consumes them."""
    orig = opt.step

    def capture(*a, **kw):
        for n, p in named:
            if p.grad is not None:
                grads[n] = p.grad.clone()
        return orig(*a, **kw)
    opt.step = capture


def run_pipeline(model, batch, cuts, schedule, n_micro, clip, port_base, codec="fp32", steps=1, u_shaped=False):
    """Runs `steps` pipelined steps; with `u_shaped`, `cuts` cut the trunk and stage 0 also holds the heads."""
    stages, head = _split(Partitioner(model), cuts, u_shaped)
    k = len(stages)
    ctx = zmq.Context()
    addrs = [f"tcp://127.0.0.1:{port_base + i}" for i in range(k)]
    inboxes = [Inbox(ctx, a) for a in addrs]
    runners, links = [], []
    for i, stage in enumerate(stages):
        prev = OutLink(ctx, f"s{i - 1}", addrs[i - 1], i, codec=codec) if i > 0 else None
        nxt = OutLink(ctx, f"s{i + 1}", addrs[i + 1], i, codec=codec) if i < k - 1 else None
        turn = None
        if u_shaped and i in (0, k - 1):
            peer = k - 1 if i == 0 else 0
            turn = OutLink(ctx, f"s{peer}", addrs[peer], i, codec=codec)
        links += [x for x in (prev, nxt, turn) if x]
        trained = torch.nn.ModuleList([stage, head.stage]) if (u_shaped and i == 0) else stage
        runners.append(StageRunner(stage, i, k, inbox=inboxes[i], prev=prev, next=nxt,
                                   optimizer=stage_adamw(trained, model), schedule=schedule, n_micro=n_micro,
                                   grad_clip=clip, label_names=LABEL_INPUTS, timeout_s=60, u_shaped=u_shaped,
                                   head=head if i == 0 else None, turn=turn))
    grads: dict[str, torch.Tensor] = {}
    results: list = [None] * k
    errors: list = []

    def work(i):
        try:
            for step in range(steps):
                feed = {n: batch[n] for n in runners[0].batch_inputs} if i == 0 else None
                if step == steps - 1:
                    named = list(stages[i].named_parameters())
                    if head is not None and i == 0:
                        named += list(head.stage.named_parameters())
                    _capture_grads(runners[i].optimizer, named, grads)
                results[i] = runners[i].run_step(step, feed)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for x in links + inboxes:
        x.close()
    ctx.term()
    if errors:
        raise errors[0]
    return results, grads, links


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = VisionEncoder(get_config("tiny"))
    batch = batch_to_torch(next(synthetic_batches(1, 6, seed=3)))
    return model, batch


@pytest.mark.parametrize(("cuts", "schedule", "n_micro", "u_shaped"), [
    ((10,), "gpipe", 3, False), ((10,), "1f1b", 3, False), ((6, 16), "gpipe", 2, False), ((6, 16), "1f1b", 3, False),
    ((4, 12), "1f1b", 6, False),
    # U-shaped: the cuts split the trunk [0, 18); stage 0 also runs the heads and the loss
    ((10,), "gpipe", 3, True), ((10,), "1f1b", 3, True), ((6, 16), "gpipe", 2, True), ((6, 16), "1f1b", 3, True),
    ((4, 12), "1f1b", 6, True), ((17,), "1f1b", 2, True),
])
def test_pipelined_step_equals_single_process(setup, port_base, cuts, schedule, n_micro, u_shaped):
    model, batch = setup
    ref_model, pipe_model = copy.deepcopy(model), copy.deepcopy(model)
    n_layers = len(Partitioner(model).graph)
    cuts = tuple(c for c in cuts if c < n_layers)
    ref_loss, ref_norm, ref_grads = reference_step(ref_model, batch, clip=1.0)   # clip=1 actually clips
    results, grads, links = run_pipeline(pipe_model, batch, cuts, schedule, n_micro, clip=1.0, port_base=port_base,
                                         u_shaped=u_shaped)
    loss_owner = results[0] if u_shaped else results[-1]
    assert [r.loss is not None for r in results] == [r is loss_owner for r in results]
    assert loss_owner.loss == pytest.approx(ref_loss, rel=1e-5)
    assert results[0].grad_norm == pytest.approx(ref_norm, rel=1e-4)
    ref_by_name = dict(ref_grads)
    for name, g in grads.items():
        assert torch.allclose(g, ref_by_name[name], rtol=1e-4, atol=1e-6), name
    assert len(grads) == len(ref_grads)
    # Adam's first step moves each weight by about lr * g / (|g| + eps): where the true gradient is zero
    # (e.g. attention key biases, to which softmax is invariant) g is rounding noise, and noise of either
    # sign moves the weight by up to lr. Those weights may differ by that much; every other weight must
    # match tightly.
    noise_elems = total_elems = 0
    for (n1, p1), (n2, p2) in zip(ref_model.named_parameters(), pipe_model.named_parameters(), strict=True):
        assert n1 == n2
        noise = ref_grads[n1].abs() < 1e-7 if n1 in ref_grads else torch.ones_like(p1, dtype=torch.bool)
        atol = torch.where(noise, torch.tensor(2 * 7.5e-4), torch.tensor(1e-6))
        assert torch.all((p1 - p2).abs() <= atol + 1e-4 * p1.abs()), n1
        noise_elems += int(noise.sum())
        total_elems += noise.numel()
    assert noise_elems < 0.05 * total_elems
    # data stays home: no raw sensor tensor was ever sent on any link, and in a U-shape no label either
    sent_digests = {d for link in links for rec in link.stats.audit for d in rec.digests}
    label_digests = {tensor_digest(c) for n in LABELS for c in torch.tensor_split(batch[n], n_micro)}
    raw_digests = {tensor_digest(c) for n in RAW_SENSORS for c in torch.tensor_split(batch[n], n_micro)}
    for link in links:
        for rec in link.stats.audit:
            assert not RAW_SENSORS & set(rec.names), rec
            assert len(rec.digests) == len(rec.names)
            if u_shaped:
                assert not LABELS & set(rec.names), rec
    assert not raw_digests & sent_digests
    # the audit sees labels where they do travel: the content check can fail
    assert bool(label_digests & sent_digests) is not u_shaped
    assert any(rec.kind == tensorframe.KIND_ACTIVATION for link in links for rec in link.stats.audit)
    if u_shaped:
        # the turnaround hop: the last trunk stage sends its features to stage 0, which returns their gradient
        k = len(results)
        assert any(rec.kind == tensorframe.KIND_ACTIVATION for link in links if link.stage_index == k - 1
                   for rec in link.stats.audit if rec.to == "s0")
        assert any(rec.kind == tensorframe.KIND_GRADIENT for link in links if link.stage_index == 0
                   for rec in link.stats.audit if rec.to == f"s{k - 1}")


def test_in_flight_bounded_by_schedule(setup, port_base):
    model, batch = setup
    results, _, _ = run_pipeline(copy.deepcopy(model), batch, (6, 16), "1f1b", 6, clip=None, port_base=port_base)
    assert [r.peak_in_flight for r in results] == [3, 2, 1]
    results, _, _ = run_pipeline(copy.deepcopy(model), batch, (6, 16), "gpipe", 6, clip=None, port_base=port_base)
    assert [r.peak_in_flight for r in results] == [6, 6, 6]


@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_u_shaped_codecs_compress_the_turnaround(setup, port_base, codec):
    model, batch = setup
    ref_loss, _, _ = reference_step(copy.deepcopy(model), batch, clip=1.0)
    plain, _, plain_links = run_pipeline(copy.deepcopy(model), batch, (6, 16), "1f1b", 3, clip=1.0,
                                         port_base=port_base, u_shaped=True)
    packed, _, packed_links = run_pipeline(copy.deepcopy(model), batch, (6, 16), "1f1b", 3, clip=1.0,
                                           port_base=port_base + 8, codec=codec, u_shaped=True)

    def turnaround_bytes(links, kind):
        # the last trunk stage (2) sends its features to stage 0; stage 0 returns their gradient to stage 2
        src, dst = (2, "s0") if kind == tensorframe.KIND_ACTIVATION else (0, "s2")
        return sum(rec.nbytes for link in links if link.stage_index == src for rec in link.stats.audit
                   if rec.to == dst and rec.kind == kind)

    ratio = 3.5 if codec == "int8" else 1.9
    for kind in (tensorframe.KIND_ACTIVATION, tensorframe.KIND_GRADIENT):
        assert turnaround_bytes(packed_links, kind) * ratio < turnaround_bytes(plain_links, kind), kind
    assert plain[0].loss == pytest.approx(ref_loss, rel=1e-5)
    assert packed[0].loss == pytest.approx(ref_loss, rel=1e-2)   # the first step's loss sees only forward rounding


@pytest.mark.parametrize("codec", ["fp16", "bf16", "int8"])
def test_labels_forward_labels_arrive_bit_exact_under_lossy_codecs(setup, port_base, codec):
    """Labels-forward ships the labels with the activations; a lossy codec compresses the activations only."""
    _, batch = setup
    ctx = zmq.Context()
    inbox = Inbox(ctx, f"tcp://127.0.0.1:{port_base}")
    out = OutLink(ctx, "s1", f"tcp://127.0.0.1:{port_base}", 0, codec=codec)
    act = torch.randn(6, 40, 64)
    sent = {"dec.2": act, **{k: batch[k] for k in LABEL_INPUTS}}
    out.send(sent, kind=tensorframe.KIND_ACTIVATION, step=0, micro_batch=0)
    _, got = inbox.get(tensorframe.KIND_ACTIVATION, 0, 0, timeout_s=5)
    out.close()
    inbox.close()
    ctx.term()
    for k in LABEL_INPUTS:
        assert got[k].dtype == batch[k].dtype and torch.equal(got[k], batch[k]), k
    assert not torch.equal(got["dec.2"], act)                 # the activation itself did go through the codec
    assert torch.allclose(got["dec.2"], act, atol=act.abs().max().item() / 100)
