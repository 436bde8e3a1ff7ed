"""Error feedback on stage links: a lossy codec's error is carried into the slot's next send, not lost.

Links are real ZeroMQ PUSH/PULL pairs on loopback (`OutLink` -> `Inbox`); the convergence check trains the tiny
encoder as a two-stage pipeline in threads of this process, as test_fhdp_equivalence.py does.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import zmq

from flad_core import tensorcodec, tensorframe
from flad_vehicle.encoder.config import get_config
from flad_vehicle.encoder.model import LABEL_INPUTS, VisionEncoder, batch_to_torch
from flad_vehicle.encoder.partition import Partitioner
from flad_vehicle.encoder.synthetic import synthetic_batches
from flad_vehicle.fhdp import links as links_mod
from flad_vehicle.fhdp.links import KIND_CONTROL, Inbox, OutLink
from flad_vehicle.fhdp.optim import stage_adamw
from flad_vehicle.fhdp.runner import StageRunner

ACT = tensorframe.KIND_ACTIVATION
SMALL_CAMERAS = {"rgb_front": (64, 64), "rgb_left": (32, 32), "rgb_right": (32, 32), "rgb_rear": (32, 32)}


@pytest.fixture
def pair(port_base):
    """(make_link, inbox): OutLinks made by `make_link(**kw)` all feed the one inbox; everything closed after."""
    ctx = zmq.Context()
    address = f"tcp://127.0.0.1:{port_base}"
    inbox = Inbox(ctx, address)
    made: list[OutLink] = []

    def make_link(**kw) -> OutLink:
        made.append(OutLink(ctx, "s1", address, 0, **kw))
        return made[-1]

    yield make_link, inbox
    for link in made:
        link.close()
    inbox.close()
    ctx.term()


def _round_trip(link: OutLink, inbox: Inbox, tensors: dict, step: int, mb: int = 0, kind: int = ACT) -> dict:
    link.send(tensors, kind=kind, step=step, micro_batch=mb)
    return inbox.get(kind, step, mb, timeout_s=5)[1]


def _single_shot_error(x: torch.Tensor, codec: str = "int4") -> float:
    return float((tensorcodec.decode(tensorcodec.encode({"x": x}, codec))["x"] - x).norm())


@pytest.mark.parametrize("feedback", [True, False])
def test_feedback_makes_the_mean_of_repeated_sends_exact(pair, feedback):
    make_link, inbox = pair
    link = make_link(codec="int4", error_feedback=feedback)
    x = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))
    waypoints = torch.randn(1, 5, 2)
    received = []
    for step in range(50):
        got = _round_trip(link, inbox, {"act": x, "waypoints": waypoints, "n": torch.tensor(7)}, step)
        assert torch.equal(got["waypoints"], waypoints) and int(got["n"]) == 7    # labels stay exact
        assert got["act"].dtype == x.dtype and got["act"].shape == x.shape
        received.append(got["act"])
    single = _single_shot_error(x)
    mean_err = float((torch.stack(received).mean(0) - x).norm())
    # each send stays an int4 decode (its error is the single shot's size) ...
    assert float((received[-1] - x).norm()) < 2 * single
    if feedback:
        # ... but the errors cancel over the steps: the sum received is the sum sent minus one residual
        assert mean_err < 0.2 * single, (mean_err, single)
        assert {key[1] for key in link._residuals} == {"act"}       # no residual for labels or integer tensors
        assert link.residual_norm() > 0
    else:
        assert mean_err == pytest.approx(single, rel=0.05), (mean_err, single)
        assert link.residual_norm() == 0.0


def test_residuals_are_per_micro_batch_and_kind(pair):
    make_link, inbox = pair
    link = make_link(codec="int4", error_feedback=True)
    g = torch.Generator().manual_seed(1)
    xs = {0: torch.randn(32, 40, generator=g), 1: torch.randn(32, 40, generator=g) * 5 + 3}
    grad = torch.randn(32, 40, generator=g) * 0.01
    sums = {0: torch.zeros(32, 40), 1: torch.zeros(32, 40)}
    for step in range(40):
        for mb, x in xs.items():
            sums[mb] += _round_trip(link, inbox, {"act": x}, step, mb)["act"]
        # a gradient frame of the same name and slot has its own residual
        _round_trip(link, inbox, {"act": grad}, step, 0, kind=tensorframe.KIND_GRADIENT)
    assert set(link._residuals) == {(ACT, "act", 0), (ACT, "act", 1), (tensorframe.KIND_GRADIENT, "act", 0)}
    for mb, x in xs.items():
        # mixed slots would pull each mean toward the other (their means differ by 3)
        assert float((sums[mb] / 40 - x).norm()) < 0.2 * _single_shot_error(x), mb
    # control frames go uncompressed and leave the residuals alone
    before = link.residual_norm()
    link.send({"sq": torch.tensor(2.0, dtype=torch.float64)}, kind=KIND_CONTROL, step=0, micro_batch=99,
              compress=False)
    assert inbox.get(KIND_CONTROL, 0, 99, timeout_s=5)[1]["sq"].item() == 2.0
    assert link.residual_norm() == before and len(link._residuals) == 3


def test_stale_residual_of_another_shape_is_dropped(pair):
    make_link, inbox = pair
    link = make_link(codec="int4", error_feedback=True)
    _round_trip(link, inbox, {"act": torch.randn(6, 32) * 100}, 0)
    small = torch.randn(4, 32)
    got = _round_trip(link, inbox, {"act": small}, 1)["act"]
    # the big tensor's residual (~100x larger) was not added to the new shape's first send
    assert float((got - small).norm()) <= 1.5 * _single_shot_error(small)
    assert link._residuals[(ACT, "act", 0)].shape == small.shape


def test_residual_norm_stays_bounded_and_slots_are_capped(pair, monkeypatch):
    make_link, inbox = pair
    link = make_link(codec="int4", error_feedback=True)
    g = torch.Generator().manual_seed(2)
    norms = []
    for step in range(200):
        _round_trip(link, inbox, {"act": torch.randn(16, 64, generator=g)}, step)
        norms.append(link.residual_norm())
    # per element the residual stays below half a step of a scale ~ absmax / 6.5 (|x| < 6 here): a fixed point
    assert max(norms) < (16 * 64) ** 0.5 * 6 / 13
    assert sum(norms[-50:]) < 1.5 * sum(norms[50:100])                       # no drift
    monkeypatch.setattr(links_mod, "MAX_RESIDUALS", 8)
    for mb in range(20):
        _round_trip(link, inbox, {"act": torch.randn(4, 8, generator=g)}, 500, mb)
    assert len(link._residuals) == 8 and (ACT, "act", 19) in link._residuals and (ACT, "act", 11) not in link._residuals


@pytest.mark.parametrize("codec", ["fp32", "int8"])
def test_feedback_is_a_no_op_without_loss_and_harmless_with_int8(pair, codec):
    make_link, inbox = pair
    link = make_link(codec=codec, error_feedback=True)
    x = torch.randn(8, 33)
    got = _round_trip(link, inbox, {"act": x}, 0)["act"]
    if codec == "fp32":
        assert torch.equal(got, x) and link.residual_norm() == 0.0 and not link._residuals
    else:
        assert torch.allclose(got, x, atol=float(x.abs().max()) / 100) and link.residual_norm() > 0


# -- convergence: a two-stage pipeline whose activations and gradients travel int4 --------------------------------
def _train(model, batches, cuts, codec, feedback, port_base, n_micro=2):
    """Losses of `len(batches)` pipelined 1F1B steps (stages in threads, real sockets); and the links."""
    stages = Partitioner(model).stages(cuts)
    k = len(stages)
    ctx = zmq.Context()
    addrs = [f"tcp://127.0.0.1:{port_base + i}" for i in range(k)]
    inboxes = [Inbox(ctx, a) for a in addrs]
    links, runners = [], []
    for i, stage in enumerate(stages):
        prev = OutLink(ctx, f"s{i - 1}", addrs[i - 1], i, codec=codec, error_feedback=feedback) if i > 0 else None
        nxt = OutLink(ctx, f"s{i + 1}", addrs[i + 1], i, codec=codec, error_feedback=feedback) if i < k - 1 else None
        links += [x for x in (prev, nxt) if x]
        runners.append(StageRunner(stage, i, k, inbox=inboxes[i], prev=prev, next=nxt,
                                   optimizer=stage_adamw(stage, model), schedule="1f1b", n_micro=n_micro,
                                   grad_clip=1.0, label_names=LABEL_INPUTS, timeout_s=60))
    losses: list = [None] * len(batches)
    errors: list = []

    def work(i):
        try:
            for step, batch in enumerate(batches):
                feed = {n: batch[n] for n in runners[0].batch_inputs} if i == 0 else None
                result = runners[i].run_step(step, feed)
                if i == k - 1:
                    losses[step] = result.loss
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
    return losses, links


def test_int4_with_error_feedback_converges_like_fp32(port_base):
    torch.manual_seed(0)
    model = VisionEncoder(get_config("tiny"))
    pool = [batch_to_torch(b) for b in synthetic_batches(4, 2, seed=3, camera_sizes=SMALL_CAMERAS, lidar_rays=2048)]
    batches = [pool[s % len(pool)] for s in range(12)]
    runs = {}
    for i, (codec, feedback) in enumerate((("fp32", False), ("int4", False), ("int4", True))):
        runs[(codec, feedback)] = _train(copy.deepcopy(model), batches, (10,), codec, feedback, port_base + 4 * i)
    final = {key: sum(losses[-3:]) / 3 for key, (losses, _) in runs.items()}
    act_bytes = {key: sum(r.nbytes for link in links for r in link.stats.audit if r.kind == ACT)
                 for key, (_, links) in runs.items()}
    ratio = act_bytes[("fp32", False)] / act_bytes[("int4", True)]
    msg = (f"final loss (mean of the last 3 of 12 steps): fp32 {final[('fp32', False)]:.4f}, "
           f"int4 {final[('int4', False)]:.4f}, int4+EF {final[('int4', True)]:.4f}; "
           f"first loss {runs[('fp32', False)][0][0]:.4f}; activation frames fp32/int4 bytes {ratio:.2f}; "
           f"losses int4+EF {[round(x, 4) for x in runs[('int4', True)][0]]}")
    assert final[("fp32", False)] < 0.8 * runs[("fp32", False)][0][0], msg            # it does train
    assert final[("int4", True)] == pytest.approx(final[("fp32", False)], rel=0.05), msg
    assert ratio > 6.0, msg                                    # int4 frames (labels included) are ~7x smaller
    assert any(link.residual_norm() > 0 for link in runs[("int4", True)][1]), msg
