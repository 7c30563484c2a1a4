"""Fairness interventions that turn a biased attribute classifier into a fair one.

FD-MIA needs pairs of models that differ only by the intervention: a biased model trained on the
imbalanced data (``none``) and a fair model trained on the same data with ``reweight``
(pre-processing weights for the per-sample loss) or ``fair_mixup`` (an in-processing penalty).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from common.data.dataset import FaceDataset

FAIRNESS_METHODS: tuple[str, ...] = ("none", "reweight", "fair_mixup")
FAIR_MIXUP_MODES: tuple[str, ...] = ("eo", "dp")
SENSITIVE_ATTRIBUTES: tuple[str, ...] = ("gender", "group")


def reweight(sensitive: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-sample loss weights that make the label independent of the sensitive attribute.

    Kamiran & Calders (2012), "Data preprocessing techniques for classification without
    discrimination": w(s, y) = P(s) P(y) / P(s, y), frequencies taken over the samples whose
    sensitive value and label are both known. Under these weights every (s, y) cell carries mass
    P(s) P(y), so a weighted loss no longer rewards predicting y from s.

    Samples with an unknown (-1) sensitive value or label get weight 1 (nothing to correct).
    The known samples' weights are rescaled to mean 1, which keeps the loss scale (and so the
    learning rate) unchanged; the rescaling matters only when a cell is empty (its mass
    P(s) P(y) cannot be placed, so the raw weights sum to less than the sample count).
    """
    sensitive = np.asarray(sensitive)
    labels = np.asarray(labels)
    if sensitive.shape != labels.shape or sensitive.ndim != 1:
        raise ValueError(f"reweight: sensitive {sensitive.shape} and labels {labels.shape} must be equal 1-d shapes")
    weights = np.ones(labels.size, dtype=np.float64)
    known = (sensitive >= 0) & (labels >= 0)
    if not known.any():
        return weights
    s_index = np.unique(sensitive[known], return_inverse=True)[1]
    y_index = np.unique(labels[known], return_inverse=True)[1]
    joint = cell_counts(s_index, y_index, int(s_index.max()) + 1, int(y_index.max()) + 1)
    w = kamiran_calders(joint)[s_index, y_index]  # every sample's own cell is non-empty
    weights[known] = w / w.mean()
    return weights


def kamiran_calders(counts: np.ndarray) -> np.ndarray:
    """The weight P(s) P(y) / P(s, y) of every (s, y) cell of a count table (inf where a cell is empty)."""
    p = np.asarray(counts, dtype=np.float64) / np.sum(counts)
    with np.errstate(divide="ignore"):
        return p.sum(axis=1, keepdims=True) * p.sum(axis=0, keepdims=True) / p


def cell_counts(sensitive: np.ndarray, labels: np.ndarray, n_sensitive: int, n_labels: int = 2) -> np.ndarray:
    """Counts of the samples in each (sensitive value, label) cell, over the fixed public domain
    0..n_sensitive-1 x 0..n_labels-1 (samples with an unknown value are not counted)."""
    s, y = np.asarray(sensitive), np.asarray(labels)
    known = (s >= 0) & (s < n_sensitive) & (y >= 0) & (y < n_labels)
    counts = np.zeros((n_sensitive, n_labels))
    np.add.at(counts, (s[known], y[known]), 1.0)
    return counts


def noisy_cell_counts(sensitive: np.ndarray, labels: np.ndarray, n_sensitive: int, sigma: float,
                      rng: np.random.Generator) -> np.ndarray:
    """``cell_counts`` plus Gaussian noise of standard deviation ``sigma`` in every cell: the
    Gaussian mechanism on a histogram, whose L2 sensitivity to adding or removing one sample is 1,
    so it costs one step at sampling rate 1 and noise multiplier ``sigma`` in an RDP accountant."""
    counts = cell_counts(sensitive, labels, n_sensitive)
    return counts + rng.normal(0.0, sigma, counts.shape)


def weights_from_counts(sensitive: np.ndarray, labels: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Kamiran-Calders weights w(s, y) = P(s) P(y) / P(s, y) with the frequencies taken from
    ``counts`` (e.g. a noisy histogram, clipped to >= 1 per cell) instead of from the samples.

    Every weight is then a function of the sample's own (s, y) and of ``counts`` only: adding
    or removing one sample leaves every other sample's weight unchanged, so DP-SGD's per-sample
    sensitivity argument holds, and the histogram's own cost is accounted where it was released.
    Under ``counts`` the weights have mean 1 (sum over cells of P(s) P(y) = 1). Samples with an
    unknown value, or a value outside the counted domain, get weight 1.
    """
    s, y = np.asarray(sensitive), np.asarray(labels)
    cell = kamiran_calders(np.clip(np.asarray(counts, dtype=np.float64), 1.0, None))
    weights = np.ones(s.size, dtype=np.float64)
    known = (s >= 0) & (s < cell.shape[0]) & (y >= 0) & (y < cell.shape[1])
    weights[known] = cell[s[known], y[known]]
    return weights


def weight_bound(counts: np.ndarray) -> float:
    """The largest weight ``weights_from_counts`` can give any sample under ``counts``: the
    largest cell weight, or 1 (an unknown value). Under DP-SGD the weights scale each sample's
    clipped gradient and so must stay <= 1 (the sensitivity stays the clipping norm); dividing
    by this bound does that without reading the samples: the bound is a function of the released
    histogram over the fixed domain of cells, not of which cells the samples occupy."""
    cell = kamiran_calders(np.clip(np.asarray(counts, dtype=np.float64), 1.0, None))
    return float(max(1.0, cell.max()))


def fair_mixup_penalty(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: torch.Tensor,
                       generator: torch.Generator, mode: str = "eo") -> torch.Tensor:
    """Fair Mixup smoothness penalty on the path between the two sensitive groups.

    Chuang & Mroueh, "Fair Mixup: Fairness via Interpolation", ICLR 2021. The demographic parity
    gap |E[f(x0)] - E[f(x1)]| is bounded by the integral over t in [0, 1] of
    |d/dt E[f(t x0 + (1 - t) x1)]|; penalising that derivative regularises the whole path between
    the groups instead of just its end points. Here f(x) = sigmoid(attribute logit) with the logit
    ``model(x)[1]``, and the integral is estimated with one t ~ U(0, 1) per call:

    * ``mode="dp"`` (demographic parity): pair the samples with s = 0 and s = 1 of the batch;
    * ``mode="eo"`` (equalized odds): do the same within each label class y and sum the classes.

    Each group of a pair is drawn with replacement to the larger group's count, and t is drawn
    after the pairing, all from ``generator``. The derivative is taken by autograd through t with
    ``create_graph=True``, so the returned penalty back-propagates into the model; the caller
    minimises ``mean loss + lam * penalty``. Samples with s outside {0, 1} (unknown -1), and for
    ``eo`` those with an unknown label, take no part; a class lacking one of the groups contributes nothing, and with no usable class the
    result is a constant 0-d zero tensor (no gradient).

    The penalty couples samples across the batch (group means), so it is not a per-sample loss:
    it cannot be combined with DP-SGD's per-sample gradient clipping.
    """
    if mode not in FAIR_MIXUP_MODES:
        raise ValueError(f"fair_mixup_penalty: mode must be one of {FAIR_MIXUP_MODES}, got {mode!r}")
    classes = [y == c for c in torch.unique(y[y >= 0])] if mode == "eo" else [torch.ones_like(s, dtype=torch.bool)]
    penalty = torch.zeros((), dtype=x.dtype, device=x.device)
    for in_class in classes:
        idx0 = torch.nonzero(in_class & (s == 0)).flatten()
        idx1 = torch.nonzero(in_class & (s == 1)).flatten()
        if idx0.numel() == 0 or idx1.numel() == 0:
            continue
        m = max(idx0.numel(), idx1.numel())
        x0 = x[idx0[torch.randint(idx0.numel(), (m,), generator=generator).to(idx0.device)]]
        x1 = x[idx1[torch.randint(idx1.numel(), (m,), generator=generator).to(idx1.device)]]
        t = torch.rand((), generator=generator).to(device=x.device, dtype=x.dtype).requires_grad_(True)
        mean_score = torch.sigmoid(model(t * x0 + (1 - t) * x1)[1]).mean()
        (d_dt,) = torch.autograd.grad(mean_score, t, create_graph=True, allow_unused=True, materialize_grads=True)
        penalty = penalty + d_dt.abs()
    return penalty


def sensitive_attribute(ds: FaceDataset, name: str) -> np.ndarray:
    """The per-sample sensitive attribute a fairness intervention or metric refers to."""
    return ds.gender if name == "gender" else ds.group
