"""Edge-aided backups for quick recovery (paper §4.2): the latest state of every layer, at the edge.

Vehicles upload, every `e` steps, only the layers that changed since their last upload (see
`flad_vehicle.fhdp.backup.BackupTracker`). The edge keeps, per layer, the newest payload (weights and
optimizer state), the training step it reflects and a SHA-256; each layer is written atomically to
`<root>/<layer>.safetensors` with a manifest, so a crashed edge restarts with its backups intact.
When a vehicle departs, its layers are restored from here to their new owners.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from flad_core import weights as wts
from flad_core.atomic import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)


@dataclass
class LayerBackup:
    layer: str
    step: int
    owner: str
    sha256: str
    nbytes: int


class BackupStore:
    """Per-layer backups, in memory and (optionally) on disk."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root else None
        self.entries: dict[str, LayerBackup] = {}
        self.payloads: dict[str, bytes] = {}
        self.bytes_received = 0
        self._lock = threading.Lock()
        if self.root is not None and (self.root / "manifest.json").exists():
            self._load()

    def put(self, layer: str, payload: bytes, *, step: int, owner: str) -> bool:
        """Store `layer`'s payload if it is newer than what is held; False for a stale upload."""
        digest = hashlib.sha256(payload).hexdigest()
        with self._lock:
            old = self.entries.get(layer)
            if old is not None and old.step > step:
                return False
            self.entries[layer] = LayerBackup(layer, step, owner, digest, len(payload))
            self.payloads[layer] = payload
            self.bytes_received += len(payload)
            if self.root is not None:
                atomic_write_bytes(self.root / f"{layer}.safetensors", payload)
                atomic_write_json(self.root / "manifest.json", {k: asdict(v) for k, v in self.entries.items()})
        return True

    def put_state(self, layer_payloads: dict[str, dict[str, torch.Tensor]], *, step: int, owner: str) -> int:
        """Store several layers given as tensors; returns the bytes stored."""
        total = 0
        for layer, tensors in layer_payloads.items():
            data = wts.to_bytes(tensors)
            if self.put(layer, data, step=step, owner=owner):
                total += len(data)
        return total

    def get(self, layer: str) -> tuple[dict[str, torch.Tensor], LayerBackup]:
        """The layer's tensors (checksum verified) and its record; KeyError if never backed up."""
        with self._lock:
            if layer not in self.entries:
                raise KeyError(f"no backup of layer {layer!r}")
            entry, payload = self.entries[layer], self.payloads[layer]
        if hashlib.sha256(payload).hexdigest() != entry.sha256:
            raise wts.WeightsError(f"backup of layer {layer!r} is corrupted (checksum mismatch)")
        return wts.from_bytes(payload, what=f"backup of {layer}"), entry

    def export(self, layers: list[str]) -> dict[str, torch.Tensor]:
        """Merged payload of `layers` (what a new owner fetches)."""
        out: dict[str, torch.Tensor] = {}
        for layer in layers:
            out.update(self.get(layer)[0])
        return out

    def oldest_step(self, layers: list[str]) -> int:
        return min(self.entries[layer].step for layer in layers)

    def _load(self) -> None:
        manifest = json.loads((self.root / "manifest.json").read_text())
        for layer, rec in manifest.items():
            path = self.root / f"{layer}.safetensors"
            data = path.read_bytes()
            entry = LayerBackup(**rec)
            if hashlib.sha256(data).hexdigest() != entry.sha256:
                raise wts.WeightsError(f"backup file {path} does not match its manifest checksum")
            self.entries[layer] = entry
            self.payloads[layer] = data
        log.info("restored %d layer backups from %s", len(self.entries), self.root)
