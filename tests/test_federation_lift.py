"""The federation's lift: a paired bootstrap over identities that sees a real difference, not an
absent one, and a studio pretraining population that is a real domain gap for wild members."""

from __future__ import annotations

import numpy as np
import pytest

from common.evaluation.verification import verification_auc, verification_auc_difference


def _features(identity: np.ndarray, signal: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((identity.max() + 1, 16))
    return signal * centres[identity] + rng.standard_normal((identity.size, 16))


IDENTITY = np.repeat(np.arange(30), 6)


def test_the_difference_is_paired_and_matches_the_two_aucs() -> None:
    good, weak = _features(IDENTITY, 1.0, 1), _features(IDENTITY, 0.3, 1)
    out = verification_auc_difference(good, weak, IDENTITY, seed=3, n_boot=300)
    assert out["auc_a"] == verification_auc(good, IDENTITY, seed=3)
    assert out["auc_b"] == verification_auc(weak, IDENTITY, seed=3)
    assert out["difference"] == pytest.approx(out["auc_a"] - out["auc_b"])
    lo, hi = out["ci95"]
    assert 0 < lo < out["difference"] < hi and out["identities"] == 30 and out["n_boot"] == 300
    same = verification_auc_difference(good, good, IDENTITY, seed=3, n_boot=100)
    assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0]


def test_two_equally_good_models_get_an_interval_around_zero() -> None:
    covered = sum(lo <= 0 <= hi for lo, hi in (
        verification_auc_difference(_features(IDENTITY, 0.6, s), _features(IDENTITY, 0.6, s + 100), IDENTITY,
                                    seed=s, n_boot=200)["ci95"] for s in range(10)))
    assert covered >= 8  # a 95% interval; identity clustering ignored would cover far less often


def test_studio_photos_are_the_same_people_in_another_setting() -> None:
    from common.data.sources.synthfaces.generator import SynthConfig, generate

    wild = generate(SynthConfig(num_identities=6, images_per_identity=4, image_size=32, seed=5))
    studio = generate(SynthConfig(num_identities=6, images_per_identity=4, image_size=32, seed=5, condition="studio"))
    assert np.array_equal(wild.identity, studio.identity) and np.array_equal(wild.gender, studio.gender)
    assert all(np.array_equal(wild.labels[k], studio.labels[k]) for k in wild.labels)
    assert not np.array_equal(wild.images, studio.images)
    # the studio removes the nuisance: its images of one person vary far less than the wild ones
    spread = {name: np.mean([ds.images[ds.identity == i].astype(float).std(axis=0).mean() for i in range(6)])
              for name, ds in (("wild", wild), ("studio", studio))}
    assert spread["studio"] < 0.6 * spread["wild"]
    with pytest.raises(ValueError, match="SynthConfig.condition: expected one of"):
        SynthConfig(condition="indoor").validate()


def test_pretraining_and_the_central_bound_train_by_their_own_recipe() -> None:
    """``pretrain.lr``, ``batch_size``, ``optimizer``: public pretraining (and the lift's central bound,
    which trains every parameter without DP like it) may differ from the clients' DP recipe."""
    from common.config import load_config
    from common.train.pretraining import full_recipe

    clients = ("train.optimizer=sgd", "train.lr=0.5", "train.batch_size=96")
    same = full_recipe(load_config(None, list(clients)), "both")
    assert (same.optimizer, same.lr, same.batch_size, same.task) == ("sgd", 0.5, 96, "both")
    own = full_recipe(load_config(None, [*clients, "pretrain.optimizer=adam", "pretrain.lr=0.002",
                                         "pretrain.batch_size=32"]), "identity")
    assert (own.optimizer, own.lr, own.batch_size, own.task, own.max_seconds) == ("adam", 0.002, 32, "identity", 0.0)
