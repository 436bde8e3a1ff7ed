"""Vehicle side of quick recovery, in-process: an abort ends a blocked step at once and keeps the weights,
stale frames of an aborted pipeline are dropped, backups carry only changed layers, off the training thread."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import zmq

from flad_core import tensorframe
from flad_vehicle.encoder.config import get_config
from flad_vehicle.encoder.model import LABEL_INPUTS, VisionEncoder
from flad_vehicle.encoder.partition import Partitioner
from flad_vehicle.fhdp.backup import BackupTracker, BackupUploader, split_by_layer
from flad_vehicle.fhdp.layerstore import LayerStore
from flad_vehicle.fhdp.links import Inbox, OutLink, StepAbortedError
from flad_vehicle.fhdp.optim import stage_adamw
from flad_vehicle.fhdp.runner import StageRunner


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return VisionEncoder(get_config("tiny"))


def test_abort_ends_a_blocked_step_promptly_and_keeps_weights(model, port_base):
    part = Partitioner(model)
    stage = part.stage((17, 22))          # a last stage: it waits for activations from a neighbour that left
    ctx = zmq.Context()
    inbox = Inbox(ctx, f"tcp://127.0.0.1:{port_base}")
    prev = OutLink(ctx, "gone", f"tcp://127.0.0.1:{port_base + 1}", 1)
    abort = threading.Event()
    runner = StageRunner(stage, 1, 2, inbox=inbox, prev=prev, next=None, optimizer=stage_adamw(stage, model),
                         n_micro=2, grad_clip=5.0, label_names=LABEL_INPUTS, timeout_s=60, abort=abort)
    before = {n: p.detach().clone() for n, p in stage.named_parameters()}
    threading.Timer(0.2, abort.set).start()
    t0 = time.monotonic()
    with pytest.raises(StepAbortedError):
        runner.run_step(5)
    assert time.monotonic() - t0 < 1.0                       # not the 60 s link timeout
    runner.discard_partial_step()
    for n, p in stage.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None
    prev.close()
    inbox.close()
    ctx.term()


def test_stale_frames_of_an_aborted_pipeline_are_dropped(port_base):
    ctx = zmq.Context()
    inbox = Inbox(ctx, f"tcp://127.0.0.1:{port_base}")
    out = OutLink(ctx, "me", f"tcp://127.0.0.1:{port_base}", 0)
    for step in (3, 4, 10):
        out.send({"x": torch.ones(2)}, kind=tensorframe.KIND_ACTIVATION, step=step, micro_batch=0)
    time.sleep(0.2)
    assert inbox.drop_steps_below(10) == 2
    _, tensors = inbox.get(tensorframe.KIND_ACTIVATION, 10, 0, timeout_s=2)
    assert torch.equal(tensors["x"], torch.ones(2))
    out.close()
    inbox.close()
    ctx.term()


def test_backups_are_changed_layers_sent_off_the_training_thread(model):
    store = LayerStore(model, Partitioner(model).graph.names)
    store.owned = set(store.layer_names)
    tracker = BackupTracker(store)
    sent: list[tuple[list[str], int]] = []
    gate = threading.Event()

    def send(payload, layers, step, pid):
        gate.wait(5)                       # a slow link: the trainer must not wait for it
        assert set(split_by_layer(payload, layers)) == {x for x in layers if store.params_of([x])}
        sent.append((sorted(layers), step))
        return sum(t.numel() * t.element_size() for t in payload.values())

    up = BackupUploader(send)
    t0 = time.monotonic()
    up.submit(tracker.snapshot(store.layer_names), 1, "p")
    while not up._busy and time.monotonic() - t0 < 5:       # the uploader took the first snapshot
        time.sleep(0.001)
    with torch.no_grad():
        store.params[store.params_of(["enc_0"])[0]].add_(1.0)
    up.submit(tracker.snapshot(store.layer_names), 3, "p")
    assert time.monotonic() - t0 < 0.5
    gate.set()
    assert up.flush(10)
    up.close()
    assert sent[0][1] == 1 and len(sent[0][0]) == len(store.layer_names)     # first backup: everything
    assert sent[-1] == (["enc_0"], 3)                                          # then only what changed
    assert up.errors == 0
