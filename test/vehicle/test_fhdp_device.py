"""FHDP stages on a device and in a precision: placement, host staging, mixed precision and the loss scale.

Pipelined steps run as in test_fhdp_equivalence.py: stages in threads of this process, talking only through real
ZeroMQ sockets on loopback. A GPU stage is stood in for on a CPU-only host by a stage whose frames go through the
host staging buffers (`HostStaging(stage_cpu=True)`); the `cuda`-marked tests run the real thing where there is one.
"""

from __future__ import annotations

import argparse
import copy
import math
import threading

import pytest
import torch
import zmq

from flad_core.bus import BusConfig
from flad_core.config import ConfigError
from flad_core.device import DeviceError, HostStaging
from flad_core.fleet import FleetConfig, VehicleSpec
from flad_core.procs import free_port_base
from flad_edge.fhdp.config import FhdpConfig
from flad_vehicle.encoder.config import get_config
from flad_vehicle.encoder.model import LABEL_INPUTS, VisionEncoder, batch_to_torch
from flad_vehicle.encoder.partition import Partitioner
from flad_vehicle.encoder.synthetic import synthetic_batches
from flad_vehicle.fhdp import worker
from flad_vehicle.fhdp.fanin import FanInPlan, FanInRunner
from flad_vehicle.fhdp.layerstore import LayerStore
from flad_vehicle.fhdp.links import Inbox, OutLink
from flad_vehicle.fhdp.optim import stage_adamw, stage_param_groups
from flad_vehicle.fhdp.pipeline import Assignment, Pipeline, PipelineError
from flad_vehicle.fhdp.placement import LossScale, move_optimizer_state
from flad_vehicle.fhdp.runner import StageRunner
from flad_vehicle.fhdp.ushape import head_start, u_stages
from flad_vehicle.fhdp.worker import FhdpVehicle

from flad_testing import reference_step

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_reference_step(model, batch, clip, precision, device="cpu"):
    """`reference_step` with the forward under autocast (the single-process mixed-precision step); fp16 on CUDA
    with torch's GradScaler, which a pipeline's loss scale must reproduce. Returns (loss, norm, gradients)."""
    model.to(device)
    batch = {k: v.to(device) for k, v in batch.items()}
    opt = torch.optim.AdamW(model.param_groups(7.5e-4, 3e-4, 0.05), eps=1e-8)
    scaler = torch.amp.GradScaler(device, enabled=precision == "fp16" and device != "cpu")
    with torch.autocast(device_type=torch.device(device).type, dtype=_AUTOCAST[precision]):
        loss = model.forward_train(batch)["loss"]
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    grads = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters() if p.grad is not None}
    scaler.step(opt)
    scaler.update()
    return float(loss.detach()), float(norm), grads


def _capture_grads(opt, named, grads):
    """Make `opt.step` copy the gradients of the `named` parameters into `grads` just before it consumes them."""
    orig = opt.step

    def capture(*a, **kw):
        for n, p in named:
            if p.grad is not None:
                grads[n] = p.grad.detach().cpu().clone()
        return orig(*a, **kw)
    opt.step = capture


def run_pipeline(model, batch, cuts, port_base, *, n_micro=2, clip=1.0, u_shaped=False, stage_kw=None, spy=None):
    """One pipelined step; `stage_kw[i]` are extra StageRunner arguments of stage i (device, precision, staging,
    loss_scale); `spy(i, runner)` sees each runner before it runs. Returns (results, gradients by name, runners)."""
    part = Partitioner(model)
    if u_shaped:
        bounds = [0, *cuts, head_start(part.graph)]
        stages, head = u_stages(part, [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)])
    else:
        stages, head = part.stages(cuts), None
    k = len(stages)
    stage_kw = stage_kw or [{}] * k
    ctx = zmq.Context()
    addrs = [f"tcp://127.0.0.1:{port_base + i}" for i in range(k)]
    inboxes = [Inbox(ctx, a) for a in addrs]
    runners, links = [], []
    for i, stage in enumerate(stages):
        prev = OutLink(ctx, f"s{i - 1}", addrs[i - 1], i) if i > 0 else None
        nxt = OutLink(ctx, f"s{i + 1}", addrs[i + 1], i) if i < k - 1 else None
        turn = None
        if u_shaped and i in (0, k - 1):
            turn = OutLink(ctx, f"s{k - 1 - i}", addrs[k - 1 - i], i)
        links += [x for x in (prev, nxt, turn) if x]
        trained = torch.nn.ModuleList([stage, head.stage]) if (u_shaped and i == 0) else stage
        runners.append(StageRunner(stage, i, k, inbox=inboxes[i], prev=prev, next=nxt,
                                   optimizer=stage_adamw(trained, model), n_micro=n_micro, grad_clip=clip,
                                   label_names=LABEL_INPUTS, timeout_s=60, u_shaped=u_shaped,
                                   head=head if i == 0 else None, turn=turn, **stage_kw[i]))
    for i, runner in enumerate(runners):
        if spy is not None:
            spy(i, runner)
    grads: dict[str, torch.Tensor] = {}
    results: list = [None] * k
    errors: list = []

    def work(i):
        try:
            named = list(stages[i].named_parameters())
            if head is not None and i == 0:
                named += list(head.stage.named_parameters())
            _capture_grads(runners[i].optimizer, named, grads)
            feed = {n: batch[n] for n in runners[0].batch_inputs} if i == 0 else None
            results[i] = runners[i].run_step(0, feed)
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
    return results, grads, runners


def assert_grads_close(grads, ref_grads, rtol, atol):
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        assert torch.allclose(g, ref_grads[name], rtol=rtol, atol=atol), \
            (name, float((g - ref_grads[name]).abs().max()))


def loss_of(results, u_shaped=False):
    return (results[0] if u_shaped else results[-1]).loss


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = VisionEncoder(get_config("tiny"))
    batch = batch_to_torch(next(synthetic_batches(1, 6, seed=3)))
    return model, batch


# -- placement ---------------------------------------------------------------------------------------------------
def test_a_runner_puts_its_stage_and_heads_on_its_device(setup, port_base):
    """`device="meta"` moves every parameter of the stage, the heads, a fan-in replica and trunk stage there
    (nothing is hard-wired to the CPU); "cpu" keeps them on the CPU. Where the optimizer state goes: next test."""
    model = copy.deepcopy(setup[0])
    part = Partitioner(model)
    stages, head = u_stages(part, [(0, 10), (10, head_start(part.graph))])
    ctx = zmq.Context()
    inbox = Inbox(ctx, f"tcp://127.0.0.1:{port_base}")
    link = OutLink(ctx, "s1", f"tcp://127.0.0.1:{port_base + 1}", 0)
    try:
        cpu = StageRunner(stages[1], 1, 2, inbox=inbox, prev=link, next=None, optimizer=None, u_shaped=True,
                          turn=link)
        assert cpu.device == torch.device("cpu") and cpu.precision == "fp32"
        assert all(p.device.type == "cpu" for p in stages[1].parameters())
        # moving to meta replaces the Parameter objects: an optimizer built before cannot follow, and says so
        with pytest.raises(ValueError, match="optimizer holds parameters on cpu, the stage runs on meta"):
            StageRunner(stages[0], 0, 2, inbox=inbox, prev=None, next=link, u_shaped=True, head=head, turn=link,
                        optimizer=stage_adamw(torch.nn.ModuleList([stages[0], head.stage]), model), device="meta")
        meta = StageRunner(stages[0], 0, 2, inbox=inbox, prev=None, next=link, optimizer=None, u_shaped=True,
                           head=head, turn=link, device="meta", precision="bf16")
        assert meta.device == torch.device("meta") and meta.staging.device == torch.device("meta")
        assert all(p.device.type == "meta" for p in stages[0].parameters())
        assert all(p.device.type == "meta" for p in head.stage.parameters())
        assert meta.precision == "bf16" and not meta.loss_scale.enabled
        # the fan-in runner places its replica and trunk stage the same way
        fanin_model = copy.deepcopy(setup[0])
        fpart = Partitioner(fanin_model)
        plan = FanInPlan.of(["a"], [("a", 6, len(fpart.graph))])
        replica, trunk = fpart.stage((0, 6)), fpart.stage((6, len(fpart.graph)))
        runner = FanInRunner("a", plan, inbox=inbox, links={}, replica=replica, trunk_stage=trunk, optimizer=None,
                             batch_size=4, n_micro=2, device="meta")
        assert runner.device.type == "meta"
        assert all(p.device.type == "meta" for m in (replica, trunk) for p in m.parameters())
    finally:
        link.close()
        inbox.close()
        ctx.term()


def test_the_layer_store_keeps_optimizer_state_on_the_cpu_and_attaches_it_on_the_parameters_device(setup):
    model = copy.deepcopy(setup[0]).to("meta")        # a vehicle whose layers live on a device
    part = Partitioner(model)
    store = LayerStore(model, part.graph.names)
    layers = store.layers_in(0, 2)
    shapes = {n: store.params[n].shape for n in store.params_of(layers)}
    name = store.params_of(layers)[0]
    # a payload from a peer or the edge: CPU tensors, loaded onto the layers' device; its optimizer state is kept
    # on the CPU until an optimizer is attached
    store.import_(layers, {**{f"p/{n}": torch.zeros(shape) for n, shape in shapes.items()},
                           f"m/{name}": torch.ones(shapes[name]), f"v/{name}": torch.ones(shapes[name]),
                           f"t/{name}": torch.tensor([2.0])})
    assert store.opt_state[name]["exp_avg"].device.type == "cpu"
    stage = part.stage((0, 2))
    opt = stage_adamw(stage, model)
    store.attach(opt)
    p = store.params[name]
    assert opt.state[p]["exp_avg"].device.type == "meta" and opt.state[p]["step"].device.type == "cpu"
    # the optimizer's state comes back to the CPU when it is detached (layers travel as CPU tensors)
    opt.state[p] = {"exp_avg": torch.full(p.shape, 2.0), "exp_avg_sq": torch.ones(p.shape), "step": torch.tensor(3.0)}
    store.detach(opt)
    assert store.opt_state[name]["exp_avg"].device.type == "cpu"
    assert float(store.opt_state[name]["step"]) == 3.0
    moved = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2, device="meta"))])
    q = moved.param_groups[0]["params"][0]
    moved.state[q] = {"exp_avg": torch.zeros(2), "step": torch.tensor(1.0)}
    move_optimizer_state(moved)
    assert moved.state[q]["exp_avg"].device.type == "meta" and moved.state[q]["step"].device.type == "cpu"


# -- errors ------------------------------------------------------------------------------------------------------
def test_a_bad_device_or_precision_is_a_clear_error(setup, port_base):
    with pytest.raises(ValueError, match=r"precision must be one of fp32, bf16, fp16, got 'fp8'"):
        FhdpConfig(precision="fp8").validate()
    FhdpConfig(precision="bf16").validate()
    with pytest.raises(ConfigError, match="device"):
        VehicleSpec("v1", device="tpu").validate()
    model = copy.deepcopy(setup[0])
    stage = Partitioner(model).stage((0, len(Partitioner(model).graph)))
    ctx = zmq.Context()
    inbox = Inbox(ctx, f"tcp://127.0.0.1:{port_base}")
    try:
        with pytest.raises(DeviceError, match=r"device 'tpu'"):
            StageRunner(stage, 0, 1, inbox=inbox, prev=None, next=None, optimizer=None, device="tpu")
        with pytest.raises(DeviceError, match=r"precision 'half': choose one of fp32, bf16, fp16"):
            StageRunner(stage, 0, 1, inbox=inbox, prev=None, next=None, optimizer=None, precision="half")
        if not torch.cuda.is_available():
            with pytest.raises(DeviceError, match="sees no CUDA device"):
                StageRunner(stage, 0, 1, inbox=inbox, prev=None, next=None, optimizer=None, device="cuda")
        with pytest.raises(ValueError, match="host staging for meta"):
            StageRunner(stage, 0, 1, inbox=inbox, prev=None, next=None, optimizer=None,
                        staging=HostStaging("meta"))
    finally:
        inbox.close()
        ctx.term()
    # the edge's assignment carries the precision; a vehicle refuses one it does not know
    a = Assignment(pipeline_id="p", round=0, cluster_id="c", method="exact", pipeline=Pipeline.whole("v", 3),
                   members={"v": "tcp://a:1"}, inboxes=["tcp://a:2"], layer_owner=["edge"] * 3, precision="bf16")
    assert Assignment.from_msg(a.to_msg()) == a
    msg = a.to_msg()
    msg.precision = "int3"
    with pytest.raises(PipelineError, match="precision 'int3'"):
        Assignment.from_msg(msg)


# -- host staging -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("cuts", "staged"), [((10,), (1,)), ((6, 16), (1,)), ((6, 16), (0, 2))])
def test_a_stage_with_staging_on_exchanges_frames_exactly(setup, port_base, cuts, staged):
    """Stages whose frames go through the host staging buffers (the path of a GPU stage; `stage_cpu` takes it on
    the CPU) next to plain CPU stages: the step is bit for bit the all-CPU pipelined step (staging copies bytes,
    nothing else), hence the single-process step too, and the buffers were used both ways."""
    model, batch = setup
    plain, plain_grads, _ = run_pipeline(copy.deepcopy(model), batch, cuts, port_base, n_micro=3)
    k = len(cuts) + 1
    stagings = {i: HostStaging("cpu", stage_cpu=True) for i in staged}
    kw = [{"staging": stagings[i]} if i in stagings else {} for i in range(k)]
    results, grads, runners = run_pipeline(copy.deepcopy(model), batch, cuts, port_base + 8, n_micro=3, stage_kw=kw)
    for i, staging in stagings.items():
        assert runners[i].staging is staging and staging.copies > 0
        # what it sent (activations or gradients) left through its buffers, what it received entered through them
        assert {direction for direction, *_ in staging._buffers} == {"d2h", "h2d"}
    assert loss_of(results) == loss_of(plain)
    assert set(grads) == set(plain_grads)
    for name, g in grads.items():
        assert torch.equal(g, plain_grads[name]), name
    ref_loss, _, ref_grads = reference_step(copy.deepcopy(model), batch, clip=1.0)
    assert loss_of(results) == pytest.approx(ref_loss, rel=1e-5)
    # the tolerances of test_fhdp_equivalence: micro-batching only reorders fp32 sums
    assert_grads_close(grads, ref_grads, rtol=1e-4, atol=1e-6)
    assert all(r.device == "cpu" and r.precision == "fp32" for r in results)


def run_fanin_step(model, batches, plan, port_base, kw):
    """One fan-in step (as test_fhdp_fanin.run_fanin), `kw[v]` extra FanInRunner arguments of vehicle v. Returns the
    results, and every vehicle's trained model (the hub's is `model`; other sources train copies of the replica)."""
    part = Partitioner(model)
    ctx = zmq.Context()
    members = plan.members
    addrs = {v: f"tcp://127.0.0.1:{port_base + i}" for i, v in enumerate(members)}
    inboxes = {v: Inbox(ctx, addrs[v]) for v in members}
    links = {v: {p: OutLink(ctx, p, addrs[p], i) for p in members if p != v} for i, v in enumerate(members)}
    runners, owners = {}, {}
    for v in members:
        trunk_stage = None
        if v in plan.trunk.members:
            st = plan.trunk[plan.trunk.stage_of(v)]
            trunk_stage = part.stage((st.start, st.end))
        replica = None
        owners[v] = model if v == plan.hub or v not in plan.sources else copy.deepcopy(model)
        if v in plan.sources:
            replica = Partitioner(owners[v]).stage((0, plan.cut))
        trained = torch.nn.ModuleList([m for m in (replica, trunk_stage) if m is not None])
        groups = [g for m, o in ((replica, owners[v]), (trunk_stage, model)) if m is not None
                  for g in stage_param_groups(m, o.param_groups(7.5e-4, 3e-4, 0.05))]
        assert sum(len(g["params"]) for g in groups) == len(list(trained.parameters()))
        runners[v] = FanInRunner(v, plan, inbox=inboxes[v], links=links[v], replica=replica, trunk_stage=trunk_stage,
                                 optimizer=torch.optim.AdamW(groups, eps=1e-8), batch_size=4, n_micro=2,
                                 grad_clip=1.0, label_names=LABEL_INPUTS, timeout_s=60, **kw.get(v, {}))
    results, errors = {}, []

    def work(v):
        try:
            feed = None
            if v in plan.sources:
                feed = {n: batches[plan.sources.index(v)][n] for n in runners[v].batch_inputs}
            results[v] = runners[v].run_step(0, feed)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(v,)) for v in members]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for x in [*(x for per in links.values() for x in per.values()), *inboxes.values()]:
        x.close()
    ctx.term()
    if errors:
        raise errors[0]
    return results, owners


@pytest.mark.parametrize("mode", ["staging", "loss_scale"])
def test_a_fan_in_step_with_staging_or_a_loss_scale_equals_the_plain_one(setup, port_base, mode):
    """Fan-in: the remote source b and the last trunk stage c with their frames through host staging buffers, or
    every vehicle with a forced loss scale (the last trunk stage's scale rides to the hub, which unscales the norm
    and sends 1/scale in the clip factor to the trunk and the sources): the step is the plain fp32 step."""
    model, _ = setup
    batches = [batch_to_torch(next(synthetic_batches(1, 4, seed=11 + i))) for i in range(2)]
    n = len(Partitioner(model).graph)
    plan = FanInPlan.of(["a", "b"], [("a", 10, 16), ("c", 16, n)])
    plain, plain_models = run_fanin_step(copy.deepcopy(model), batches, plan, port_base, {})
    if mode == "staging":
        stagings = {v: HostStaging("cpu", stage_cpu=True) for v in ("b", "c")}
        kw = {v: {"staging": st} for v, st in stagings.items()}
    else:
        kw = {v: {"loss_scale": LossScale("cpu", "fp32", enabled=True, init_scale=2.0**12)} for v in plan.members}
    results, models = run_fanin_step(copy.deepcopy(model), batches, plan, port_base + 8, kw)
    if mode == "staging":
        assert all(st.copies > 0 for st in stagings.values())
    assert results["c"].loss == plain["c"].loss
    assert results["a"].grad_norm == pytest.approx(plain["a"].grad_norm, rel=1e-12)
    for v in ("a", "b"):      # the hub's model (trunk and replica) and the remote source's replica after the step
        for (name, p), (_, q) in zip(models[v].named_parameters(), plain_models[v].named_parameters(), strict=True):
            assert torch.allclose(p, q, rtol=1e-6, atol=1e-9), (v, name)
    replica = [name for name, _ in Partitioner(models["b"]).stage((0, plan.cut)).named_parameters()]
    a_params, b_params = dict(models["a"].named_parameters()), dict(models["b"].named_parameters())
    assert all(torch.equal(a_params[name], b_params[name]) for name in replica)     # the replicas stay identical


# -- mixed precision --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("cuts", "u_shaped"), [((10,), False), ((6, 16), False), ((10,), True)])
def test_a_bf16_pipelined_step_equals_the_single_process_bf16_step(setup, port_base, cuts, u_shaped):
    model, batch = setup
    ref_loss, ref_norm, ref_grads = autocast_reference_step(copy.deepcopy(model), batch, clip=1.0, precision="bf16")
    fp32_loss, fp32_norm, fp32_grads = reference_step(copy.deepcopy(model), batch, clip=1.0)
    k = len(cuts) + 1
    # one micro-batch: every stage runs the single-process step's ops on the same tensors (activations cross the
    # links in the dtype autocast gave them), yet not bit for bit: the CPU's bf16 kernels (oneDNN convolutions, the
    # GRU) do not give identical results from run to run (~1e-3 of a tensor's largest gradient, seen even between
    # two identical pipelined runs), and a cut through the CNN backbones (6) hands the next stage a contiguous
    # copy of a bf16 convolution output that in one process stays channels-last (frames carry no strides), so the
    # next convolution runs another kernel. Hence bf16 tolerances (`assert_bf16_close`); the loss, computed before
    # any of that, is all but exact
    results, grads, _ = run_pipeline(copy.deepcopy(model), batch, cuts, port_base, n_micro=1, u_shaped=u_shaped,
                                     stage_kw=[{"precision": "bf16"}] * k)
    assert all(r.precision == "bf16" and r.device == "cpu" for r in results)
    assert loss_of(results, u_shaped) == pytest.approx(ref_loss, rel=1e-4)
    assert results[0].grad_norm == pytest.approx(ref_norm, rel=1e-3)
    assert_bf16_close(grads, ref_grads, fp32_grads)
    # three micro-batches: each micro-batch's gradients are rounded to bf16 before they are summed in fp32, where
    # one whole-batch step rounds their sum once (bf16 keeps 8 significant bits: a relative step of 2^-8)
    results, grads, _ = run_pipeline(copy.deepcopy(model), batch, cuts, port_base + 8, n_micro=3, u_shaped=u_shaped,
                                     stage_kw=[{"precision": "bf16"}] * k)
    assert loss_of(results, u_shaped) == pytest.approx(ref_loss, rel=1e-4)
    assert results[0].grad_norm == pytest.approx(ref_norm, rel=1e-3)
    assert_bf16_close(grads, ref_grads, fp32_grads)
    # against the fp32 step: autocast rounds every matmul's inputs to bf16, which moves the loss by ~1e-4 relative
    # and the whole gradient by ~3% (bound 5%), its direction hardly at all (cosine ~0.9996, bound 0.999)
    assert loss_of(results, u_shaped) == pytest.approx(fp32_loss, rel=1e-3)
    assert results[0].grad_norm == pytest.approx(fp32_norm, rel=1e-2)
    assert _rel_err(grads, fp32_grads) < 5e-2
    flat, fp32_flat = _flat(grads), _flat(fp32_grads)
    assert float(torch.nn.functional.cosine_similarity(flat, fp32_flat, dim=0)) > 0.999


def assert_bf16_close(grads, ref_grads, fp32_grads):
    """bf16 gradients equal up to bf16 rounding: over the whole model within 1% (relative L2; ~0.2% seen), and per
    tensor within 3% plus twice what bf16 itself moves that tensor's gradient away from fp32 -- a layer whose
    gradient is mostly bf16 rounding noise (the lidar pillar MLP's: summed over many points by a bf16 index_add)
    differs by tens of percent between any two bf16 runs, and by as much from fp32."""
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        err, ref = float((g - ref_grads[name]).norm()), float(ref_grads[name].norm())
        bf16_noise = float((ref_grads[name] - fp32_grads[name]).norm())
        assert err <= 0.03 * ref + 2 * bf16_noise + 1e-9, (name, err, ref, bf16_noise)
    assert _rel_err(grads, ref_grads) < 1e-2


def _flat(grads):
    return torch.cat([grads[n].flatten() for n in sorted(grads)])


def _rel_err(grads, ref_grads):
    """Relative L2 error of the whole model's gradient."""
    return float((_flat(grads) - _flat(ref_grads)).norm() / _flat(ref_grads).norm())


@pytest.mark.parametrize(("cuts", "u_shaped"), [((6, 16), False), ((10,), True)])
def test_a_loss_scale_travels_with_the_norm_and_leaves_the_step_unchanged(setup, port_base, cuts, u_shaped):
    """The fp16 loss scale, forced on (on the CPU `grad_scaler` disables it, and CPU fp16 is slow) in an fp32 step,
    whose CPU kernels are deterministic: a power-of-two scale multiplies every gradient exactly, the loss stage's
    scale travels with the partial norms (through the middle stage of a labels-forward pipeline; U-shaped, the loss
    stage decides itself), and the first stage divides it out of the norm and the clip factor, so the step equals
    the unscaled one to the last bits."""
    model, batch = setup
    k = len(cuts) + 1
    partial: dict[tuple[bool, int], float] = {}

    def spy(scaled):
        def watch(i, runner):     # each stage's squared gradient norm before unscaling and clipping
            own = runner._local_sq_norm

            def recorded():
                sq = own()
                partial[(scaled, i)] = float(sq)
                return sq
            runner._local_sq_norm = recorded
        return watch

    plain, plain_grads, _ = run_pipeline(copy.deepcopy(model), batch, cuts, port_base, n_micro=2, u_shaped=u_shaped,
                                         spy=spy(False))
    scales = [LossScale("cpu", "fp32", enabled=True, init_scale=2.0**10) for _ in range(k)]
    results, grads, _ = run_pipeline(copy.deepcopy(model), batch, cuts, port_base + 8, n_micro=2, u_shaped=u_shaped,
                                     stage_kw=[{"loss_scale": s} for s in scales], spy=spy(True))
    # every stage's gradients were 2^10 times the true ones before the step unscaled them
    assert all(partial[(True, i)] == pytest.approx(2.0**20 * partial[(False, i)], rel=1e-12) for i in range(k))
    assert loss_of(results, u_shaped) == loss_of(plain, u_shaped)
    assert results[0].grad_norm == pytest.approx(plain[0].grad_norm, rel=1e-12)
    assert not any(r.dropped for r in results)
    assert_grads_close(grads, plain_grads, rtol=1e-6, atol=0.0)
    assert all(s.scale == 2.0**10 for s in scales)     # a good step: no back-off (growth only after 2000)


def test_the_loss_scale_backs_off_on_overflow_and_grows_after_good_steps():
    scale = LossScale("cpu", "fp16", enabled=True, init_scale=8.0, growth_interval=2)
    scale.update(finite=False)
    assert scale.scale == 4.0
    scale.update(finite=True)
    assert scale.scale == 4.0
    scale.update(finite=True)
    assert scale.scale == 8.0
    off = LossScale("cpu", "fp16")                    # on the CPU the scaler is off: gradients are never scaled
    off.update(finite=False)
    assert not off.enabled and off.scale == 1.0


# -- CUDA -------------------------------------------------------------------------------------------------------
@pytest.fixture
def exact_cuda():
    """CUDA matmuls and convolutions in full fp32 (no TF32), so a CUDA stage can be compared with the CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.cuda
@pytest.mark.parametrize("devices", [("cuda", "cpu"), ("cpu", "cuda")])
def test_a_cuda_stage_next_to_a_cpu_stage_equals_the_cpu_step(setup, port_base, exact_cuda, devices):
    model, batch = setup
    ref_loss, ref_norm, ref_grads = reference_step(copy.deepcopy(model), batch, clip=1.0)
    pipe_model = copy.deepcopy(model)
    results, grads, runners = run_pipeline(pipe_model, batch, (10,), port_base, n_micro=3,
                                           stage_kw=[{"device": d} for d in devices])
    gpu = devices.index("cuda")
    assert results[gpu].device == "cuda:0" and results[1 - gpu].device == "cpu"
    assert runners[gpu].staging.copies > 0              # frames left and entered the GPU through pinned buffers
    assert all(p.device.type == "cuda" for p in runners[gpu].stage.parameters())
    # CUDA kernels sum in another order than the CPU's: fp32 rounding, a little looser than CPU-only pipelines
    assert results[-1].loss == pytest.approx(ref_loss, rel=1e-4)
    assert results[0].grad_norm == pytest.approx(ref_norm, rel=1e-3)
    assert_grads_close(grads, ref_grads, rtol=1e-3, atol=1e-5)
    # what goes to the edge is a CPU tensor; a released layer leaves the GPU
    store = LayerStore(pipe_model, Partitioner(pipe_model).graph.names)
    layers = list(runners[gpu].stage.layer_names)
    store.owned.update(layers)
    assert all(t.device.type == "cpu" for t in store.export(layers).values())
    store.release(layers)
    assert all(p.device.type == "cpu" for p in runners[gpu].stage.parameters())
    # optimizer state attached on the CPU follows its parameters to the GPU; AdamW's step counter stays behind
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(lin.parameters())
    lin(torch.ones(1, 3)).sum().backward()
    opt.step()
    lin.to("cuda")
    move_optimizer_state(opt)
    assert all(st["exp_avg"].is_cuda and not st["step"].is_cuda for st in opt.state.values())
    lin(torch.ones(1, 3, device="cuda")).sum().backward()
    opt.step()


@pytest.mark.cuda
def test_an_fp16_cuda_pipeline_with_its_loss_scale_equals_the_grad_scaler_step(setup, port_base, exact_cuda):
    """fp16 on CUDA: the loss stage's scale (GradScaler's initial 2^16) rides with the norm; the step equals the
    single-process fp16 step with torch's GradScaler (one micro-batch, so the same ops on the same tensors; fp16
    keeps 11 significant bits, and cuBLAS may pick other kernels for another batch layout: 1% tolerances)."""
    model, batch = setup
    ref_loss, ref_norm, ref_grads = autocast_reference_step(copy.deepcopy(model), batch, clip=1.0, precision="fp16",
                                                            device="cuda")
    results, grads, runners = run_pipeline(copy.deepcopy(model), batch, (6, 16), port_base, n_micro=1,
                                           stage_kw=[{"device": d, "precision": "fp16"} for d in ("cuda", "cpu",
                                                                                                    "cuda")])
    assert runners[-1].loss_scale.enabled and not runners[1].loss_scale.enabled
    assert not any(r.dropped for r in results)
    assert results[-1].loss == pytest.approx(ref_loss, rel=1e-2)
    assert results[0].grad_norm == pytest.approx(ref_norm, rel=1e-2)
    for name, g in grads.items():
        scale = float(ref_grads[name].abs().max())
        assert torch.allclose(g, ref_grads[name], rtol=5e-2, atol=1e-2 * scale + 1e-8), name
    assert math.isfinite(results[0].grad_norm)


# -- the vehicle process -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", [None, pytest.param("cuda", marks=pytest.mark.cuda)])
def test_a_vehicle_trains_on_its_fleet_device_in_the_assigned_precision_and_says_so(monkeypatch, device):
    """`device` None: the fleet file's (cpu); "cuda": the --device flag's, which overrides the fleet file."""
    base = free_port_base(8)
    addr = [f"tcp://127.0.0.1:{base + i}" for i in range(8)]
    fleet = FleetConfig(bus=BusConfig(hub_pub=addr[0], hub_sub=addr[1]),
                        vehicles=[VehicleSpec("v0", control=addr[2], data=addr[3], device="cpu"),
                                  VehicleSpec("v1", control=addr[4], data=addr[5], device="tpu")])
    with pytest.raises(DeviceError, match="device 'tpu'"):         # refused before any socket is bound
        FhdpVehicle(fleet, "v1")
    with pytest.raises(DeviceError, match="device 'gpu'"):
        FhdpVehicle(fleet, "v0", device="gpu")
    parser = argparse.ArgumentParser()
    worker.add_device_arg(parser)
    assert parser.parse_args([]).device is None and parser.parse_args(["--device", "cuda:1"]).device == "cuda:1"
    vehicle = FhdpVehicle(fleet, "v0", encoder="tiny", device=device)
    want = "cuda:0" if device == "cuda" else "cpu"
    reports = []
    monkeypatch.setattr(vehicle, "_send_report", lambda service, report, timeout_s=30.0: reports.append(report))
    try:
        assert str(vehicle.device) == want and vehicle.device_info["device"] == want
        n = len(vehicle.store.layer_names)
        vehicle.store.owned = set(vehicle.store.layer_names)
        a = Assignment(pipeline_id="p1", round=0, cluster_id="c0", method="exact", pipeline=Pipeline.whole("v0", n),
                       members={"v0": addr[2]}, inboxes=[addr[3]], layer_owner=["v0"] * n, steps=1, batch_size=4,
                       n_micro=2, precision="bf16")
        vehicle._current = {"assignment": a, "stage_index": 0, "range": (0, n), "fetched": 0,
                            "wanted": set(vehicle.store.layer_names)}
        vehicle.train(a)
    finally:
        vehicle.close()
    (report,) = reports
    assert report.error == "" and report.steps_done == 1 and report.has_loss and math.isfinite(report.loss)
    assert report.device == want and report.precision == "bf16"
    # layers leave as CPU tensors, with the optimizer state the step left
    payload = vehicle.store.export(vehicle.store.layers_in(0, 2))
    assert payload and all(t.device.type == "cpu" for t in payload.values())
    assert any(k.startswith("m/") for k in payload)
    assert all(p.device.type == want.split(":")[0] for p in vehicle.model.parameters())
    vehicle.store.release(list(vehicle.store.owned))             # layers given up leave the GPU
    assert all(p.device.type == "cpu" for p in vehicle.model.parameters())
