"""Weight transfer: safetensors payloads survive chunking; corruption and mismatches are named."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flad_core import codec
from flad_core import weights as w


def model_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"enc.weight": torch.randn(64, 33, generator=g), "enc.bias": torch.randn(64, generator=g),
            "steps": torch.tensor([7], dtype=torch.int64), "half": torch.randn(5, generator=g).half()}


@settings(max_examples=40, deadline=None)
@given(chunk=st.integers(1, 20000), seed=st.integers(0, 1000))
def test_chunked_round_trip(chunk, seed):
    state = model_state(seed)
    payload = w.to_bytes(state, {"round": "3"})
    msgs = w.chunk_messages(payload, sender="v1", update_id=f"u{seed}", round=3, num_samples=12, chunk_bytes=chunk)
    # chunks pass through the CDR codec as they would on the bus, in any order
    wire = [codec.decode(codec.encode(m), "flad_msgs/msg/WeightChunk") for m in msgs]
    random.Random(seed).shuffle(wire)
    back = w.from_bytes(w.join_chunks(wire), expect=state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_corruption_and_gaps_detected():
    payload = w.to_bytes(model_state())
    msgs = w.chunk_messages(payload, sender="v1", update_id="u", chunk_bytes=1000)
    with pytest.raises(w.WeightsError, match="incomplete transfer"):
        w.join_chunks(msgs[:-1])
    msgs[1].data = msgs[1].data.copy()
    msgs[1].data[3] ^= 0xFF
    with pytest.raises(w.WeightsError, match="checksum mismatch"):
        w.join_chunks(msgs)
    other = w.chunk_messages(payload, sender="v1", update_id="other", chunk_bytes=1000)
    asm = w.ChunkAssembler()
    asm.add(msgs[0])
    with pytest.raises(w.WeightsError, match="update_id"):
        asm.add(other[1])


def test_payload_checks():
    state = model_state()
    with pytest.raises(w.WeightsError, match="not a valid safetensors"):
        w.from_bytes(b"garbage" * 10)
    bad = dict(state, **{"enc.bias": torch.randn(65)})
    with pytest.raises(w.WeightsError, match=r"enc\.bias is torch.float32 \[65\]"):
        w.from_bytes(w.to_bytes(bad), expect=state)
    with pytest.raises(w.WeightsError, match="missing"):
        w.from_bytes(w.to_bytes({"enc.weight": state["enc.weight"]}), expect=state)
    nan = dict(state, **{"enc.bias": torch.full((64,), float("nan"))})
    with pytest.raises(w.WeightsError, match="NaN"):
        w.from_bytes(w.to_bytes(nan))
    with pytest.raises(w.WeightsError, match="exceeds"):
        w.ChunkAssembler(max_bytes=10).add(w.chunk_messages(w.to_bytes(state), sender="v")[0])


def test_empty_state_round_trips():
    # a parameter-free layer (the loss) moves as an empty payload
    assert w.from_bytes(w.to_bytes({})) == {}
    assert w.from_bytes(w.to_bytes({}, {"round": "1"})) == {}
