"""Run records: every run writes its config, metrics and logs under `runs/<id>/`.

`<id>` is `<UTC time>-<kind>-<short hash of the config>` so runs sort by time and identical
configs are recognisable. Metrics are JSON lines (one object per step/round) so a crashed run
keeps everything it logged.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import random
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from flad_core.atomic import atomic_write_json, atomic_write_text
from flad_core.config import to_dict

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(processName)s %(name)s: %(message)s"


def default_runs_root() -> Path:
    return Path(os.environ.get("FLAD_RUNS_DIR", "runs"))


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and (if imported) torch so a run is reproducible."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)


def setup_logging(level: int | str = logging.INFO, logfile: Path | None = None) -> None:
    """Root logging to stderr (and `logfile`), idempotent across calls."""
    root = logging.getLogger()
    root.setLevel(level)
    fmt = logging.Formatter(LOG_FORMAT)
    if not any(getattr(h, "_flad", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(fmt)
        handler._flad = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    if logfile is not None and not any(getattr(h, "baseFilename", None) == str(logfile.resolve())
                                       for h in root.handlers):
        fh = logging.FileHandler(logfile, encoding="utf-8")
        fh.setFormatter(fmt)
        root.addHandler(fh)


class RunDir:
    """One run's folder: `config.yaml`, `meta.json`, `metrics.jsonl`, `log.txt`, plus artefacts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    @property
    def id(self) -> str:
        return self.path.name

    @classmethod
    def create(cls, kind: str, config: Any = None, root: Path | None = None,
               run_id: str | None = None, log: bool = True) -> RunDir:
        root = Path(root) if root is not None else default_runs_root()
        cfg = to_dict(config) if config is not None else {}
        if run_id is None:
            digest = hashlib.sha1(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:6]
            stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S%f")[:-3]
            run_id = f"{stamp}-{kind}-{digest}"
        path = root / run_id
        path.mkdir(parents=True, exist_ok=False)
        run = cls(path)
        atomic_write_text(path / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
        atomic_write_json(path / "meta.json", {
            "kind": kind, "id": run_id, "argv": sys.argv, "host": socket.gethostname(),
            "python": platform.python_version(), "platform": platform.platform(),
            "started_utc": _dt.datetime.now(_dt.UTC).isoformat(),
        })
        if log:
            setup_logging(logfile=path / "log.txt")
        return run

    def log_metrics(self, record: dict[str, Any]) -> None:
        """Append one JSON object to `metrics.jsonl` (flushed at once)."""
        line = json.dumps(record, sort_keys=True, default=_jsonable) + "\n"
        with self._lock, open(self.path / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(line)

    def write_json(self, name: str, obj: Any) -> Path:
        target = self.path / name
        atomic_write_json(target, obj)
        return target

    def read_metrics(self) -> list[dict[str, Any]]:
        file = self.path / "metrics.jsonl"
        if not file.exists():
            return []
        return [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line]


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
