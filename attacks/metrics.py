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
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from common.report.plots import log_log_roc
from common.runs.records import fpr_key

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
        "tpr_at_fpr": {_target_key(t): float(res[_target_key(t)][0]) for t in targets},
        "n_members": int(m.sum()),
        "n_nonmembers": int((~m).sum()),
    }


def _bootstrap_ci(s: np.ndarray, m: np.ndarray, targets: Sequence[float], seed: int, n_boot: int) -> dict[str, Any]:
    """Percentile 95% intervals from a bootstrap stratified over members and non-members.

    Members and non-members are resampled separately, with replacement and at their own sizes, so
    every resample has the audit's member/non-member counts (the split is fixed by design, not
    sampled). Seeded: the same seed gives identical intervals.
    """
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(m), np.flatnonzero(~m)
    row_members = np.concatenate([np.ones(pos.size, bool), np.zeros(neg.size, bool)])
    chunk = max(1, _BOOT_CHUNK_ELEMENTS // s.size)
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        idx = np.hstack([rng.choice(pos, (b, pos.size)), rng.choice(neg, (b, neg.size))])
        parts.append(_curve_metrics(s[idx], np.broadcast_to(row_members, idx.shape), targets))

    def interval(key: str) -> list[float]:
        values = np.concatenate([p[key] for p in parts])
        lo, hi = np.percentile(values, [2.5, 97.5])
        return [float(lo), float(hi)]

    return {
        "auc": interval("auc"),
        "accuracy": interval("accuracy"),
        "balanced_accuracy": interval("balanced_accuracy"),
        "tpr_at_fpr": {_target_key(t): interval(_target_key(t)) for t in targets},
    }


def attack_metrics(scores: Any, is_member: Any, groups: Mapping[str, Any] | None, seed: int,
                   n_boot: int = 1000, fpr_targets: Sequence[float] = DEFAULT_FPR_TARGETS) -> dict[str, Any]:
    """Every reported number of one attack, JSON-ready.

    Keys: ``auc``, ``accuracy`` and ``balanced_accuracy`` (at the balanced-accuracy-maximising
    threshold, which is chosen on the very scores it is evaluated on: an optimistic upper bound for an
    attacker who must fix the threshold in advance, the usual convention in the MIA literature;
    balanced accuracy rather than accuracy, so that an unbalanced member/non-member ratio cannot be
    exploited by admitting everyone or no one; the highest among equally good thresholds), ``tpr_at_fpr``
    ({"0.001": ..., "0.01": ...}), ``n_members``, ``n_nonmembers``, ``ci95`` (the same metrics as
    [lo, hi], stratified bootstrap seeded by ``seed``; None when ``n_boot`` is 0), ``n_boot``,
    ``seed`` and ``per_group``: {attribute: {value: metrics without CI}}. Leakage can be unfair
    too, hence the per-group breakdown; a group lacking members or non-members gets None metrics.
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
            if gm.all() or not gm.any():
                per_group[name][str(value)] = {
                    "auc": None, "accuracy": None, "balanced_accuracy": None,
                    "tpr_at_fpr": {_target_key(t): None for t in targets},
                    "n_members": int(gm.sum()), "n_nonmembers": int((~gm).sum()),
                }
            else:
                per_group[name][str(value)] = _point_metrics(s[sel], gm, targets)
    out["per_group"] = per_group
    return out


def log_log_roc_plot(curves: Mapping[str, tuple[Any, Any]], path: str | os.PathLike[str],
                     title: str | None = None) -> None:
    """Write a PNG of the ROC curves on log-log axes (the low-FPR regime is what matters).

    Axes run from max(1e-4, 1 / largest non-member count) to 1: below one false positive the FPR
    is not resolvable. The dashed diagonal is a random guess. The file is written atomically.
    """
    if not curves:
        raise ValueError("curves is empty")
    curves_xy = {}
    for name, (s, m) in curves.items():
        fpr, tpr, _ = roc_points(s, m)
        label = f"{name} (AUC {roc_auc(s, m):.3f}, TPR@0.1% {tpr_at_fpr(s, m, 0.001):.3f})"
        curves_xy[label] = (fpr, tpr)
    max_neg = max(int((~np.asarray(m, dtype=bool)).sum()) for _, m in curves.values())
    log_log_roc(curves_xy, path, max(1e-4, 1.0 / max_neg), title=title)
