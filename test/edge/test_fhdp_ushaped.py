"""U-shaped FHDP across real processes: `flad demo` with `u_shaped: true` (cloud, edge, 6 vehicles on loopback).

The data owner of every pipeline keeps the heads and the loss, so the audit of every frame and layer payload
the vehicles sent must show neither a label nor a raw sensor tensor (by name and by content digest); the
turnaround hop carries the last trunk stage's features back to the owner; the heads move with the data owner
role when the rotation switches pipelines; and the loss falls.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import yaml
from _fhdp_audit import LABELS, RAW_SENSORS, audits, owner_digests, sent_digests

from flad_core import tensorframe
from flad_vehicle.encoder.config import get_config
from flad_vehicle.encoder.model import VisionEncoder
from flad_vehicle.encoder.partition import Partitioner
from flad_vehicle.fhdp.ushape import head_layers

from flad_testing import REPO, free_port_base, processes_mentioning

BATCH, N_MICRO, STEPS = 4, 2, 3


@pytest.fixture(scope="module")
def u_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ushaped")
    cfg = yaml.safe_load((REPO / "launch" / "fhdp.yaml").read_text())
    cfg.update(u_shaped=True, batch_size=BATCH, n_micro=N_MICRO, local_steps=STEPS, rounds=3, codec="fp32")
    (tmp / "fhdp.yaml").write_text(yaml.safe_dump(cfg))
    runs = tmp / "runs"
    cmd = [sys.executable, "-m", "flad_core.cli", "demo", "--rounds", "3", "--frames", "12", "--runs-dir", str(runs),
           "--port-base", str(free_port_base(24)), "--config", str(tmp / "fhdp.yaml")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    (run,) = list(runs.iterdir())
    return out, run, runs


def rounds(run):
    return [m for m in (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
            if "round" in m]


def test_u_shaped_demo_trains_and_the_loss_falls(u_run):
    out, run, runs = u_run
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rs = rounds(run)
    assert [r["round"] for r in rs] == [0, 1, 2]
    for r in rs:
        assert r["accepted"] == 4 and r["missing"] == [] and not r["errors"]
        for client in ("cluster1", "cluster2"):
            assert r["per_client"][client]["loss"] > 0     # the data owner reported the pipeline's loss
    assert rs[-1]["train_loss"] < rs[0]["train_loss"]
    for _ in range(100):
        if not processes_mentioning(str(runs)):
            break
        time.sleep(0.1)
    assert processes_mentioning(str(runs)) == []


def test_no_label_and_no_raw_sensor_tensor_leaves_a_vehicle(u_run):
    _, run, _ = u_run
    records = audits(run)
    assert len(records) == 6
    frames = [rec for recs in records.values() for rec in recs if rec["kind"] != "layers"]
    assert frames, "cluster members sent no tensor frames"
    for rec in frames:
        assert not (set(LABELS) | set(RAW_SENSORS)) & set(rec["names"]), rec
        assert len(rec["digests"]) == len(rec["names"])
    sent = sent_digests(records)
    # by content too: no micro-batch slice of any label or raw sensor tensor of any vehicle was in any frame
    n_batches = STEPS + 1
    assert not owner_digests(run, LABELS, BATCH, N_MICRO, n_batches) & sent
    assert not owner_digests(run, RAW_SENSORS, BATCH, N_MICRO, n_batches) & sent


def test_turnaround_hop_and_heads_move_with_the_data_owner(u_run):
    _, run, _ = u_run
    records = audits(run)
    heads = set(head_layers(Partitioner(VisionEncoder(get_config("tiny"))).graph))
    for a, b in (("v002", "v003"), ("v004", "v005")):
        # each member is the data owner of one pipeline and the last trunk stage of the other: both send
        # activations (trunk forward, and the turnaround features) and gradients to each other
        for src, dst in ((a, b), (b, a)):
            kinds = {rec["kind"] for rec in records[src] if rec["to"] == dst}
            assert {tensorframe.KIND_ACTIVATION, tensorframe.KIND_GRADIENT} <= kinds
            turned = [rec for rec in records[src] if rec["to"] == dst and rec["kind"] == tensorframe.KIND_ACTIVATION
                      and rec["names"] == ["dec.2"]]
            assert turned, f"{src} never returned the trunk's features to {dst}"
        # stage exchange: the heads go to whoever is the data owner of the next pipeline
        moves = [rec for v in (a, b) for rec in records[v] if rec["kind"] == "layers" and rec["to"] in (a, b)]
        with_heads = [rec for rec in moves if set(rec["names"]) & heads]
        assert with_heads, moves
        for rec in with_heads:     # all heads, and they travel from one data owner to the next
            assert heads <= set(rec["names"])
            assert "meas" in rec["names"]   # with the owner's stage-0 layers (the raw-input readers)
