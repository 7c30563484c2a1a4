"""The run directory: the contract between training, evaluation and the audit.

``runs/<run-id>/`` holds config.toml, manifest.json, metrics.jsonl, models/ and the rest (see
docs/architecture.md). Every file is written atomically; metrics are appended one JSON object
per line and each line is flushed and fsynced, so a crash loses at most the line being written.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from common.config import Config, dump_toml
from common.io import atomic_write_json, atomic_write_text, read_json


def new_run_id(prefix: str, cfg: Config) -> str:
    """``<prefix>-<UTC time>-<config hash>``: sortable, and two configs never share an id."""
    digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{digest}"


class RunDir:
    """Paths and writers of one run directory."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, root: str | os.PathLike[str], prefix: str, cfg: Config) -> RunDir:
        base = Path(root) / new_run_id(prefix, cfg)
        Path(root).mkdir(parents=True, exist_ok=True)
        for n in range(1, 1000):  # two runs of one config in the same second get -2, -3, ...
            path = base if n == 1 else base.with_name(f"{base.name}-{n}")
            try:
                path.mkdir()
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError(f"{base}: too many runs with this id")
        run = cls(path)
        atomic_write_text(run.config_path, dump_toml(cfg))
        return run

    @property
    def config_path(self) -> Path:
        return self.path / "config.toml"

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def models(self) -> Path:
        d = self.path / "models"
        d.mkdir(exist_ok=True)
        return d

    @property
    def status_path(self) -> Path:
        return self.path / "status.json"

    def write_status(self, status: str, **info: Any) -> None:
        """Record the run's state (running / finished / failed): the CLI's source of truth."""
        atomic_write_json(self.status_path, {"status": status, "time": round(time.time(), 3), **info})

    def read_status(self) -> dict[str, Any]:
        if not self.status_path.exists():
            return {"status": "missing", "error": f"{self.status_path} was never written"}
        return read_json(self.status_path)

    def log_metrics(self, event: str, **values: Any) -> dict[str, Any]:
        """Append one event to metrics.jsonl (durably) and return it."""
        record = {"event": event, "time": round(time.time(), 3), **values}
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return record

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        records = []
        for n, line in enumerate(self.metrics_path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{self.metrics_path}:{n}: not valid JSON ({exc})") from None
        return records
