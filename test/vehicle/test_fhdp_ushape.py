"""U-shaped pipeline plumbing: which tensors cross which cut, what stays home, and SWIFT's view of the heads."""

from __future__ import annotations

import pytest
import zmq
from _encoder_testlib import tiny_batch, tiny_model

from flad_edge.swift import Cluster, Vehicle, plan
from flad_edge.swift.model import load_profile
from flad_vehicle.encoder.model import LABEL_INPUTS, VisionEncoder
from flad_vehicle.encoder.partition import Partitioner, PartitionError
from flad_vehicle.encoder.profile import profile_model
from flad_vehicle.fhdp.links import Inbox, OutLink
from flad_vehicle.fhdp.runner import StageRunner
from flad_vehicle.fhdp.ushape import head_layers, head_start, live_u, u_profile, u_stages

RAW = {"rgb_front", "rgb_left", "rgb_right", "rgb_rear", "lidar"}


@pytest.fixture(scope="module")
def part():
    return Partitioner(VisionEncoder("tiny"))


def test_heads_are_the_head_and_loss_suffix(part):
    g = part.graph
    h = head_start(g)
    assert head_layers(g) == g.names[h:] == ["bev_head", "tl_head", "wp_head", "features", "loss"]
    assert g.min_first_end <= h


@pytest.mark.parametrize("cuts", [(10,), (6, 16), (4, 12), (4, 17)])
def test_labels_and_raw_inputs_never_cross_a_u_shaped_cut(part, cuts):
    g = part.graph
    h = head_start(g)
    bounds = [0, *cuts, h]
    stages, head = u_stages(part, [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)])
    sent = [set(head.first_sends)] + [set(s.outputs) for s in stages[1:]]
    for names in sent:
        assert not names & (RAW | set(LABEL_INPUTS)), names
    # the heads read the labels from the batch, what stage 0 produced itself, and the turnaround features
    assert set(head.from_batch) == set(LABEL_INPUTS)
    assert set(head.kept) == {"meas.wp_h0", "tl.focus"}
    assert head.turnaround == ("dec.2",) == stages[-1].outputs
    assert "meas.wp_h0" not in head.first_sends          # only the heads read it: it stays home
    assert set(stages[0].inputs) <= set(g.inputs) and not set(stages[0].inputs) & set(LABEL_INPUTS)
    # a stage's inputs are exactly what its upstream neighbour sends
    for i in range(1, len(stages)):
        assert set(stages[i].inputs) == sent[i - 1]
    # compared with labels-forward, every cut carries a subset of the tensors (no labels, no head-only tensors)
    for e in bounds[1:-1]:
        assert set(live_u(g, h, bounds[1], e)) < set(g.live(e))


def test_bad_u_shaped_ranges_are_rejected(part):
    h = head_start(part.graph)
    with pytest.raises(PartitionError, match="two trunk stages"):
        u_stages(part, [(0, h)])
    with pytest.raises(PartitionError, match="heads start"):
        u_stages(part, [(0, 8), (8, len(part.graph))])
    with pytest.raises(PartitionError, match="raw inputs"):
        u_stages(part, [(0, 2), (2, h)])
    with pytest.raises(PartitionError, match="contiguous"):
        u_stages(part, [(0, 8), (9, h)])


def test_u_profile_puts_the_heads_on_the_data_owner_for_swift():
    model, batch = tiny_model(), tiny_batch()
    prof = profile_model(model, batch, measure=False)
    g = Partitioner(model).graph
    h = head_start(g)
    up = u_profile(prof, g)
    assert len(up["layers"]) == h and up["min_first_stage_end"] == prof["min_first_stage_end"]
    for k in ("flops", "param_bytes", "mem_bytes"):   # nothing lost: the heads' costs sit on layer 0
        assert sum(r[k] for r in up["layers"]) == sum(r[k] for r in prof["layers"])
    for i in range(g.min_first_end - 1, h - 1):          # no labels ride along: fewer bytes at every cut
        assert up["layers"][i]["activation_bytes"] < prof["layers"][i]["activation_bytes"]
    cluster = Cluster([Vehicle("a", 4e9, 1.0, 50.0), Vehicle("b", 4e9, 0.5, 50.0)], n_batch=4)
    p = plan(cluster, load_profile(up), "exact", first="b", objective="bottleneck")
    assert p.feasible and p.path[0] == "b" and p.ranges[-1][1] == h


def test_runner_checks_the_u_shaped_links(part, port_base):
    h = head_start(part.graph)
    stages, head = u_stages(part, [(0, 10), (10, h)])
    ctx = zmq.Context()
    inbox = Inbox(ctx, f"tcp://127.0.0.1:{port_base}")
    link = OutLink(ctx, "s1", f"tcp://127.0.0.1:{port_base + 1}", 0)
    try:
        with pytest.raises(ValueError, match="turnaround"):
            StageRunner(stages[0], 0, 2, inbox=inbox, prev=None, next=link, optimizer=None, u_shaped=True, head=head)
        with pytest.raises(ValueError, match="first stage holds the heads"):
            StageRunner(stages[1], 1, 2, inbox=inbox, prev=link, next=None, optimizer=None, u_shaped=True,
                        head=head, turn=link)
        with pytest.raises(ValueError, match="U-shaped pipelines only"):
            StageRunner(stages[0], 0, 2, inbox=inbox, prev=None, next=link, optimizer=None, head=head, turn=link)
        r = StageRunner(stages[0], 0, 2, inbox=inbox, prev=None, next=link, optimizer=None, u_shaped=True,
                        head=head, turn=link)
        assert r.owns_loss and set(LABEL_INPUTS) <= set(r.batch_inputs)
        # the schedule is that of a 3-stage pipeline: the heads are its virtual last stage
        assert r.head_ops == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2), ("F", 3), ("B", 3)]
    finally:
        link.close()
        inbox.close()
        ctx.term()
