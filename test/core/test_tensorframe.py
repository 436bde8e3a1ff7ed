"""Tensor frames: lossless round trip for every dtype/shape, and every kind of damage is caught."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from flad_core import tensorframe as tf

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
          torch.int32, torch.int64, torch.bool]


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=4)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen, dtype=torch.float32) * 100).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=gen, dtype=dtype)


@settings(max_examples=150, deadline=None)
@given(named=st.dictionaries(st.text(min_size=1, max_size=12), tensors(), max_size=5),
       step=st.integers(0, 2**63), mb=st.integers(0, 2**32 - 1), stage=st.integers(0, 2**32 - 1),
       kind=st.integers(0, 3), checksum=st.booleans())
def test_round_trip(named, step, mb, stage, kind, checksum):
    frames = tf.pack(named, kind=kind, step=step, micro_batch=mb, stage=stage, checksum=checksum)
    header, back = tf.unpack([bytes(f) for f in frames])
    assert (header.kind, header.step, header.micro_batch, header.stage, header.checksum) == (
        kind, step, mb, stage, checksum)
    assert list(back) == list(named)
    for name, t in named.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        assert torch.equal(back[name], t)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_random_headers_never_crash(data):
    with contextlib.suppress(tf.FrameError):  # anything else (IndexError, struct.error) fails the test
        tf.parse_header(data)


@settings(max_examples=100, deadline=None)
@given(cut=st.integers(0, 200))
def test_truncated_header_rejected(cut):
    frames = tf.pack({"act": torch.ones(2, 3), "lbl": torch.zeros(4, dtype=torch.int64)})
    head = bytes(frames[0])
    if cut >= len(head):
        return
    with pytest.raises(tf.FrameError):
        tf.unpack([head[:cut], *frames[1:]])


def test_damage_is_named():
    frames = [bytes(f) for f in tf.pack({"act": torch.arange(12.0).reshape(3, 4)})]
    flipped = bytearray(frames[1])
    flipped[5] ^= 0xFF
    with pytest.raises(tf.FrameError, match="checksum mismatch"):
        tf.unpack([frames[0], bytes(flipped)])
    with pytest.raises(tf.FrameError, match="bytes arrived"):
        tf.unpack([frames[0], frames[1][:-4]])
    with pytest.raises(tf.FrameError, match="buffers arrived"):
        tf.unpack([frames[0]])
    with pytest.raises(tf.FrameError, match="bad magic"):
        tf.unpack([b"XXXX" + frames[0][4:], frames[1]])
    with pytest.raises(tf.FrameError, match="exceeds"):
        tf.unpack(frames, max_bytes=16)
    with pytest.raises(tf.FrameError, match=r"expected float32 \[4, 3\]|expected torch.float32 \[4, 3\]"):
        tf.unpack(frames, expect={"act": (torch.float32, (4, 3))})
    with pytest.raises(tf.FrameError, match="expected tensors"):
        tf.unpack(frames, expect={"other": (torch.float32, (3, 4))})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_rejected(bad):
    t = torch.randn(100)
    t[17] = bad
    with pytest.raises(tf.FrameError, match="NaN or inf"):
        tf.unpack(tf.pack({"g": t}))
    tf.unpack(tf.pack({"g": t}), finite=False)  # allowed when the receiver says so


def test_large_finite_values_not_mistaken_for_overflow():
    t = torch.full((1000,), 3e38)   # the float32 sum overflows, the values are finite
    _, back = tf.unpack(tf.pack({"x": t}))
    assert torch.equal(back["x"], t)


def test_header_size_mismatch_named():
    frames = tf.pack({"a": torch.ones(4)})
    head = bytearray(bytes(frames[0]))
    # the entry's nbytes field sits before its 8-byte checksum at the end of the header
    head[-16:-8] = (999).to_bytes(8, "little")
    with pytest.raises(tf.FrameError, match="does not match shape"):
        tf.parse_header(bytes(head))


def test_zero_copy_views():
    t = torch.arange(1 << 16, dtype=torch.float32)
    frames = tf.pack({"t": t}, checksum=False)
    assert isinstance(frames[1], memoryview)
    assert np.shares_memory(np.frombuffer(frames[1], dtype=np.uint8), t.numpy())
    assert frames[1].nbytes == t.numel() * 4 and tf.checksum_of(frames[1]) == tf.checksum_of(t.numpy().tobytes())


def test_frames_between_processes(port_base):
    """A real PUSH/PULL pair across processes: the receiver validates and echoes the sum."""
    receiver = textwrap.dedent(f"""
        import zmq, torch
        from flad_core import tensorframe as tf
        ctx = zmq.Context()
        pull = ctx.socket(zmq.PULL); pull.bind("tcp://127.0.0.1:{port_base}")
        push = ctx.socket(zmq.PUSH); push.connect("tcp://127.0.0.1:{port_base + 1}")
        for _ in range(3):
            header, ts = tf.unpack(pull.recv_multipart(copy=False))
            push.send_multipart(tf.pack({{"sum": ts["act"].double().sum().reshape(1)}}, kind=tf.KIND_GRADIENT,
                                         step=header.step, micro_batch=header.micro_batch))
    """)
    proc = subprocess.Popen([sys.executable, "-c", receiver])
    ctx = zmq.Context()
    try:
        push = ctx.socket(zmq.PUSH)
        push.connect(f"tcp://127.0.0.1:{port_base}")
        pull = ctx.socket(zmq.PULL)
        pull.bind(f"tcp://127.0.0.1:{port_base + 1}")
        for mb in range(3):
            act = torch.randn(64, 256, generator=torch.Generator().manual_seed(mb))
            push.send_multipart(tf.pack({"act": act}, step=7, micro_batch=mb), copy=False)
            assert pull.poll(10_000)
            header, ts = tf.unpack(pull.recv_multipart(copy=False))
            assert header.kind == tf.KIND_GRADIENT and header.step == 7 and header.micro_batch == mb
            assert torch.allclose(ts["sum"], act.double().sum().reshape(1))
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        ctx.destroy(0)
