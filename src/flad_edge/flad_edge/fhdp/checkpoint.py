"""The edge's round checkpoints: a crashed edge process starts again after its last committed round.

Two files in the edge's run dir, each written atomically (`flad_edge.fl.durable`: tensors as safetensors,
bookkeeping as JSON metadata, one rename):

  edge_checkpoint.safetensors   after every committed round (with the cloud tier: once the cloud's global model
                                is in): the global model, and the round, the FHDP version, the ledger of the
                                accepted updates of every committed round -- (round, edge, client, update_id,
                                samples), each (round, client) exactly once --, the round summaries, and how
                                many times the edge resumed
  edge_pending.safetensors      with the cloud tier, between the edge's FedAvg and the cloud's answer: the edge
                                aggregate of that round with its summary. A restarted edge finishes the cloud
                                tier with this very update (same update id, which the cloud may already have
                                counted) rather than training the round again.

A round interrupted before its edge aggregate existed is redone whole: its partial updates were only in the
dead process, so none of them counts.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flad_core import weights as wts
from flad_edge.fl.durable import load_state, save_state

log = logging.getLogger(__name__)

CHECKPOINT = "edge_checkpoint.safetensors"
PENDING = "edge_pending.safetensors"
FORMAT = "flad-edge-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed (unreadable, another edge's, or another model's)."""


@dataclass
class EdgeState:
    """What a committed checkpoint holds."""

    round: int                                   # the last committed round
    version: int                                 # FHDP model version after it
    model: dict[str, torch.Tensor]
    ledger: list[dict[str, Any]] = field(default_factory=list)
    summaries: list[dict[str, Any]] = field(default_factory=list)
    resumes: int = 0


@dataclass
class PendingRound:
    """A round whose edge aggregate exists but whose cloud tier had not finished."""

    round: int
    version: int
    state: dict[str, torch.Tensor]
    summary: dict[str, Any]


def ledger_entries(edge_id: str, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The ledger lines of one round: every update the edge's collector accepted, by client."""
    return [{"round": int(summary["round"]), "edge": edge_id, "client": client, "update_id": u["update_id"],
             "samples": int(u["samples"])} for client, u in sorted(summary.get("updates", {}).items())]


class EdgeCheckpoint:
    """Reads and writes one edge's checkpoint files in its run dir (see the module docstring)."""

    def __init__(self, run_dir: Path, edge_id: str) -> None:
        self.path = Path(run_dir) / CHECKPOINT
        self.pending_path = Path(run_dir) / PENDING
        self.edge_id = edge_id

    def _read(self, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        try:
            state, meta = load_state(path)
        except (wts.WeightsError, ValueError, OSError) as exc:
            raise CheckpointError(f"{path}: unreadable ({exc}); move it away or start with --no-resume") from exc
        if meta.get("format") != FORMAT or meta.get("edge") != self.edge_id:
            raise CheckpointError(f"{path} is not a checkpoint of edge {self.edge_id!r} "
                                  f"(format {meta.get('format')!r}, edge {meta.get('edge')!r})")
        return state, meta

    def load(self) -> EdgeState | None:
        """The last committed state, or None when there is no checkpoint yet."""
        if not self.path.exists():
            return None
        state, meta = self._read(self.path)
        return EdgeState(int(meta["round"]), int(meta["version"]), state, list(meta["ledger"]),
                         list(meta["summaries"]), int(meta.get("resumes", 0)))

    def commit(self, saved: EdgeState) -> None:
        """Write `saved` as the committed state (atomically), then drop the pending round it finishes."""
        keys = [(e["round"], e["client"]) for e in saved.ledger]
        if len(keys) != len(set(keys)):
            raise RuntimeError(f"ledger counts a (round, client) twice: {sorted(k for k in keys if keys.count(k) > 1)}")
        save_state(self.path, saved.model, {"format": FORMAT, "edge": self.edge_id, "round": saved.round,
                                            "version": saved.version, "ledger": saved.ledger,
                                            "summaries": saved.summaries, "resumes": saved.resumes})
        self.clear_pending()

    def save_pending(self, pending: PendingRound) -> None:
        save_state(self.pending_path, pending.state, {"format": FORMAT, "edge": self.edge_id, "round": pending.round,
                                                      "version": pending.version, "summary": pending.summary})

    def load_pending(self, rnd: int) -> PendingRound | None:
        """The pending aggregate of round `rnd`, if one was stored (one of another round is stale: removed)."""
        if not self.pending_path.exists():
            return None
        state, meta = self._read(self.pending_path)
        if int(meta["round"]) != rnd:
            log.warning("dropping %s: it holds round %s, the next round is %d", self.pending_path, meta["round"], rnd)
            self.clear_pending()
            return None
        return PendingRound(rnd, int(meta["version"]), state, dict(meta["summary"]))

    def clear_pending(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.pending_path.unlink()
