"""Compression codecs for pipeline traffic (the paper's open question on inter-stage communication).

A codec turns one float tensor into a few tensors that travel in a tensor frame, and back:
  fp32  as is (lossless)
  fp16  half precision (2x fewer bytes)
  bf16  bfloat16 (2x fewer bytes, fp32's range)
  int8  symmetric per-channel quantisation over the last dimension: int8 values + one float32 scale per
        channel (~4x fewer bytes for wide tensors)
  int4  symmetric group-wise quantisation: the flattened tensor in groups of 32 consecutive elements (the last
        one zero-padded), one float16 scale per group (absmax / 7, rounded up to the next float16 so that no
        value clips), values round(x / scale) in [-7, 7] as two signed nibbles per byte (~7.1x fewer bytes:
        0.5 byte per element + 2 bytes per 32). Error per element <= scale / 2. Meant with error feedback
        (`OutLink(error_feedback=True)`), which carries each send's quantisation error into the next.
Non-float tensors (labels, indices) are never quantised, nor are the float tensors named in `exact`
(labels such as waypoints: a lossy codec must never change the targets a stage trains on). The compressing
codecs (all but fp32) pack those tensors losslessly instead: DEFLATE (zlib, level 1) over their raw bytes,
kept only when it saves bytes. In labels-forward pipelines the labels ride along on every hop, and the
BEV occupancy label (uint8 0/1, 2.5 KB per sample) deflates ~100x, so without packing the exact labels
dilute int8's ~4x (int4's ~7x) on activations. fp32 stays the raw baseline: nothing is packed or quantised.
Decoding restores the original dtype, shape and bits.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Collection, Mapping

import torch

CODECS = ("fp32", "fp16", "bf16", "int8", "int4")
_SEP = "\x1f"  # joins a tensor name and its codec part; never appears in layer tensor names
#: a packed tensor may not declare more than this (bytes once inflated) nor more dimensions: a receiver's frame
#: limit (tensorframe.DEFAULT_MAX_FRAME_BYTES) and MAX_NDIM; DEFLATE could otherwise inflate a few KB to gigabytes
MAX_UNPACKED_BYTES = 512 * 1024 * 1024
MAX_NDIM = 8


class CodecError(ValueError):
    pass


def _int8_encode(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = t.detach().float().reshape(-1, t.shape[-1]) if t.dim() else t.detach().float().reshape(1, 1)
    scale = flat.abs().amax(dim=0).clamp_min(1e-12) / 127.0          # one scale per channel (last dim)
    q = torch.round(flat / scale).clamp_(-127, 127).to(torch.int8)
    return q.reshape(t.shape) if t.dim() else q.reshape(()), scale


INT4_GROUP = 32                      # elements per int4 scale
_F16_MAX = float(torch.finfo(torch.float16).max)
_F16_TINY = 2.0 ** -24               # the smallest float16 (subnormal): an all-zero group's scale, so 0 / scale = 0


def _int4_encode(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(nibbles, scales): uint8 [ceil(n / 32) * 16] (element 2i in the low nibble, 2i + 1 in the high one, two's
    complement) and float16 [ceil(n / 32)]."""
    flat = t.detach().reshape(-1).float()
    n_groups = -(-flat.numel() // INT4_GROUP)
    groups = torch.nn.functional.pad(flat, (0, n_groups * INT4_GROUP - flat.numel())).reshape(n_groups, INT4_GROUP)
    absmax = groups.abs().amax(dim=1)
    scale = (absmax / 7.0).clamp(_F16_TINY, _F16_MAX).half()
    # float16 rounding may put 7 x scale below absmax (the largest value would clip): one float16 step up
    short = (scale.float() * 7.0 < absmax) & (scale < _F16_MAX)
    scale = torch.where(short, (scale.view(torch.int16) + 1).view(torch.float16), scale)
    q = torch.round(groups / scale.float()[:, None]).clamp_(-7, 7).to(torch.int8)   # clamps only past float16's range
    nib = (q.reshape(-1, 2) & 0xF).to(torch.uint8)
    return nib[:, 0] | (nib[:, 1] << 4), scale


_PACKABLE = {str(d).removeprefix("torch."): d for d in (
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.float16, torch.bfloat16, torch.float32, torch.float64)}
_PACK_MIN_BYTES = 64   # below this, DEFLATE's framing eats any saving


def _pack(name: str, t: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """Lossless DEFLATE of a tensor the codec must not change; None when it would not save bytes."""
    raw_n = t.numel() * t.element_size()
    tag = str(t.dtype).removeprefix("torch.")
    if raw_n < _PACK_MIN_BYTES or tag not in _PACKABLE:
        return None
    raw = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
    packed = zlib.compress(raw, 1)
    if len(packed) >= raw_n:
        return None
    shape = "x".join(str(s) for s in t.shape) or "scalar"
    return f"{name}{_SEP}zlib{_SEP}{tag}{_SEP}{shape}", torch.frombuffer(bytearray(packed), dtype=torch.uint8)


def _unpack(key: str, t: torch.Tensor) -> tuple[str, torch.Tensor]:
    name, _, tag, shape_s = key.split(_SEP)
    dtype = _PACKABLE.get(tag)
    try:
        shape = () if shape_s == "scalar" else tuple(int(s) for s in shape_s.split("x"))
    except ValueError:
        raise CodecError(f"packed tensor {name!r}: malformed shape {shape_s!r}") from None
    if dtype is None or t.dtype != torch.uint8 or t.dim() != 1 or any(s < 0 for s in shape) or len(shape) > MAX_NDIM:
        raise CodecError(f"packed tensor {name!r}: bad dtype {tag!r}, shape {shape_s!r} or payload {t.dtype} "
                         f"{list(t.shape)}")
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if expected > MAX_UNPACKED_BYTES:
        raise CodecError(f"packed tensor {name!r}: declares {expected} bytes, more than {MAX_UNPACKED_BYTES}")
    inflate = zlib.decompressobj()
    try:   # bounded: a hostile or corrupt payload cannot inflate past the declared size
        raw = inflate.decompress(t.contiguous().numpy().tobytes(), expected + 1)
    except zlib.error as exc:
        raise CodecError(f"packed tensor {name!r}: corrupt DEFLATE payload ({exc})") from None
    if len(raw) != expected or not inflate.eof:
        raise CodecError(f"packed tensor {name!r}: inflates to {len(raw)}{'+' if not inflate.eof else ''} bytes, "
                         f"expected {expected} for {tag}{list(shape)}")
    if dtype == torch.bool and raw.translate(None, b"\x00\x01"):
        raise CodecError(f"packed tensor {name!r}: bool payload holds bytes other than 0 and 1")
    return name, torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape).clone()


def encode(tensors: Mapping[str, torch.Tensor], codec: str, exact: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """Compress the float tensors of `tensors` with `codec`; the others, and those named in `exact`, arrive
    bit-exact (packed losslessly by every codec but fp32, when that saves bytes)."""
    if codec not in CODECS:
        raise CodecError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if _SEP in name:
            raise CodecError(f"tensor name {name!r} contains a reserved separator")
        if codec == "fp32":
            out[name] = t
        elif not t.is_floating_point() or name in exact:
            packed = _pack(name, t)
            if packed is None:
                out[name] = t
            else:
                out[packed[0]] = packed[1]
        elif codec == "fp16":
            out[f"{name}{_SEP}fp16{_SEP}{_dtype_tag(t)}"] = t.detach().half()
        elif codec == "bf16":
            out[f"{name}{_SEP}bf16{_SEP}{_dtype_tag(t)}"] = t.detach().bfloat16()
        elif codec == "int8":
            q, scale = _int8_encode(t)
            out[f"{name}{_SEP}int8{_SEP}{_dtype_tag(t)}"] = q
            out[f"{name}{_SEP}scale"] = scale
        else:
            q, scale = _int4_encode(t)
            shape = "x".join(str(s) for s in t.shape) or "scalar"
            out[f"{name}{_SEP}int4{_SEP}{_dtype_tag(t)}{_SEP}{shape}"] = q
            out[f"{name}{_SEP}scale"] = scale
    return out


_TAGS = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16"}
_FROM_TAG = {v: k for k, v in _TAGS.items()}


def _dtype_tag(t: torch.Tensor) -> str:
    return _TAGS[t.dtype]


def decode(tensors: Mapping[str, torch.Tensor], *, finite: bool = True) -> dict[str, torch.Tensor]:
    """Invert `encode` (whatever codec produced it).

    Network-facing: whatever arrives, the only exception is CodecError. With `finite` (the default) a float
    tensor that the decoding itself made (int8 x scale, a cast, an inflated packed tensor) must hold no NaN/inf:
    the frame's finiteness check only saw the encoded parts."""
    try:
        return _decode(tensors, finite)
    except CodecError:
        raise
    except (RuntimeError, ValueError, TypeError, OverflowError, IndexError, KeyError, MemoryError) as exc:
        raise CodecError(f"malformed codec tensors ({type(exc).__name__}: {exc})") from exc


def decode_names(tensors: Mapping[str, torch.Tensor], names: Collection[str], *, finite: bool = True
                 ) -> dict[str, torch.Tensor]:
    """`decode` of just the tensors `names` of an `encode` result (what a sender needs to learn its codec's error,
    without inflating the rest)."""
    names = set(names)
    return decode({k: t for k, t in tensors.items() if k.split(_SEP, 1)[0] in names}, finite=finite)


def _decode(tensors: Mapping[str, torch.Tensor], finite: bool) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if _SEP not in key:
            out[key] = t
            continue
        parts = key.split(_SEP)
        if len(parts) == 2 and parts[1] == "scale":
            continue
        if len(parts) == 4 and parts[1] == "zlib":
            name, value = _unpack(key, t)
        elif len(parts) == 4 and parts[1] == "int4":
            name, value = _int4_decode(key, parts, t, tensors, finite)
        else:
            name, value = _decode_lossy(key, parts, t, tensors)
        if finite and not _all_finite(value):
            raise CodecError(f"tensor {name!r} decodes to NaN or inf ({key!r})")
        out[name] = value
    return out


def _decode_lossy(key: str, parts: list[str], t: torch.Tensor, tensors: Mapping[str, torch.Tensor]
                  ) -> tuple[str, torch.Tensor]:
    if len(parts) != 3 or parts[2] not in _FROM_TAG:
        raise CodecError(f"malformed codec tensor name {key!r}")
    name, codec, tag = parts
    dtype = _FROM_TAG[tag]
    if codec in ("fp16", "bf16"):
        return name, t.to(dtype)
    if codec != "int8":
        raise CodecError(f"unknown codec {codec!r} in {key!r}")
    scale = tensors.get(f"{name}{_SEP}scale")
    if scale is None:
        raise CodecError(f"int8 tensor {name!r} arrived without its scale")
    if t.dtype != torch.int8 or not scale.is_floating_point():
        raise CodecError(f"int8 tensor {name!r}: values are {t.dtype}, scale {scale.dtype}")
    if scale.shape != ((t.shape[-1],) if t.dim() else (1,)):      # a scalar was encoded as one 1x1 channel
        raise CodecError(f"int8 tensor {name!r}: scale shape {list(scale.shape)} does not fit {list(t.shape)}")
    return name, (t.float() * scale).to(dtype) if t.dim() else (t.float() * scale.reshape(())).to(dtype)


def _int4_decode(key: str, parts: list[str], t: torch.Tensor, tensors: Mapping[str, torch.Tensor], finite: bool
                 ) -> tuple[str, torch.Tensor]:
    name, _, tag, shape_s = parts
    dtype = _FROM_TAG.get(tag)
    if dtype is None:
        raise CodecError(f"malformed codec tensor name {key!r}")
    try:
        shape = () if shape_s == "scalar" else tuple(int(s) for s in shape_s.split("x"))
    except ValueError:
        raise CodecError(f"int4 tensor {name!r}: malformed shape {shape_s!r}") from None
    if any(s < 0 for s in shape) or len(shape) > MAX_NDIM:
        raise CodecError(f"int4 tensor {name!r}: bad shape {shape_s!r}")
    n = math.prod(shape)
    if n * torch.empty((), dtype=dtype).element_size() > MAX_UNPACKED_BYTES:
        raise CodecError(f"int4 tensor {name!r}: declares {n} elements of {dtype}, more than {MAX_UNPACKED_BYTES} "
                         "bytes")
    scale = tensors.get(f"{name}{_SEP}scale")
    if scale is None:
        raise CodecError(f"int4 tensor {name!r} arrived without its scales")
    n_groups = -(-n // INT4_GROUP)
    # the sizes pin the padding: fewer than one group of padded elements, one scale per group, two per byte
    if t.dtype != torch.uint8 or t.dim() != 1 or t.numel() != n_groups * INT4_GROUP // 2:
        raise CodecError(f"int4 tensor {name!r}: values are {t.dtype} {list(t.shape)}, expected uint8 "
                         f"[{n_groups * INT4_GROUP // 2}] for shape {list(shape)}")
    if scale.dtype != torch.float16 or scale.dim() != 1 or scale.numel() != n_groups:
        raise CodecError(f"int4 tensor {name!r}: scales are {scale.dtype} {list(scale.shape)}, expected float16 "
                         f"[{n_groups}] for shape {list(shape)}")
    if finite and not _all_finite(scale):
        raise CodecError(f"int4 tensor {name!r}: NaN or inf scale")
    nib = torch.stack((t & 0xF, t >> 4), dim=1).to(torch.int8)
    q = (nib ^ 8) - 8                                                 # sign-extend the nibbles
    values = (q.reshape(n_groups, INT4_GROUP).float() * scale.float()[:, None]).reshape(-1)[:n].reshape(shape)
    if dtype == torch.float16:      # a group at float16's edge: 7 x its rounded-up scale may pass the largest float16
        values = values.clamp_(-_F16_MAX, _F16_MAX)
    return name, values.to(dtype)


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN/inf in a float tensor (a finite sum proves it cheaply; see tensorframe._all_finite)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def wire_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
