"""The partitioner: topological layer sequence, live tensors across cuts, stages composing to the whole model."""

from __future__ import annotations

import copy

import pytest
import torch
from _encoder_testlib import tiny_batch, tiny_model

from flad_vehicle.encoder import partition as P
from flad_vehicle.encoder.partition import Partitioner, PartitionError, Stage, build_graph

SENSORS = ("rgb_front", "rgb_left", "rgb_right", "rgb_rear", "lidar", "speed", "target_point")


def run_pipeline(stages: list[Stage], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Forward through the stages as separate processes would (detach at every cut), then backward."""
    sent = {n: batch[n] for n in stages[0].inputs}
    ins_outs = []
    for s in stages:
        ins = sent if s.is_first else Stage.receive(sent)
        out = s.stage_forward(ins)
        ins_outs.append((ins, out))
        sent = {k: v.detach() for k, v in out.items()}
    grads = None
    for ins, out in reversed(ins_outs):
        grads = Stage.backward(ins, out, grads)
    return ins_outs[-1][1]


CUT_SETS = [[4], [6, 14], [4, 9, 15, 20], "all"]   # 4 = min_first_end (meas, rgb_stem, lidar_pillars, tl_focus)


@pytest.mark.parametrize("cuts", CUT_SETS, ids=str)
def test_stages_equal_whole_model(cuts):
    whole = tiny_model(seed=1)
    piped = copy.deepcopy(whole)
    batch = tiny_batch(2, seed=3)
    ref = whole.forward_train(batch)
    ref["loss"].backward()
    part = Partitioner(piped)
    n = len(part.graph)
    if cuts == "all":
        cuts = list(range(part.graph.min_first_end, n))
    stages = part.stages(cuts)
    assert len(stages) == len(cuts) + 1
    out = run_pipeline(stages, batch)
    assert set(out) == set(ref)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k].detach(), rtol=1e-5, atol=1e-6, msg=k)
    gw = dict(whole.named_parameters())
    for name, p in piped.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, gw[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fx_and_declared_graphs_agree_and_fallback(monkeypatch):
    m = tiny_model()
    g_fx = build_graph(m, method="fx")
    g_decl = build_graph(m, method="declared")
    assert g_fx.method == "fx" and g_decl.method == "declared"
    assert g_fx.names == g_decl.names
    assert [n.reads for n in g_fx.nodes] == [n.reads for n in g_decl.nodes]

    def broken(*a, **k):
        raise RuntimeError("symbolically traced variables cannot be used as inputs to control flow")

    monkeypatch.setattr(P, "_fx_edges", broken)
    g = build_graph(m)
    assert g.method == "declared" and "control flow" in g.note and g.names == g_fx.names
    with pytest.raises(RuntimeError):
        build_graph(m, method="fx")


def test_topological_order_and_raw_inputs_stay_in_first_stage():
    m = tiny_model()
    g = build_graph(m)
    pos = {n: i for i, n in enumerate(g.names)}
    producer = {w: node.name for node in g.nodes for w in node.writes}
    for node in g.nodes:
        for r in node.reads:
            if r in producer:
                assert pos[producer[r]] < pos[node.name]
    # every raw-input reader precedes min_first_end; no raw tensor is live at any allowed cut
    readers = [i for i, node in enumerate(g.nodes) if set(node.reads) & set(SENSORS)]
    assert max(readers) + 1 == g.min_first_end <= 4   # meas, rgb_stem, lidar_pillars, tl_focus
    for k in range(g.min_first_end, len(g) + 1):
        assert not set(g.live(k)) & set(SENSORS), k
    # labels travel to the loss at every cut
    for k in range(1, len(g)):
        assert {"bev", "tl_state", "waypoints"} <= set(g.live(k))
    assert g.names[-1] == "loss"


def test_invalid_cuts_and_inputs_are_rejected():
    m = tiny_model()
    part = Partitioner(m)
    with pytest.raises(PartitionError, match="raw inputs"):
        part.stages([1])
    with pytest.raises(PartitionError):
        part.stages([5, 5])
    with pytest.raises(PartitionError):
        part.stages_from_ranges([(0, 4), (5, len(part.graph))])
    s = part.stage((0, 4))
    with pytest.raises(PartitionError, match="missing"):
        s.stage_forward({"speed": torch.zeros(1)})


def test_inference_partition_carries_no_labels():
    m = tiny_model()
    part = Partitioner(m, include_loss=False)
    g = part.graph
    assert "loss" not in g.names
    for k in range(1, len(g) + 1):
        assert not {"bev", "tl_state", "waypoints"} & set(g.live(k))
    b = tiny_batch(2)
    stages = part.stages([5, 12])
    x = {n: b[n] for n in stages[0].inputs}
    for s in stages:
        x = s(x)
    assert set(x) == {"pred.bev", "pred.tl", "pred.waypoints", "features"}
    with torch.no_grad():
        ref = m(b)
    torch.testing.assert_close(x["features"].detach(), ref["features"], rtol=1e-5, atol=1e-6)


def test_stage_state_dict_is_a_slice_of_the_model():
    m = tiny_model()
    part = Partitioner(m)
    stages = part.stages([6, 14])
    full = m.state_dict()
    keys = [k for s in stages for k in s.state_dict()]
    assert sorted(keys) == sorted(full)
    for s in stages:
        for k, v in s.state_dict().items():
            assert v.data_ptr() == full[k].data_ptr()


def test_make_stage_from_config_and_state_dict():
    m = tiny_model(seed=2)
    n = len(Partitioner(m).graph)
    s = P.make_stage(m.cfg, (6, n), state_dict=m.state_dict())
    ref = Partitioner(m).stage((6, n))
    b = tiny_batch(2)
    first = Partitioner(m).stage((0, 6))
    x = first({k: b[k] for k in first.inputs})
    with torch.no_grad():
        a, r = s(x), ref(x)
    for k in r:
        torch.testing.assert_close(a[k], r[k])
    with pytest.raises(PartitionError, match="lacks"):
        P.make_stage(m.cfg, (0, 6), state_dict={})
