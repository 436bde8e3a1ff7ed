"""Training decreases the loss; checkpoints round-trip; bad checkpoints give a clear error; the CLI runs."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from _encoder_testlib import tiny_batch, tiny_model

from flad_core.cli import main as flad_main
from flad_vehicle.encoder.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from flad_vehicle.encoder.synthetic import synthetic_batches
from flad_vehicle.encoder.train import DataSource, Metrics, TrainConfig, evaluate, train


class FixedSource(DataSource):
    """A small fixed synthetic dataset, cycled (so the loss must go down if training works)."""

    def __init__(self, cfg: TrainConfig, n_batches: int = 4) -> None:
        super().__init__(cfg, [])
        self.batches = list(synthetic_batches(n_batches, cfg.batch_size, seed=7))

    def train_batches(self):
        while True:
            yield from self.batches

    def eval_batches(self, limit: int = 0):
        return iter(self.batches)


def test_loss_decreases_on_small_dataset(tmp_path):
    cfg = TrainConfig(synthetic=True, steps=40, batch_size=4, warmup_steps=5, progress=False, threads=1)
    src = FixedSource(cfg)
    before = evaluate(tiny_model(seed=0), src.eval_batches())["loss"]
    res = train(cfg, source=src, checkpoint=tmp_path / "c.safetensors")
    after = evaluate(res["model"], src.eval_batches())["loss"]
    assert after < 0.8 * before, (before, after)
    assert res["last_loss_mean10"] < res["first_loss"]
    assert res["train_samples_per_s"] > 0 and (tmp_path / "c.safetensors").exists()


def test_training_is_deterministic():
    cfg = TrainConfig(synthetic=True, steps=3, batch_size=2, warmup_steps=1, progress=False)
    a = train(cfg, source=FixedSource(cfg, 2))["model"]
    b = train(cfg, source=FixedSource(cfg, 2))["model"]
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), k


def test_checkpoint_round_trip(tmp_path):
    m = tiny_model(seed=4)
    path = save_checkpoint(tmp_path / "enc.safetensors", m, step=17, extra={"note": "x"})
    m2, meta = load_checkpoint(path)
    assert meta["step"] == 17 and meta["config"] == m.cfg and meta["extra"] == {"note": "x"}
    b = tiny_batch(2)
    with torch.no_grad():
        torch.testing.assert_close(m(b)["features"], m2(b)["features"])
    m3 = tiny_model(seed=9)
    load_checkpoint(path, m3)
    for k, v in m.state_dict().items():
        assert torch.equal(v, m3.state_dict()[k])
    assert not list(tmp_path.glob(".*.tmp"))            # atomic write left no temp file


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, match", [
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "truncated"),
    (lambda p: p.write_bytes(b""), "empty or truncated"),
    (lambda p: p.write_bytes(b"\x00" * 64), "not a valid safetensors|truncated"),
    (_flip_last_byte, "checksum"),
    (lambda p: p.unlink(), "not found"),
])
def test_bad_checkpoint_clear_error(tmp_path, damage, match):
    path = save_checkpoint(tmp_path / "enc.safetensors", tiny_model(), step=1)
    damage(path)
    with pytest.raises(CheckpointError, match=match) as exc:
        load_checkpoint(path)
    assert str(path) in str(exc.value)


def test_checkpoint_not_flad_and_config_mismatch(tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "something-else"})
    with pytest.raises(CheckpointError, match="not a FLAD encoder checkpoint"):
        load_checkpoint(other)
    path = save_checkpoint(tmp_path / "enc.safetensors", tiny_model(), step=1)
    with pytest.raises(CheckpointError, match=r"config mismatch \(d_model"):
        load_checkpoint(path, tiny_model(d_model=32, n_heads=2))
    # header length field pointing past the end of the file
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 2)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)


def test_metrics_definitions():
    m = Metrics()
    batch = {"waypoints": torch.zeros(1, 5, 2), "tl_state": torch.tensor([2]), "bev": torch.zeros(1, 2, 2)}
    batch["bev"][0, 0, 0] = 1
    wp = torch.zeros(1, 5, 2)
    wp[0, :, 0] = 3.0
    wp[0, :, 1] = 4.0
    pred_bev = torch.zeros(1, 2, 2, dtype=torch.bool)
    pred_bev[0, 0, :] = True
    m.add(torch.tensor([2]), wp, pred_bev, batch)
    r = m.result()
    assert r["tl_accuracy"] == 1.0 and r["wp_l1"] == pytest.approx(3.5)
    assert r["wp_ade"] == pytest.approx(5.0) and r["wp_fde"] == pytest.approx(5.0) and r["bev_iou"] == 0.5


def test_train_and_eval_cli(tmp_path, capsys):
    runs = tmp_path / "runs"
    rc = flad_main(["vehicle", "train", "--synthetic", "--steps", "3", "--batch-size", "2", "--no-progress",
                    "--runs-dir", str(runs), "--no-eval"])
    assert rc == 0
    (run,) = list(runs.iterdir())
    assert (run / "config.yaml").exists() and (run / "metrics.jsonl").exists() and (run / "log.txt").exists()
    ckpt = run / "encoder.safetensors"
    assert ckpt.exists()
    res = json.loads((run / "result.json").read_text())
    assert res["steps"] == 3
    capsys.readouterr()
    assert flad_main(["vehicle", "eval", "--checkpoint", str(ckpt), "--synthetic", "--max-batches", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"tl_accuracy", "wp_l1", "wp_ade", "wp_fde", "bev_iou"} <= set(out["eval"])
    ckpt.write_bytes(b"garbage")
    assert flad_main(["vehicle", "eval", "--checkpoint", str(ckpt), "--synthetic"]) == 2
    assert str(ckpt) in capsys.readouterr().err


def test_augmentation_is_deterministic_and_keeps_shapes():
    from flad_vehicle.encoder.train import augment_cameras

    b = tiny_batch(2)
    cams = ("rgb_front", "rgb_left", "rgb_right", "rgb_rear")
    a1 = augment_cameras(b, torch.Generator().manual_seed(0), cams)
    a2 = augment_cameras(b, torch.Generator().manual_seed(0), cams)
    for c in cams:
        assert a1[c].dtype == torch.uint8 and a1[c].shape == b[c].shape
        assert torch.equal(a1[c], a2[c]) and not torch.equal(a1[c], b[c])
    assert a1["lidar"] is b["lidar"] and torch.equal(a1["waypoints"], b["waypoints"])
