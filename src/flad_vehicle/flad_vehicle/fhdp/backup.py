"""Vehicle side of edge backups: find the layers that changed since the last upload.

A layer's fingerprint is a CRC32 over its parameter bytes; only layers whose fingerprint changed since
they were last backed up are sent (a layer that did not train -- frozen, or idle in this pipeline --
costs nothing). Fingerprinting a few MB takes well under a millisecond per layer.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import torch

from .layerstore import LayerStore


def layer_fingerprint(store: LayerStore, layer: str) -> int:
    crc = 0
    for name in store.params_of([layer]):
        t = store.params[name].detach().contiguous()
        crc = zlib.crc32(memoryview(t.numpy()).cast("B"), crc)
    return crc


class BackupTracker:
    def __init__(self, store: LayerStore) -> None:
        self.store = store
        self.sent: dict[str, int] = {}

    def changed(self, layers: Iterable[str]) -> list[str]:
        return [layer for layer in layers if self.sent.get(layer) != layer_fingerprint(self.store, layer)]

    def snapshot(self, layers: Iterable[str]) -> dict[str, dict[str, torch.Tensor]]:
        """Payloads (weights + optimizer state) of the changed `layers`, marked as sent."""
        out = {}
        for layer in self.changed(layers):
            out[layer] = self.store.export([layer])
            self.sent[layer] = layer_fingerprint(self.store, layer)
        return out
