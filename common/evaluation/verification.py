"""Verification and classification metrics shared by training, evaluation and the audit.

Verification pairs are sampled once per seed: every genuine pair (or a seeded sample of them)
against as many impostor pairs, so that ROC AUC is balanced and reproducible.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def verification_pairs(identity: np.ndarray, seed: int, max_genuine: int = 20_000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (i, j, genuine) index pairs: genuine pairs within identities, equally many impostors."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED_FA11]))
    identity = np.asarray(identity)
    gi, gj = [], []
    for ident in np.unique(identity):
        idx = np.flatnonzero(identity == ident)
        a, b = np.triu_indices(idx.size, k=1)
        gi.append(idx[a])
        gj.append(idx[b])
    gen_i, gen_j = (np.concatenate(gi), np.concatenate(gj)) if gi else (np.empty(0, int), np.empty(0, int))
    if gen_i.size == 0:
        raise ValueError("verification needs at least one identity with two or more samples")
    if gen_i.size > max_genuine:
        keep = np.sort(rng.choice(gen_i.size, max_genuine, replace=False))
        gen_i, gen_j = gen_i[keep], gen_j[keep]
    if np.unique(identity).size < 2:
        raise ValueError("verification needs at least two identities")
    n = identity.size
    imp_i = np.empty(0, int)
    imp_j = np.empty(0, int)
    while imp_i.size < gen_i.size:  # rejection sampling: impostors must differ in identity
        i = rng.integers(0, n, 2 * gen_i.size)
        j = rng.integers(0, n, 2 * gen_i.size)
        ok = identity[i] != identity[j]
        imp_i, imp_j = np.concatenate([imp_i, i[ok]]), np.concatenate([imp_j, j[ok]])
    imp_i, imp_j = imp_i[: gen_i.size], imp_j[: gen_i.size]
    genuine = np.concatenate([np.ones(gen_i.size, bool), np.zeros(imp_i.size, bool)])
    return np.concatenate([gen_i, imp_i]), np.concatenate([gen_j, imp_j]), genuine


def cosine_pair_scores(features: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Cosine similarity of rows i and j (features need not be normalised)."""
    f = features.reshape(features.shape[0], -1).astype(np.float64)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    return np.einsum("nd,nd->n", f[i], f[j])


def verification_auc(features: np.ndarray, identity: np.ndarray, seed: int = 0) -> float:
    """ROC AUC of cosine similarity for genuine vs impostor pairs."""
    i, j, genuine = verification_pairs(identity, seed)
    return float(roc_auc_score(genuine, cosine_pair_scores(features, i, j)))


def pixel_verification_auc(images: np.ndarray, identity: np.ndarray, seed: int = 0) -> float:
    """Raw-pixel baseline: cosine of mean-centred pixel vectors (how hard the data is without learning)."""
    x = np.asarray(images).reshape(len(images), -1).astype(np.float32)
    return verification_auc(x - x.mean(axis=1, keepdims=True), identity, seed)


def binary_accuracy(scores: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> float:
    """Accuracy of ``scores >= threshold`` against 0/1 labels (unknown -1 labels ignored)."""
    known = labels >= 0
    if not known.any():
        raise ValueError("no known labels to score")
    return float(np.mean((scores[known] >= threshold) == (labels[known] == 1)))


def verification_auc_difference(features_a: np.ndarray, features_b: np.ndarray, identity: np.ndarray, seed: int = 0,
                                n_boot: int = 1000) -> dict[str, float | list[float] | int]:
    """AUC of model a minus AUC of model b on the same verification pairs of the same images, with
    a 95% interval from a paired bootstrap over identities (``pair_auc_difference``)."""
    i, j, genuine = verification_pairs(identity, seed)
    return pair_auc_difference(cosine_pair_scores(features_a, i, j), cosine_pair_scores(features_b, i, j), genuine,
                               i, j, identity, seed, n_boot)


def pair_auc_difference(scores_a: np.ndarray, scores_b: np.ndarray, genuine: np.ndarray, i: np.ndarray,
                        j: np.ndarray, identity: np.ndarray, seed: int = 0,
                        n_boot: int = 1000) -> dict[str, float | list[float] | int]:
    """AUC of pair scores a minus that of pair scores b (pairs (i, j) of images of ``identity``,
    from ``verification_pairs``), with a 95% interval from a paired bootstrap over identities.

    Pairs share identities, so they are not independent draws: the bootstrap resamples identities
    (with replacement) and weights each pair by how often its identities were drawn (a genuine
    pair by its identity's count, an impostor pair by the product of its two counts), identically
    for both models, so that what the two share (which identities are hard) cancels.
    """
    auc_a, auc_b = roc_auc_score(genuine, scores_a), roc_auc_score(genuine, scores_b)
    codes, inverse = np.unique(np.asarray(identity), return_inverse=True)
    ci, cj = inverse[i], inverse[j]
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xB007]))
    diffs = []
    for _ in range(n_boot):
        drawn = np.bincount(rng.integers(0, codes.size, codes.size), minlength=codes.size).astype(np.float64)
        weight = np.where(genuine, drawn[ci], drawn[ci] * drawn[cj])
        kept = weight > 0
        if genuine[kept].all() or not genuine[kept].any():
            continue
        diffs.append(roc_auc_score(genuine[kept], scores_a[kept], sample_weight=weight[kept])
                     - roc_auc_score(genuine[kept], scores_b[kept], sample_weight=weight[kept]))
    lo, hi = np.percentile(diffs, [2.5, 97.5]) if diffs else (np.nan, np.nan)
    return {"auc_a": float(auc_a), "auc_b": float(auc_b), "difference": float(auc_a - auc_b),
            "ci95": [float(lo), float(hi)], "n_boot": len(diffs), "identities": int(codes.size),
            "pairs": int(genuine.size), "seed": int(seed)}
