"""Typed records of a run directory's JSON documents, shared by their writers and their readers.

* ``RunStatus``: status.json (``common.runs.rundir`` writes it; the server commits rounds with it).
* ``MoteEvaluation``: mote/evaluation.json (``common.evaluation.mote`` writes it).
* ``AuditReport`` with one ``AttackEntry`` per (attack, target): audit/report.json
  (``attacks.audit`` writes it).

Readers (``common.runs.results``, ``common.report.html``, ``workflow.sweep``, ``workflow.demo``,
``scripts/make_results.py``) go through ``from_dict``/``load``; writers through ``to_dict``/``save``.
The JSON keys are the on-disk contract: a field may be added, never renamed or dropped. Nested
parts that only one side inspects (per-group metrics, intervals, per-method verification reports)
stay plain dicts, and keys a record does not know are kept in its ``extra`` and written back, so
that a writer adding a key never loses it on the way. A document that lacks a required field
raises ValueError naming it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any

from common.runs.io import atomic_write_json, read_json


def _require(raw: Any, keys: Sequence[str], what: str) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{what}: expected a JSON object, got {type(raw).__name__}")
    missing = [k for k in keys if k not in raw]
    if missing:
        raise ValueError(f"{what}: missing {', '.join(missing)}")
    return raw


def _load(cls: Any, path: str | os.PathLike[str]) -> Any:
    """``cls.from_dict`` of a JSON file, naming the file in any error."""
    raw = read_json(path)
    try:
        return cls.from_dict(raw)
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{path}: {exc}") from None


# ------------------------------------------------------------------ status.json

RUNNING, FINISHED, FAILED, MISSING = "running", "finished", "failed", "missing"


@dataclass(frozen=True)
class RunStatus:
    """status.json: the run's state (running / finished / failed; "missing" when never written)
    and its last commit (``rounds_completed`` with ``metrics_lines``, see ``common.runs.rundir``).
    ``summary`` holds whatever else the writer recorded, e.g. a finished run's final metrics."""

    status: str
    time: float | None = None
    rounds_completed: int | None = None
    metrics_lines: int | None = None
    error: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)

    _TYPED = ("status", "time", "rounds_completed", "metrics_lines", "error")

    @classmethod
    def now(cls, status: str, **info: Any) -> RunStatus:
        """A status stamped with the current time; ``info`` the typed fields and the summary."""
        typed = {k: info.pop(k) for k in cls._TYPED[2:] if k in info}
        return cls(status, round(time.time(), 3), summary=info, **typed)

    @classmethod
    def missing(cls, path: str | os.PathLike[str]) -> RunStatus:
        return cls(MISSING, error=f"{path} was never written")

    @classmethod
    def from_dict(cls, raw: Any) -> RunStatus:
        raw = _require(raw, ("status",), "status")
        if not isinstance(raw["status"], str):
            raise ValueError(f"status: expected a string, got {raw['status']!r}")
        for key in ("rounds_completed", "metrics_lines"):
            if raw.get(key) is not None and (isinstance(raw[key], bool) or not isinstance(raw[key], int)):
                raise ValueError(f"{key}: expected an integer, got {raw[key]!r}")
        return cls(**{k: raw[k] for k in cls._TYPED if k in raw},
                   summary={k: v for k, v in raw.items() if k not in cls._TYPED})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RunStatus:
        return _load(cls, path)

    def to_dict(self) -> dict[str, Any]:
        typed = {k: getattr(self, k) for k in self._TYPED}
        return {**{k: v for k, v in typed.items() if v is not None}, **self.summary}

    def save(self, path: str | os.PathLike[str]) -> Path:
        return atomic_write_json(path, self.to_dict())

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    @property
    def committed(self) -> bool:
        """Whether the status carries a commit record (``metrics_lines``): resumable runs do."""
        return self.metrics_lines is not None

    def last_commit(self) -> dict[str, int]:
        """``rounds_completed`` and ``metrics_lines`` of the commit ({} without one)."""
        if not self.committed:
            return {}
        return {"rounds_completed": int(self.rounds_completed or 0), "metrics_lines": int(self.metrics_lines or 0)}


# ------------------------------------------------------------------ mote/evaluation.json

TEMPLATES = "templates"  # the plain embedding templates, the baseline MOTE is compared with
BALANCED_FACTOR = 0.5  # MOTE's balanced gallery (both genders weighted alike): the fair one of a pair


def mote_method(balancing_factor: float) -> str:
    """The name of one MOTE gallery among the evaluation's methods: ``MOTE b=0.50``."""
    return f"MOTE b={balancing_factor:.2f}"


BALANCED_GALLERY = mote_method(BALANCED_FACTOR)


@dataclass(frozen=True)
class MoteEvaluation:
    """mote/evaluation.json: verification of templates and of each MOTE gallery on the run's probes
    (``methods``: name -> verification report), and the template thief's gender inference
    (``gender_inference``: name -> balanced accuracy and per-class accuracies)."""

    target_fmr: float
    enrolled: int
    probes: int
    methods: dict[str, dict[str, Any]]
    gender_inference: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    _KEYS = ("target_fmr", "enrolled", "probes", "methods", "gender_inference")

    @classmethod
    def from_dict(cls, raw: Any) -> MoteEvaluation:
        raw = _require(raw, cls._KEYS[:4], "MOTE evaluation")
        if not isinstance(raw["methods"], Mapping):
            raise ValueError("methods: expected an object of method -> report")
        return cls(raw["target_fmr"], raw["enrolled"], raw["probes"], dict(raw["methods"]),
                   dict(raw.get("gender_inference") or {}), {k: v for k, v in raw.items() if k not in cls._KEYS})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MoteEvaluation:
        return _load(cls, path)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {**self.extra, "target_fmr": self.target_fmr, "enrolled": self.enrolled,
                               "probes": self.probes, "methods": self.methods}
        if self.gender_inference:
            out["gender_inference"] = self.gender_inference
        return out

    def save(self, path: str | os.PathLike[str]) -> Path:
        return atomic_write_json(path, self.to_dict())

    def method(self, name: str) -> dict[str, Any]:
        """One method's verification report ({} when the run has no such method)."""
        return self.methods.get(name, {})

    def leakage(self, name: str) -> dict[str, Any]:
        """The gender-inference result on one method's templates ({} when not measured)."""
        return self.gender_inference.get(name, {})


# ------------------------------------------------------------------ audit/report.json

class TargetKind(StrEnum):
    """What an audited model is; every attack entry of a report names its target's kind."""

    GLOBAL = "global"  # the final global model, black-box
    WHITE_BOX = "white-box"  # the final global model with its activations (MINT)
    FAIR = "fair"  # the final global model of the fair twin run (--fair)
    PAIR = "pair"  # the biased + fair pair of models (FD-MIA with --fair)
    CLIENT = "client"  # one client's own post-round model: what a curious plaintext server holds
    MOTE_GALLERY = "mote-gallery"  # one MOTE gallery of the run
    MOTE_PAIR = "mote-pair"  # the fair (balanced) + skewed pair of MOTE galleries (FD-MIA)

    @property
    def per_client(self) -> bool:
        """Per client, not per run: one client's update (plaintext runs only)."""
        return self is TargetKind.CLIENT

    @property
    def mote(self) -> bool:
        """A MOTE gallery or pair: trained after the federation, outside DP-SGD's guarantee."""
        return self in (TargetKind.MOTE_GALLERY, TargetKind.MOTE_PAIR)

    @property
    def family(self) -> str:
        """The ROC figure this kind's attacks are drawn in (a key of ``FAMILY_TITLES``): attacks on the
        final global model(s), on each client's update and on the MOTE galleries answer different
        threat models, and one figure of them all is unreadable."""
        if self.mote:
            return "mote"
        return "clients" if self.per_client else "global"


FAMILY_TITLES: Mapping[str, str] = MappingProxyType({
    "global": "final global model",
    "clients": "each client's update (curious server)",
    "mote": "MOTE galleries",
})
"""Every target family (``TargetKind.family``), in report order, with its title for a human."""

MIN_FALSE_POSITIVES = 10
"""Nonmembers above the threshold needed before a TPR at a target FPR means anything."""


MIN_GROUP_PER_CLASS = 50
"""Members and nonmembers a group needs before its own AUC is reported (its standard error is then
about 0.06 or less); smaller groups are listed with their counts and no metric."""


def resolvable(n_nonmembers: int, fpr: float) -> bool:
    """Whether ``n_nonmembers`` can resolve TPR at FPR ``fpr``: the threshold must sit above at least
    ``MIN_FALSE_POSITIVES`` nonmembers, or the "FPR" is one or two samples and the TPR is noise (TPR at
    0.1% FPR needs 10,000 nonmembers)."""
    return n_nonmembers * fpr >= MIN_FALSE_POSITIVES


def fpr_key(target: float) -> str:
    """How a target FPR keys ``tpr_at_fpr`` in the report: 0.001 -> "0.001"."""
    return f"{target:g}"


def tpr_label(key: str) -> str:
    """A column heading for ``tpr_at_fpr[key]``: "0.001" -> "TPR@0.1%FPR"."""
    return f"TPR@{float(key) * 100:g}%FPR"


_METRICS = ("auc", "accuracy", "balanced_accuracy", "tpr_at_fpr", "n_members", "n_nonmembers", "ci95", "n_boot",
            "seed", "per_group")


@dataclass(frozen=True)
class AttackEntry:
    """One attack on one target: the metrics of ``attacks.metrics.attack_metrics`` and the target's
    description. ``partition`` is set for client targets, ``balancing_factor`` and ``fair`` (the
    balanced gallery of the pair) for MOTE galleries."""

    name: str
    target: str
    kind: TargetKind
    auc: float
    accuracy: float
    balanced_accuracy: float
    tpr_at_fpr: dict[str, float]
    n_members: int
    n_nonmembers: int
    ci95: dict[str, Any] | None
    n_boot: int
    seed: int
    per_group: dict[str, dict[str, Any]]
    partition: int | None = None
    balancing_factor: float | None = None
    fair: bool | None = None
    # attacks.empirical_epsilon.EpsilonBound.to_dict(): the epsilon this attack's ROC proves
    epsilon_lower_bound: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _OPTIONAL = ("partition", "balancing_factor", "fair", "epsilon_lower_bound")

    @classmethod
    def from_dict(cls, raw: Any) -> AttackEntry:
        raw = _require(raw, ("name", "target"), "attack")
        what = f"attack {raw['name']!r} on {raw['target']!r}"
        if "kind" not in raw:
            raise ValueError(f"{what}: no target kind; the report was written by an older facefl: "
                             "run `facefl audit` again")
        raw = _require(raw, _METRICS, what)
        try:
            kind = TargetKind(raw["kind"])
        except ValueError:
            raise ValueError(f"{what}: unknown target kind {raw['kind']!r}") from None
        known = ("name", "target", "kind", *_METRICS, *cls._OPTIONAL)
        return cls(raw["name"], raw["target"], kind, **{k: raw[k] for k in _METRICS},
                   **{k: raw[k] for k in cls._OPTIONAL if raw.get(k) is not None},
                   extra={k: v for k, v in raw.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        out = {**self.extra, "name": self.name, "target": self.target, "kind": self.kind.value,
               **{k: getattr(self, k) for k in _METRICS}}
        out.update({k: getattr(self, k) for k in self._OPTIONAL if getattr(self, k) is not None})
        return out

    @property
    def label(self) -> str:
        """``name @ target``: one attack on one model, unique within an audit report."""
        return f"{self.name} @ {self.target}"

    @property
    def per_client(self) -> bool:
        return self.kind.per_client

    def ci(self, metric: str) -> list[float] | None:
        """The bootstrap 95% interval of ``metric`` (auc, accuracy, balanced_accuracy); None without one."""
        return (self.ci95 or {}).get(metric)

    def tpr_ci(self, fpr: str) -> list[float] | None:
        """The bootstrap 95% interval of ``tpr_at_fpr[fpr]``; None without one."""
        return ((self.ci95 or {}).get("tpr_at_fpr") or {}).get(fpr)

    def resolves(self, fpr: str) -> bool:
        """Whether the audited nonmembers can resolve TPR at FPR ``fpr`` (``resolvable``)."""
        return resolvable(self.n_nonmembers, float(fpr))


def tpr_text(entry: AttackEntry, fpr: str) -> str:
    """``tpr_at_fpr[fpr]`` for a table, or why it is not there: "not resolvable at n = 300"
    (nonmembers); a number only where ``resolvable``."""
    value = entry.tpr_at_fpr.get(fpr)
    if value is None or not entry.resolves(fpr):
        return f"not resolvable at n = {entry.n_nonmembers}"
    return f"{value:.3f}"


@dataclass(frozen=True)
class AuditReport:
    """audit/report.json: the audited run, the audit's settings, the update-level availability,
    the target FPRs under which every ``tpr_at_fpr`` is keyed (``fpr_keys``) and the entries."""

    run: str
    fair_run: str | None
    task: str
    dp: dict[str, Any]
    audited: dict[str, int]
    references: int
    seed: int
    update_level: dict[str, Any]
    fpr_targets: tuple[float, ...]
    attacks: list[AttackEntry]
    mote_audited: dict[str, Any] | None = None
    reference_recipe: str | None = None  # "target" or "central" (attacks.audit.REFERENCE_RECIPES)
    comparisons: list[dict[str, Any]] = field(default_factory=list)  # attacks.metrics.paired_difference, labelled
    canary_audit: dict[str, Any] | None = None  # attacks.canary_audit: the one-run audit's counts and bound
    extra: dict[str, Any] = field(default_factory=dict)

    _OPTIONAL = ("mote_audited", "reference_recipe", "canary_audit")

    _REQUIRED = ("run", "fair_run", "task", "dp", "audited", "references", "seed", "update_level", "attacks")

    @classmethod
    def from_dict(cls, raw: Any) -> AuditReport:
        raw = _require(raw, cls._REQUIRED, "audit report")
        if "fpr_targets" not in raw:
            raise ValueError("audit report: no fpr_targets; it was written by an older facefl: run `facefl audit` again")
        if not isinstance(raw["attacks"], list):
            raise ValueError("audit report: attacks: expected a list")
        known = (*cls._REQUIRED, "fpr_targets", "comparisons", *cls._OPTIONAL)
        return cls(raw["run"], raw["fair_run"], raw["task"], raw["dp"], raw["audited"], raw["references"], raw["seed"],
                   raw["update_level"], tuple(float(t) for t in raw["fpr_targets"]),
                   [AttackEntry.from_dict(a) for a in raw["attacks"]], comparisons=list(raw.get("comparisons", [])),
                   **{k: raw.get(k) for k in cls._OPTIONAL}, extra={k: v for k, v in raw.items() if k not in known})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AuditReport:
        return _load(cls, path)

    def to_dict(self) -> dict[str, Any]:
        out = {**self.extra, **{k: getattr(self, k) for k in self._REQUIRED if k != "attacks"}}
        out["fpr_targets"] = list(self.fpr_targets)
        out["attacks"] = [a.to_dict() for a in self.attacks]
        out["comparisons"] = self.comparisons
        out.update({k: getattr(self, k) for k in self._OPTIONAL if getattr(self, k) is not None})
        return out

    def save(self, path: str | os.PathLike[str]) -> Path:
        return atomic_write_json(path, self.to_dict())

    @property
    def fpr_keys(self) -> tuple[str, ...]:
        """The keys of every entry's ``tpr_at_fpr``, lowest FPR (the headline) first."""
        return tuple(fpr_key(t) for t in sorted(self.fpr_targets))

    def entries(self, include_updates: bool = True) -> list[AttackEntry]:
        """The attack entries; without ``include_updates``, only the per-run ones (no client updates)."""
        return [a for a in self.attacks if include_updates or not a.per_client]
