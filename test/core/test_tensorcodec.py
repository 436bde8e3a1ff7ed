"""Compression codecs: exact where promised, bounded error otherwise, and the byte savings hold."""

from __future__ import annotations

import math

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
    elif codec == "int8":  # at most half a quantisation step of the channel's scale
        per_channel_max = t.abs().reshape(-1, t.shape[-1]).amax(0) if t.dim() else t.abs().reshape(1)
        assert torch.all(err <= per_channel_max / 127 * 0.5 + 1e-6)
    else:  # int4: at most half a quantisation step of the group's scale (absmax / 7, rounded up to float16)
        assert torch.all(err <= _int4_group_absmax(t) / 7 * (1 + 2**-9) * 0.5 + 2**-24)


def test_byte_savings():
    act = {"x": torch.randn(8, 64, 128)}
    fp32 = tc.wire_bytes(tc.encode(act, "fp32"))
    assert tc.wire_bytes(tc.encode(act, "fp16")) * 2 == fp32
    assert fp32 / tc.wire_bytes(tc.encode(act, "int8")) > 3.9


def test_errors():
    with pytest.raises(tc.CodecError, match="unknown codec"):
        tc.encode({"x": torch.ones(2)}, "int2")
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


# -- int4: group-wise 4-bit quantisation --------------------------------------------------------------------------
def _int4_group_absmax(t: torch.Tensor) -> torch.Tensor:
    """Per element, the absmax of its int4 group (32 consecutive elements of the flattened tensor)."""
    flat = t.detach().float().reshape(-1)
    n_groups = -(-flat.numel() // 32)
    groups = torch.nn.functional.pad(flat, (0, n_groups * 32 - flat.numel())).reshape(n_groups, 32)
    return groups.abs().amax(1).repeat_interleave(32)[:flat.numel()].reshape(t.shape)


def _int4_parts(enc: dict, name: str) -> tuple[str, torch.Tensor, torch.Tensor]:
    (key,) = [k for k in enc if k.startswith(f"{name}\x1fint4\x1f")]
    return key, enc[key], enc[f"{name}\x1fscale"]


_FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@settings(max_examples=80, deadline=None)
@given(shape=st.lists(st.integers(0, 70), min_size=0, max_size=3), seed=st.integers(0, 999),
       dtype=st.sampled_from(_FLOATS), magnitude=st.floats(1e-6, 1e4), density=st.floats(0.0, 1.0))
def test_int4_round_trip_error_bound(shape, seed, dtype, magnitude, density):
    """|x - decode| <= scale / 2 per element, scale = group absmax / 7 up to float16 rounding (never below)."""
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g) * magnitude * (torch.rand(shape, generator=g) < density)).to(dtype)
    enc = tc.encode({"act": t}, "int4")
    _, wire = tf.unpack(tf.pack(enc))
    back = tc.decode(wire)["act"]
    assert back.dtype == t.dtype and back.shape == t.shape
    _, nibbles, scale = _int4_parts(enc, "act")
    n_groups = -(-t.numel() // 32)
    assert nibbles.dtype == torch.uint8 and nibbles.shape == (n_groups * 16,)
    assert scale.dtype == torch.float16 and scale.shape == (n_groups,)
    absmax = _int4_group_absmax(t)
    per_elem = scale.float().repeat_interleave(32)[:t.numel()].reshape(t.shape)
    assert torch.all(per_elem * 7 >= absmax)                                    # rounded up: nothing clips
    assert torch.all(per_elem <= absmax / 7 * (1 + 2**-9) + 2**-23)             # by one float16 step at most
    x = t.float()
    rounding = x.abs() * max(torch.finfo(dtype).eps, 2**-23)                    # the cast back to `dtype`
    assert torch.all((back.float() - x).abs() <= per_elem / 2 * (1 + 1e-6) + rounding)
    assert torch.equal(back[x == 0].float(), x[x == 0])                         # zeros (and zero groups) exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (1,), (31,), (33,), (5, 7), (2, 3, 65)])
def test_int4_restores_dtype_and_shape(shape, dtype):
    t = (torch.randn(shape, generator=torch.Generator().manual_seed(len(shape))) * 3).to(dtype)
    for x in (t, torch.zeros(shape, dtype=dtype)):
        enc = tc.encode({"x": x}, "int4")
        _, wire = tf.unpack(tf.pack(enc))
        back = tc.decode(wire)["x"]
        assert back.dtype == dtype and back.shape == x.shape
        assert torch.all((back.float() - x.float()).abs() <= _int4_group_absmax(x) / 13 + 1e-6)
        if not x.any():
            assert torch.equal(back, x)


def test_int4_labels_stay_exact_through_a_frame():
    g = torch.Generator().manual_seed(4)
    bev = (torch.rand(4, 50, 50, generator=g) < 0.1).to(torch.uint8)
    waypoints = torch.randn(4, 5, 2, generator=g) * 9.7
    tl_state = torch.randint(0, 4, (4,), generator=g)
    act = torch.randn(4, 40, 64, generator=g)
    sent = {"act": act, "bev": bev, "waypoints": waypoints, "tl_state": tl_state}
    enc = tc.encode(sent, "int4", exact={"bev", "waypoints"})
    _, wire = tf.unpack(tf.pack(enc))
    back = tc.decode(wire)
    for k in ("bev", "waypoints", "tl_state"):
        assert back[k].dtype == sent[k].dtype and torch.equal(back[k], sent[k]), k
    assert not torch.equal(back["act"], act) and torch.allclose(back["act"], act, atol=float(act.abs().max()) / 13)
    assert tc.wire_bytes(tc.encode({"bev": bev}, "int4")) * 5 < bev.numel()       # labels packed as by int8


def test_int4_byte_savings():
    x = {"x": torch.randn(1024, 1024)}                    # 1M elements: 0.5 byte each + a float16 per 32
    fp32, int4 = tc.wire_bytes(tc.encode(x, "fp32")), tc.wire_bytes(tc.encode(x, "int4"))
    assert int4 * 6.5 <= fp32
    assert int4 == 1024 * 1024 // 2 + 1024 * 1024 // 32 * 2
    wide = {"x": torch.randn(8, 64, 128)}                 # an activation through a real frame, header included
    framed = {c: sum(memoryview(f).nbytes for f in tf.pack(tc.encode(wide, c))) for c in ("fp32", "int8", "int4")}
    assert framed["fp32"] / framed["int4"] > 6.5 and framed["int4"] * 1.7 < framed["int8"]


def test_int4_float16_range_edges():
    h = torch.tensor([65504.0, -65504.0, 1.0, 0.0] * 9, dtype=torch.float16)   # 7 x the rounded-up scale > 65504
    back = tc.decode(tc.encode({"h": h}, "int4"))["h"]
    assert back.dtype == torch.float16 and torch.equal(back[:2], h[:2])
    huge = torch.tensor([1e30, -3e38, 2.0])                # past float16 x 7: the scale saturates, values clip
    back = tc.decode(tc.encode({"x": huge}, "int4"))["x"]
    assert torch.equal(back, torch.tensor([7 * 65504.0, -7 * 65504.0, 0.0]))
    tiny = torch.tensor([1e-12, -3e-9, 0.0])               # below float16's smallest scale: decode to ~0, finite
    assert torch.all(tc.decode(tc.encode({"x": tiny}, "int4"))["x"].abs() <= 2**-24)


def test_int4_malformed_parts_are_codec_errors():
    enc = tc.encode({"a": torch.randn(3, 40)}, "int4")    # 120 elements: 4 groups, 64 bytes, 4 scales
    key, nib, scale = _int4_parts(enc, "a")
    skey = "a\x1fscale"
    assert key == "a\x1fint4\x1ff32\x1f3x40" and nib.shape == (64,) and scale.shape == (4,)

    def bad(parts, match, **kw):
        with pytest.raises(tc.CodecError, match=match):
            tc.decode(parts, **kw)

    bad({key: nib[:-1], skey: scale}, r"values are torch.uint8 \[63\], expected uint8 \[64\]")     # truncated
    bad({key: nib, skey: scale[:3]}, r"scales are torch.float16 \[3\], expected float16 \[4\]")     # a scale short
    bad({key: nib, skey: torch.cat([scale, scale[:1]])}, "scales are")                               # one too many
    bad({key: nib}, "without its scales")
    bad({key: nib.view(torch.int8), skey: scale}, "values are torch.int8")
    bad({key: nib.reshape(8, 8), skey: scale}, "values are")
    bad({key: nib, skey: scale.float()}, "scales are torch.float32")
    for poison in (float("nan"), float("inf")):
        bad({key: nib, skey: torch.tensor([1.0, poison, 1.0, 1.0], dtype=torch.float16)}, "NaN or inf scale")
    nan_ok = tc.decode({key: nib, skey: torch.tensor([1.0, float("nan"), 1.0, 1.0], dtype=torch.float16)},
                       finite=False)["a"]                # the caller asked for no finiteness check
    assert nan_ok.shape == (3, 40) and bool(nan_ok.reshape(-1)[32:64].isnan().all())
    # absurd padding: the payload holds more groups than the shape needs (padding of 32 or more elements)
    bad({key.replace("3x40", "1"): nib, skey: scale}, r"expected uint8 \[16\]")
    bad({key: torch.cat([nib, nib[:16]]), skey: torch.cat([scale, scale[:1]])}, r"expected uint8 \[64\]")
    bad({key.replace("3x40", "0"): nib, skey: scale}, r"expected uint8 \[0\]")
    # malformed or hostile declared shapes: refused before anything is allocated
    for shape, match in (("3xforty", "malformed shape"), ("-3x40", "bad shape"), ("", "malformed shape"),
                         ("x".join(["1"] * 9), "bad shape"), ("99999999999x99999999999", "more than"),
                         ("4294967296x4294967296x4294967296", "more than")):
        bad({key.replace("3x40", shape): nib, skey: scale}, match)
    bad({key.replace("f32", "f17"): nib, skey: scale}, "malformed codec tensor name")
    bad({key + "\x1fextra": nib, skey: scale}, "malformed codec tensor name")


_INT4_SHAPES = [(), (0,), (1,), (31,), (32,), (33,), (3, 40), (2, 0), (2, 2, 2, 2, 2, 2, 2, 2)]
_INT4_BAD_SHAPES = ["-1", "", "x", "1x1x1x1x1x1x1x1x1", "99999999999x99999999999", "2x-16", "1e3"]


@st.composite
def _int4_parts_strategy(draw) -> dict:
    """int4 parts near well-formed: sizes off by a little or not, odd dtypes, NaN/inf/huge scales, bad keys."""
    shape = draw(st.sampled_from(_INT4_SHAPES))
    n_groups = -(-math.prod(shape) // 32)
    shape_s = draw(st.sampled_from(_INT4_BAD_SHAPES)) if draw(st.integers(0, 4)) == 0 else \
        "x".join(map(str, shape)) or "scalar"
    tag = draw(st.sampled_from(["int8", ""])) if draw(st.integers(0, 9)) == 0 else \
        draw(st.sampled_from(["f32", "f16", "bf16", "f64"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    n_bytes = max(0, n_groups * 16 + draw(st.sampled_from([0, 0, 0, -1, 1, 16, -16])))
    values = torch.randint(0, 256, (n_bytes,), generator=g, dtype=torch.uint8)
    values = values.to(draw(st.sampled_from([torch.uint8] * 5 + [torch.int8, torch.float16]))) \
        .reshape(draw(st.sampled_from([(-1,)] * 4 + [(1, -1)])) if n_bytes else (0,))
    n_scales = max(0, n_groups + draw(st.sampled_from([0, 0, 0, -1, 1])))
    scale = torch.rand(n_scales, generator=g) * draw(st.sampled_from([1e-8, 1.0, 1e4, 65504.0]))
    special = draw(st.sampled_from([None] * 4 + [float("nan"), float("inf"), -float("inf"), 0.0]))
    if special is not None and n_scales:
        scale[int(torch.randint(0, n_scales, (1,), generator=g))] = special
    scale = scale.to(draw(st.sampled_from([torch.float16] * 5 + [torch.float32, torch.uint8])))
    parts = {f"a\x1fint4\x1f{tag}\x1f{shape_s}": values}
    if draw(st.integers(0, 9)):
        parts["a\x1fscale"] = scale
    return parts


@settings(max_examples=300, deadline=None)
@given(parts=_int4_parts_strategy(), finite=st.booleans())
def test_int4_hostile_parts_decode_or_raise_codec_error(parts, finite):
    """Whatever arrives as int4 parts, decoding returns a well-formed tensor or raises CodecError, nothing else."""
    try:
        out = tc.decode(parts, finite=finite)
    except tc.CodecError:
        return
    (key,) = [k for k in parts if "int4" in k]
    shape_s = key.split("\x1f")[3]
    assert out["a"].dtype in _FLOATS and list(out["a"].shape) == ([] if shape_s == "scalar" else
                                                                  [int(x) for x in shape_s.split("x")])
    assert out["a"].numel() <= 2 * parts[key].numel()
    if finite:
        assert bool(torch.isfinite(out["a"]).all())
