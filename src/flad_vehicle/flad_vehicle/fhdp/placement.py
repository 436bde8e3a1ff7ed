"""Where a pipeline stage runs: its device and training precision, the pipeline's loss scale, and the memory check.

A stage runner (`runner.py`, `fanin.py`) keeps its modules and optimizer state on its device (`flad_core.device`:
auto, cpu, cuda[:N], meta) and moves its batch there; frames stay CPU tensors, so a CPU vehicle and a GPU vehicle
can be neighbours: what a stage sends leaves its device through `HostStaging.to_host`, what it receives enters
through `HostStaging.to_device`.

Mixed precision (`precision` bf16 or fp16) runs each stage's forward under autocast. fp16 needs a loss scale, and
in a pipeline it must be one scale for the whole pipeline: every stage's gradients descend from the one loss. The
stage that owns the loss holds it (`LossScale`, GradScaler's rule: halve on a non-finite step, double after
`growth_interval` good ones), multiplies its loss by it, and the scale rides with the gradient-norm reduction to
the stage that decides the step, which unscales the norm and folds 1/scale into the clip factor every stage
applies (`runner.StageRunner._clip`). A non-finite step is dropped everywhere by the step guard, as without
scaling. bf16 keeps fp32's exponent range and needs no scale; on the CPU the scale is off (`grad_scaler`).
"""

from __future__ import annotations

import logging

import torch

from flad_core.device import grad_scaler, peak_memory_bytes, reset_peak_memory
from flad_core.emulation import MemoryCapError, MemoryGuard
from flad_core.fleet import DeviceProfile

log = logging.getLogger(__name__)

#: GradScaler's defaults (torch.amp.GradScaler): the scale a pipeline starts from and how it moves
INIT_SCALE = 2.0**16
GROWTH_FACTOR = 2.0
BACKOFF_FACTOR = 0.5
GROWTH_INTERVAL = 2000


class LossScale:
    """The pipeline's dynamic loss scale (module docstring); 1.0 and inert when disabled.

    `enabled=None` follows `flad_core.device.grad_scaler` (fp16 on CUDA only); tests force it on to exercise the
    scaled path on a CPU-only host. The scale stays a power of two, so scaling and unscaling are exact."""

    def __init__(self, device: torch.device | str, precision: str = "fp32", *, enabled: bool | None = None,
                 init_scale: float = INIT_SCALE, growth_interval: int = GROWTH_INTERVAL) -> None:
        self.enabled = grad_scaler(device, precision).is_enabled() if enabled is None else bool(enabled)
        self.scale = float(init_scale) if self.enabled else 1.0
        self.growth_interval = growth_interval
        self._good = 0

    def update(self, finite: bool) -> None:
        """After a step: back off on non-finite gradients (the step was dropped), grow after a run of good ones."""
        if not self.enabled:
            return
        if not finite:
            self.scale *= BACKOFF_FACTOR
            self._good = 0
            log.info("loss scale backed off to %g after non-finite gradients", self.scale)
            return
        self._good += 1
        if self._good >= self.growth_interval:
            self.scale *= GROWTH_FACTOR
            self._good = 0


def move_optimizer_state(optimizer: torch.optim.Optimizer | None) -> None:
    """Put each parameter's optimizer state on that parameter's device. AdamW's `step` counter stays on the CPU,
    where the optimizer keeps it unless it runs capturable or fused (as `Optimizer.load_state_dict` does)."""
    if optimizer is None:
        return
    for p, state in optimizer.state.items():
        for k, v in list(state.items()):
            if isinstance(v, torch.Tensor) and k != "step" and v.device != p.device:
                state[k] = v.to(p.device)


class DeviceMemoryGuard:
    """`MemoryGuard` for a stage on a CUDA device: the peak tensor memory allocated on it since the guard was made
    (weights, gradients, optimizer state, activations) against the profile's `stage_mem_bytes`. The process's
    resident set says nothing about device memory, so the CPU guard cannot see what a GPU stage holds."""

    def __init__(self, device: torch.device | str, cap_bytes: int, label: str = "device") -> None:
        self.device = torch.device(device)
        self.cap_bytes = cap_bytes
        self.label = label
        self.peak_used = 0
        reset_peak_memory(self.device)

    def used(self) -> int:
        used = peak_memory_bytes(self.device) or 0
        self.peak_used = max(self.peak_used, used)
        return used

    def check(self) -> int:
        used = self.used()
        if used > self.cap_bytes:
            raise MemoryCapError(f"{self.label}: peak {self.device} memory {used / 2**20:.1f} MiB, over the emulated "
                                 f"device's {self.cap_bytes / 2**20:.1f} MiB")
        return used


def stage_memory_guard(device: torch.device | str, profile: DeviceProfile, label: str
                       ) -> MemoryGuard | DeviceMemoryGuard:
    """The memory check of a stage on `device`: peak CUDA allocations against `profile.stage_mem_bytes` on a GPU,
    the process's resident-set growth against `profile.mem_bytes` elsewhere."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return DeviceMemoryGuard(dev, profile.stage_mem_bytes, label)
    return MemoryGuard(profile.mem_bytes, label)


__all__ = ["DeviceMemoryGuard", "LossScale", "move_optimizer_state", "stage_memory_guard"]
