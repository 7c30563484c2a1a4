"""Metrics of a membership-inference attack: ROC, AUC, TPR at low FPR, accuracy, bootstrap CIs.

Convention everywhere: a higher score means "more likely a member", and a threshold ``t`` admits
every sample with ``score >= t``. Samples with equal scores are therefore admitted or rejected
together: the ROC has one point per distinct score, never a point inside a block of ties.

TPR at a fixed low FPR is the headline number (Carlini et al. 2022, "Membership inference attacks
from first principles"): it is read at the largest achievable FPR that does not exceed the
target, so a reported "TPR @ 0.1% FPR" is never earned with a threshold whose FPR is larger.

All metrics of one set of scores are computed in a single vectorised pass over the sorted
scores, and the stratified bootstrap runs that same pass on a matrix of resamples.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.report.plots import log_log_roc
from common.runs.records import FAMILY_TITLES, MIN_GROUP_PER_CLASS, fpr_key, resolvable

DEFAULT_FPR_TARGETS: tuple[float, ...] = (0.001, 0.01)
_BOOT_CHUNK_ELEMENTS = 1_000_000  # resampled scores held at once in the bootstrap


def _check_inputs(scores: Any, is_member: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert (scores, is_member); both classes must be present."""
    s = np.asarray(scores, dtype=np.float64)
    m = np.asarray(is_member)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {s.shape}")
    if s.size == 0:
        raise ValueError("scores is empty")
    if not np.isfinite(s).all():
        raise ValueError("scores contains NaN or infinite values")
    if m.shape != s.shape:
        raise ValueError(f"is_member must have the shape of scores {s.shape}, got {m.shape}")
    if m.dtype != bool:
        if not np.isin(m, (0, 1)).all():
            raise ValueError("is_member must be boolean or 0/1")
        m = m.astype(bool)
    if m.all() or not m.any():
        raise ValueError("is_member needs at least one member and one non-member")
    return s, m


def _check_target(target: float) -> float:
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target FPR must lie in [0, 1], got {target}")
    return float(target)


def _sorted_curves(scores: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Row-wise ROC counts of a (B, n) score matrix, snapped to whole tie blocks.

    Returns (sorted scores, is_block_end, fp, tp): fp and tp have n + 1 columns, column 0 being
    "nothing admitted"; column k + 1 counts the samples admitted by the threshold equal to the
    k-th largest score, i.e. including every sample tied with it. Consecutive columns inside a
    tie block are therefore equal, which makes the trapezoid AUC count ties as half.
    """
    order = np.argsort(-scores, axis=1, kind="stable")
    s = np.take_along_axis(scores, order, axis=1)
    m = np.take_along_axis(members, order, axis=1)
    b, n = s.shape
    is_end = np.ones((b, n), dtype=bool)
    is_end[:, :-1] = s[:, 1:] != s[:, :-1]
    # Index of the end of each sample's tie block: reversed running minimum of the end indices.
    end_at = np.where(is_end, np.arange(n), n)
    end_idx = np.minimum.accumulate(end_at[:, ::-1], axis=1)[:, ::-1]
    tp = np.take_along_axis(np.cumsum(m, axis=1), end_idx, axis=1)
    fp = np.take_along_axis(np.cumsum(~m, axis=1), end_idx, axis=1)
    zeros = np.zeros((b, 1), dtype=tp.dtype)
    return s, is_end, np.hstack([zeros, fp]), np.hstack([zeros, tp])


def _curve_metrics(scores: np.ndarray, members: np.ndarray, targets: Sequence[float]) -> dict[str, np.ndarray]:
    """AUC, best-threshold accuracy / balanced accuracy and TPR@FPR for each row of (B, n)."""
    _, _, fp, tp = _sorted_curves(scores, members)
    n1 = tp[:, -1:].astype(np.float64)
    n0 = fp[:, -1:].astype(np.float64)
    tpr, fpr = tp / n1, fp / n0
    auc = np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2.0, axis=1)
    balanced = (tpr + 1.0 - fpr) / 2.0
    best = np.argmax(balanced, axis=1)[:, None]  # first maximum: the highest such threshold
    correct = np.take_along_axis(tp, best, axis=1) + n0 - np.take_along_axis(fp, best, axis=1)
    out = {
        "auc": auc,
        "accuracy": (correct / (n0 + n1))[:, 0],
        "balanced_accuracy": np.take_along_axis(balanced, best, axis=1)[:, 0],
    }
    for t in targets:
        # Column 0 (nothing admitted, FPR 0) always qualifies, so the result is 0.0 at worst.
        out[_target_key(t)] = np.max(np.where(fpr <= t, tpr, 0.0), axis=1)
    return out


def _target_key(target: float) -> str:
    return fpr_key(target)  # how report.json keys tpr_at_fpr


def roc_points(scores: Any, is_member: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC of ``score >= threshold`` decisions: (fpr, tpr, thresholds), one point per distinct score.

    The first point is (0, 0) with threshold +inf (nothing admitted); thresholds then decrease
    through the distinct scores, so the last point is (1, 1).
    """
    s, m = _check_inputs(scores, is_member)
    ss, is_end, fp, tp = _sorted_curves(s[None], m[None])
    keep = np.concatenate([[True], is_end[0]])
    n0, n1 = fp[0, -1], tp[0, -1]
    thresholds = np.concatenate([[np.inf], ss[0]])[keep]
    return fp[0, keep] / n0, tp[0, keep] / n1, thresholds


def tpr_at_fpr(scores: Any, is_member: Any, target: float) -> float:
    """TPR at the largest achievable FPR <= ``target`` (Carlini et al. 2022's low-FPR metric).

    A block of tied scores is admitted as a whole; if admitting it would push the FPR above the
    target it is excluded. When only "nothing admitted" stays within the target, the TPR is 0.0.
    """
    fpr, tpr, _ = roc_points(scores, is_member)
    return float(np.max(tpr[fpr <= _check_target(target)]))


def roc_auc(scores: Any, is_member: Any) -> float:
    """Area under the ROC (ties count one half): P(member score > non-member score)."""
    s, m = _check_inputs(scores, is_member)
    return float(_curve_metrics(s[None], m[None], ())["auc"][0])


def _point_metrics(s: np.ndarray, m: np.ndarray, targets: Sequence[float]) -> dict[str, Any]:
    res = _curve_metrics(s[None], m[None], targets)
    return {
        "auc": float(res["auc"][0]),
        "accuracy": float(res["accuracy"][0]),
        "balanced_accuracy": float(res["balanced_accuracy"][0]),
        "tpr_at_fpr": {_target_key(t): float(res[_target_key(t)][0]) if resolvable(int((~m).sum()), t) else None
                       for t in targets},
        "n_members": int(m.sum()),
        "n_nonmembers": int((~m).sum()),
    }


def _resampled(scores: Sequence[np.ndarray], m: np.ndarray, targets: Sequence[float], seed: int,
               n_boot: int) -> list[dict[str, np.ndarray]]:
    """Each score array's metrics on ``n_boot`` bootstrap resamples stratified over members and
    non-members: resampled separately, with replacement and at their own sizes, so every resample
    has the audit's member/non-member counts (the split is fixed by design, not sampled). All arrays
    share the resampled indices (a paired bootstrap). Seeded: the same seed gives the same resamples."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(m), np.flatnonzero(~m)
    row_members = np.concatenate([np.ones(pos.size, bool), np.zeros(neg.size, bool)])
    chunk = max(1, _BOOT_CHUNK_ELEMENTS // m.size)
    parts: list[list[dict[str, np.ndarray]]] = []
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        idx = np.hstack([rng.choice(pos, (b, pos.size)), rng.choice(neg, (b, neg.size))])
        parts.append([_curve_metrics(s[idx], np.broadcast_to(row_members, idx.shape), targets) for s in scores])
    return [{k: np.concatenate([p[i][k] for p in parts]) for k in parts[0][i]} for i in range(len(scores))]


def _bootstrap_ci(s: np.ndarray, m: np.ndarray, targets: Sequence[float], seed: int, n_boot: int) -> dict[str, Any]:
    """Percentile 95% intervals from the stratified bootstrap (``_resampled``)."""
    boot = _resampled([s], m, targets, seed, n_boot)[0]
    n_neg = int((~m).sum())

    def interval(key: str) -> list[float]:
        lo, hi = np.percentile(boot[key], [2.5, 97.5])
        return [float(lo), float(hi)]

    return {
        "auc": interval("auc"),
        "accuracy": interval("accuracy"),
        "balanced_accuracy": interval("balanced_accuracy"),
        "tpr_at_fpr": {_target_key(t): interval(_target_key(t)) if resolvable(n_neg, t) else None for t in targets},
    }


def paired_difference(scores_a: Any, scores_b: Any, is_member: Any, seed: int, n_boot: int = 1000,
                      metric: str = "auc") -> dict[str, Any]:
    """``metric`` of attack a minus that of attack b on the same samples, with a paired bootstrap 95%
    interval (None when ``n_boot`` is 0): each resample draws the same members and nonmembers for
    both, so what the two share (which samples happen to be easy) cancels, and the interval is that
    of the difference, not two overlapping intervals. ``metric``: auc, accuracy, balanced_accuracy
    or a target FPR key ("0.01").
    """
    a, m = _check_inputs(scores_a, is_member)
    b, _ = _check_inputs(scores_b, is_member)
    if a.shape != b.shape:
        raise ValueError(f"paired_difference: scores of different shapes {a.shape} and {b.shape}")
    targets = [float(metric)] if metric not in ("auc", "accuracy", "balanced_accuracy") else []
    key = _target_key(targets[0]) if targets else metric
    if targets and not resolvable(int((~m).sum()), targets[0]):
        raise ValueError(f"paired_difference: {int((~m).sum())} nonmembers cannot resolve TPR at FPR {metric}")
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    point_a, point_b = (float(_curve_metrics(x[None], m[None], targets)[key][0]) for x in (a, b))
    ci = None  # n_boot = 0: the point difference alone
    if n_boot:
        boot_a, boot_b = _resampled([a, b], m, targets, seed, n_boot)
        ci = [float(v) for v in np.percentile(boot_a[key] - boot_b[key], [2.5, 97.5])]
    return {"metric": metric, "value_a": point_a, "value_b": point_b, "difference": point_a - point_b,
            "ci95": ci, "n_boot": int(n_boot),
            "seed": int(seed), "n_members": int(m.sum()), "n_nonmembers": int((~m).sum())}


def attack_metrics(scores: Any, is_member: Any, groups: Mapping[str, Any] | None, seed: int,
                   n_boot: int = 1000, fpr_targets: Sequence[float] = DEFAULT_FPR_TARGETS) -> dict[str, Any]:
    """Every reported number of one attack, JSON-ready.

    Keys: ``auc``, ``accuracy`` and ``balanced_accuracy`` (at the balanced-accuracy-maximising
    threshold, which is chosen on the very scores it is evaluated on: an optimistic upper bound for an
    attacker who must fix the threshold in advance, the usual convention in the MIA literature;
    balanced accuracy rather than accuracy, so that an unbalanced member/non-member ratio cannot be
    exploited by admitting everyone or no one; the highest among equally good thresholds), ``tpr_at_fpr``
    ({"0.001": ..., "0.01": ...}; None where the nonmembers cannot resolve that FPR,
    ``common.runs.records.resolvable``), ``n_members``, ``n_nonmembers``, ``ci95`` (the same metrics as
    [lo, hi], stratified bootstrap seeded by ``seed``; None when ``n_boot`` is 0), ``n_boot``,
    ``seed`` and ``per_group``: {attribute: {value: metrics without CI}}. Leakage can be unfair
    too, hence the per-group breakdown; a group with fewer than ``MIN_GROUP_PER_CLASS`` members or
    nonmembers gets None metrics and the reason (``omitted``).
    """
    s, m = _check_inputs(scores, is_member)
    targets = [_check_target(t) for t in fpr_targets]
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    out = _point_metrics(s, m, targets)
    out["ci95"] = _bootstrap_ci(s, m, targets, seed, n_boot) if n_boot else None
    out["n_boot"] = int(n_boot)
    out["seed"] = int(seed)
    per_group: dict[str, dict[str, Any]] = {}
    for name, values in (groups or {}).items():
        g = np.asarray(values)
        if g.shape != s.shape:
            raise ValueError(f"groups[{name!r}] must have the shape of scores {s.shape}, got {g.shape}")
        per_group[name] = {}
        for value in np.unique(g):
            sel = g == value
            gm = m[sel]
            if min(gm.sum(), (~gm).sum()) < MIN_GROUP_PER_CLASS:
                per_group[name][str(value)] = {
                    "auc": None, "accuracy": None, "balanced_accuracy": None,
                    "tpr_at_fpr": {_target_key(t): None for t in targets},
                    "n_members": int(gm.sum()), "n_nonmembers": int((~gm).sum()),
                    "omitted": f"fewer than {MIN_GROUP_PER_CLASS} members or nonmembers",
                }
            else:
                per_group[name][str(value)] = _point_metrics(s[sel], gm, targets)
    out["per_group"] = per_group
    return out


@dataclass(frozen=True, eq=False)
class RocCurve:
    """One attack on one target, for ``roc_figures``: its target family (``TargetKind.family``, which
    picks its figure), its legend label and its audited scores with their membership."""

    family: str
    label: str
    scores: np.ndarray
    is_member: np.ndarray

    def __post_init__(self) -> None:
        if self.family not in FAMILY_TITLES:
            raise ValueError(f"RocCurve {self.label!r}: unknown family {self.family!r} "
                             f"(known: {', '.join(FAMILY_TITLES)})")


LEGEND_FPR = 0.01
"""The FPR whose TPR a legend entry shows, when the curve's nonmembers resolve it (``records.resolvable``)."""


def _counts(values: Sequence[int], what: str) -> str:
    """``500 members``, or ``up to 500 members`` when a family's curves audited different numbers."""
    return f"{'' if len(set(values)) == 1 else 'up to '}{max(values)} {what}"


def roc_figures(curves: Iterable[RocCurve], path_of: Callable[[str], str | os.PathLike[str]]) -> dict[str, Path]:
    """Write one log-log ROC PNG per target family that has curves, atomically at ``path_of(family)``
    (e.g. ``RunDir.audit_roc``); returns {family: path} in ``FAMILY_TITLES`` order.

    Attacks on the global model, on each client's update and on the MOTE galleries answer different
    threat models, so each family gets its own figure. Axes run from max(1e-4, 1 / largest nonmember
    count) to 1: below one false positive the FPR is not resolvable. A legend entry gives the AUC, and
    the TPR at ``LEGEND_FPR`` only where at least ``MIN_FALSE_POSITIVES`` nonmembers lie above it.
    """
    by_family: dict[str, list[RocCurve]] = {family: [] for family in FAMILY_TITLES}
    for curve in curves:
        by_family[curve.family].append(curve)
    written: dict[str, Path] = {}
    for family, group in by_family.items():
        if not group:
            continue
        xy: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        n_members: list[int] = []
        n_nonmembers: list[int] = []
        labels = [curve.label for curve in group]
        if len(set(labels)) < len(labels):
            raise ValueError(f"{family} curves share a label: {sorted({x for x in labels if labels.count(x) > 1})}")
        for curve in group:
            s, m = _check_inputs(curve.scores, curve.is_member)
            n_members.append(int(m.sum()))
            n_nonmembers.append(int((~m).sum()))
            label = f"{curve.label}: AUC {roc_auc(s, m):.3f}"
            if resolvable(n_nonmembers[-1], LEGEND_FPR):
                label += f", TPR@{LEGEND_FPR * 100:g}% FPR {tpr_at_fpr(s, m, LEGEND_FPR):.3f}"
            fpr, tpr, _ = roc_points(s, m)
            xy[label] = (fpr, tpr)
        title = (f"{FAMILY_TITLES[family]}: membership inference\n"
                 f"({_counts(n_members, 'members')} vs {_counts(n_nonmembers, 'nonmembers')})")
        path = Path(path_of(family))
        log_log_roc(xy, path, max(1e-4, 1.0 / max(n_nonmembers)), title=title)
        written[family] = path
    return written
