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
