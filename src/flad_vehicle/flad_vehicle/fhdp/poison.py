"""ATTACK EMULATION: a poisoned vehicle, for robustness tests and chaos runs -- never part of real training.

A vehicle started with `--poison MODE` (`FhdpVehicle(..., poison=MODE)`) trains honestly, but corrupts the
weights it hands to the edge when the edge gathers the round's model (a model-poisoning client of federated
learning). What it trains with, and what it hands to its cluster peers, stay clean, so the attack reaches
exactly one place: the update the edge aggregates. Modes:

* `scale:K` -- multiply every weight it hands over by K (a boosted update);
* `nan`     -- put a NaN into every weight tensor it hands over;
* `noise:S` -- add Gaussian noise of standard deviation S.

The edge's update screening and robust aggregation (flad_edge.fl.aggregation) are what it tests.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

MODES = ("scale", "nan", "noise")


class PoisonError(ValueError):
    pass


@dataclass(frozen=True)
class Poison:
    """One attack (module docstring); `apply` corrupts a layer payload's weights (`p/<name>` entries)."""

    mode: str
    value: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> Poison:
        """`scale:100`, `nan` or `noise:0.1`."""
        mode, _, arg = spec.strip().partition(":")
        if mode not in MODES:
            raise PoisonError(f"poison mode must be scale:K, nan or noise:S, got {spec!r}")
        if mode == "nan":
            if arg:
                raise PoisonError(f"poison mode nan takes no value, got {spec!r}")
            return cls("nan")
        try:
            value = float(arg)
        except ValueError:
            raise PoisonError(f"poison mode {mode} needs a number ({mode}:X), got {spec!r}") from None
        if not math.isfinite(value) or (mode == "noise" and value <= 0):
            raise PoisonError(f"poison {mode} needs a finite{' positive' if mode == 'noise' else ''} number, "
                              f"got {spec!r}")
        return cls(mode, value)

    def __str__(self) -> str:
        return self.mode if self.mode == "nan" else f"{self.mode}:{self.value:g}"

    def apply(self, payload: Mapping[str, torch.Tensor], generator: torch.Generator | None = None
              ) -> dict[str, torch.Tensor]:
        """A corrupted copy of `payload`: its float weights (`p/...`) attacked; optimizer state left alone."""
        out = dict(payload)
        for k, t in payload.items():
            if not k.startswith("p/") or not t.is_floating_point() or t.numel() == 0:
                continue
            if self.mode == "scale":
                out[k] = t * self.value
            elif self.mode == "nan":
                bad = t.clone()
                bad.view(-1)[0] = math.nan
                out[k] = bad
            else:
                noise = torch.randn(t.shape, generator=generator, dtype=torch.float32).to(t.dtype)
                out[k] = t + noise * self.value
        return out


def parse_poison(spec: str | Poison | None) -> Poison | None:
    """None / "" -> no attack; a string -> `Poison.parse`."""
    if spec is None or isinstance(spec, Poison):
        return spec
    return Poison.parse(spec) if spec.strip() else None
