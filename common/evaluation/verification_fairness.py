"""Verification error rates at one global threshold, per demographic group, and their disparity.

A verification system runs at one operating point for everybody, so fairness is measured at ONE
global threshold tau chosen on all impostor scores (as in the MOTE paper: FNMR at FMR = 1e-3),
and the group error rates at that tau are compared:

* FDR, the Fairness Discrepancy Rate of de Freitas Pereira & Marcel ("Fairness in Biometrics: a
  figure of merit to assess biometric verification systems"): 1 - weighted largest gaps.
* GARBE, the Gini Aggregation Rate for Biometric Equitability of Howard et al. ("Evaluating
  Proposed Fairness Models for Face Recognition Algorithms"), and iGARBE = 1 - GARBE as reported
  by MOTE (higher = fairer, like FDR).
* IR, the inequity rate: weighted ratios of the worst to the best group rate.

A decision is genuine iff score >= tau. Rates are fractions in [0, 1]; a rate of a group without
pairs is NaN, and every metric built on a NaN rate is NaN (no made-up fairness from empty cells).
Group rates can be given as a mapping group -> rate or as a sequence in a fixed group order.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

Rates = Mapping[Hashable, float] | Sequence[float] | np.ndarray


def _scores(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x).ravel()
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    if np.isnan(arr).any():
        raise ValueError(f"{name}: scores contain NaN")
    return arr


def _max_false_matches(n: int, target: float) -> int:
    """The largest a with a / n <= target, evaluated in floating point as the FMR is."""
    a = min(n, math.floor(target * n))
    while a < n and (a + 1) / n <= target:
        a += 1
    while a > 0 and a / n > target:
        a -= 1
    return a


def threshold_at_fmr(impostor_scores: np.ndarray | Sequence[float], target: float = 1e-3) -> float:
    """The global threshold tau with FMR = mean(impostor >= tau) <= ``target``, never above.

    tau is the smallest impostor score value that satisfies the target (the most permissive
    threshold among observed scores, ties kept on the same side). When no impostor score
    qualifies (target * n < 1, or ties at the top), tau is the next representable value above the
    highest impostor score (in the scores' own float type), so FMR = 0.
    """
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target FMR must be in [0, 1], got {target}")
    raw = _scores(impostor_scores, "threshold_at_fmr")
    if raw.size == 0:
        raise ValueError("threshold_at_fmr: no impostor scores")
    s = np.sort(raw)
    n = s.size
    a = _max_false_matches(n, target)
    j = n - a  # s[j:] are the a highest scores
    if j < n:
        tau = s[j]
        first = int(np.searchsorted(s, tau, side="left"))
        if first >= j:
            return float(tau)
        above = int(np.searchsorted(s, tau, side="right"))  # a tie straddles the boundary: next value up
        if above < n:
            return float(s[above])
    return float(np.nextafter(s[-1], np.asarray(np.inf, dtype=s.dtype)))


def fnmr_fmr(genuine: np.ndarray | Sequence[float], impostor: np.ndarray | Sequence[float],
             tau: float) -> tuple[float, float]:
    """(FNMR, FMR) at ``tau``: genuine scores below tau, impostor scores at or above (NaN if empty)."""
    g, i = _scores(genuine, "fnmr_fmr genuine"), _scores(impostor, "fnmr_fmr impostor")
    fnmr = float(np.mean(g < tau)) if g.size else math.nan
    fmr = float(np.mean(i >= tau)) if i.size else math.nan
    return fnmr, fmr


def _pair(fmr_by_group: Rates, fnmr_by_group: Rates) -> tuple[np.ndarray, np.ndarray]:
    """Both rate vectors in the same group order; mappings must name the same groups."""
    if isinstance(fmr_by_group, Mapping) != isinstance(fnmr_by_group, Mapping):
        raise TypeError("give FMR and FNMR by group both as mappings or both as sequences")
    if isinstance(fmr_by_group, Mapping):
        if set(fmr_by_group) != set(fnmr_by_group):
            raise ValueError(f"FMR groups {sorted(map(str, fmr_by_group))} differ from FNMR groups "
                             f"{sorted(map(str, fnmr_by_group))}")
        keys = list(fmr_by_group)
        fmr = np.array([fmr_by_group[k] for k in keys], dtype=np.float64)
        fnmr = np.array([fnmr_by_group[k] for k in keys], dtype=np.float64)
    else:
        fmr, fnmr = np.asarray(fmr_by_group, dtype=np.float64), np.asarray(fnmr_by_group, dtype=np.float64)
    if fmr.ndim != 1 or fmr.shape != fnmr.shape or fmr.size == 0:
        raise ValueError(f"expected one FMR and one FNMR per group, got shapes {fmr.shape} and {fnmr.shape}")
    return fmr, fnmr


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


def fdr(fmr_by_group: Rates, fnmr_by_group: Rates, alpha: float = 0.5) -> float:
    """FDR = 1 - (alpha * max gap in FMR + (1 - alpha) * max gap in FNMR); 1 = equal rates."""
    _check_alpha(alpha)
    fmr, fnmr = _pair(fmr_by_group, fnmr_by_group)
    return float(1.0 - (alpha * (fmr.max() - fmr.min()) + (1 - alpha) * (fnmr.max() - fnmr.min())))


def gini(rates: np.ndarray | Sequence[float]) -> float:
    """Gini coefficient with the small-sample factor n / (n - 1), as GARBE uses it.

    All rates 0 (mean 0) gives 0: no group is worse off than another, which is the value the
    limit of equal rates has, rather than an undefined 0 / 0.
    """
    x = np.asarray(rates, dtype=np.float64).ravel()
    if x.size < 2:
        raise ValueError(f"a Gini coefficient over groups needs at least 2 groups, got {x.size}")
    if np.isnan(x).any():
        return math.nan
    mean = x.mean()
    if mean == 0:
        return 0.0
    n = x.size
    return float(n / (n - 1) * np.abs(x[:, None] - x[None, :]).sum() / (2 * n * n * mean))


def garbe(fmr_by_group: Rates, fnmr_by_group: Rates, alpha: float = 0.5) -> float:
    """GARBE = alpha * Gini(FMR) + (1 - alpha) * Gini(FNMR); 0 = equal rates."""
    _check_alpha(alpha)
    fmr, fnmr = _pair(fmr_by_group, fnmr_by_group)
    return float(alpha * gini(fmr) + (1 - alpha) * gini(fnmr))


def igarbe(fmr_by_group: Rates, fnmr_by_group: Rates, alpha: float = 0.5) -> float:
    """1 - GARBE, the MOTE paper's orientation (1 = equal rates)."""
    return 1.0 - garbe(fmr_by_group, fnmr_by_group, alpha)


def _ratio(x: np.ndarray) -> float:
    """max / min: 1 for equal rates (all zero included), inf when only the best group's rate is 0."""
    hi, lo = float(x.max()), float(x.min())
    if hi == lo:
        return 1.0
    return math.inf if lo == 0 else hi / lo


def inequity_rate(fmr_by_group: Rates, fnmr_by_group: Rates, alpha: float = 0.5) -> float:
    """IR = (max FMR / min FMR)^alpha * (max FNMR / min FNMR)^(1 - alpha); 1 = equal rates.

    A zero best rate against a non-zero worst one makes its ratio infinite, so IR is inf (unless
    that term's exponent is 0); equal rates, including all zero, give a ratio of 1.
    """
    _check_alpha(alpha)
    fmr, fnmr = _pair(fmr_by_group, fnmr_by_group)
    if np.isnan(fmr).any() or np.isnan(fnmr).any():
        return math.nan
    return float(_ratio(fmr) ** alpha * _ratio(fnmr) ** (1 - alpha))


def verification_report(genuine_scores: np.ndarray, genuine_group: np.ndarray, impostor_scores: np.ndarray,
                        impostor_group: np.ndarray, groups: Sequence[Hashable], target_fmr: float = 1e-3,
                        alpha: float = 0.5) -> dict[str, Any]:
    """ROC AUC, the global tau at ``target_fmr``, FNMR / FMR overall and per group, FDR, GARBE,
    iGARBE and IR.

    The group of a genuine pair is its identity's group; the group of an impostor pair is the
    group of its probe (the person presenting), so a group's FMR is how often that group's members
    are falsely accepted as someone else.
    """
    gen, imp = _scores(genuine_scores, "genuine"), _scores(impostor_scores, "impostor")
    gen_g, imp_g = np.asarray(genuine_group).ravel(), np.asarray(impostor_group).ravel()
    if gen_g.shape != gen.shape or imp_g.shape != imp.shape:
        raise ValueError(f"one group per score expected: genuine {gen.shape} vs {gen_g.shape}, "
                         f"impostor {imp.shape} vs {imp_g.shape}")
    if gen.size == 0:
        raise ValueError("verification_report: no genuine scores")
    tau = threshold_at_fmr(imp, target_fmr)
    fnmr, fmr = fnmr_fmr(gen, imp, tau)
    per_group: dict[Hashable, dict[str, float]] = {}
    for g in groups:
        g_fnmr, g_fmr = fnmr_fmr(gen[gen_g == g], imp[imp_g == g], tau)
        per_group[g] = {"fnmr": g_fnmr, "fmr": g_fmr, "n_genuine": int((gen_g == g).sum()),
                        "n_impostor": int((imp_g == g).sum())}
    fmr_by = {g: r["fmr"] for g, r in per_group.items()}
    fnmr_by = {g: r["fnmr"] for g, r in per_group.items()}
    labels = np.concatenate([np.ones(gen.size), np.zeros(imp.size)])
    g_value = garbe(fmr_by, fnmr_by, alpha) if len(per_group) >= 2 else math.nan
    return {"target_fmr": target_fmr, "tau": tau, "auc": float(roc_auc_score(labels, np.concatenate([gen, imp]))),
            "fnmr": fnmr, "fmr": fmr, "n_genuine": int(gen.size), "n_impostor": int(imp.size), "groups": per_group,
            "alpha": alpha, "fdr": fdr(fmr_by, fnmr_by, alpha), "garbe": g_value, "igarbe": 1.0 - g_value,
            "ir": inequity_rate(fmr_by, fnmr_by, alpha)}
