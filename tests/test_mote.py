"""MOTE model templates: KDE sampling, batched training, gallery storage and the gender attack."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from attacks.gender_inference import GenderInference, attack_accuracy, collapse
from common.config import MoteConfig
from common.mote.gallery import MoteGallery, enroll
from common.mote.kde import (
    GenderKDE,
    ImpostorPool,
    build_enrollment_set,
    split_counts,
)
from common.mote.networks import StackedAdam, gradients, one_cycle_schedule, parameter_count, unflatten

SMALL = MoteConfig(synthetic=40, impostors=60, synthetic_impostors=20, batch_size=32, epochs=10, patience=2,
                     min_delta=0.02)  # identities stop at different epochs: the stack shrinks mid-run


def _population(n_ids: int, per: int, dim: int, seed: int, spread: float = 0.1,
                gender_shift: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian clusters: unit-norm identity centres (shifted along one axis by gender) + noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ids, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    gender = rng.integers(0, 2, n_ids)
    centres[:, 0] += gender_shift * (2 * gender - 1)
    x = np.repeat(centres, per, axis=0) + rng.normal(scale=spread / math.sqrt(dim), size=(n_ids * per, dim))
    return x.astype(np.float32), np.repeat(np.arange(n_ids), per), np.repeat(gender, per)


@pytest.fixture(scope="module")
def toy() -> dict:
    """40 well-separated identities x 6 embeddings (d = 16) and a KDE fitted on the last 20."""
    x, ident, gender = _population(40, 6, 16, seed=1)
    pool = ident >= 20
    kde = GenderKDE.fit(x[pool], ident[pool], gender[pool], bandwidths=[0.01, 0.03, 0.1], seed=0)
    return {"x": x, "ident": ident, "gender": gender, "kde": kde, "pool": pool}


def test_kde_bandwidth_search_and_seeded_sampling(toy: dict) -> None:
    kde = toy["kde"]
    assert kde.male.bandwidth_ in (0.01, 0.03, 0.1) and kde.dim == 16
    a = kde.sample(3, 4, np.random.default_rng(5))
    assert a.shape == (7, 16)
    np.testing.assert_array_equal(a, kde.sample(3, 4, np.random.default_rng(5)))
    assert not np.array_equal(a, kde.sample(3, 4, np.random.default_rng(6)))


def test_kde_refuses_a_gender_with_too_few_samples() -> None:
    x, ident, gender = _population(10, 4, 8, seed=0)
    gender = np.where(ident < 9, 1, 0)  # one female identity: 4 offsets, 5 folds
    with pytest.raises(ValueError, match=r"female KDE needs at least 5 .* got 4"):
        GenderKDE.fit(x, ident, gender, bandwidths=[0.01, 0.1])


def test_synthetic_genuine_samples_are_centred_on_the_reference(toy: dict) -> None:
    x, ident = toy["x"], toy["ident"]
    reference = x[ident == 3][:2]
    settings = {"n_synthetic": 3000, "n_impostors": 10, "n_synthetic_impostors": 10, "val_fraction": 0.2}
    s = build_enrollment_set(3, reference, toy["kde"], ImpostorPool(x, ident), 0.5, np.random.default_rng(0),
                             **settings)
    np.testing.assert_array_equal(s.genuine_train[:2], reference)  # references stay in training
    synthetic = np.concatenate([s.genuine_train[2:], s.genuine_val]).astype(np.float64)
    assert synthetic.shape[0] == 3000 and s.genuine_val.shape[0] == 600
    # The KDE's training offsets have mean 0 per gender, so the sample mean is the centroid up to
    # sampling error: 5 standard errors per coordinate.
    tolerance = 5 * synthetic.std(axis=0) / math.sqrt(synthetic.shape[0])
    assert (np.abs(synthetic.mean(axis=0) - reference.mean(axis=0)) < tolerance).all()
    assert s.impostor_train.shape[0] + s.impostor_val.shape[0] == 20
    assert not np.isin(s.impostor_train, x[ident == 3]).all(axis=1).any()  # never the identity itself


def _axis_kde() -> GenderKDE:
    """Male identities vary only along axis 0, female only along axis 1 (offsets +-1)."""
    n, dim = 10, 4
    centres = np.random.default_rng(0).normal(size=(2 * n, dim)) * 10
    axis = np.repeat(np.arange(2 * n) >= n, 2).astype(int)  # identity i < n: male, axis 0
    x = np.repeat(centres, 2, axis=0) + np.eye(dim)[axis] * np.tile([1, -1], 2 * n)[:, None]
    return GenderKDE.fit(x, np.repeat(np.arange(2 * n), 2), 1 - axis, bandwidths=[1e-3])


def _male_like(offsets: np.ndarray) -> np.ndarray:
    male, female = np.abs(offsets[:, 0]) > 0.5, np.abs(offsets[:, 1]) > 0.5
    assert (male ^ female).all()  # every sample comes from exactly one of the two KDEs
    return male


@pytest.mark.parametrize("b", [0.0, 0.3, 1.0])
def test_balancing_factor_picks_the_gender_kde(b: float) -> None:
    kde = _axis_kde()
    reference = np.zeros((1, 4))
    pool = ImpostorPool(np.full((6, 4), 50.0) + np.arange(6)[:, None], np.repeat([7, 8, 9], 2))
    s = build_enrollment_set(0, reference, kde, pool, b, np.random.default_rng(1), n_synthetic=50,
                             n_impostors=0, n_synthetic_impostors=30)
    assert _male_like(np.concatenate([s.genuine_train[1:], s.genuine_val])).sum() == split_counts(50, b)[0]
    assert split_counts(50, b)[0] == round(50 * b)
    impostors = np.concatenate([s.impostor_train, s.impostor_val])
    nearest = pool.centroids[np.linalg.norm(impostors[:, None] - pool.centroids[None], axis=2).argmin(axis=1)]
    assert _male_like(impostors - nearest).sum() == split_counts(30, b)[0]


def test_gradients_match_autograd_with_and_without_per_sample_clipping() -> None:
    k, batch, dim = 2, 6, 5
    gen = torch.Generator().manual_seed(0)
    flat = torch.randn(k, parameter_count(dim), generator=gen, dtype=torch.float64)
    x = torch.randn(k, batch, dim, generator=gen, dtype=torch.float64)
    y = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    m1 = (torch.rand(k, batch, 128, generator=gen) > 0.5).double() * 2
    m2 = (torch.rand(k, batch, 64, generator=gen) > 0.5).double() * 2

    def sample_loss(p: dict, xi: torch.Tensor, yi: torch.Tensor, m1i: torch.Tensor, m2i: torch.Tensor) -> torch.Tensor:
        a1 = torch.relu(xi @ p["w1"] + p["b1"]) * m1i
        a2 = torch.relu(a1 @ p["w2"] + p["b2"]) * m2i
        return torch.nn.functional.binary_cross_entropy_with_logits(a2 @ p["w3"] + p["b3"], yi)

    per_sample = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0, 0, 0))
    for clip in (None, 0.5):
        got = gradients(unflatten(flat, dim), x, y, m1, m2, clip)
        for i in range(k):
            p = {n: t[i] for n, t in unflatten(flat, dim).items()}
            g = per_sample(p, x[i], y, m1[i], m2[i])
            norms = torch.sqrt(sum(t.reshape(batch, -1).square().sum(1) for t in g.values()))
            scale = torch.ones(batch) if clip is None else (clip / (norms + 1e-6)).clamp(max=1)
            for name, t in g.items():
                want = (t * scale.view(-1, *[1] * (t.dim() - 1))).mean(0)
                torch.testing.assert_close(got[name][i], want, rtol=1e-9, atol=1e-12)
            if clip is not None:
                assert (norms > clip).any()  # the clipping branch was exercised


def test_stacked_adam_follows_torch_one_cycle_and_keeps_moments_of_kept_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(3, 7, generator=gen)
    grads = [torch.randn(3, 7, generator=gen) for _ in range(12)]
    ref = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([ref], lr=1e-2, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=len(grads))
    adam = StackedAdam(start, weight_decay=1e-3)
    keep = torch.tensor([True, False, True])
    for step, ((lr, beta1), g) in enumerate(zip(one_cycle_schedule(1e-2, len(grads)), grads), start=1):
        ref.grad = g.clone()
        opt.step()
        if step < len(grads):
            sched.step()
        adam.step(g.clone() if step <= 5 else g[keep].clone(), lr, beta1)
        if step == 5:
            adam.select(keep)  # row 1 stops early; rows 0 and 2 carry on with their moments
    torch.testing.assert_close(adam.params.detach(), ref.detach()[keep], rtol=1e-5, atol=1e-6)


def _enroll_toy(toy: dict, settings: MoteConfig, seed: int = 0,
                ids: tuple[int, ...] = (0, 1, 2, 5, 7)) -> MoteGallery:
    x, ident, pool = toy["x"], toy["ident"], toy["pool"]
    first = np.isin(ident, ids) & (np.arange(ident.size) % 6 == 0)
    first |= (ident == ids[0]) & (np.arange(ident.size) % 6 == 1)  # one identity with two references
    return enroll(x[first], ident[first], toy["kde"], x[pool], ident[pool], [0.0, 0.5, 1.0, 0.5, 0.2][:len(ids)],
                  seed, settings)


# Batched and one-at-a-time training run the same kernels on the same numbers: identical in
# practice (atol 0 observed with 1 thread); the stated tolerance is 1e-5 absolute on every weight.
BATCH_TOLERANCE = 1e-5


def test_batched_training_equals_one_at_a_time(toy: dict) -> None:
    """Without DP each identity trains alone (under DP the stack is one mechanism: test_mote_dp.py)."""
    extra: dict = {}
    runs = [_enroll_toy(toy, MoteConfig(**{**vars(SMALL), "enroll_batch": eb, **extra})) for eb in (5, 2, 1)]
    for other in runs[1:]:
        np.testing.assert_array_equal(other.identity_ids, runs[0].identity_ids)
        assert other.info["epochs"] == runs[0].info["epochs"]
        for name, t in runs[0].params.items():
            torch.testing.assert_close(other.params[name], t, rtol=0, atol=BATCH_TOLERANCE)
    assert len(set(runs[0].info["epochs"])) > 1  # identities left the stack at different epochs
    # Same seed, same models; another seed, other models.
    again = _enroll_toy(toy, MoteConfig(**{**vars(SMALL), **extra}))
    torch.testing.assert_close(again.params["w1"], runs[0].params["w1"], rtol=0, atol=0)
    other_seed = _enroll_toy(toy, MoteConfig(**{**vars(SMALL), **extra}), seed=1)
    assert not torch.allclose(other_seed.params["w1"], runs[0].params["w1"])


def test_mote_accepts_its_identity_and_rejects_others(toy: dict) -> None:
    x, ident = toy["x"], toy["ident"]
    enrolled = (0, 1, 2, 5, 7)
    settings = MoteConfig(synthetic=60, impostors=100, synthetic_impostors=40, epochs=30)
    gallery = _enroll_toy(toy, settings, ids=enrolled)
    probes = np.isin(ident, enrolled) & (np.arange(ident.size) % 6 >= 2)  # never a reference
    scores = gallery.scores(x[probes])
    own = ident[probes][:, None] == gallery.identity_ids[None, :]
    assert scores.shape == (probes.sum(), 5)
    assert roc_auc_score(own.ravel(), scores.ravel()) > 0.99
    assert (scores[own] >= 0.5).mean() >= 0.9 and (scores[~own] < 0.5).mean() >= 0.95
    unseen = gallery.scores(x[(ident >= 8) & (ident < 20)])  # neither enrolled nor in the impostor pool
    assert (unseen < 0.5).mean() >= 0.9
    assert roc_auc_score(np.r_[np.ones(own.sum()), np.zeros(unseen.size)], np.r_[scores[own], unseen.ravel()]) > 0.99


def test_gallery_save_load_round_trip(toy: dict, tmp_path) -> None:
    gallery = _enroll_toy(toy, MoteConfig(**{**vars(SMALL), "epochs": 2}))
    probes = toy["x"][:20]
    gallery.save(tmp_path / "g32.safetensors")
    back = MoteGallery.load(tmp_path / "g32.safetensors")
    np.testing.assert_array_equal(back.identity_ids, gallery.identity_ids)
    np.testing.assert_array_equal(back.balancing_factor, gallery.balancing_factor)
    assert back.seed == 0 and back.info == gallery.info
    for name, t in gallery.params.items():
        assert torch.equal(back.params[name], t)
    np.testing.assert_array_equal(back.scores(probes), gallery.scores(probes))

    gallery.save(tmp_path / "g16.safetensors", fp16=True)
    half = MoteGallery.load(tmp_path / "g16.safetensors")
    for name, t in gallery.params.items():
        torch.testing.assert_close(half.params[name], t, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(half.scores(probes), gallery.scores(probes), atol=1e-2)
    k = len(gallery)
    assert (tmp_path / "g16.safetensors").stat().st_size < (tmp_path / "g32.safetensors").stat().st_size
    assert (tmp_path / "g32.safetensors").stat().st_size >= k * gallery.storage_kb_per_identity() * 1000
    assert gallery.storage_kb_per_identity(fp16=True) == gallery.storage_kb_per_identity() / 2
    assert round(parameter_count(512) * 4 / 1000) == 296  # the paper's 297 KB at d = 512 (+ file overhead)

    sub = gallery.subset([int(gallery.identity_ids[2])])
    np.testing.assert_allclose(sub.scores(probes)[:, 0], gallery.scores(probes)[:, 2], rtol=1e-6)
    with pytest.raises(KeyError):
        gallery.subset([999])
    (tmp_path / "bad.safetensors").write_bytes(b"\x80\x04not a checkpoint")
    with pytest.raises(ValueError, match="pickle"):
        MoteGallery.load(tmp_path / "bad.safetensors")


def test_gender_attack_reads_gender_from_templates_but_not_from_random_labels() -> None:
    x, _, gender = _population(400, 1, 16, seed=3, spread=0.0, gender_shift=0.5)
    aux, target = slice(0, 200), slice(200, 400)
    attack = GenderInference(x[aux][gender[aux] == 1], x[aux][gender[aux] == 0])
    leak = attack_accuracy(attack.predict_templates(x[target]), gender[target])
    assert leak["balanced_accuracy"] > 0.9 and leak["n_male"] + leak["n_female"] == 200
    random_labels = np.random.default_rng(0).integers(0, 2, 200)
    chance = attack_accuracy(attack.predict_templates(x[target]), random_labels)
    assert abs(chance["balanced_accuracy"] - 0.5) < 0.1
    assert 0.0 <= chance["male_accuracy"] <= 1.0 and 0.0 <= chance["female_accuracy"] <= 1.0


def test_gender_attack_on_models_uses_their_outputs() -> None:
    """A hand-built model whose logit is the dot product with its identity's template leaks exactly
    like that template: checks that the attack averages each model's outputs per gender."""
    x, _, gender = _population(300, 1, 16, seed=4, spread=0.0, gender_shift=0.5)
    aux, target = slice(0, 100), slice(100, 300)
    t = torch.from_numpy(x[target] / np.linalg.norm(x[target], axis=1, keepdims=True))
    k = t.shape[0]
    params = {n: torch.zeros(k, *shape) for n, shape in
              {"w1": (16, 128), "b1": (128,), "w2": (128, 64), "b2": (64,), "w3": (64,), "b3": ()}.items()}
    params["w1"][:, :, 0], params["w1"][:, :, 1] = t, -t  # relu(t.x) and relu(-t.x)
    params["w2"][:, 0, 0] = params["w2"][:, 1, 1] = 1.0
    params["w3"][:, 0], params["w3"][:, 1] = 1.0, -1.0  # logit = t.x
    gallery = MoteGallery(np.arange(k), params, np.full(k, 0.5), 0)
    attack = GenderInference(x[aux][gender[aux] == 1], x[aux][gender[aux] == 0])
    unit = attack.male / np.linalg.norm(attack.male, axis=1, keepdims=True)
    np.testing.assert_allclose(gallery.logits(unit)[:, :3], unit @ t.numpy()[:3].T, rtol=1e-4, atol=1e-5)
    on_models = attack_accuracy(attack.predict_mote(gallery, score="logit")[0], gender[target])
    on_templates = attack_accuracy(attack.predict_templates(x[target]), gender[target])
    assert on_models["balanced_accuracy"] > 0.9 and on_templates["balanced_accuracy"] > 0.9
    assert set(np.unique(attack.predict_mote(gallery)[0])) <= {0, 1}
    calibrated, ties = attack.predict_mote(gallery, score="calibrated")
    assert attack_accuracy(calibrated, gender[target])["balanced_accuracy"] > 0.9 and not ties.any()

    # Saturated models: logit = 60 t.x - 1000 rejects every impostor. In float64 their sigmoid
    # scores are 0.0 on every auxiliary template (below -745) and the threshold accepts none:
    # the sigmoid and decision variants tie and collapse to one class (the paper's 50%), while the
    # logits still carry the gender.
    params["w3"] *= 60.0
    params["b3"] = torch.full((k,), -1000.0)
    saturated = MoteGallery(np.arange(k), params, np.full(k, 0.5), 0)
    for variant in ("sigmoid", "decision"):
        guess, tied = attack.predict_mote(saturated, score=variant, threshold=0.5)
        leak = attack_accuracy(guess, gender[target])
        assert tied.all() and collapse(guess, tied)["majority_share"] == 1.0 and leak["balanced_accuracy"] == 0.5
    guess, tied = attack.predict_mote(saturated, score="logit")
    assert attack_accuracy(guess, gender[target])["balanced_accuracy"] > 0.9 and not tied.any()
    with pytest.raises(ValueError, match="operating threshold"):
        attack.predict_mote(saturated, score="decision")
