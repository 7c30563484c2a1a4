"""The same federated configuration gives a biased and a fair global model (real simulations).

SynthFaces with a strong task / sensitive-attribute correlation (P(smiling | female) = 0.9,
P(smiling | male) = 0.1), the attribute task (smiling) without DP, two clients, four rounds:
once with ``fairness.method=none`` and once with ``reweight``. At 32 px the mouth is small, so the
unmitigated model leans on gender, the easier cue; reweighting removes that shortcut.

The runs are seeded and bitwise reproducible, so the assertions are deterministic; the margins
were chosen from 8 seeds of this configuration (reproduced outside Flower with
``client.local.local_train``, which gives the same bits), final round, none vs reweight:

    DEO (|dTPR| + |dFPR|)   none 0.27-0.61, reweight 0.05-0.24, gap 0.13-0.48 (seed 0: 0.61 vs 0.18)
    bias amplification     none -0.06..-0.02, reweight -0.25..-0.14, gap 0.10-0.23
    accuracy               none 0.89-0.94, reweight 0.66-0.83 (held-out majority class ~0.5)

Server-side pretraining is off (``pretrain.identities=0``): it is an identity-task warm start that
the margins above were not measured with, and it would double the runs' time.

``fair_mixup`` is not asserted here: on this data lam=1 collapses to a constant classifier (DEO 0,
accuracy = majority class) for 4 of 4 seeds and lam=0.5 nearly so (accuracy 0.56), so a "lower
DEO" check could pass for the wrong reason; the default lam=0.05 lowered DEO from 0.61 to 0.48 at
equal accuracy (0.916) in one seed, too few runs to assert a margin.
"""

from __future__ import annotations

import math

import pytest
from sim_runs import round_events, simulated_run

BIASED_DATA = ("split.num_clients=2", "data.identities=400", "data.images_per_identity=8", "data.image_size=32",
               "data.smiling_rate_female=0.9", "data.smiling_rate_male=0.1",
               "model.width=16", "model.blocks=1,1", "model.embedding_dim=16",
               "train.task=attribute", "train.attribute=smiling", "dp.mode=off", "train.batch_size=32",
               "train.lr=0.005", "federation.local_epochs=3", "federation.rounds=4", "federation.client_cpus=1",
               "pretrain.identities=0", "seed=0")
KEYS = ("attribute_accuracy", "attribute_deo_sum", "attribute_bias_amplification")
DEO_MARGIN = 0.1  # smallest gap over 8 seeds: 0.13
BA_MARGIN = 0.05  # smallest gap over 8 seeds: 0.10

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                         "ignore::FutureWarning")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[dict]]:
    out = {}
    for method in ("none", "reweight"):
        run, status = simulated_run(tmp_path_factory, BIASED_DATA + (f"fairness.method={method}",))
        events = round_events(run)
        # status.json carries the final round's evaluation.
        assert all(status[k] == events[-1][k] for k in KEYS)
        out[method] = events
    return out


def test_every_round_reports_accuracy_deo_and_bias_amplification(runs) -> None:
    for method, events in runs.items():
        assert [e["round"] for e in events] == [1, 2, 3, 4], method
        for e in events:
            for key in KEYS:
                assert key in e and math.isfinite(e[key]), (method, e["round"], key)
            assert 0.0 <= e["attribute_accuracy"] <= 1.0
            assert 0.0 <= e["attribute_deo_sum"] <= 2.0
            assert e["attribute_deo_sum"] == pytest.approx(e["attribute_dtpr"] + e["attribute_dfpr"])


def test_reweighting_gives_a_fairer_global_model(runs) -> None:
    biased, fair = runs["none"][-1], runs["reweight"][-1]
    summary = {m: {k: round(runs[m][-1][k], 3) for k in KEYS} for m in runs}
    # Both models learned the task (not a constant predictor, which is trivially "fair").
    assert biased["attribute_accuracy"] > 0.85, summary
    assert fair["attribute_accuracy"] > 0.6, summary
    assert 0 < fair["attribute_positive_rate_s0"] < 1 and 0 < fair["attribute_positive_rate_s1"] < 1
    # The unmitigated model's errors depend on gender; the reweighted model's much less.
    assert biased["attribute_deo_sum"] > fair["attribute_deo_sum"] + DEO_MARGIN, summary
    assert biased["attribute_bias_amplification"] > fair["attribute_bias_amplification"] + BA_MARGIN, summary
