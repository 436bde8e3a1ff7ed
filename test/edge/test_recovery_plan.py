"""Recovery planning and edge backups: exact move accounting, changed-only backups, atomic restore."""

from __future__ import annotations

import pytest
import torch

from flad_core.protocol import BACKUP_OWNER as BACKUP
from flad_edge.fhdp.recovery.backups import BackupStore
from flad_edge.fhdp.recovery.moves import departed_share, moved_bytes, owners, plan_moves
from flad_vehicle.encoder.config import get_config
from flad_vehicle.encoder.model import VisionEncoder
from flad_vehicle.encoder.partition import Partitioner
from flad_vehicle.fhdp.backup import BackupTracker
from flad_vehicle.fhdp.layerstore import LayerStore

NAMES = [f"l{i}" for i in range(6)]
BYTES = {f"l{i}": 100 * (i + 1) for i in range(6)}


def test_middle_stage_departure_moves_only_its_layers():
    old = [("a", 0, 2), ("b", 2, 4), ("c", 4, 6)]
    new = [("a", 0, 3), ("c", 3, 6)]                 # b left; a and c absorb its layers
    moves = plan_moves(old, new, {"b"}, NAMES, BYTES)
    assert [(m.layer, m.source, m.dest) for m in moves] == [("l2", BACKUP, "a"), ("l3", BACKUP, "c")]
    assert moved_bytes(moves) == 300 + 400 == departed_share(old, {"b"}, NAMES, BYTES)


def test_reshuffle_among_survivors_is_counted():
    old = [("a", 0, 2), ("b", 2, 4), ("c", 4, 6)]
    new = [("a", 0, 1), ("c", 1, 6)]
    moves = plan_moves(old, new, {"b"}, NAMES, BYTES)
    assert {(m.layer, m.source) for m in moves} == {("l1", "a"), ("l2", BACKUP), ("l3", BACKUP)}
    assert moved_bytes(moves) == 200 + 300 + 400


def test_invalid_pipelines_rejected():
    with pytest.raises(ValueError, match="contiguous"):
        owners([("a", 0, 2), ("b", 3, 6)], 6)
    with pytest.raises(ValueError, match="covers"):
        owners([("a", 0, 2)], 6)
    with pytest.raises(ValueError, match="departed"):
        plan_moves([("a", 0, 3), ("b", 3, 6)], [("b", 0, 6)], {"b"}, NAMES, BYTES)


def test_backups_only_changed_layers_and_restore(tmp_path):
    torch.manual_seed(0)
    model = VisionEncoder(get_config("tiny"))
    store = LayerStore(model, Partitioner(model).graph.names)
    store.owned = set(store.layer_names)
    tracker = BackupTracker(store)
    edge = BackupStore(tmp_path / "backups")
    first = tracker.snapshot(store.layer_names)
    edge.put_state(first, step=0, owner="v1")
    assert set(first) == set(store.layer_names)
    assert tracker.snapshot(store.layer_names) == {}          # nothing changed: nothing sent
    with torch.no_grad():
        store.params[store.params_of(["enc_0"])[0]].add_(1.0)
    second = tracker.snapshot(store.layer_names)
    assert list(second) == ["enc_0"]
    edge.put_state(second, step=5, owner="v1")
    # a stale upload never overwrites a newer backup
    assert edge.put("enc_0", b"stale", step=3, owner="v9") is False
    restored, entry = BackupStore(tmp_path / "backups").get("enc_0")   # from disk
    assert entry.step == 5
    for name in store.params_of(["enc_0"]):
        assert torch.equal(restored[f"p/{name}"], store.params[name])
    (tmp_path / "backups" / "enc_0.safetensors").write_bytes(b"corrupt")
    with pytest.raises(Exception, match="checksum"):
        BackupStore(tmp_path / "backups")
