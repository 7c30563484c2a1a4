"""Empirical (audited) lower bounds on epsilon from membership-inference results.

A DP guarantee is an upper bound on leakage; an attack that succeeds "too well" proves a *lower*
bound: no (eps, delta) with a smaller eps can hold. Every bound here is a statistical statement,
valid with probability at least ``confidence`` over the randomness of the experiment, and every
data-dependent choice (which threshold, which number of guesses) is paid for with a Bonferroni
correction so the reported maximum keeps that guarantee.

Two estimators are provided:

* :func:`roc_epsilon_lower_bound`: the ROC/threshold audit of Jagielski, Ullman & Oprea 2020
  ("Auditing differentially private machine learning: how private is private SGD?") and Nasr et
  al. 2021 ("Adversary instantiation: lower bounds for differentially private machine
  learning"), with Clopper-Pearson intervals on TPR and FPR. It needs independent trials (one
  member/nonmember example per trained model, or examples whose scores are independent).
* :func:`one_run_epsilon_lower_bound` / :func:`one_run_audit`: Steinke, Nasr & Jagielski 2023
  ("Privacy auditing with one (1) training run", arXiv:2305.08846), where m canaries are each
  included independently with probability 1/2 in a single run; its analysis tolerates the
  dependence between canaries that a single run creates.

Convention (as in :mod:`attacks.metrics`): a higher score means "more likely a member", and a
threshold ``t`` admits every sample with ``score >= t``. Pure numpy/scipy, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.special import expit
from scipy.stats import beta as beta_dist
from scipy.stats import binom

_EPS_MAX = 50.0  # upper end of the bisection for the one-run bound (e^50 is "no privacy" anyway)
_EPS_TOL = 1e-6  # bisection tolerance on epsilon
_MIN_GUESSES = 10  # smallest guess count in the default abstention grid of one_run_audit
_TIE_SEED = 20230515  # fixed seed of the label-independent tie-breaking order in one_run_audit


# ----------------------------------------------------------------------------- Clopper-Pearson


def _check_confidence(confidence: float) -> float:
    c = float(confidence)
    if not 0.0 < c < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return c


def _check_delta(delta: float) -> float:
    d = float(delta)
    if not 0.0 <= d < 1.0:
        raise ValueError(f"delta must be in [0, 1), got {delta!r}")
    return d


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    return int(value)


def cp_lower(k: Any, n: Any, alpha: float) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound: P(p < lower) <= alpha; 0 where k == 0 (vectorised)."""
    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    safe_k = np.where(k > 0, k, 1.0)
    return np.where(k > 0, beta_dist.ppf(alpha, safe_k, n - safe_k + 1.0), 0.0)


def cp_upper(k: Any, n: Any, alpha: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper bound: P(p > upper) <= alpha; 1 where k == n (vectorised)."""
    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    safe_k = np.where(k < n, k, n - 1.0)
    return np.where(k < n, beta_dist.ppf(1.0 - alpha, safe_k + 1.0, n - safe_k), 1.0)


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided Clopper-Pearson interval for a binomial proportion (k successes in n trials).

    Exact rather than a normal approximation because audits live in the tails (FPR near 0, TPR near
    1) where the Wald interval under-covers; an over-optimistic interval would overstate epsilon.
    """
    k = _check_count("k", k)
    n = _check_count("n", n)
    confidence = _check_confidence(confidence)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, n] = [0, {n}], got {k}")
    half = (1.0 - confidence) / 2.0
    return float(cp_lower(k, n, half)), float(cp_upper(k, n, half))


# ----------------------------------------------------------------------------- result record


@dataclass(frozen=True)
class EpsilonBound:
    """An audited lower bound on epsilon and what it rests on.

    ``epsilon`` >= 0 holds with probability >= ``confidence``: the audited mechanism is *not*
    (eps', delta)-DP for any eps' < epsilon. Fields that do not apply to a method are None.
    """

    epsilon: float
    delta: float
    confidence: float
    method: str
    n_members: int
    n_nonmembers: int
    # ROC/threshold audit
    threshold: float | None = None
    tpr: float | None = None
    fpr: float | None = None
    tpr_lower: float | None = None
    fpr_upper: float | None = None
    thresholds_tested: int | None = None
    # one-run audit
    canaries: int | None = None
    guesses: int | None = None
    correct: int | None = None
    levels_tested: int | None = None

    def to_dict(self) -> dict[str, float | int | str | None]:
        """JSON-ready dict (plain Python floats/ints/strings, None for fields that do not apply)."""
        out: dict[str, float | int | str | None] = {}
        for key, value in asdict(self).items():
            if isinstance(value, bool | np.bool_):
                out[key] = bool(value)
            elif isinstance(value, int | np.integer):
                out[key] = int(value)
            elif isinstance(value, float | np.floating):
                out[key] = float(value)
            else:
                out[key] = value
        return out


# ----------------------------------------------------------------------------- ROC audit


def _check_scores(scores: Any, labels: Any, label_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate (scores, boolean labels): 1-D, same length, finite, labels 0/1, both classes present."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {s.shape}")
    if y.ndim != 1:
        raise ValueError(f"{label_name} must be 1-D, got shape {y.shape}")
    if s.shape != y.shape:
        raise ValueError(f"scores and {label_name} differ in length: {s.size} vs {y.size}")
    if s.size == 0:
        raise ValueError("scores is empty")
    if not np.isfinite(s).all():
        raise ValueError(f"scores must be finite; {int((~np.isfinite(s)).sum())} are NaN or inf")
    if y.dtype != np.bool_:
        if not np.isin(y, (0, 1)).all():
            raise ValueError(f"{label_name} must be boolean (or 0/1)")
        y = y.astype(bool)
    if y.all() or not y.any():
        raise ValueError(f"{label_name} must contain both classes (True and False)")
    return s, y


def roc_epsilon_lower_bound(
    scores: Any,
    is_member: Any,
    delta: float,
    confidence: float = 0.95,
    max_thresholds: int = 100,
) -> EpsilonBound:
    """Lower bound on epsilon implied by a membership attack's ROC (Jagielski et al. 2020; Nasr et al. 2021).

    (eps, delta)-DP forces every threshold test to satisfy TPR <= e^eps FPR + delta and
    TNR <= e^eps FNR + delta, hence eps >= log((TPR - delta) / FPR) and eps >= log((1 - FPR - delta)
    / (1 - TPR)). Plugging in a one-sided Clopper-Pearson lower bound on TPR and upper bound on FPR
    makes each right-hand side a valid lower bound; the thresholds are a label-independent grid of
    pooled-score quantiles, and a Bonferroni correction over (thresholds x 2 one-sided bounds) makes
    the maximum over the grid hold jointly at ``confidence``. Scores must be independent trials.
    """
    s, member = _check_scores(scores, is_member, "is_member")
    delta = _check_delta(delta)
    confidence = _check_confidence(confidence)
    max_thresholds = _check_count("max_thresholds", max_thresholds)
    if max_thresholds < 1:
        raise ValueError(f"max_thresholds must be >= 1, got {max_thresholds}")

    # Label-independent grid: quantiles of the pooled scores, snapped to observed values; the
    # minimum admits everything (TPR = FPR = 1) and can never give a bound, so it is not spent on.
    probs = np.arange(1, max_thresholds + 1) / (max_thresholds + 1)
    grid = np.unique(np.quantile(s, probs, method="inverted_cdf"))
    grid = grid[grid > s.min()]
    if grid.size == 0:  # all scores equal: the attack carries no information
        grid = np.array([s.min()])
    n_thr = int(grid.size)
    alpha = (1.0 - confidence) / (2.0 * n_thr)

    pos = np.sort(s[member])
    neg = np.sort(s[~member])
    n_pos, n_neg = pos.size, neg.size
    tp = n_pos - np.searchsorted(pos, grid, side="left")  # count of member scores >= t
    fp = n_neg - np.searchsorted(neg, grid, side="left")
    tpr_lo = cp_lower(tp, n_pos, alpha)
    fpr_hi = cp_upper(fp, n_neg, alpha)  # > 0 always, and tpr_lo < 1 always: no division by zero

    with np.errstate(divide="ignore", invalid="ignore"):
        upper_eps = np.log(np.maximum(tpr_lo - delta, 0.0) / fpr_hi)
        lower_eps = np.log(np.maximum(1.0 - fpr_hi - delta, 0.0) / (1.0 - tpr_lo))
    eps_all = np.maximum(upper_eps, lower_eps)  # -inf where neither inequality is informative
    best = int(np.argmax(eps_all))
    epsilon = float(max(eps_all[best], 0.0))

    method = (
        f"ROC threshold audit (Jagielski et al. 2020; Nasr et al. 2021): eps = max over {n_thr} label-independent "
        f"pooled-score quantile thresholds of max(log((TPR_lo - delta)/FPR_hi), "
        f"log((1 - FPR_hi - delta)/(1 - TPR_lo))), "
        f"floored at 0, with one-sided Clopper-Pearson bounds each at level {alpha:.3g} (Bonferroni over {n_thr} "
        f"thresholds x 2 bounds) so the maximum holds jointly at confidence {confidence:g}."
    )
    return EpsilonBound(
        epsilon=epsilon,
        delta=delta,
        confidence=confidence,
        method=method,
        n_members=int(n_pos),
        n_nonmembers=int(n_neg),
        threshold=float(grid[best]),
        tpr=float(tp[best] / n_pos),
        fpr=float(fp[best] / n_neg),
        tpr_lower=float(tpr_lo[best]),
        fpr_upper=float(fpr_hi[best]),
        thresholds_tested=n_thr,
    )


# ----------------------------------------------------------------------------- one-run audit


def _one_run_p_value(canaries: int, guesses: int, correct: int, eps: float, delta: float) -> float:
    """Upper bound on P[>= ``correct`` right guesses] under (eps, delta)-DP (Steinke, Nasr & Jagielski 2023).

    With q = e^eps / (1 + e^eps) and f(v) = P[Binomial(guesses, q) >= v], their main theorem gives
    P[W >= v] <= f(v) + 2 m delta max_{i >= 1} (f(v - i) - f(v)) / i  (m = canaries). The delta term
    only needs i <= v because f(v - i) = 1 beyond that, so the ratio only decreases. delta = 0 is
    the plain binomial tail of eps-DP randomised response.
    """
    q = float(expit(eps))
    tail = float(binom.sf(correct - 1, guesses, q))  # f(v) = P[Bin >= v]
    if delta == 0.0 or correct == 0 or tail >= 1.0:
        return min(tail, 1.0)
    # window[i - 1] = f(v - i) - f(v) = P[v - i <= Bin <= v - 1]; summing pmfs avoids cancellation.
    pmf = binom.pmf(np.arange(correct - 1, -1, -1), guesses, q)
    window = np.cumsum(pmf)
    ratio = float(np.max(window / np.arange(1, correct + 1)))
    return min(tail + 2.0 * canaries * delta * ratio, 1.0)


def one_run_epsilon_lower_bound(
    canaries: int,
    guesses: int,
    correct: int,
    delta: float,
    confidence: float = 0.95,
) -> float:
    """Largest eps at which (eps, delta)-DP is rejected by ``correct`` right guesses out of ``guesses``.

    Steinke, Nasr & Jagielski 2023, arXiv:2305.08846: ``canaries`` (m) examples are each included
    independently with probability 1/2 in one run, and the auditor guesses in/out for ``guesses``
    of them (abstaining on the rest). Under (eps, delta)-DP the number of correct guesses is
    stochastically dominated as in :func:`_one_run_p_value`; we bisect on [0, 50] for the largest
    eps whose p-value is still <= 1 - confidence. Returns 0 when not even eps = 0 is rejected.
    """
    m = _check_count("canaries", canaries)
    r = _check_count("guesses", guesses)
    v = _check_count("correct", correct)
    delta = _check_delta(delta)
    confidence = _check_confidence(confidence)
    if m < 1:
        raise ValueError(f"canaries must be >= 1, got {m}")
    if not 0 <= r <= m:
        raise ValueError(f"guesses must be in [0, canaries] = [0, {m}], got {r}")
    if not 0 <= v <= r:
        raise ValueError(f"correct must be in [0, guesses] = [0, {r}], got {v}")
    significance = 1.0 - confidence
    if v == 0 or _one_run_p_value(m, r, v, 0.0, 0.0) > significance:
        return 0.0  # the delta term only adds, so delta > 0 cannot reject either

    def rejected(eps: float) -> bool:
        if _one_run_p_value(m, r, v, eps, 0.0) > significance:  # cheap: skip the delta term
            return False
        return _one_run_p_value(m, r, v, eps, delta) <= significance

    lo, hi = 0.0, _EPS_MAX
    if not rejected(lo):
        return 0.0
    if rejected(hi):
        return hi
    # Invariant: rejected(lo). Reporting lo is valid even if the p-value were not monotone in eps.
    while hi - lo > _EPS_TOL:
        mid = 0.5 * (lo + hi)
        if rejected(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _default_levels(m: int) -> list[int]:
    """Guess counts m, m/2, m/4, ... down to about 10 (all of m when m < 10)."""
    levels = [m]
    k = m // 2
    while k >= _MIN_GUESSES:
        levels.append(k)
        k //= 2
    return levels


def one_run_audit(
    scores: Any,
    included: Any,
    delta: float,
    confidence: float = 0.95,
    abstentions: Sequence[int] | None = None,
) -> EpsilonBound:
    """One-run audit (Steinke, Nasr & Jagielski 2023) of canaries scored after a single training run.

    ``included[i]`` must have been drawn as an independent fair coin before training; ``scores[i]``
    is the attack's membership score (higher = more likely included). For each guess count k in
    ``abstentions`` (default m, m/2, m/4, ... down to ~10) the auditor follows the paper's
    Algorithm 1 with k+ = ceil(k/2) top scores guessed IN and k- = floor(k/2) bottom scores guessed
    OUT (abstaining on the middle); the best bound over levels is reported, each level tested at
    confidence 1 - (1 - confidence) / levels (Bonferroni) so the maximum stays valid. Ties in the
    scores are broken by a fixed pseudo-random order, which cannot depend on ``included``.
    """
    s, inc = _check_scores(scores, included, "included")
    delta = _check_delta(delta)
    confidence = _check_confidence(confidence)
    m = int(s.size)
    if abstentions is None:
        levels = _default_levels(m)
    else:
        levels = sorted({_check_count("abstentions entry", k) for k in abstentions}, reverse=True)
        if not levels:
            raise ValueError("abstentions must name at least one guess count")
        bad = [k for k in levels if not 1 <= k <= m]
        if bad:
            raise ValueError(f"abstentions entries must be in [1, {m}] (number of canaries), got {bad}")
    n_levels = len(levels)
    level_confidence = 1.0 - (1.0 - confidence) / n_levels

    tie_break = np.random.default_rng(_TIE_SEED).random(m)
    order = np.lexsort((tie_break, s))  # ascending score, ties in a label-independent order
    inc_sorted = inc[order]
    # correct IN guesses among the top j and correct OUT guesses among the bottom j, for every j
    top_in = np.concatenate(([0], np.cumsum(inc_sorted[::-1])))
    bottom_out = np.concatenate(([0], np.cumsum(~inc_sorted)))

    best: tuple[float, int, int] | None = None
    for k in levels:
        k_plus = (k + 1) // 2
        k_minus = k // 2
        correct = int(top_in[k_plus] + bottom_out[k_minus])
        eps = one_run_epsilon_lower_bound(m, k, correct, delta, level_confidence)
        if best is None or eps > best[0]:
            best = (eps, k, correct)
    assert best is not None
    epsilon, guesses, correct = best

    method = (
        f"One-run audit (Steinke, Nasr & Jagielski 2023): best of {n_levels} guess levels (top ceil(k/2) scores "
        f"guessed IN, bottom floor(k/2) OUT), each bisecting for the largest eps whose (eps, delta) p-value "
        f"P[Bin(k, e^eps/(1+e^eps)) >= correct] + 2 m delta max_i P[correct - i <= Bin <= correct - 1]/i is "
        f"<= {(1.0 - confidence) / n_levels:.3g} (Bonferroni over {n_levels} levels, joint confidence {confidence:g})."
    )
    return EpsilonBound(
        epsilon=float(epsilon),
        delta=delta,
        confidence=confidence,
        method=method,
        n_members=int(inc.sum()),
        n_nonmembers=int(m - inc.sum()),
        canaries=m,
        guesses=int(guesses),
        correct=int(correct),
        levels_tested=n_levels,
    )


__all__ = [
    "EpsilonBound",
    "clopper_pearson",
    "cp_lower",
    "cp_upper",
    "one_run_audit",
    "one_run_epsilon_lower_bound",
    "roc_epsilon_lower_bound",
]
