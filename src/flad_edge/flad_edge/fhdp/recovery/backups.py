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
import re
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from flad_core import codec
from flad_core import weights as wts
from flad_core.atomic import atomic_write_bytes, atomic_write_json
from flad_vehicle.fhdp.backup import split_by_layer
from flad_vehicle.fhdp.worker import LayerServer

log = logging.getLogger(__name__)

#: a layer's name, which is also its backup file's name (`LayerStore` names layers by index or module name)
LAYER_NAME = re.compile(r"[A-Za-z0-9_]+")
#: what a backup payload may hold: `<kind>/layers.<layer>.<rest>` (weights, optimizer moments, steps)
BACKUP_TENSOR = re.compile(r"[a-z]/layers\.[A-Za-z0-9_]+\.[A-Za-z0-9_.]+")


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
                path = self.root / f"{layer}.safetensors"
                if not LAYER_NAME.fullmatch(layer) or path.resolve().parent != self.root.resolve():
                    raise ValueError(f"layer name {layer!r} is not a plain file name")
                atomic_write_bytes(path, payload)
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

    def step_of(self, layer: str) -> int:
        """The training step `layer`'s backup reflects; -1 if it was never backed up."""
        with self._lock:
            entry = self.entries.get(layer)
        return entry.step if entry is not None else -1

    def clear(self) -> None:
        """Forget every backup (a fresh round starts from the round's model: older backups are stale)."""
        with self._lock:
            self.entries.clear()
            self.payloads.clear()

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


class EdgeBackups:
    """The edge's backup services: `edge/backup` stores what vehicles upload, per client; `edge/backup-layers`
    serves it to a departed vehicle's successors (a layer not backed up this round: the round's model)."""

    def __init__(self, edge_id: str, root: str, global_export: Callable[[list[str]], dict[str, torch.Tensor]]) -> None:
        self.edge_id, self.root = edge_id, root
        self.global_export = global_export
        self.stores: dict[str, BackupStore] = {}
        self.servers: dict[str, LayerServer] = {}
        self.client_of: dict[str, str] = {}       # vehicle -> its client this round
        self._floor: dict[str, int] = {}          # client -> first step of its current round
        self._assemblers: dict[str, wts.ChunkAssembler] = {}

    def store(self, client_id: str) -> BackupStore:
        if client_id not in self.stores:
            self.stores[client_id] = BackupStore(Path(self.root) / client_id if self.root else None)
        return self.stores[client_id]

    def start_round(self, client_id: str, members: list[str], first_step: int) -> BackupStore:
        """A fresh round starts from the round's model: older backups are stale, and refused from now on."""
        for m in members:
            self.client_of[m] = client_id
        self._floor[client_id] = first_step
        store = self.store(client_id)
        store.clear()
        return store

    def export(self, client_id: str, names: list[str]) -> dict[str, torch.Tensor]:
        store = self.store(client_id)
        have = [n for n in names if n in store.entries]
        out = store.export(have)
        rest = [n for n in names if n not in store.entries]
        if rest:
            out.update(self.global_export(rest))
        return out

    # -- bus handlers ---------------------------------------------------------------------------------------
    def on_backup(self, chunk):
        asm = self._assemblers.setdefault(chunk.update_id, wts.ChunkAssembler())
        try:
            if not asm.add(chunk):
                return codec.new("flad_msgs/msg/Ack", ok=True, message="chunk stored")
            data = asm.payload()
        except wts.WeightsError:
            self._assemblers.pop(chunk.update_id, None)   # a bad chunk must not block a later transfer of this id
            raise
        finally:
            if asm.first is not None and len(asm.parts) == asm.first.num_chunks:
                self._assemblers.pop(chunk.update_id, None)
        client = self.client_of.get(chunk.sender)
        if client is None:
            return codec.new("flad_msgs/msg/Ack", ok=False, message=f"{chunk.sender} belongs to no client")
        if int(chunk.model_version) < self._floor.get(client, 0):
            return codec.new("flad_msgs/msg/Ack", ok=True, message="stale: from an earlier round, ignored")
        payload = wts.from_bytes(data, what=f"backup from {chunk.sender}")
        bad = [k for k in payload if not BACKUP_TENSOR.fullmatch(k)]
        if bad:     # layer names become file names: nothing but the layer-store naming may get through
            return codec.new("flad_msgs/msg/Ack", ok=False, message=f"bad tensor names in backup: {bad[:3]}")
        layers = sorted({k.split("/", 1)[1].split(".")[1] for k in payload})
        stored = self.store(client).put_state(split_by_layer(payload, layers), step=int(chunk.model_version),
                                              owner=chunk.sender)
        return codec.new("flad_msgs/msg/Ack", ok=True, message=f"stored {stored} bytes")

    def on_backup_layers(self, req):
        client = self.client_of.get(req.requester)
        if client is None:
            raise ValueError(f"{req.requester} belongs to no client")
        if client not in self.servers:
            self.servers[client] = LayerServer(self.edge_id, lambda names: self.export(client, names))
        return self.servers[client].handle(req)
