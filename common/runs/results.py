"""What one run directory says about its results, read without any of the models.

The report (``common.report.html``), the sweep table (``workflow.sweep``) and ``scripts/make_results.py``
all read the same files (``common.runs.layout``): the configuration, status, manifest, metrics,
privacy ledger, HE summary, MOTE evaluation and audit report, the last three through their typed
records (``common.runs.records``). Every file is optional here, because a run can stop (or be
stopped) after any phase; a file that exists but cannot be read is kept as a problem naming the
file, so that a report says so instead of crashing.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.runs import layout
from common.runs.io import read_json
from common.runs.records import BALANCED_GALLERY, TEMPLATES, AttackEntry, AuditReport, MoteEvaluation, RunStatus
from common.runs.rundir import RunDir


@dataclass
class RunResults:
    """The parsed result files of one run directory (None where absent or unreadable)."""

    path: Path
    config: dict[str, Any] | None = None
    status: RunStatus | None = None
    manifest: dict[str, Any] | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    privacy: dict[str, Any] | None = None
    he: dict[str, Any] | None = None
    evaluation: MoteEvaluation | None = None
    audit: AuditReport | None = None
    lift: dict[str, Any] | None = None
    self_audit: dict[str, Any] | None = None
    mote_members: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, run_dir: str | os.PathLike[str]) -> RunResults:
        res = cls(Path(run_dir))
        if not (res.path / layout.CONFIG).is_file():
            raise FileNotFoundError(f"{res.path}: not a facefl run directory (no {layout.CONFIG})")
        res.config = res._read(layout.CONFIG, lambda p: tomllib.loads(p.read_text(encoding="utf-8")))
        res.status = res._read(layout.STATUS, RunStatus.load)
        res.manifest = res._read(layout.MANIFEST, read_json)
        res.privacy = res._read(layout.PRIVACY, read_json)
        res.he = res._read(layout.HE, read_json)
        res.evaluation = res._read(layout.MOTE_EVALUATION, MoteEvaluation.load)
        res.audit = res._read(layout.AUDIT_REPORT, AuditReport.load)
        res.lift = res._read(layout.LIFT, read_json)
        res.self_audit = res._read(layout.SELF_AUDIT, read_json)
        res.mote_members = res._read(layout.MOTE_MEMBERS_EVALUATION, read_json)
        res.metrics = res._read(layout.METRICS, lambda p: RunDir(p.parent).read_metrics()) or []
        res._check_complete()
        return res

    def _check_complete(self) -> None:
        """Record as a problem every file the status says was written but is not there, so that
        nobody reads "training did not start" in the report of a damaged run."""
        done = int((self.status.rounds_completed if self.status is not None else None) or 0)
        if done == 0:
            return
        manifest = [] if self.per_member() else [layout.MANIFEST]  # members keep their own splits
        expected = [*manifest, layout.METRICS, *([layout.PRIVACY] if self.dp_on() else [])]
        for name in expected:
            if not (self.path / name).exists():
                self.problems.append(f"{self.path / name}: missing although {layout.STATUS} records {done} completed "
                                     "rounds: the run directory is damaged")
        if (self.path / layout.METRICS).is_file() and not self.events("round") and not self.problem_with(layout.METRICS):
            self.problems.append(f"{self.path / layout.METRICS}: no round recorded although {layout.STATUS} records "
                                 f"{done}: the run directory is damaged")

    def problem_with(self, name: str) -> str | None:
        """The recorded problem of the run file ``name`` (unreadable or missing), if there is one."""
        target = str(self.path / name)
        return next((p for p in self.problems if p.startswith(target + ":")), None)

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

    def per_member(self) -> bool:
        """Whether the members kept their own data (``data.layout = per-member``)."""
        return self.cfg("data.layout") == "per-member"

    def dp_on(self) -> bool:
        return self.cfg("dp.mode") == "sample"

    def epsilon(self) -> float:
        """The largest per-client epsilon spent; inf without DP (no guarantee), NaN if unknown."""
        if self.config is not None and not self.dp_on():
            return math.inf
        if self.privacy is None:
            return math.nan
        return float(self.privacy.get("max_epsilon", math.nan))

    def attacks(self, include_updates: bool = True) -> list[AttackEntry]:
        """The audit's entries ([] without an audit); without ``include_updates``, the per-run ones only."""
        return self.audit.entries(include_updates) if self.audit is not None else []

    def headline(self) -> dict[str, Any]:
        """Flat headline numbers of the run (one sweep.csv row without the grid columns)."""
        final = self.final_metrics()
        row: dict[str, Any] = {
            "status": self.status.status if self.status is not None else "missing",
            "epsilon": self.epsilon(),
            "epsilon_unit": self.privacy.get("unit", "sample") if self.privacy is not None else "",
            "verification_auc": final.get("verification_auc", math.nan),
            "attribute_accuracy": final.get("attribute_accuracy", math.nan),
            "attribute_deo_sum": final.get("attribute_deo_sum", math.nan),
            "attribute_bias_amplification": final.get("attribute_bias_amplification", math.nan),
        }
        ev = self.evaluation
        for method in (TEMPLATES, BALANCED_GALLERY):
            verification, leak = (ev.method(method), ev.leakage(method)) if ev is not None else ({}, {})
            for key in ("auc", "fnmr", "fdr", "igarbe"):
                row[f"{method} {key}"] = verification.get(key, math.nan)
            row[f"{method} gender_inference_ba"] = leak.get("balanced_accuracy", math.nan)
        row["empirical_epsilon"] = self.empirical_epsilon()
        for a in self.attacks():
            row[f"auc: {a.label}"] = a.auc
            for fpr in self.audit.fpr_keys:  # NaN where the nonmembers cannot resolve the FPR
                row[f"tpr@{fpr}: {a.label}"] = a.tpr_at_fpr[fpr] if a.tpr_at_fpr[fpr] is not None else math.nan
            if a.epsilon_lower_bound:
                row[f"eps_lb: {a.label}"] = a.epsilon_lower_bound["epsilon"]
        return row

    def empirical_bounds(self) -> list[tuple[float, str]]:
        """(lower bound on the global model's epsilon, what proves it): each attack on the final
        global model(s) and the one-run canary audit ([] without an audit)."""
        if self.audit is None:
            return []
        bounds = [(a.epsilon_lower_bound["epsilon"], a.label) for a in self.attacks()
                  if a.epsilon_lower_bound and a.kind.family == "global"]
        if self.audit.canary_audit:
            c = self.audit.canary_audit
            bounds.append((c["bound"]["epsilon"], f"one-run canary audit, {c['counts']['included']} of "
                                                  f"{c['counts']['m']} canaries included"))
        return bounds

    def best_empirical_bound(self) -> tuple[float, str] | None:
        """The largest of ``empirical_bounds`` and what proves it ("no attack proves epsilon > 0"
        when every bound is 0); None without one."""
        bounds = self.empirical_bounds()
        if not bounds:
            return None
        best, what = max(bounds)
        return best, what if best > 0 else "no attack proves epsilon > 0"

    def empirical_epsilon(self) -> float:
        """The largest lower bound of ``empirical_bounds``; NaN without one."""
        best = self.best_empirical_bound()
        return best[0] if best is not None else math.nan

