"""TensorBoard scalars of a `flad run` experiment, written live under `runs/<id>/tb/`.

metrics.jsonl is the record of a run and report.py its after-the-fact summary; this is the live view: point
`tensorboard --logdir runs` at a running experiment and watch loss, accuracy, bytes and wall time per round,
per edge, and compare runs side by side. The event files are a convenience, never the record, so when the
tensorboard package cannot be imported Telemetry logs one warning and does nothing; the run goes on.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_warned = False
MB = 1e6


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def _writer_class() -> Any:
    """torch's SummaryWriter, or None (with one warning per process) when tensorboard is not installed."""
    global _warned
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        if not _warned:
            _warned = True
            log.warning("TensorBoard event files are off: %s (pip install tensorboard)", e)
        return None
    return SummaryWriter


class Telemetry:
    """Scalars of each round to TensorBoard under `<run_dir>/tb/`.

    `purge_step`: when a run resumes at round k, pass k so TensorBoard drops what the interrupted run wrote at
    steps >= k (the redone rounds would otherwise show twice, as in metrics.jsonl before "the last one wins").
    """

    def __init__(self, run_dir: Path, *, purge_step: int | None = None, enabled: bool = True) -> None:
        self.log_dir = Path(run_dir) / "tb"
        self._writer: Any = None
        cls = _writer_class() if enabled else None
        if cls is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = cls(log_dir=str(self.log_dir), purge_step=purge_step)

    @property
    def enabled(self) -> bool:
        """Whether event files are being written."""
        return self._writer is not None

    def scalar(self, tag: str, value: Any, step: int) -> None:
        """One scalar; a missing or non-finite value is skipped (a gap in the curve, not a zero)."""
        v = _num(value)
        if self._writer is not None and v is not None:
            self._writer.add_scalar(tag, v, global_step=int(step))

    def round(self, record: dict[str, Any]) -> None:
        """The scalars of one round record of metrics.jsonl, at step = its round number."""
        step = record.get("round")
        if self._writer is None or _num(step) is None:
            return
        step = int(step)
        for key in ("train_loss", "samples", "accepted"):
            self.scalar(key, record.get(key), step)
        if _num(record.get("moved_bytes")) is not None:
            self.scalar("moved_MB", record["moved_bytes"] / MB, step)
        for section in ("global", "wall"):
            sub = record.get(section)
            if isinstance(sub, dict):
                for k, v in sub.items():
                    self.scalar(f"{section}/{k}", v, step)
        edges = record.get("edges")
        if isinstance(edges, dict):
            for eid, e in edges.items():
                if not isinstance(e, dict):
                    continue
                for key in ("accepted", "samples", "train_loss", "in_coverage"):
                    self.scalar(f"edge/{eid}/{key}", e.get(key), step)
                if isinstance(e.get("clients"), list):
                    self.scalar(f"edge/{eid}/clients", len(e["clients"]), step)
                if _num(e.get("moved_bytes")) is not None:
                    self.scalar(f"edge/{eid}/moved_MB", e["moved_bytes"] / MB, step)

    def flush(self) -> None:
        """Push buffered events to disk (the writer otherwise flushes every two minutes)."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file; later calls are no-ops."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
