"""What one run directory says about its results, read without any of the models.

The report (``common.report.html``), the sweep table (``workflow.sweep``) and ``scripts/make_results.py``
all read the same files: config.toml, status.json, manifest.json, metrics.jsonl, privacy.json,
he.json, mote/evaluation.json and audit/report.json. Every file is optional here, because a run
can stop (or be stopped) after any phase; a file that exists but cannot be read is kept as a
problem naming the file, so that a report says so instead of crashing.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.runs.io import read_json
from common.evaluation.mote import EVALUATION_FILE
from common.runs.rundir import RunDir

AUDIT_FILE = "audit/report.json"
FAIR_GALLERY = "MOTE b=0.50"  # the balanced MOTE gallery, the one MOTE's claims are about
FPR_KEYS = ("0.001", "0.01")  # attacks.metrics.DEFAULT_FPR_TARGETS, as report.json keys them


def attack_label(entry: dict[str, Any]) -> str:
    """``name @ target``: one attack on one model, unique within an audit report."""
    return f"{entry['name']} @ {entry['target']}"


def is_update_attack(entry: dict[str, Any]) -> bool:
    """Attacks on one client's own post-round model (plaintext runs): per client, not per run."""
    return str(entry["target"]).startswith("client ")


@dataclass
class RunResults:
    """The parsed result files of one run directory (None where absent or unreadable)."""

    path: Path
    config: dict[str, Any] | None = None
    status: dict[str, Any] | None = None
    manifest: dict[str, Any] | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    privacy: dict[str, Any] | None = None
    he: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    audit: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, run_dir: str | os.PathLike[str]) -> RunResults:
        res = cls(Path(run_dir))
        if not res.path.is_dir():
            raise FileNotFoundError(f"{res.path}: not a run directory")
        res.config = res._read("config.toml", lambda p: tomllib.loads(p.read_text(encoding="utf-8")))
        for name, attr in (("status.json", "status"), ("manifest.json", "manifest"), ("privacy.json", "privacy"),
                           ("he.json", "he"), (EVALUATION_FILE, "evaluation"), (AUDIT_FILE, "audit")):
            setattr(res, attr, res._read(name, read_json))
        res.metrics = res._read("metrics.jsonl", lambda p: RunDir(p.parent).read_metrics()) or []
        return res

    def _read(self, name: str, reader: Any) -> Any:
        path = self.path / name
        if not path.is_file():
            return None
        try:
            return reader(path)
        except (ValueError, OSError, tomllib.TOMLDecodeError) as exc:
            self.problems.append(f"{path}: unreadable ({exc})")
            return None

    def cfg(self, dotted: str, default: Any = None) -> Any:
        """A value of the resolved configuration by dotted key, e.g. ``cfg("dp.mode")``."""
        node: Any = self.config or {}
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.metrics if e.get("event") == kind]

    def final_metrics(self) -> dict[str, Any]:
        """The final global model's evaluation: the key holder's decryption when there is one
        (HE runs), else the last round's server-side evaluation."""
        decrypted = self.events("decrypted")
        if decrypted:
            return decrypted[-1]
        rounds = [e for e in self.events("round") if "verification_auc" in e]
        return rounds[-1] if rounds else {}

    def dp_on(self) -> bool:
        return self.cfg("dp.mode") == "sample"

    def epsilon(self) -> float:
        """The largest per-client epsilon spent; inf without DP (no guarantee), NaN if unknown."""
        if self.config is not None and not self.dp_on():
            return math.inf
        if self.privacy is None:
            return math.nan
        return float(self.privacy.get("max_epsilon", math.nan))

    def attacks(self, include_updates: bool = True) -> list[dict[str, Any]]:
        entries = (self.audit or {}).get("attacks", [])
        return [a for a in entries if include_updates or not is_update_attack(a)]

    def headline(self) -> dict[str, Any]:
        """Flat headline numbers of the run (one sweep.csv row without the grid columns)."""
        final = self.final_metrics()
        row: dict[str, Any] = {
            "status": (self.status or {}).get("status", "missing"),
            "epsilon": self.epsilon(),
            "verification_auc": final.get("verification_auc", math.nan),
            "attribute_accuracy": final.get("attribute_accuracy", math.nan),
            "attribute_deo_sum": final.get("attribute_deo_sum", math.nan),
            "attribute_bias_amplification": final.get("attribute_bias_amplification", math.nan),
        }
        methods = (self.evaluation or {}).get("methods", {})
        leak = (self.evaluation or {}).get("gender_inference", {})
        for method in ("templates", FAIR_GALLERY):
            for key in ("auc", "fnmr", "fdr", "igarbe"):
                row[f"{method} {key}"] = methods.get(method, {}).get(key, math.nan)
            row[f"{method} gender_inference_ba"] = leak.get(method, {}).get("balanced_accuracy", math.nan)
        for a in self.attacks():
            label = attack_label(a)
            row[f"auc: {label}"] = a["auc"]
            for fpr in FPR_KEYS:
                row[f"tpr@{fpr}: {label}"] = a["tpr_at_fpr"][fpr]
        return row

