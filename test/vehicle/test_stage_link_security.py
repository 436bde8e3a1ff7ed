"""CURVE on the FHDP stage links: who may deliver a frame to a vehicle's inbox, and that training is unchanged.

With CURVE, an inbox is a CURVE server behind the allow-list and takes frames only from the key names its
current assignment allows: a plaintext or unknown-key peer never delivers (no handshake), an allow-listed
vehicle outside the assignment is refused (counted, logged with who and where), the assigned neighbour is
delivered. A pipelined step over CURVE links gives exactly the plaintext result. Without CURVE nothing is
authenticated, so the inbox delivers every well-formed frame (as before).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
import time

import pytest
import torch
import zmq
from test_fhdp_equivalence import _capture_grads, _split

from flad_core import tensorframe
from flad_core.fleet import FleetConfig, VehicleSpec
from flad_core.security import SecurityConfig, SecurityError, generate_keypair
from flad_vehicle.encoder.config import get_config
from flad_vehicle.encoder.model import LABEL_INPUTS, VisionEncoder, batch_to_torch
from flad_vehicle.encoder.partition import Partitioner
from flad_vehicle.encoder.synthetic import synthetic_batches
from flad_vehicle.fhdp.links import Inbox, LinkTimeoutError, OutLink
from flad_vehicle.fhdp.optim import stage_adamw
from flad_vehicle.fhdp.pipeline import Assignment, Pipeline
from flad_vehicle.fhdp.runner import StageRunner
from flad_vehicle.fhdp.worker import neighbour_stages, stage_key_names

ACT = tensorframe.KIND_ACTIVATION


@pytest.fixture
def keys(tmp_path):
    """Key pairs of vehicles v0..v3 and stages s0..s3 (all allow-listed) and of an intruder (not allow-listed)."""
    keys = tmp_path / "keys"
    for name in ("v0", "v1", "v2", "v3", "s0", "s1", "s2", "s3"):
        generate_keypair(keys, name, allow_dir=keys / "allowed")
    generate_keypair(keys, "intruder")
    return keys


def curve(keys) -> SecurityConfig:
    return SecurityConfig(curve=True, keys_dir=keys, allow_dir=keys / "allowed")


def send(link: OutLink, step: int, value: float = 1.0) -> None:
    link.send({"x": torch.full((4,), value)}, kind=ACT, step=step, micro_batch=0)


def settle(inbox: Inbox, seconds: float = 0.5) -> None:
    """Read whatever arrives for `seconds` (refused frames are checked as they are read)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        inbox.has(ACT, 10**9, 0)
        time.sleep(0.02)


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.term()


def test_plaintext_and_unknown_key_peers_never_deliver(keys, ctx, port_base, caplog):
    address = f"tcp://127.0.0.1:{port_base}"
    inbox = Inbox(ctx, address, security=curve(keys), identity="v0")
    inbox.allow(["v1"])
    plain = OutLink(ctx, "v0", address, 1)
    intruder = OutLink(ctx, "v0", address, 1, security=curve(keys), identity="intruder")
    neighbour = OutLink(ctx, "v0", address, 1, security=curve(keys), identity="v1")
    try:
        with caplog.at_level(logging.WARNING, logger="flad_core.security"):
            send(plain, 1)
            send(intruder, 2)
            for step in (1, 2):
                with pytest.raises(LinkTimeoutError):
                    inbox.get(ACT, step, 0, timeout_s=1.0)
        assert "refused a CURVE peer with unknown public key" in caplog.text     # ZAP refused the intruder
        assert not inbox.refused_peers and inbox.received_bytes == 0            # neither got as far as a frame
        send(neighbour, 3, 7.0)                                                 # the inbox itself works
        _, tensors = inbox.get(ACT, 3, 0, timeout_s=10.0)
        assert torch.equal(tensors["x"], torch.full((4,), 7.0))
    finally:
        for x in (plain, intruder, neighbour, inbox):
            x.close()


def test_an_allow_listed_vehicle_outside_the_assignment_is_refused_and_logged(keys, ctx, port_base, caplog):
    address = f"tcp://127.0.0.1:{port_base}"
    inbox = Inbox(ctx, address, security=curve(keys), identity="v0")
    inbox.allow(["v1", "v2"])                     # this assignment: v1 before us, v2 after
    outsider = OutLink(ctx, "v0", address, 0, security=curve(keys), identity="v3")
    neighbour = OutLink(ctx, "v0", address, 0, security=curve(keys), identity="v1")
    try:
        with caplog.at_level(logging.WARNING, logger="flad_vehicle.fhdp.links"):
            send(outsider, 5, 3.0)
            send(neighbour, 5, 1.0)
            _, tensors = inbox.get(ACT, 5, 0, timeout_s=10.0)
            assert torch.equal(tensors["x"], torch.full((4,), 1.0))     # the neighbour's, not the outsider's
            settle(inbox)
            assert not inbox.has(ACT, 5, 0)                             # the outsider's frame was never buffered
        assert inbox.refused_peers == {"v3": 1}
        refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert len(refusals) == 1
        assert all(part in refusals[0] for part in ("v3", address, "activation frame of step 5", "v1, v2"))
        # a new assignment that names v3 lets it through; v1 is now the outsider
        inbox.allow(["v3"])
        send(outsider, 6, 3.0)
        send(neighbour, 6, 1.0)
        _, tensors = inbox.get(ACT, 6, 0, timeout_s=10.0)
        assert torch.equal(tensors["x"], torch.full((4,), 3.0))
        settle(inbox)
        assert inbox.refused_peers == {"v3": 1, "v1": 1}
    finally:
        for x in (outsider, neighbour, inbox):
            x.close()


def test_nobody_may_deliver_before_the_first_assignment(keys, ctx, port_base):
    address = f"tcp://127.0.0.1:{port_base}"
    inbox = Inbox(ctx, address, security=curve(keys), identity="v0")
    link = OutLink(ctx, "v0", address, 0, security=curve(keys), identity="v1")
    try:
        send(link, 1)
        with pytest.raises(LinkTimeoutError):
            inbox.get(ACT, 1, 0, timeout_s=1.0)
        assert inbox.refused_peers == {"v1": 1}
    finally:
        link.close()
        inbox.close()


def test_without_curve_nothing_is_authenticated_and_allow_is_not_enforced(ctx, port_base):
    address = f"tcp://127.0.0.1:{port_base}"
    inbox = Inbox(ctx, address)
    inbox.allow(["v1"])
    link = OutLink(ctx, "v0", address, 0)       # nobody in particular: plaintext carries no identity
    try:
        assert not inbox.authenticated
        send(link, 1)
        inbox.get(ACT, 1, 0, timeout_s=10.0)
        assert not inbox.refused_peers
    finally:
        link.close()
        inbox.close()


def test_a_curve_inbox_needs_an_allow_list(keys, ctx, port_base):
    cfg = dataclasses.replace(curve(keys), allow_dir=None)
    with pytest.raises(SecurityError, match="allow_dir"):
        Inbox(ctx, f"tcp://127.0.0.1:{port_base}", security=cfg, identity="v0")


def test_a_missing_peer_key_is_a_clear_error(keys, ctx, port_base):
    with pytest.raises(SecurityError, match=r"nobody\.key"):
        OutLink(ctx, "nobody", f"tcp://127.0.0.1:{port_base}", 0, security=curve(keys), identity="v0")


# -- which neighbours an assignment allows, under which key names ---------------------------------------------
def test_neighbour_stages_are_previous_next_and_the_u_turn():
    assert [neighbour_stages(i, 1, False) for i in range(1)] == [[]]
    assert [neighbour_stages(i, 3, False) for i in range(3)] == [[1], [0, 2], [1]]
    assert [sorted(neighbour_stages(i, 3, True)) for i in range(3)] == [[1, 2], [0, 2], [0, 1]]
    assert [neighbour_stages(i, 2, True) for i in range(2)] == [[1], [0]]
    assert [sorted(neighbour_stages(i, 4, True)) for i in range(4)] == [[1, 3], [0, 2], [1, 3], [0, 2]]


def _assignment(members: list[str], inboxes: list[str]) -> Assignment:
    pipeline = Pipeline.of([(v, i, i + 1) for i, v in enumerate(members)])
    return Assignment(pipeline_id="p", round=0, cluster_id="c", method="exact", pipeline=pipeline,
                      members=dict.fromkeys(members, ""), inboxes=inboxes, layer_owner=members)


def test_stage_key_names_follow_the_inbox_address_so_a_pooled_slot_keeps_its_key():
    slots = FleetConfig(vehicles=[VehicleSpec(id=f"slot0{i}", control=f"tcp://127.0.0.1:{9000 + 2 * i}",
                                              data=f"tcp://127.0.0.1:{9001 + 2 * i}") for i in range(3)])
    # the round's vehicles v17 and v42 are played by slot02 and slot00: their inboxes are those slots'
    a = _assignment(["v17", "v42"], ["tcp://127.0.0.1:9005", "tcp://127.0.0.1:9001"])
    assert stage_key_names(slots, a) == ["slot02", "slot00"]
    # one process per vehicle: the fleet entry at the address is the member itself
    fleet = FleetConfig(vehicles=[VehicleSpec(id="v1", data="tcp://10.0.0.1:7201"),
                                  VehicleSpec(id="v2", data="tcp://10.0.0.2:7201")])
    assert stage_key_names(fleet, _assignment(["v2", "v1"], ["tcp://10.0.0.2:7201", "tcp://10.0.0.1:7201"])) == [
        "v2", "v1"]
    # an address the fleet file does not list: the member id names the key
    assert stage_key_names(fleet, _assignment(["v9"], ["tcp://edge:7301"])) == ["v9"]


# -- a pipelined step over CURVE links equals the plaintext one ----------------------------------------------
def run_pipeline(model, batch, cuts, n_micro, port_base, u_shaped, security):
    """One pipelined 1F1B step (stages in threads, real sockets), each stage keyed s<i>; returns
    (results, gradients, inboxes' refusals)."""
    stages, head = _split(Partitioner(model), cuts, u_shaped)
    k = len(stages)
    ctx = zmq.Context()
    addrs = [f"tcp://127.0.0.1:{port_base + i}" for i in range(k)]
    names = [f"s{i}" for i in range(k)]
    inboxes = [Inbox(ctx, a, security=security, identity=n) for a, n in zip(addrs, names, strict=True)]
    runners, links = [], []
    for i, stage in enumerate(stages):
        inboxes[i].allow(names[j] for j in neighbour_stages(i, k, u_shaped))

        def link(j: int, i: int = i) -> OutLink:
            return OutLink(ctx, names[j], addrs[j], i, security=security, identity=names[i])

        prev = link(i - 1) if i > 0 else None
        nxt = link(i + 1) if i < k - 1 else None
        turn = link(k - 1 if i == 0 else 0) if u_shaped and i in (0, k - 1) else None
        links += [x for x in (prev, nxt, turn) if x]
        trained = torch.nn.ModuleList([stage, head.stage]) if (u_shaped and i == 0) else stage
        runners.append(StageRunner(stage, i, k, inbox=inboxes[i], prev=prev, next=nxt,
                                   optimizer=stage_adamw(trained, model), schedule="1f1b", n_micro=n_micro,
                                   grad_clip=1.0, label_names=LABEL_INPUTS, timeout_s=60, u_shaped=u_shaped,
                                   head=head if i == 0 else None, turn=turn))
    grads: dict[str, torch.Tensor] = {}
    results: list = [None] * k
    errors: list = []

    def work(i: int) -> None:
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
    refused = [dict(x.refused_peers) for x in inboxes]
    for x in links + inboxes:
        x.close()
    ctx.term()
    if errors:
        raise errors[0]
    return results, grads, refused


@pytest.mark.parametrize(("cuts", "n_micro", "u_shaped"), [((6, 16), 3, False), ((6, 12), 2, True)])
def test_a_pipelined_step_over_curve_equals_plaintext(keys, port_base, cuts, n_micro, u_shaped):
    torch.manual_seed(0)
    model = VisionEncoder(get_config("tiny"))
    batch = batch_to_torch(next(synthetic_batches(1, 6, seed=3)))
    plain_model, curve_model = copy.deepcopy(model), copy.deepcopy(model)
    plain, plain_grads, _ = run_pipeline(plain_model, batch, cuts, n_micro, port_base, u_shaped, None)
    secured, curve_grads, refused = run_pipeline(curve_model, batch, cuts, n_micro, port_base + 8, u_shaped,
                                                 curve(keys))
    assert refused == [{}] * len(secured)
    assert [r.loss for r in secured] == [r.loss for r in plain]
    assert secured[0].grad_norm == plain[0].grad_norm
    assert curve_grads.keys() == plain_grads.keys() and curve_grads
    for name, g in plain_grads.items():
        assert torch.equal(curve_grads[name], g), name
    for (n1, p1), (_, p2) in zip(plain_model.named_parameters(), curve_model.named_parameters(), strict=True):
        assert torch.equal(p1, p2), n1
