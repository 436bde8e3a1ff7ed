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
from flad_vehicle.fhdp.links import Inbox, OutLink
from flad_vehicle.fhdp.optim import stage_adamw
from flad_vehicle.fhdp.runner import StageRunner

RAW_SENSORS = {"rgb_front", "rgb_left", "rgb_right", "rgb_rear", "lidar"}


def reference_step(model, batch, clip):
    opt = torch.optim.AdamW(model.param_groups(7.5e-4, 3e-4, 0.05), eps=1e-8)
    loss = model.forward_train(batch)["loss"]
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    return float(loss.detach()), float(norm), grads


def run_pipeline(model, batch, cuts, schedule, n_micro, clip, port_base, codec="fp32", steps=1):
    part = Partitioner(model)
    stages = part.stages(cuts)
    k = len(stages)
    ctx = zmq.Context()
    addrs = [f"tcp://127.0.0.1:{port_base + i}" for i in range(k)]
    inboxes = [Inbox(ctx, a) for a in addrs]
    runners, links = [], []
    for i, stage in enumerate(stages):
        prev = OutLink(ctx, f"s{i - 1}", addrs[i - 1], i, codec=codec) if i > 0 else None
        nxt = OutLink(ctx, f"s{i + 1}", addrs[i + 1], i, codec=codec) if i < k - 1 else None
        links += [x for x in (prev, nxt) if x]
        runners.append(StageRunner(stage, i, k, inbox=inboxes[i], prev=prev, next=nxt,
                                   optimizer=stage_adamw(stage, model), schedule=schedule, n_micro=n_micro,
                                   grad_clip=clip, label_names=LABEL_INPUTS, timeout_s=60))
    grads: dict[str, torch.Tensor] = {}
    results: list = [None] * k
    errors: list = []

    def work(i):
        try:
            for step in range(steps):
                feed = {n: batch[n] for n in stages[0].inputs} if i == 0 else None
                if step == steps - 1:
                    # capture gradients just before the optimizer consumes them
                    opt = runners[i].optimizer
                    orig = opt.step

                    def capture(*a, orig=orig, **kw):
                        for n, p in stages[i].named_parameters():
                            if p.grad is not None:
                                grads[n] = p.grad.clone()
                        return orig(*a, **kw)
                    opt.step = capture
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


@pytest.mark.parametrize(("cuts", "schedule", "n_micro"), [
    ((10,), "gpipe", 3), ((10,), "1f1b", 3), ((6, 16), "gpipe", 2), ((6, 16), "1f1b", 3), ((4, 12), "1f1b", 6),
])
def test_pipelined_step_equals_single_process(setup, port_base, cuts, schedule, n_micro):
    model, batch = setup
    ref_model, pipe_model = copy.deepcopy(model), copy.deepcopy(model)
    n_layers = len(Partitioner(model).graph)
    cuts = tuple(c for c in cuts if c < n_layers)
    ref_loss, ref_norm, ref_grads = reference_step(ref_model, batch, clip=1.0)   # clip=1 actually clips
    results, grads, links = run_pipeline(pipe_model, batch, cuts, schedule, n_micro, clip=1.0, port_base=port_base)
    last = results[-1]
    assert last.loss == pytest.approx(ref_loss, rel=1e-5)
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
    # data stays home: no raw sensor tensor was ever sent on any link
    for link in links:
        for rec in link.stats.audit:
            assert not RAW_SENSORS & set(rec.names), rec
    assert any(rec.kind == tensorframe.KIND_ACTIVATION for link in links for rec in link.stats.audit)


def test_in_flight_bounded_by_schedule(setup, port_base):
    model, batch = setup
    results, _, _ = run_pipeline(copy.deepcopy(model), batch, (6, 16), "1f1b", 6, clip=None, port_base=port_base)
    assert [r.peak_in_flight for r in results] == [3, 2, 1]
    results, _, _ = run_pipeline(copy.deepcopy(model), batch, (6, 16), "gpipe", 6, clip=None, port_base=port_base)
    assert [r.peak_in_flight for r in results] == [6, 6, 6]
