"""Reweighting under DP-SGD with a valid sensitivity bound.

Kamiran-Calders weights computed from a client's whole data set make every sample's weight depend
on every other sample, which DP-SGD's per-sample argument does not cover. Under DP the weights come
from a noisy (sensitive value, label) histogram released once and charged to the client's ledger;
a weighted sample's gradient is still clipped to the norm. Real Opacus, tiny data.
"""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.rdp import RdpAccountant
from sim_runs import LEDGER_FULL

from client.local import local_train
from common.config import load_config
from common.data.dataset import FaceDataset
from common.nn.build import build_model, model_spec
from common.train.dp import spent_epsilon
from common.train.fairness import cell_counts, noisy_cell_counts, reweight, weight_bound, weights_from_counts
from common.train.local_round import ClientState
from common.train.loop import train

REWEIGHTED = (*LEDGER_FULL, "train.task=attribute", "fairness.method=reweight")


def test_released_counts_make_each_weight_independent_of_the_other_samples() -> None:
    rng = np.random.default_rng(0)
    s, y = rng.integers(-1, 2, 200), rng.integers(0, 2, 200)
    counts = noisy_cell_counts(s, y, 2, sigma=3.0, rng=rng)
    weights = weights_from_counts(s, y, counts)
    for j in (0, 17, 199):  # remove one sample: every other weight stays what it was
        np.testing.assert_array_equal(weights_from_counts(np.delete(s, j), np.delete(y, j), counts),
                                      np.delete(weights, j))
    assert (weights[s < 0] == 1).all()
    # With the exact histogram the weights are Kamiran-Calders' (mean 1 over the known samples).
    known = s >= 0
    np.testing.assert_allclose(weights_from_counts(s[known], y[known], cell_counts(s[known], y[known], 2)),
                               reweight(s[known], y[known]))


def _rdp(history: list[tuple[float, float, int]], delta: float) -> float:
    acc = RdpAccountant()
    for sigma, q, steps in history:
        event = dp_accounting.GaussianDpEvent(sigma)
        acc.compose(dp_accounting.SelfComposedDpEvent(event if q == 1 else dp_accounting.PoissonSampledDpEvent(q, event),
                                                      steps))
    return acc.get_epsilon(delta)


@pytest.mark.timeout(300)
def test_the_histogram_is_charged_once_and_the_noise_leaves_room_for_it() -> None:
    cfg = load_config(None, list(REWEIGHTED))
    global_state = build_model(model_spec(cfg), cfg.seed).state_dict()
    state = ClientState()
    for server_round in range(1, cfg.federation.rounds + 1):
        global_state, state, report = local_train(cfg, 1, server_round, global_state, state)
    sigma_h = cfg.fairness.histogram_noise
    assert state.dp_history[0] == (sigma_h, 1.0, 1)  # released once, at the first round
    assert sum(1 for entry in state.dp_history if entry[1] == 1.0) == 1
    assert state.reweight_counts is not None and '"reweighting"' in state.privacy_json()
    # The whole release (histogram + every DP-SGD step) stays within the target, and it is what
    # Google's dp_accounting says for the same events.
    eps = spent_epsilon("rdp", state.dp_history, cfg.dp.delta)
    assert cfg.dp.target_epsilon * 0.97 <= eps <= cfg.dp.target_epsilon * 1.001
    assert eps == pytest.approx(_rdp(state.dp_history, cfg.dp.delta), rel=1e-3)
    assert report["epsilon"] == pytest.approx(eps)


def _one_step(mode: str, unit: str, weights: tuple[float, ...]) -> float:
    """The norm of one DP-SGD step of plain SGD on two copies of one photo of one person, both
    drawn (q = 1), with a clipping norm far below the gradient and no noise to speak of."""
    cfg = load_config(None, [*LEDGER_FULL, "train.task=attribute", "train.optimizer=sgd", "train.momentum=0",
                             "train.weight_decay=0", "train.augment=false", "train.batch_size=2", "train.lr=0.1",
                             f"dp.grad_sample_mode={mode}", f"dp.unit={unit}", "dp.max_images_per_identity=2",
                             "dp.max_grad_norm=0.001"])
    image = np.random.default_rng(1).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    ds = FaceDataset(images=np.repeat(image, 2, axis=0), identity=np.zeros(2, np.int64),
                     gender=np.zeros(2, np.int64), group=np.zeros(2, np.int64), age=np.zeros(2, np.int64),
                     labels={"smiling": np.ones(2, np.int64)}, sample_ids=["a", "b"], source="test")
    model = build_model(model_spec(cfg), 0)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters() if p.requires_grad])
    train(model, ds, cfg.train, cfg.dp, seed=0, epochs=1, noise_multiplier=1e-9,
          sample_weight=np.array(weights), noise_seed=0)
    return float((torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad]) - before).norm())


@pytest.mark.parametrize(("mode", "unit"), [("bk", "sample"), ("hooks", "sample"), ("functorch", "sample"),
                                            ("ghost", "sample"), ("bk", "identity"), ("hooks", "identity")])
def test_a_weight_scales_the_clipped_gradient_in_every_engine(mode: str, unit: str) -> None:
    """Weighting the loss before clipping changes nothing once gradients exceed the norm (clipping
    undoes it: a reweighted model under DP was as unfair as the biased one). Every engine weights
    the clipped gradient instead: weights (1, 1/4) move the model 1.25 / 2 as far as (1, 1), for a
    sample unit and for an identity unit (its mean weight), and no weight can exceed 1."""
    full = _one_step(mode, unit, (1.0, 1.0))
    assert 0 < full
    assert _one_step(mode, unit, (1.0, 0.25)) == pytest.approx(0.625 * full, rel=1e-3)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        _one_step(mode, unit, (1.0, 4.0))


def test_dp_weights_are_the_kamiran_calders_ratios_scaled_to_at_most_one() -> None:
    rng = np.random.default_rng(0)
    s, y = rng.integers(0, 2, 300), (rng.random(300) < 0.2).astype(np.int64)
    counts = cell_counts(s, y, 2)
    scaled = weights_from_counts(s, y, counts) / weight_bound(counts)
    assert scaled.max() == pytest.approx(1.0) and scaled.min() > 0
    np.testing.assert_allclose(scaled / scaled.mean(), reweight(s, y))  # the same ratios
    # The bound reads the histogram's whole domain, not the cells the samples occupy.
    assert weight_bound(counts) == weight_bound(counts) and weight_bound(np.array([[5.0, 1.0], [1.0, 5.0]])) > 1
