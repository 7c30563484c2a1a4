"""Fairness interventions and metrics: hand-computed cases, properties and a toy end-to-end run.

The end-to-end tests train a linear model on synthetic tensors where one channel carries a noisy
label signal and another encodes the sensitive attribute, with the label correlated with that
attribute: plain training uses the attribute (high DEO); Fair Mixup and reweighting must not.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import confusion_matrix
from torch import nn

from common.evaluation.attribute_fairness import (
    attribute_report,
    bias_amplification,
    deo,
    group_rates,
)
from common.nn.face_model import FaceModel, ModelSpec
from common.train.fairness import FAIRNESS_METHODS, fair_mixup_penalty, reweight

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- metrics

def test_group_rates_hand_computed() -> None:
    # group 0: labels 1 1 0 0, preds 1 0 1 0 ; group 1: labels 1 1 1 0, preds 1 1 1 1 ; two unknowns ignored
    labels = np.array([1, 1, 0, 0, 1, 1, 1, 0, -1, 1])
    pred = np.array([1, 0, 1, 0, 1, 1, 1, 1, 1, 0])
    sens = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0, -1])
    rates = group_rates(pred, labels, sens)
    assert rates == {0: {"tpr": 0.5, "fpr": 0.5, "positive_rate": 0.5, "accuracy": 0.5, "n": 4},
                     1: {"tpr": 1.0, "fpr": 1.0, "positive_rate": 1.0, "accuracy": 0.75, "n": 4}}
    d = deo(pred, labels, sens)
    assert d == pytest.approx({"deo_sum": 1.0, "deo_max": 0.5, "dtpr": 0.5, "dfpr": 0.5})


def test_deo_sum_and_max_differ() -> None:
    # group 0: TPR 2/3, FPR 0 ; group 1: TPR 1/3, FPR 1/2  ->  dtpr 1/3, dfpr 1/2
    labels = np.array([1, 1, 1, 0, 0, 1, 1, 1, 0, 0])
    pred = np.array([1, 1, 0, 0, 0, 1, 0, 0, 1, 0])
    sens = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    d = deo(pred, labels, sens)
    assert d["dtpr"] == pytest.approx(1 / 3)
    assert d["dfpr"] == pytest.approx(1 / 2)
    assert d["deo_sum"] == pytest.approx(5 / 6)
    assert d["deo_max"] == pytest.approx(1 / 2)


def test_deo_undefined_rates_are_nan() -> None:
    # group 0 has no negatives: its FPR, and so DEO, is undefined; TPR gap is still reported
    labels = np.array([1, 1, 1, 0])
    pred = np.array([1, 0, 1, 1])
    sens = np.array([0, 0, 1, 1])
    rates = group_rates(pred, labels, sens)
    assert math.isnan(rates[0]["fpr"]) and rates[1]["fpr"] == 1.0
    d = deo(pred, labels, sens)
    assert d["dtpr"] == pytest.approx(0.5)
    assert all(math.isnan(d[k]) for k in ("dfpr", "deo_sum", "deo_max"))
    # a single group: no gap to measure
    assert math.isnan(deo(pred, labels, np.zeros(4, int))["deo_sum"])


def _fairlearn_equalized_odds_difference(y: np.ndarray, p: np.ndarray, s: np.ndarray) -> float:
    """fairlearn.metrics.equalized_odds_difference (method='between_groups'), re-derived independently."""
    tprs, fprs = [], []
    for g in np.unique(s):
        tn, fp, fn, tp = confusion_matrix(y[s == g], p[s == g], labels=[0, 1]).ravel()
        tprs.append(tp / (tp + fn))
        fprs.append(fp / (fp + tn))
    return max(max(tprs) - min(tprs), max(fprs) - min(fprs))


@settings(max_examples=60, deadline=None)
@given(groups=st.integers(2, 3), base_pred=st.lists(st.integers(0, 1), min_size=6, max_size=6),
       data=st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1), st.integers(0, 2)), max_size=80))
def test_deo_max_matches_fairlearn_definition(groups: int, base_pred: list[int],
                                              data: list[tuple[int, int, int]]) -> None:
    # base rows give every group a positive and a negative, so every rate is defined
    base = [(label, pred, g) for (label, g), pred in zip([(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)], base_pred)]
    y, p, s = (np.array(col) for col in zip(*(base[:2 * groups] + data)))
    s = s % groups
    d = deo(p, y, s)
    assert d["deo_max"] == pytest.approx(_fairlearn_equalized_odds_difference(y, p, s))
    assert d["deo_sum"] == pytest.approx(d["dtpr"] + d["dfpr"])


def test_bias_amplification_zero_when_predictions_reproduce_training_bias() -> None:
    rng = np.random.default_rng(0)
    s = rng.integers(0, 2, 500)
    y = (rng.random(500) < np.where(s == 1, 0.7, 0.3)).astype(int)
    assert bias_amplification(y, s, y, s) == 0.0
    # a different evaluated set with the same (s, t) cell proportions also gives 0
    assert bias_amplification(y, s, np.tile(y, 3), np.tile(s, 3)) == pytest.approx(0.0, abs=1e-12)


def test_bias_amplification_hand_computed() -> None:
    # training: t=1 -> 6 male, 2 female (b*(1,1)=0.75); t=0 -> 3 male, 5 female (b*(0,0)=0.625)
    train_y = np.array([1] * 8 + [0] * 8)
    train_s = np.array([1] * 6 + [0] * 2 + [1] * 3 + [0] * 5)
    # predictions: t=1 -> 8 male, 2 female (b~=0.8); t=0 -> 2 male, 6 female (b~=0.75); unknown s ignored
    pred = np.array([1] * 10 + [0] * 8 + [1, 0])
    sens = np.array([1] * 8 + [0] * 2 + [1] * 2 + [0] * 6 + [-1, -1])
    assert bias_amplification(train_y, train_s, pred, sens) == pytest.approx(((0.8 - 0.75) + (0.75 - 0.625)) / 2)
    # reversing the correlation in the predictions gives negative amplification
    assert bias_amplification(train_y, train_s, pred, 1 - sens.clip(0)) < 0
    # a task value never predicted: its predicted bias is undefined
    assert math.isnan(bias_amplification(train_y, train_s, np.ones(4, int), np.array([0, 1, 0, 1])))


def test_attribute_report_keys_and_values() -> None:
    labels = np.array([1, 1, 0, 0, 1, 1, 1, 0, -1])
    prob = np.array([0.9, 0.2, 0.6, 0.1, 0.7, 0.8, 0.5, 0.55, 0.9])
    sens = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    r = attribute_report(prob, labels, sens, train_labels=labels, train_sensitive=sens)
    assert r["accuracy"] == pytest.approx(5 / 8)
    assert r["balanced_accuracy"] == pytest.approx((4 / 5 + 1 / 3) / 2)
    assert r["accuracy_s0"] == 0.5 and r["accuracy_s1"] == 0.75
    assert r["tpr_s1"] == 1.0 and r["fpr_s1"] == 1.0 and r["n_s0"] == 4
    assert r["deo_sum"] == pytest.approx(1.0) and r["deo_max"] == pytest.approx(0.5)
    expected_ba = bias_amplification(labels, sens, (prob >= 0.5).astype(int), sens)
    assert r["bias_amplification"] == pytest.approx(expected_ba)
    assert attribute_report(prob, labels, sens, labels, sens, threshold=0.85)["accuracy"] == pytest.approx(4 / 8)


# ----------------------------------------------------------------------------- reweighting

def test_reweight_hand_computed() -> None:
    # P(s=0)=3/4, P(y=1)=1/2; cells (0,1): 1/2, (0,0): 1/4, (1,0): 1/4, (1,1) empty
    w = reweight(np.array([0, 0, 0, 1, -1, 1]), np.array([1, 1, 0, 0, 1, -1]))
    raw = np.array([0.75, 0.75, 1.5, 0.5])
    assert w[:4] == pytest.approx(raw / raw.mean())
    assert w[4:] == pytest.approx([1.0, 1.0])
    assert reweight(np.array([-1, -1]), np.array([0, 1])) == pytest.approx([1.0, 1.0])


@settings(max_examples=60, deadline=None)
@given(cells=st.lists(st.tuples(st.integers(-1, 2), st.integers(-1, 1)), min_size=1, max_size=200))
def test_reweight_makes_label_independent_of_sensitive(cells: list[tuple[int, int]]) -> None:
    s, y = (np.array(col) for col in zip(*cells))
    w = reweight(s, y)
    assert w.mean() == pytest.approx(1.0)
    assert (w > 0).all()
    assert (w[(s < 0) | (y < 0)] == 1.0).all()
    known = (s >= 0) & (y >= 0)
    s_vals, y_vals = np.unique(s[known]), np.unique(y[known])
    if not all(((s == a) & (y == b)).any() for a in s_vals for b in y_vals):
        return  # an empty cell's mass P(s)P(y) cannot be placed; only the mean is guaranteed then
    total = w[known].sum()
    for a in s_vals:
        for b in y_vals:
            mass = w[(s == a) & (y == b)].sum() / total
            assert mass == pytest.approx(np.mean(s[known] == a) * np.mean(y[known] == b))


def test_fairness_methods_listed() -> None:
    assert FAIRNESS_METHODS == ("none", "reweight", "fair_mixup")


# ----------------------------------------------------------------------------- Fair Mixup penalty

class Linear(nn.Module):
    """FaceModel-shaped linear classifier: (flattened input, attribute logit)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = x.flatten(1)
        return f, self.fc(f).squeeze(1)


class AffineScore(nn.Module):
    """sigmoid(logit) = 0.5 + a * mean(channel 1): the path derivative is exactly a * mean(x0 - x1)."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, torch.logit(0.5 + self.a * x[:, 1].mean(dim=(1, 2)))


class ConstantLogit(nn.Module):
    """Ignores its input."""

    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Parameter(torch.tensor(0.3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, self.b.expand(x.shape[0])


def toy(n: int, seed: int, label_signal: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, y, s): P(y=1|s=1)=0.8, P(y=1|s=0)=0.2; channel 0 = noisy label, channel 1 = sensitive (+-1)."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.rand(n, generator=g) < 0.5).long()
    y = (torch.rand(n, generator=g) < torch.where(s == 1, 0.8, 0.2)).long()
    x = torch.randn(n, 3, 2, 2, generator=g) * 0.3
    x[:, 0] += ((2 * y - 1) * label_signal + torch.randn(n, generator=g)).view(n, 1, 1)
    x[:, 1] += (2 * s - 1).view(n, 1, 1).float()
    return x, y, s


def test_penalty_exact_value_and_gradient() -> None:
    n = 12
    s = torch.tensor([0, 1] * (n // 2))
    y = torch.tensor([0, 0, 1, 1] * (n // 4))
    x = torch.zeros(n, 3, 2, 2)
    x[:, 1] = (2 * s - 1).view(n, 1, 1).float()  # x0 - x1 = -2 on channel 1 for every pair
    model = AffineScore(0.1)
    eo = fair_mixup_penalty(model, x, y, s, torch.Generator().manual_seed(0), mode="eo")
    assert eo.item() == pytest.approx(2 * 0.1 * 2, rel=1e-5)  # two classes, |0.1 * -2| each
    (grad,) = torch.autograd.grad(eo, model.a)
    assert grad.item() == pytest.approx(4.0, rel=1e-4)
    dp = fair_mixup_penalty(model, x, y, s, torch.Generator().manual_seed(0), mode="dp")
    assert dp.item() == pytest.approx(0.2, rel=1e-5)


def test_penalty_zero_for_constant_models() -> None:
    x, y, s = toy(64, 0)
    flat = Linear(12)
    nn.init.zeros_(flat.fc.weight)
    for model in (flat, ConstantLogit()):
        assert fair_mixup_penalty(model, x, y, s, torch.Generator().manual_seed(0)).item() == 0.0


def test_penalty_positive_and_trains_a_sensitive_dependent_model() -> None:
    x, y, s = toy(64, 0)
    model = Linear(12)
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.weight.view(3, 2, 2)[1] = 0.5  # the logit reads the sensitive channel
    penalty = fair_mixup_penalty(model, x, y, s, torch.Generator().manual_seed(0))
    assert penalty.item() > 0.1 and penalty.requires_grad
    penalty.backward()
    # the gradient pushes the sensitive channel's weights down, and a step lowers the penalty
    assert model.fc.weight.grad.view(3, 2, 2)[1].sum() > 0
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    assert fair_mixup_penalty(model, x, y, s, torch.Generator().manual_seed(0)).item() < penalty.item()


def test_penalty_deterministic_for_seeded_generator() -> None:
    x, y, s = toy(50, 1)
    model = Linear(12)
    a, b, c = (fair_mixup_penalty(model, x, y, s, torch.Generator().manual_seed(k)) for k in (7, 7, 8))
    assert a.item() == b.item()
    assert a.item() != c.item()


def test_penalty_missing_groups_and_unknowns() -> None:
    x, y, s = toy(40, 2)
    model = Linear(12)
    only_one_group = fair_mixup_penalty(model, x, y, torch.zeros_like(s), torch.Generator().manual_seed(0))
    assert only_one_group.item() == 0.0 and only_one_group.shape == ()
    # class 1 lacks group 1 -> only class 0 contributes, the same as masking class 1 out as unknown
    s_cut = torch.where(y == 1, 0, s)
    y_unknown = torch.where(y == 1, -1, y)
    a = fair_mixup_penalty(model, x, y, s_cut, torch.Generator().manual_seed(3))
    b = fair_mixup_penalty(model, x, y_unknown, s, torch.Generator().manual_seed(3))
    assert a.item() > 0 and a.item() == pytest.approx(b.item())
    with pytest.raises(ValueError, match="mode"):
        fair_mixup_penalty(model, x, y, s, torch.Generator(), mode="eop")


def test_penalty_backpropagates_through_face_model() -> None:
    torch.manual_seed(0)
    model = FaceModel(ModelSpec(width=4, blocks=(1,), embedding_dim=8, image_size=16))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 16, 16, generator=g) * 2 - 1
    y = torch.tensor([0, 1] * 4)
    s = torch.tensor([0, 0, 1, 1] * 2)
    penalty = fair_mixup_penalty(model, x, y, s, g)
    penalty.backward()
    stem = model.backbone.stem[0].weight.grad
    assert penalty.item() > 0 and stem is not None and stem.abs().sum() > 0


# ----------------------------------------------------------------------------- end to end

def _train(seed: int, *, lam: float = 0.0, weighted: bool = False) -> dict[str, float]:
    """Train the linear model on the biased toy data; report on a fresh biased test set."""
    torch.manual_seed(seed)
    x, y, s = toy(2000, seed)
    w = torch.as_tensor(reweight(s.numpy(), y.numpy()), dtype=torch.float32) if weighted else torch.ones(len(y))
    model = Linear(12)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(300):
        i = torch.randint(len(y), (256,), generator=g)
        loss = (F.binary_cross_entropy_with_logits(model(x[i])[1], y[i].float(), reduction="none") * w[i]).mean()
        if lam:
            loss = loss + lam * fair_mixup_penalty(model, x[i], y[i], s[i], g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    xt, yt, st_ = toy(4000, seed + 100)
    with torch.no_grad():
        prob = torch.sigmoid(model(xt)[1]).numpy()
    return attribute_report(prob, yt.numpy(), st_.numpy(), y.numpy(), s.numpy())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fair_mixup_and_reweight_reduce_deo_on_biased_toy_data(seed: int) -> None:
    biased = _train(seed)
    assert biased["deo_sum"] > 0.4 and biased["accuracy"] > 0.85
    for fair in (_train(seed, lam=2.0), _train(seed, weighted=True)):
        assert fair["deo_sum"] < 0.5 * biased["deo_sum"]
        assert fair["deo_max"] < 0.5 * biased["deo_max"]
        assert fair["bias_amplification"] < biased["bias_amplification"]
        assert fair["accuracy"] > 0.75
