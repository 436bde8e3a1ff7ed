"""The cloud's durable state: the uploads it accepted, and each aggregated round's global model and what it counted.

A restarted cloud reloads it, so a crash loses nothing an edge was told was received, and counts nothing twice.
Layout under the state folder (`<run dir>/cloud_state/`), every file written atomically:

    uploads/r<round>-<edge>.safetensors   an accepted edge upload (an abstention: no tensors) of a round not yet
                                          aggregated; written before the edge's upload is acknowledged
    global-r<round>.safetensors           an aggregated round's global model, byte for byte as it is served
    rounds.json                           every aggregated round: samples, global file + SHA-256, the uploads
                                          counted (edge, update_id, samples) and the edges that abstained

A round is aggregated once `rounds.json` names it; its global file is written first, its uploads removed after.
A crash in between leaves the round unaggregated with its uploads intact: it is aggregated again, each upload
once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from flad_core import weights as wts
from flad_core.atomic import atomic_write_bytes, atomic_write_json
from flad_edge.fl.durable import load_state, save_state

log = logging.getLogger(__name__)

ROUNDS_FILE = "rounds.json"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


class CloudStore:
    """Reads and writes the cloud's state folder (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.uploads_dir = self.root / "uploads"
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        self._rounds: dict[str, Any] = self._read_manifest()

    def _read_manifest(self) -> dict[str, Any]:
        path = self.root / ROUNDS_FILE
        if not path.exists():
            return {}
        return dict(json.loads(path.read_text(encoding="utf-8")).get("rounds", {}))

    # -- uploads -------------------------------------------------------------------------------------------
    def _upload_path(self, rnd: int, sender: str) -> Path:
        return self.uploads_dir / f"r{rnd:06d}-{_safe(sender)}.safetensors"

    def save_upload(self, rnd: int, sender: str, update_id: str, samples: int,
                    state: dict[str, torch.Tensor]) -> None:
        """An accepted upload (samples 0 and no tensors: an abstention), durable before it is acknowledged."""
        save_state(self._upload_path(rnd, sender), state,
                   {"round": rnd, "sender": sender, "update_id": update_id, "samples": samples})

    def drop_upload(self, rnd: int, sender: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._upload_path(rnd, sender).unlink()

    def uploads(self) -> list[tuple[dict[str, Any], dict[str, torch.Tensor]]]:
        """Every stored upload as (meta, state), by round; an unreadable one is logged and skipped."""
        out = []
        for path in sorted(self.uploads_dir.glob("r*.safetensors")):
            try:
                state, meta = load_state(path)
            except (wts.WeightsError, ValueError, OSError) as exc:
                log.error("skipping unreadable stored upload %s: %s", path, exc)
                continue
            out.append((meta, state))
        return out

    # -- aggregated rounds -----------------------------------------------------------------------------------
    def save_round(self, rnd: int, payload: bytes | None, *, samples: int, counted: list[dict[str, Any]],
                   abstained: list[str]) -> None:
        """Round `rnd` is aggregated: its global model (None: every edge abstained) and what it counted."""
        entry: dict[str, Any] = {"round": rnd, "samples": samples, "counted": counted, "abstained": abstained,
                                 "file": None, "sha256": None}
        if payload is not None:
            entry["file"] = f"global-r{rnd:06d}.safetensors"
            entry["sha256"] = hashlib.sha256(payload).hexdigest()
            atomic_write_bytes(self.root / entry["file"], payload)
        self._rounds[str(rnd)] = entry
        atomic_write_json(self.root / ROUNDS_FILE, {"rounds": self._rounds})
        for c in counted:
            self.drop_upload(rnd, c["edge"])
        for edge in abstained:
            self.drop_upload(rnd, edge)

    def rounds(self) -> dict[int, tuple[dict[str, Any], bytes | None]]:
        """Every aggregated round: (manifest entry, global payload or None); one whose file is missing or does
        not match its checksum is logged and left out (it is aggregated again from what the edges send)."""
        out: dict[int, tuple[dict[str, Any], bytes | None]] = {}
        for key, entry in self._rounds.items():
            payload = None
            if entry.get("file"):
                path = self.root / entry["file"]
                try:
                    payload = path.read_bytes()
                except OSError as exc:
                    log.error("round %s: global model %s unreadable (%s); the round is not restored", key, path, exc)
                    continue
                if hashlib.sha256(payload).hexdigest() != entry["sha256"]:
                    log.error("round %s: %s does not match its checksum; the round is not restored", key, path)
                    continue
            out[int(key)] = (entry, payload)
        return dict(sorted(out.items()))
