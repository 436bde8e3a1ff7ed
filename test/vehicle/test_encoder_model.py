"""Shapes and basic behaviour of the vision encoder (tiny and paper configs)."""

from __future__ import annotations

import pytest
import torch
from _encoder_testlib import tiny_batch, tiny_model

from flad_core.config import ConfigError
from flad_vehicle.encoder import VisionEncoder, count_parameters, get_config
from flad_vehicle.encoder.layers import PillarLayer


def test_tiny_shapes_and_features():
    m = tiny_model()
    b = tiny_batch(2)
    out = m.forward_train(b)
    assert out["pred.bev"].shape == (2, 50, 50)
    assert out["pred.tl"].shape == (2, 4)
    assert out["pred.waypoints"].shape == (2, 5, 2)
    assert out["features"].shape == (2, m.cfg.n_feature_tokens, 64) == (2, 31, 64)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    feats = m.encode_features(b)
    assert feats.shape == (2, 31, 64) and not feats.requires_grad
    # inference path needs no labels
    nolabel = {k: v for k, v in b.items() if k not in ("bev", "tl_state", "waypoints")}
    assert set(m(nolabel)) == {"pred.bev", "pred.tl", "pred.waypoints", "features"}


def test_paper_builds_and_runs_one_sample():
    torch.manual_seed(0)
    m = VisionEncoder("paper")
    n = count_parameters(m)
    assert 30e6 < n < 40e6, n          # ResNet-50d trunk (~23.5M) + LiDAR convs + 1 enc / 3 dec layers at d=256
    with torch.no_grad():
        out = m(tiny_batch(1))
    assert out["features"].shape == (1, 31, 256)
    assert out["pred.bev"].shape == (1, 50, 50)


def test_config_overrides_and_errors():
    cfg = get_config({"name": "tiny", "d_model": 32, "n_heads": 2})
    assert cfg.d_model == 32 and cfg.rgb_widths == (16, 32, 64)
    with pytest.raises(ConfigError, match="no_such_key"):
        get_config({"no_such_key": 1})
    with pytest.raises(ConfigError, match="n_heads"):
        get_config({"d_model": 30})
    with pytest.raises(ConfigError, match="unknown encoder config"):
        get_config("huge")


def test_pillars_ignore_no_return_rays():
    layer = PillarLayer(10, 8, (-10.0, 40.0), (-25.0, 25.0), 4.0)
    pts = torch.zeros(2, 100, 4)
    pts[..., 3] = -1.0                       # all rays: no return
    with torch.no_grad():
        (bev,) = layer(pts)
    assert bev.shape == (2, 8, 10, 10) and float(bev.abs().sum()) == 0.0
    pts[0, 0] = torch.tensor([39.5, 24.5, 0.5, 0.8])   # far-left corner -> row 0, col 0
    with torch.no_grad():
        (bev,) = layer(pts)
    assert float(bev[0, :, 0, 0].abs().sum()) > 0 and float(bev[0, :, 1:, :].abs().sum()) == 0.0
    assert float(bev[1].abs().sum()) == 0.0


def test_param_groups_split_backbone():
    m = tiny_model()
    groups = m.param_groups(7.5e-4, 3e-4, 0.05)
    assert [g["lr"] for g in groups] == [3e-4, 7.5e-4]
    assert sum(p.numel() for g in groups for p in g["params"]) == count_parameters(m)


def test_config_from_yaml_file(tmp_path):
    f = tmp_path / "enc.yaml"
    f.write_text("name: tiny\nrgb_norm: instance\nw_tl: 1.0\n")
    cfg = get_config(str(f))
    assert cfg.rgb_norm == "instance" and cfg.w_tl == 1.0 and cfg.d_model == 64
    f.write_text("d_modle: 3\n")
    with pytest.raises(ConfigError, match=r"d_modle.*enc\.yaml"):
        get_config(str(f))
    with pytest.raises(ConfigError, match="not found"):
        get_config(str(tmp_path / "missing.yaml"))


def test_instance_norm_is_invariant_to_brightness():
    m = tiny_model(rgb_norm="instance")
    b = tiny_batch(2)
    dark = dict(b)
    for cam in ("rgb_front", "rgb_left", "rgb_right", "rgb_rear"):
        dark[cam] = (b[cam].float() * 0.5).round().to(torch.uint8)
    with torch.no_grad():
        a, d = m(b)["features"], m(dark)["features"]
    assert (a - d).abs().max() < 0.2 * a.abs().max()


def test_tl_focus_reads_only_its_crop_and_reaches_tl_outputs():
    """The focus view sees a full-resolution crop of rgb_front (where the ego's lamp is) and nothing else;
    a lamp-sized change inside the crop reaches pred.tl and the LLM's traffic-light token."""
    m = tiny_model().eval()
    focus = m.layers["tl_focus"]
    (r0, r1), (c0, c1) = focus.rows, focus.cols
    assert (r0, r1, c0, c1) == (36, 76, 40, 88)
    b = tiny_batch(2)
    with torch.no_grad():
        base = m(b)
        tok = focus(b["rgb_front"])[0]
        assert tok.shape == (2, 64)
        img = b["rgb_front"].clone()
        img[:, :r0] = 255 - img[:, :r0]
        img[:, :, c1:] = 0
        assert torch.equal(focus(img)[0], tok)
        lamp = b["rgb_front"].clone()
        lamp[:, 60:62, 63:65] = torch.tensor([255, 20, 20], dtype=torch.uint8)
        changed = m({**b, "rgb_front": lamp})
    assert not torch.allclose(focus(lamp)[0], tok)
    assert not torch.allclose(changed["pred.tl"], base["pred.tl"])
    tl_token = m.cfg.feature_pool ** 2
    assert not torch.allclose(changed["features"][:, tl_token], base["features"][:, tl_token])


def test_tl_focus_can_be_switched_off_and_validated():
    m = tiny_model(tl_focus=False)
    assert "tl_focus" not in m.layers
    out = m.forward_train(tiny_batch(2))
    assert out["pred.tl"].shape == (2, 4) and out["features"].shape == (2, 31, 64)
    with pytest.raises(ConfigError):
        get_config({"name": "tiny", "tl_focus_box": [0.6, 0.2, 0.0, 1.0]})
    with pytest.raises(ConfigError):
        get_config({"name": "tiny", "tl_class_weights": [1.0, 2.0]})
    weighted = tiny_model(tl_class_weights=[1.0, 1.0, 2.0, 2.0])
    assert torch.isfinite(weighted.forward_train(tiny_batch(2))["loss.tl"])
