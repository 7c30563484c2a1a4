"""Verification pairs, AUC and accuracy: the numbers every report and audit is built on."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.evaluation.verification import (
    binary_accuracy,
    cosine_pair_scores,
    pixel_verification_auc,
    verification_auc,
    verification_pairs,
)


def _identities(sizes: list[int], seed: int = 0) -> np.ndarray:
    """Identity codes with the given group sizes, shuffled (codes need not be contiguous)."""
    ident = np.repeat(np.arange(len(sizes)) * 7 + 3, sizes)
    return np.random.default_rng(seed).permutation(ident)


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 6), min_size=2, max_size=12).filter(lambda s: max(s) >= 2),
       order_seed=st.integers(0, 1000), seed=st.integers(0, 2**32 - 1))
def test_pairs_are_balanced_and_correctly_labelled(sizes: list[int], order_seed: int, seed: int) -> None:
    identity = _identities(sizes, order_seed)
    i, j, genuine = verification_pairs(identity, seed)
    assert i.shape == j.shape == genuine.shape and genuine.dtype == bool
    expected_genuine = sum(s * (s - 1) // 2 for s in sizes)
    assert genuine.sum() == expected_genuine == (~genuine).sum()  # balanced: every genuine pair, as many impostors
    assert (identity[i[genuine]] == identity[j[genuine]]).all()
    assert (identity[i[~genuine]] != identity[j[~genuine]]).all()
    assert (i[genuine] != j[genuine]).all()
    # Every genuine pair appears exactly once.
    pairs = {(min(a, b), max(a, b)) for a, b in zip(i[genuine], j[genuine])}
    assert len(pairs) == expected_genuine
    assert 0 <= min(i.min(), j.min()) and max(i.max(), j.max()) < identity.size


def test_pairs_are_seeded() -> None:
    identity = _identities([5] * 10)
    a, b, c = verification_pairs(identity, 1), verification_pairs(identity, 1), verification_pairs(identity, 2)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    # Genuine pairs are all of them either way; the impostors are resampled.
    assert not (np.array_equal(a[0], c[0]) and np.array_equal(a[1], c[1]))


def test_max_genuine_caps_and_subsamples_genuine_pairs() -> None:
    identity = _identities([20] * 5)  # 5 * 190 = 950 genuine pairs
    i, j, genuine = verification_pairs(identity, 0, max_genuine=100)
    assert genuine.sum() == 100 == (~genuine).sum()
    assert (identity[i[genuine]] == identity[j[genuine]]).all()
    assert len({(a, b) for a, b in zip(i[genuine], j[genuine])}) == 100  # sampled without replacement
    i2, j2, _ = verification_pairs(identity, 0, max_genuine=100)
    assert np.array_equal(i, i2) and np.array_equal(j, j2)


def test_pairs_need_a_genuine_pair_and_two_identities() -> None:
    with pytest.raises(ValueError, match="at least one identity with two or more samples"):
        verification_pairs(np.arange(6), 0)
    with pytest.raises(ValueError, match="at least two identities"):
        verification_pairs(np.zeros(4, dtype=int), 0)


def test_auc_is_one_for_perfectly_separated_features() -> None:
    identity = _identities([4] * 12)
    codes = np.unique(identity)
    features = (identity[:, None] == codes[None, :]).astype(np.float32)  # one orthogonal direction per identity
    features *= np.random.default_rng(0).uniform(0.5, 3.0, (identity.size, 1))  # scale must not matter
    assert verification_auc(features, identity, seed=0) == 1.0


def test_auc_is_one_half_for_random_features() -> None:
    identity = _identities([8] * 60)
    features = np.random.default_rng(1).standard_normal((identity.size, 32))
    assert abs(verification_auc(features, identity, seed=0) - 0.5) < 0.04  # sd about 0.009


def test_cosine_pair_scores() -> None:
    f = np.array([[3.0, 4.0], [6.0, 8.0], [4.0, -3.0], [0.0, 0.0]])
    scores = cosine_pair_scores(f, np.array([0, 0, 0, 3]), np.array([1, 2, 0, 0]))
    np.testing.assert_allclose(scores, [1.0, 0.0, 1.0, 0.0])  # a zero vector scores 0, not NaN
    # Images are flattened.
    imgs = np.arange(2 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 2, 3)
    assert cosine_pair_scores(imgs, np.array([0]), np.array([1])).shape == (1,)


def test_pixel_auc_ignores_brightness() -> None:
    # Mean-centring per image: a brightness change does not make two images look different.
    rng = np.random.default_rng(0)
    base = rng.integers(40, 200, (6, 8, 8, 3))
    identity = np.repeat(np.arange(6), 2)
    images = np.repeat(base, 2, axis=0)
    images[1::2] += 30  # the second image of each identity is brighter
    assert pixel_verification_auc(images.astype(np.uint8), identity, seed=0) == 1.0


def test_binary_accuracy_ignores_unknown_labels() -> None:
    scores = np.array([0.9, 0.2, 0.7, 0.4, 0.99, 0.01])
    labels = np.array([1, 0, 0, 1, -1, -1])
    assert binary_accuracy(scores, labels) == 0.5
    # Unknown labels do not count, whatever their score.
    assert binary_accuracy(scores[:4], labels[:4]) == 0.5
    assert binary_accuracy(np.array([0.5, 0.49]), np.array([1, 0])) == 1.0  # threshold is inclusive
    assert binary_accuracy(np.array([0.3, 0.2]), np.array([1, 0]), threshold=0.25) == 1.0
    with pytest.raises(ValueError, match="no known labels"):
        binary_accuracy(np.array([0.4, 0.6]), np.array([-1, -1]))
