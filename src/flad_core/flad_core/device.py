"""Where models run: device selection, mixed precision, device memory and host staging buffers.

Every component that runs a model takes a `device` (CLI `--device auto|cpu|cuda[:N]`, a `device` field in
its config, a `device` ROS parameter on its node) and resolves it here, so that one rule decides what `auto`
means, one error names a bad choice, and every log line and benchmark JSON can say which device ran
(`device_info`). `meta` is accepted too: it builds a model's structure without memory, which the tests use
to prove that a component puts its tensors where it is told rather than on a hard-wired device.

Stage traffic leaves and enters a GPU through `HostStaging`: page-locked (pinned) host buffers, reused per
tensor name and shape, filled with non-blocking copies on a side stream so that the copy overlaps the
compute queued behind it. The wire format never sees a device: frames carry CPU tensors, so a CPU vehicle
and a GPU vehicle can be neighbours. On a host without CUDA the same code runs with ordinary (unpinned)
buffers and synchronous copies.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import platform
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

#: what `--device` accepts (besides cuda:N)
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "meta")
#: training precisions: fp32, or autocast to bf16 / fp16 (fp16 with a gradient scaler)
PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(ValueError):
    """A device that does not exist here or is not a device at all; the message says which and why."""


def cuda_available() -> bool:
    return torch.cuda.is_available()


def check_device_spec(spec: str) -> str:
    """Syntax check of a configured device (auto, cpu, meta, cuda, cuda:N) that does not need the device to be
    here: a config written for a GPU machine validates anywhere, and `resolve_device` says at run time whether
    this host has it."""
    text = (spec or "auto").strip().lower()
    if not re.fullmatch(r"auto|cpu|meta|cuda(:\d+)?", text):
        raise DeviceError(f"device {spec!r} is not one of {', '.join(DEVICE_CHOICES)}")
    return text


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """`auto` (or None/""): the first CUDA device when there is one, else the CPU. `cpu`, `meta`, `cuda`,
    `cuda:N` are taken as given once checked: asking for CUDA where there is none is an error, not a silent
    fall back to the CPU (a run that silently trains 50x slower is worse than one that stops)."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = (spec or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda", 0) if cuda_available() else torch.device("cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise DeviceError(f"device {spec!r} is not a device (choose one of {', '.join(DEVICE_CHOICES)})") from exc
    if dev.type in ("cpu", "meta"):
        return torch.device(dev.type)
    if dev.type != "cuda":
        raise DeviceError(f"device {spec!r}: FLAD runs on {', '.join(DEVICE_CHOICES)}, not {dev.type!r}")
    if not cuda_available():
        raise DeviceError(f"device {spec!r} asked for, but this torch ({torch.__version__}) sees no CUDA device "
                          f"(use --device cpu or auto)")
    index = 0 if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise DeviceError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return torch.device("cuda", index)


def device_info(device: str | torch.device | None = None) -> dict[str, Any]:
    """What ran: for logs and every benchmark JSON."""
    dev = resolve_device(device)
    info: dict[str, Any] = {"device": str(dev), "type": dev.type, "torch": torch.__version__,
                            "cuda_available": cuda_available()}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info.update({"name": props.name, "capability": f"{props.major}.{props.minor}",
                     "total_memory_bytes": int(props.total_memory), "cuda": torch.version.cuda,
                     "unified_memory": bool(getattr(props, "is_integrated", False)),
                     "multiprocessors": int(props.multi_processor_count)})
    else:
        info.update({"name": _cpu_name(), "threads": torch.get_num_threads()})
    return info


@functools.cache
def _cpu_name() -> str:
    # platform.processor() runs `uname -p` in a subprocess: once per process is enough
    return platform.processor() or platform.machine()


def add_device_argument(parser: Any, default: str = "auto", what: str = "the model") -> None:
    """The one `--device` flag every model-running command shares."""
    parser.add_argument("--device", default=default, metavar="auto|cpu|cuda[:N]",
                        help=f"where {what} runs (default {default}: CUDA when present, else the CPU)")


def add_precision_argument(parser: Any, default: str = "fp32") -> None:
    parser.add_argument("--precision", default=default, choices=PRECISIONS,
                        help=f"training precision (default {default}; bf16/fp16 = autocast, fp16 with a gradient "
                             f"scaler)")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise DeviceError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    return precision


def autocast(device: torch.device | str, precision: str = "fp32") -> contextlib.AbstractContextManager:
    """Mixed-precision autocast for `precision` on `device` (a no-op for fp32)."""
    check_precision(precision)
    dev = torch.device(device)
    if precision == "fp32" or dev.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev.type, dtype=_AUTOCAST_DTYPE[precision])


def grad_scaler(device: torch.device | str, precision: str = "fp32") -> torch.amp.GradScaler:
    """A gradient scaler, enabled only for fp16 (bf16 has fp32's exponent range and needs none)."""
    check_precision(precision)
    dev = torch.device(device)
    enabled = precision == "fp16" and dev.type == "cuda"
    return torch.amp.GradScaler("cuda" if dev.type == "cuda" else "cpu", enabled=enabled)


def half_dtype(device: torch.device | str) -> torch.dtype:
    """The half precision to load inference models in: fp16 on CUDA, bf16 on the CPU (where fp16 matmuls are
    slow or missing)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16


def reset_peak_memory(device: torch.device | str) -> None:
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)


def peak_memory_bytes(device: torch.device | str) -> int | None:
    """Peak tensor memory allocated on a CUDA device since the last `reset_peak_memory` (None on the CPU, where
    callers measure the process's resident set instead)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    torch.cuda.synchronize(dev)
    return int(torch.cuda.max_memory_allocated(dev))


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work (timings of CUDA code are meaningless without it); a no-op on the CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def to_device(tensors: Mapping[str, Tensor], device: torch.device | str, non_blocking: bool = True
              ) -> dict[str, Tensor]:
    """Move a batch (name -> tensor) to `device`; tensors already there are returned as they are."""
    dev = torch.device(device)
    return {k: (v if v.device == dev else v.to(dev, non_blocking=non_blocking and dev.type == "cuda"))
            for k, v in tensors.items()}


class HostStaging:
    """Pinned host buffers between a device and the wire, one per (name, shape, dtype), reused every step.

    `to_host` copies device tensors into their buffers on a copy stream that waits only for the work already
    queued (so compute queued after it overlaps the copy) and returns once the bytes are on the host, since
    the frame encoder reads them next. `to_device` copies received CPU tensors into pinned buffers and from
    there to the device without blocking. Returned host tensors alias the buffers: encode them before the
    next `to_host` with the same names. CPU tensors pass through `to_host` untouched."""

    def __init__(self, device: torch.device | str, pin: bool | None = None, stage_cpu: bool = False) -> None:
        self.device = torch.device(device)
        # stage_cpu: CPU tensors go through the buffers too (the path a GPU stage takes, minus the copy stream);
        # lets a CPU-only host exercise the staging path end to end
        self.stage_cpu = bool(stage_cpu)
        self.pin = cuda_available() if pin is None else bool(pin)
        if self.pin and not cuda_available():
            raise DeviceError("pinned host buffers need CUDA; this torch sees no CUDA device")
        self._buffers: dict[tuple[str, str, tuple[int, ...], torch.dtype], Tensor] = {}
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._h2d_done: torch.cuda.Event | None = None
        self.copies = 0          # tensors copied through a buffer (tests and logs read it)

    def _buffer(self, direction: str, name: str, like: Tensor) -> Tensor:
        key = (direction, name, tuple(like.shape), like.dtype)
        buf = self._buffers.get(key)
        if buf is None:
            buf = torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=self.pin)
            self._buffers[key] = buf
        return buf

    def to_host(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        pending = False
        for name, t in tensors.items():
            if t.device.type == "cpu" and not self.stage_cpu:
                out[name] = t
                continue
            if t.device.type == "meta":
                raise DeviceError(f"tensor {name!r} is on the meta device: it has no data to send")
            buf = self._buffer("d2h", name, t)
            src = t.detach()
            if self._stream is not None:
                self._stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self._stream):
                    buf.copy_(src, non_blocking=self.pin)
                src.record_stream(self._stream)
                pending = True
            else:
                buf.copy_(src)
            self.copies += 1
            out[name] = buf
        if pending and self._stream is not None:
            self._stream.synchronize()
        return out

    def to_device(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if self.device.type == "cpu" and not self.stage_cpu:
            return dict(tensors)
        if self._h2d_done is not None:
            self._h2d_done.synchronize()     # the previous call's copies out of these buffers have finished
        out: dict[str, Tensor] = {}
        for name, t in tensors.items():
            if t.device == self.device and not self.stage_cpu:
                out[name] = t
                continue
            src = t
            if t.device.type == "cpu" and not t.is_pinned():
                buf = self._buffer("h2d", name, t)
                buf.copy_(t)
                src = buf
            # a fresh tensor on the device (a clone on the CPU): autograd may keep it past the buffer's next reuse
            out[name] = src.clone() if self.device.type == "cpu" else src.to(self.device, non_blocking=self.pin)
            self.copies += 1
        if self.device.type == "cuda":
            self._h2d_done = torch.cuda.Event()
            self._h2d_done.record(torch.cuda.current_stream(self.device))
        return out


def log_device(component: str, device: torch.device | str) -> dict[str, Any]:
    """Log which device a component runs on; returns `device_info` for the caller's records."""
    info = device_info(device)
    log.info("%s runs on %s (%s)", component, info["device"], info.get("name", ""))
    return info
