"""Compression codecs: exact where promised, bounded error otherwise, and the byte savings hold."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flad_core import tensorcodec as tc
from flad_core import tensorframe as tf


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(1, 6), min_size=0, max_size=3), seed=st.integers(0, 999),
       codec=st.sampled_from(tc.CODECS), scale=st.floats(1e-3, 1e3))
def test_round_trip_error_bounds(shape, seed, codec, scale):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale
    labels = torch.arange(3)
    waypoints = torch.randn(2, 5, 2, generator=torch.Generator().manual_seed(seed + 1)) * 7.3   # a float label
    enc = tc.encode({"act": t, "lbl": labels, "waypoints": waypoints}, codec, exact={"waypoints"})
    _, wire = tf.unpack(tf.pack(enc))                     # through a real frame
    back = tc.decode(wire)
    assert set(back) == {"act", "lbl", "waypoints"} and torch.equal(back["lbl"], labels)
    assert torch.equal(back["waypoints"], waypoints)      # labels travel bit-exact under every codec
    assert back["act"].dtype == t.dtype and back["act"].shape == t.shape
    err = (back["act"] - t).abs()
    if codec == "fp32":
        assert torch.equal(back["act"], t)
    elif codec == "fp16":
        assert torch.all(err <= t.abs() * 1e-3 + 1e-4)
    elif codec == "bf16":
        assert torch.all(err <= t.abs() * 8e-3 + 1e-30)
    else:  # int8: at most half a quantisation step of the channel's scale
        per_channel_max = t.abs().reshape(-1, t.shape[-1]).amax(0) if t.dim() else t.abs().reshape(1)
        assert torch.all(err <= per_channel_max / 127 * 0.5 + 1e-6)


def test_byte_savings():
    act = {"x": torch.randn(8, 64, 128)}
    fp32 = tc.wire_bytes(tc.encode(act, "fp32"))
    assert tc.wire_bytes(tc.encode(act, "fp16")) * 2 == fp32
    assert fp32 / tc.wire_bytes(tc.encode(act, "int8")) > 3.9


def test_errors():
    with pytest.raises(tc.CodecError, match="unknown codec"):
        tc.encode({"x": torch.ones(2)}, "int4")
    enc = tc.encode({"x": torch.ones(2, 3)}, "int8")
    with pytest.raises(tc.CodecError, match="without its scale"):
        tc.decode({k: v for k, v in enc.items() if not k.endswith("scale")})


_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64, torch.float32, torch.bfloat16]


@settings(max_examples=80, deadline=None)
@given(shape=st.lists(st.integers(0, 40), min_size=0, max_size=3), seed=st.integers(0, 999),
       dtype=st.sampled_from(_DTYPES), density=st.floats(0.0, 1.0), codec=st.sampled_from(tc.CODECS))
def test_exact_tensors_are_bit_exact_through_a_frame(shape, seed, dtype, density, codec):
    """Labels (non-float, or float named exact) survive every codec bit for bit, packed or not."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 200, shape, generator=g) * (torch.rand(shape, generator=g) < density)
    t = values.to(dtype) if dtype != torch.bool else values > 0
    enc = tc.encode({"label": t}, codec, exact={"label"})
    if codec == "fp32":
        assert enc == {"label": t}                        # the raw baseline packs nothing
    assert tc.wire_bytes(enc) <= t.numel() * t.element_size()   # packing is kept only when it saves bytes
    _, wire = tf.unpack(tf.pack(enc))
    back = tc.decode(wire)["label"]
    assert back.dtype == t.dtype and back.shape == t.shape
    assert torch.equal(back, t)


def test_bev_label_packs_losslessly():
    """The BEV occupancy label (uint8 0/1) is most of a labels-forward hop's exact bytes; it deflates well."""
    g = torch.Generator().manual_seed(0)
    bev = torch.zeros(4, 50, 50, dtype=torch.uint8)
    bev[:, 20:30, 10:40] = (torch.rand(4, 10, 30, generator=g) < 0.7).to(torch.uint8)   # a few vehicles/roads
    for codec in ("fp16", "bf16", "int8"):
        enc = tc.encode({"bev": bev}, codec)
        assert tc.wire_bytes(enc) * 5 < bev.numel()
        assert torch.equal(tc.decode(enc)["bev"], bev)
    assert tc.wire_bytes(tc.encode({"bev": bev}, "fp32")) == bev.numel()


def test_packed_payload_errors():
    bev = torch.zeros(4, 50, 50, dtype=torch.uint8)
    (key, payload), = tc.encode({"bev": bev}, "int8").items()
    with pytest.raises(tc.CodecError, match="corrupt DEFLATE"):
        tc.decode({key: torch.full_like(payload, 7)})
    bigger = key.replace("4x50x50", "4x50x51")
    with pytest.raises(tc.CodecError, match="inflates to 10000 bytes, expected 10200"):
        tc.decode({bigger: payload})
    smaller = key.replace("4x50x50", "4x50x49")
    with pytest.raises(tc.CodecError, match=r"inflates to 9801\+ bytes"):
        tc.decode({smaller: payload})
    with pytest.raises(tc.CodecError, match="malformed shape"):
        tc.decode({key.replace("4x50x50", "4xfifty"): payload})
    with pytest.raises(tc.CodecError, match="bad dtype"):
        tc.decode({key.replace("uint8", "complex64"): payload})
