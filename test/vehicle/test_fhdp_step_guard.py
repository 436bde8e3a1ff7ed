"""The step guard: a stage whose gradients are NaN (or explode) costs the pipeline one step, nothing more.

Three stages run in threads over real ZeroMQ sockets (as in test_fhdp_equivalence.py). One stage's gradients
are poisoned for one step; every stage must drop that step -- parameters and AdamW state exactly as before it
-- and the next good step must then proceed as if the bad one had never been tried.
"""

from __future__ import annotations

import copy
import math
import threading
from collections import deque

import pytest
import torch
import zmq

from flad_vehicle.encoder.config import get_config
from flad_vehicle.encoder.model import LABEL_INPUTS, VisionEncoder, batch_to_torch
from flad_vehicle.encoder.partition import Partitioner
from flad_vehicle.encoder.synthetic import synthetic_batches
from flad_vehicle.fhdp.links import Inbox, OutLink
from flad_vehicle.fhdp.optim import stage_adamw
from flad_vehicle.fhdp.runner import NORM_HISTORY_MIN, StageRunner

CUTS = (6, 16)


def _snapshot(runner: StageRunner) -> dict:
    """Every parameter of the stage and its optimizer state, copied."""
    params = {i: p.detach().clone() for i, p in enumerate(runner.parameters())}
    state = {}
    for i, p in enumerate(runner.parameters()):
        st = runner.optimizer.state.get(p, {})
        state[i] = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
    return {"params": params, "state": state}


def _same(a: dict, b: dict) -> bool:
    if a["params"].keys() != b["params"].keys():
        return False
    for i in a["params"]:
        if not torch.equal(a["params"][i], b["params"][i]):
            return False
        sa, sb = a["state"][i], b["state"][i]
        if sa.keys() != sb.keys() or any(not torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])) for k in sa):
            return False
    return True


def run(model, batches, port_base, *, clip, inject=None, stages_cut=CUTS):
    """Run len(batches) steps of a 3-stage pipeline; `inject(stage_index, step, runner)` may return a hook
    handle to poison that stage's step (removed afterwards). Returns per-stage results and snapshots taken
    after every step."""
    stages = Partitioner(model).stages(stages_cut)
    k = len(stages)
    ctx = zmq.Context()
    addrs = [f"tcp://127.0.0.1:{port_base + i}" for i in range(k)]
    inboxes = [Inbox(ctx, a) for a in addrs]
    links, runners = [], []
    for i, stage in enumerate(stages):
        prev = OutLink(ctx, f"s{i - 1}", addrs[i - 1], i) if i > 0 else None
        nxt = OutLink(ctx, f"s{i + 1}", addrs[i + 1], i) if i < k - 1 else None
        links += [x for x in (prev, nxt) if x]
        runners.append(StageRunner(stage, i, k, inbox=inboxes[i], prev=prev, next=nxt,
                                   optimizer=stage_adamw(stage, model), schedule="1f1b", n_micro=2, grad_clip=clip,
                                   label_names=LABEL_INPUTS, timeout_s=60))
    results = [[None] * len(batches) for _ in range(k)]
    snaps = [[None] * len(batches) for _ in range(k)]
    errors: list = []

    def work(i):
        try:
            for step, batch in enumerate(batches):
                handle = inject(i, step, runners[i]) if inject is not None else None
                feed = {n: batch[n] for n in runners[0].batch_inputs} if i == 0 else None
                results[i][step] = runners[i].run_step(step, feed)
                if handle is not None:
                    handle.remove()
                snaps[i][step] = _snapshot(runners[i])
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
    return results, snaps


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = VisionEncoder(get_config("tiny"))
    batches = [batch_to_torch(b) for b in synthetic_batches(3, 4, seed=5)]
    return model, batches


POISONS = {"nan": lambda g: g * math.nan, "inf": lambda g: g * math.inf,
           "explode": lambda g: g + 1e9}     # finite, but a global norm far above MAX_GRAD_NORM


def _poison_grad(stage_index: int, step: int, kind: str):
    """Poison one parameter's gradient of stage `stage_index` at `step` (NaN, inf or exploding)."""
    def inject(i, s, runner):
        if (i, s) != (stage_index, step):
            return None
        return next(iter(runner.parameters())).register_hook(POISONS[kind])
    return inject


@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize(("stage_index", "kind"), [(1, "nan"), (2, "inf"), (0, "nan"), (1, "explode")])
def test_a_poisoned_step_is_dropped_by_every_stage_and_the_next_proceeds(setup, port_base, clip, stage_index,
                                                                          kind):
    model, batches = setup
    # the clean run trains on batches 0 and 2; the poisoned run also tries batch 1 in between, poisoned
    clean, clean_snaps = run(copy.deepcopy(model), [batches[0], batches[2]], port_base, clip=clip)
    hurt, snaps = run(copy.deepcopy(model), batches, port_base + 8, clip=clip,
                      inject=_poison_grad(stage_index, 1, kind))
    for i in range(3):
        assert not hurt[i][0].dropped and hurt[i][1].dropped and not hurt[i][2].dropped, i
        assert hurt[i][1].drop_reason
        # the dropped step changed nothing: parameters and AdamW state (moments and step count) as after step 0
        assert _same(snaps[i][0], snaps[i][1]), f"stage {i} changed in the dropped step"
        assert not _same(snaps[i][1], snaps[i][2]), f"stage {i} did not train in the step after"
        # ... and the next good step is exactly the clean run's second step
        for j, p in snaps[i][2]["params"].items():
            assert torch.allclose(p, clean_snaps[i][1]["params"][j], rtol=1e-5, atol=1e-7), (i, j)
        for j, st in snaps[i][2]["state"].items():
            assert float(st["step"]) == 2.0, (i, j)
    if kind != "explode":
        assert "non-finite" in hurt[0][1].drop_reason
    else:
        assert "above the bound" in hurt[0][1].drop_reason
    assert hurt[0][2].grad_norm == pytest.approx(clean[0][1].grad_norm, rel=1e-5)


def test_a_stage_whose_forward_turns_nan_is_caught_although_nan_never_crosses_a_link(setup, port_base):
    """NaN activations cannot be sent (a peer's inbox refuses non-finite frames and would wait out its timeout):
    the stage sends zeros instead, flags the step, and the step is dropped everywhere."""
    model, batches = setup

    def inject(i, s, runner):
        if (i, s) != (1, 1):
            return None
        return runner.stage.register_forward_hook(
            lambda mod, args, out: {k: v * math.nan if v.is_floating_point() else v for k, v in out.items()})

    hurt, snaps = run(copy.deepcopy(model), batches, port_base, clip=5.0, inject=inject)
    for i in range(3):
        assert [r.dropped for r in hurt[i]] == [False, True, False], i
        assert _same(snaps[i][0], snaps[i][1]), i
    assert "non-finite values" in hurt[0][1].drop_reason
    assert math.isnan(hurt[2][1].grad_norm)


def test_one_stage_pipeline_drops_a_nan_step(setup, port_base):
    """A resource-sufficient vehicle (one stage, the whole model) guards its steps the same way."""
    model, batches = setup
    model = copy.deepcopy(model)
    stage = Partitioner(model).stage((0, len(Partitioner(model).graph)))
    ctx = zmq.Context()
    inbox = Inbox(ctx, f"tcp://127.0.0.1:{port_base}")
    runner = StageRunner(stage, 0, 1, inbox=inbox, prev=None, next=None, optimizer=stage_adamw(stage, model),
                         n_micro=2, grad_clip=None, label_names=LABEL_INPUTS)
    try:
        feed = [{n: b[n] for n in runner.batch_inputs} for b in batches]
        assert not runner.run_step(0, feed[0]).dropped
        before = _snapshot(runner)
        handle = next(iter(runner.parameters())).register_hook(lambda g: g * math.nan)
        res = runner.run_step(1, feed[1])
        handle.remove()
        assert res.dropped and math.isnan(res.grad_norm)
        assert _same(before, _snapshot(runner))
        assert not runner.run_step(2, feed[2]).dropped
        assert not _same(before, _snapshot(runner))
    finally:
        inbox.close()
        ctx.term()


def test_relative_explosion_bound_needs_a_history_of_good_steps():
    runner = StageRunner.__new__(StageRunner)
    runner.max_grad_norm, runner.explode_factor = None, 100.0
    runner.good_norms = deque(maxlen=32)
    assert runner._drop_reason(1e5) == ""                 # nothing known yet: only the absolute bound applies
    runner.good_norms.extend([1.0, 2.0] * (NORM_HISTORY_MIN // 2))
    assert runner._drop_reason(99.0) == ""                # the lower median of the history is 1.0
    assert "recent median" in runner._drop_reason(150.0)
    assert "non-finite" in runner._drop_reason(math.nan)
    runner.max_grad_norm = 10.0
    assert "above the bound" in runner._drop_reason(11.0)
