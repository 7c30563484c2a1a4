"""Fairness metrics of a binary attribute classifier: group rates, DEO and bias amplification.

All rates are fractions in [0, 1]. Samples whose label or sensitive value is unknown (-1) are
left out. A rate that is undefined for a group (TPR of a group without positives, FPR of a group
without negatives) is NaN, and every gap built on it is NaN too: a "fairness" number computed from
an empty cell would be meaningless, and crashing would lose the rest of the report.
"""

from __future__ import annotations

import numpy as np

from common.evaluation.verification import binary_accuracy


def _rate(hits: np.ndarray) -> float:
    """Mean of a boolean array, NaN when it is empty."""
    return float(hits.mean()) if hits.size else float("nan")


def group_rates(pred: np.ndarray, labels: np.ndarray, sensitive: np.ndarray) -> dict[int, dict[str, float]]:
    """Per sensitive group: tpr, fpr, positive_rate, accuracy and n (known samples only).

    ``pred`` holds hard 0/1 decisions. Groups are the known (>= 0) sensitive values present.
    """
    pred, labels, sensitive = (np.asarray(a) for a in (pred, labels, sensitive))
    known = (labels >= 0) & (sensitive >= 0)
    pred, labels, sensitive = pred[known] == 1, labels[known] == 1, sensitive[known]
    out: dict[int, dict[str, float]] = {}
    for g in np.unique(sensitive):
        p, y = pred[sensitive == g], labels[sensitive == g]
        out[int(g)] = {"tpr": _rate(p[y]), "fpr": _rate(p[~y]), "positive_rate": _rate(p),
                       "accuracy": _rate(p == y), "n": int(y.size)}
    return out


def _gap(values: list[float]) -> float:
    """max - min over groups; NaN if any is NaN or fewer than two groups exist."""
    if len(values) < 2 or np.isnan(values).any():
        return float("nan")
    return float(max(values) - min(values))


def deo(pred: np.ndarray, labels: np.ndarray, sensitive: np.ndarray) -> dict[str, float]:
    """Disparity of equalized odds (Hardt et al., 2016) between the sensitive groups.

    dtpr = max_g TPR_g - min_g TPR_g and dfpr likewise (for two groups: |TPR_1 - TPR_0| and
    |FPR_1 - FPR_0|). Two aggregates, always name which one a table shows:

    * ``deo_sum`` = dtpr + dfpr: this project's DEO (METHODS.md);
    * ``deo_max`` = max(dtpr, dfpr): fairlearn's ``equalized_odds_difference``.

    NaN when fewer than two groups are present or a group lacks positives or negatives.
    """
    rates = group_rates(pred, labels, sensitive).values()
    dtpr = _gap([r["tpr"] for r in rates])
    dfpr = _gap([r["fpr"] for r in rates])
    return {"deo_sum": dtpr + dfpr, "deo_max": float(np.max([dtpr, dfpr])), "dtpr": dtpr, "dfpr": dfpr}


def _bias(task: np.ndarray, sensitive: np.ndarray, t: int, s_values: np.ndarray) -> np.ndarray:
    """b(s, t) = P(sensitive = s | task = t) for each s of ``s_values`` (NaN if t never occurs)."""
    in_t = sensitive[task == t]
    return np.array([_rate(in_t == s) for s in s_values])


def bias_amplification(train_labels: np.ndarray, train_sensitive: np.ndarray,
                       pred: np.ndarray, sensitive: np.ndarray) -> float:
    """Bias amplification of Zhao et al., "Men Also Like Shopping" (EMNLP 2017).

    With task values T (here the binary labels) and sensitive values S, the bias of the training
    annotations towards s for task value t is b*(s, t) = P(s | t) over the training set, and the
    predicted bias b~(s, t) = P(s | predicted t) over the evaluated samples (``pred`` against
    their true ``sensitive`` values). Then

        BA = 1/|T| * sum over (s, t) with b*(s, t) > 1/|S| of (b~(s, t) - b*(s, t)),

    with T and S the known values present in training. For a binary sensitive attribute each t
    has at most one such cell, so this is the mean over those cells unless some t is exactly
    balanced in training (its term is then 0, as in the paper). Positive = the model amplifies
    the training correlation, 0 = it reproduces it, negative = it weakens it. NaN if a task value
    with a biased cell is never predicted (its b~ is undefined).
    """
    train_labels, train_sensitive = np.asarray(train_labels), np.asarray(train_sensitive)
    pred, sensitive = np.asarray(pred), np.asarray(sensitive)
    known_train = (train_labels >= 0) & (train_sensitive >= 0)
    train_labels, train_sensitive = train_labels[known_train], train_sensitive[known_train]
    known = sensitive >= 0
    pred, sensitive = pred[known], sensitive[known]
    t_values, s_values = np.unique(train_labels), np.unique(train_sensitive)
    if t_values.size == 0:
        return float("nan")
    total = 0.0
    for t in t_values:
        b_train = _bias(train_labels, train_sensitive, t, s_values)
        biased = b_train > 1.0 / s_values.size
        total += float(np.sum(_bias(pred, sensitive, t, s_values)[biased] - b_train[biased]))
    return total / t_values.size


def attribute_report(prob: np.ndarray, labels: np.ndarray, sensitive: np.ndarray, train_labels: np.ndarray,
                     train_sensitive: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy and fairness of attribute probabilities, thresholded at ``threshold``.

    Keys: accuracy and balanced_accuracy (all samples with a known label, whatever their
    sensitive value), deo_sum, deo_max, dtpr, dfpr, bias_amplification (see ``deo`` and
    ``bias_amplification``) and per group g: accuracy_s{g}, tpr_s{g}, fpr_s{g},
    positive_rate_s{g}, n_s{g}.
    """
    prob, labels, sensitive = (np.asarray(a) for a in (prob, labels, sensitive))
    pred = (prob >= threshold).astype(np.int64)
    known = labels >= 0
    recalls = [np.mean(pred[known & (labels == c)] == c) for c in np.unique(labels[known])]
    report = {"accuracy": binary_accuracy(prob, labels, threshold), "balanced_accuracy": float(np.mean(recalls))}
    report.update(deo(pred, labels, sensitive))
    report["bias_amplification"] = bias_amplification(train_labels, train_sensitive, pred, sensitive)
    for g, rates in group_rates(pred, labels, sensitive).items():
        report.update({f"{key}_s{g}": float(value) for key, value in rates.items()})
    return report
