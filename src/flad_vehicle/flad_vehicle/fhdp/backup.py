"""Vehicle side of edge backups: find the layers that changed since the last upload.

A layer's fingerprint is a CRC32 over its parameter bytes; only layers whose fingerprint changed since
they were last backed up are sent (a layer that did not train -- frozen, or idle in this pipeline --
costs nothing). Fingerprinting a few MB takes well under a millisecond per layer.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Callable, Iterable

import torch

from flad_vehicle.fhdp.layerstore import LayerStore

log = logging.getLogger(__name__)


def layer_fingerprint(store: LayerStore, layer: str) -> int:
    crc = 0
    for name in store.params_of([layer]):
        t = store.params[name].detach().cpu().contiguous()     # a layer on a GPU: its bytes, read on the host
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


def split_by_layer(payload: dict[str, torch.Tensor], layers: Iterable[str]) -> dict[str, dict[str, torch.Tensor]]:
    """A merged layer payload (`p/layers.<layer>.…`, `m/…`, `v/…`, `t/…`) split into one payload per layer."""
    out: dict[str, dict[str, torch.Tensor]] = {layer: {} for layer in layers}
    for key, t in payload.items():
        name = key.split("/", 1)[1] if "/" in key else key
        parts = name.split(".")
        if len(parts) < 3 or parts[0] != "layers" or parts[1] not in out:
            raise ValueError(f"payload entry {key!r} belongs to none of the announced layers")
        out[parts[1]][key] = t
    return {layer: tensors for layer, tensors in out.items() if tensors}


class BackupUploader:
    """Uploads layer snapshots to the edge's backup service on its own thread, off the training path.

    The trainer hands over a snapshot (already cloned tensors) and goes on with the next step; if the
    uploader is still busy, newer snapshots of a layer replace older pending ones (only the latest
    state of a layer is worth sending)."""

    def __init__(self, send: Callable[[dict[str, torch.Tensor], list[str], int, str], int]) -> None:
        self._send = send
        self._pending: dict[str, tuple[dict[str, torch.Tensor], int, str]] = {}   # layer -> (tensors, step, pid)
        self._cv = threading.Condition()
        self._stop = False
        self.uploads = 0
        self.bytes_sent = 0
        self.errors = 0
        self.last_step = -1
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="backup-upload", daemon=True)
        self._thread.start()

    def submit(self, snapshot: dict[str, dict[str, torch.Tensor]], step: int, pipeline_id: str) -> None:
        if not snapshot:
            return
        with self._cv:
            for layer, tensors in snapshot.items():
                self._pending[layer] = (tensors, step, pipeline_id)
            self._cv.notify()

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything submitted has been sent (True) or `timeout_s` passed."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._stop:
                    self._cv.wait()
                if self._stop and not self._pending:
                    return
                batch, self._pending = self._pending, {}
                self._busy = True
            # one upload per (step, pipeline): the edge stores each layer with the step it reflects
            groups: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
            names: dict[tuple[int, str], list[str]] = {}
            for layer, (tensors, step, pid) in batch.items():
                groups.setdefault((step, pid), {}).update(tensors)
                names.setdefault((step, pid), []).append(layer)
            for (step, pid), payload in sorted(groups.items()):
                try:
                    self.bytes_sent += self._send(payload, names[(step, pid)], step, pid)
                    self.uploads += 1
                    self.last_step = max(self.last_step, step)
                except Exception as exc:  # a lost backup costs steps on recovery, never the training
                    self.errors += 1
                    log.warning("backup upload of step %d failed: %s", step, exc)
            with self._cv:
                self._busy = False
                self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=5)
