"""Membership score statistics: plain numpy/scipy, higher score = more likely a member.

What is here, and the choices made:

* Loss and logit-scaled confidence of a classifier (Yeom et al. 2018 threshold attacks; the
  scaling phi(p) = log p_y - log(1 - p_y) of Carlini et al. 2022, which makes the per-example
  score distributions close to Gaussian). Every statistic of a classifier takes its logits and is
  computed exactly (log-sigmoid, log-softmax, log-mean-exp): rounded probabilities saturate where
  the most confident members are.
* LiRA (Carlini et al. 2022, "Membership inference attacks from first principles"). Online: the
  Gaussian log-likelihood ratio IN vs OUT. Offline: by default the paper's one-sided test
  against the OUT Gaussian, reported as -log(1 - Phi((s - mu_out) / sd_out)), i.e. minus the log
  of the one-sided p-value (monotone in the z-score, but keeps resolution where the p-value
  underflows); ``test="neg_logpdf"`` gives -log N(s; mu_out, sd_out) instead, the two-sided
  variant of the authors' released code.
* RMIA (Zarifzadeh et al. 2024, "Low-cost high-power membership inference attacks"): the
  fraction of population samples z that x dominates in likelihood ratio; offline with the
  linear approximation p(x) = ((1 + a) p_OUT(x) + (1 - a)) / 2, applied to x and z alike.
* Centroid similarity for embedding models (no class posterior).
* FD-MIA (Tian et al. 2024, "When fairness meets privacy: exploring privacy threats in fair
  binary classifiers via membership inference attacks", arXiv:2311.03865): the attacker sees a
  biased and a fair model. Score-based: a shadow-trained attack model on [p_bias, p_fair,
  p_bias - p_fair, correctness bits]; reference-based: a bivariate Gaussian LiRA over
  (phi_bias, phi_fair) with full covariance, online and offline.

Every statistic takes already-computed model outputs; running models is the caller's job.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from scipy.stats import norm
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

MAX_ABS_CORR = 0.9999  # bivariate Gaussians: correlations are clipped to keep the covariance invertible


# ---------------------------------------------------------------------------------------------
# validation helpers


def _finite(x: Any, name: str, ndim: int) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def _bool_mask(x: Any, name: str, shape: tuple[int, ...]) -> np.ndarray:
    a = np.asarray(x)
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    if a.dtype != bool:
        if not np.isin(a, (0, 1)).all():
            raise ValueError(f"{name} must be boolean or 0/1")
        a = a.astype(bool)
    return a


def _labels(labels: Any, n: int, n_classes: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {y.shape}")
    integral = np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_)
    if not integral and (not np.isfinite(y.astype(np.float64)).all() or (y != np.round(y)).any()):
        raise ValueError("labels must be integer class indices")
    y = y.astype(np.int64)
    if ((y < 0) | (y >= n_classes)).any():
        raise ValueError(f"labels must lie in [0, {n_classes - 1}] (unknown labels must be removed first)")
    return y


# ---------------------------------------------------------------------------------------------
# loss and scaled confidence, exact from logits


def _logits(logits: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """(z, y): finite float64 logits, (n,) of class 1 of a binary model or (n, C), and their labels."""
    ndim = np.ndim(logits)
    if ndim not in (1, 2):
        raise ValueError(f"logits must be (n,) or (n, C), got {ndim}-D")
    z = _finite(logits, "logits", ndim)
    return z, _labels(labels, z.shape[0], 2 if z.ndim == 1 else z.shape[1])


def scaled_confidence(logits: Any, labels: Any) -> np.ndarray:
    """phi = log p_y - log(1 - p_y) (Carlini et al. 2022), exactly: z_y - logsumexp(other logits),
    which for a binary model is the logit of the true label. No probability is ever formed, so
    confident predictions keep their resolution (a float32 sigmoid is 1 from a logit of ~16.6)."""
    z, y = _logits(logits, labels)
    if z.ndim == 1:
        return np.where(y == 1, z, -z)
    hit = np.arange(z.shape[1])[None, :] == y[:, None]
    others = np.where(hit, -np.inf, z)
    top = others.max(axis=1)
    return z[hit] - (top + np.log(np.exp(others - top[:, None]).sum(axis=1)))


def log_true_prob(logits: Any, labels: Any) -> np.ndarray:
    """log p_y from logits: -log(1 + exp(-phi)) for a binary model (stable for any phi), the
    log-softmax entry of the true class otherwise."""
    z, y = _logits(logits, labels)
    if z.ndim == 1:
        return -np.logaddexp(0.0, -np.where(y == 1, z, -z))
    top = z.max(axis=1)
    return z[np.arange(z.shape[0]), y] - (top + np.log(np.exp(z - top[:, None]).sum(axis=1)))


def sample_loss(logits: Any, labels: Any) -> np.ndarray:
    """Per-sample cross-entropy -log p_y from logits (Yeom et al. 2018). Use ``-loss`` as a member score."""
    return -log_true_prob(logits, labels)


# ---------------------------------------------------------------------------------------------
# LiRA


def _check_reference(target: Any, reference: Any, in_mask: Any | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = _finite(target, "target", 1)
    ref = _finite(reference, "reference", 2)
    if ref.shape[0] != s.shape[0]:
        raise ValueError(f"reference must have shape ({s.shape[0]}, R), got {ref.shape}")
    mask = np.zeros(ref.shape, bool) if in_mask is None else _bool_mask(in_mask, "in_mask", ref.shape)
    return s, ref, mask


def _gaussian_side(ref: np.ndarray, use: np.ndarray, global_variance: bool, min_std: float,
                   side: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-example mean and std of the reference scores selected by ``use`` (n, R).

    Per-example std uses ddof=1; examples with fewer than two references on this side fall back
    to the pooled estimate. The pooled (global) std is the within-example residual spread over
    all examples, sqrt(sum (s_ir - mu_i)^2 / (N - n)), i.e. one shared variance around
    per-example means, the paper's remedy when there are few reference models.
    """
    count = use.sum(axis=1)
    if (count == 0).any():
        raise ValueError(f"in_mask: {int((count == 0).sum())} examples have no {side} reference score; "
                         f"use more reference models (each example must be {side} for at least one)")
    mu = np.where(use, ref, 0.0).sum(axis=1) / count
    sq = np.where(use, (ref - mu[:, None]) ** 2, 0.0).sum(axis=1)
    dof = int(count.sum() - count.size)
    if (global_variance or (count < 2).any()) and dof <= 0:
        raise ValueError(f"reference: a {side} variance needs at least one example with two {side} scores")
    pooled = np.sqrt(sq.sum() / dof) if dof > 0 else 0.0
    if global_variance:
        sd = np.full(count.shape, pooled)
    else:
        sd = np.where(count >= 2, np.sqrt(sq / np.maximum(count - 1, 1)), pooled)
    return mu, np.maximum(sd, min_std)


def lira_online(target: Any, reference: Any, in_mask: Any, *, global_variance: bool = False,
                min_std: float = 1e-4) -> np.ndarray:
    """Online LiRA (Carlini et al. 2022): log N(s; mu_in, sd_in) - log N(s; mu_out, sd_out).

    ``target`` (n,) holds the target model's scaled scores, ``reference`` (n, R) the R reference
    models' scores on the same samples, ``in_mask`` (n, R) whether each reference model trained
    on each sample. Every example needs at least one IN and one OUT reference. ``min_std`` floors
    the std so that identical reference scores cannot produce a zero variance.
    """
    s, ref, mask = _check_reference(target, reference, in_mask)
    mu_in, sd_in = _gaussian_side(ref, mask, global_variance, min_std, "IN")
    mu_out, sd_out = _gaussian_side(ref, ~mask, global_variance, min_std, "OUT")
    return norm.logpdf(s, mu_in, sd_in) - norm.logpdf(s, mu_out, sd_out)


def lira_offline(target: Any, reference: Any, in_mask: Any | None = None, *, global_variance: bool = False,
                 test: Literal["one_sided", "neg_logpdf"] = "one_sided", min_std: float = 1e-4) -> np.ndarray:
    """Offline LiRA: only OUT reference scores (those with ``in_mask`` False; all when None).

    ``test="one_sided"`` (default, the paper's test): -log P(S >= s) under N(mu_out, sd_out), i.e.
    minus the log one-sided p-value; large when s is implausibly high for a non-member.
    ``test="neg_logpdf"``: -log N(s; mu_out, sd_out), which also flags implausibly low scores.
    """
    s, ref, mask = _check_reference(target, reference, in_mask)
    mu_out, sd_out = _gaussian_side(ref, ~mask, global_variance, min_std, "OUT")
    if test == "one_sided":
        return -norm.logsf(s, mu_out, sd_out)
    if test == "neg_logpdf":
        return -norm.logpdf(s, mu_out, sd_out)
    raise ValueError(f"test must be 'one_sided' or 'neg_logpdf', got {test!r}")


# ---------------------------------------------------------------------------------------------
# RMIA


def _log_mean_exp(a: np.ndarray, axis: int) -> np.ndarray:
    top = a.max(axis=axis, keepdims=True)
    return np.squeeze(top, axis) + np.log(np.exp(a - top).mean(axis=axis))


def _two_sum(a: np.ndarray, b: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """(s, e) with s = fl(a + b) and s + e = a + b exactly (Knuth's TwoSum)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _rmia_log_ratio(log_target: Any, log_reference: Any, *, offline_a: float | None = None,
                    out_mask: Any | None = None) -> tuple[np.ndarray, np.ndarray]:
    """log (p(x | theta) / p(x)) of RMIA (Zarifzadeh et al. 2024) as an unevaluated sum (hi, lo).

    ``log_target`` (n,) is the target model's log-probability of each sample's true label,
    ``log_reference`` (n, R) the reference models'. Online (``offline_a`` None): p(x) is their mean
    over all references. Offline: the mean over OUT references only (``out_mask`` (n, R), all when
    None) corrected linearly for the missing IN half, p(x) = ((1 + a) p_OUT(x) + (1 - a)) / 2.
    Kept as hi + lo exactly (TwoSum): a confident target's log p_y is about -e^(-z), far below the
    float64 resolution of log p(x), so a plain difference would tie every logit above ~37.
    """
    lt = _finite(log_target, "log_target", 1)
    lr = _finite(log_reference, "log_reference", 2)
    if lr.shape[0] != lt.size:
        raise ValueError(f"log_reference must have shape ({lt.size}, R), got {lr.shape}")
    if (lt > 0).any() or (lr > 0).any():
        raise ValueError("log_target and log_reference must be log-probabilities (<= 0)")
    if offline_a is None:
        if out_mask is not None:
            raise ValueError("out_mask is only used offline (set offline_a)")
        return _two_sum(-_log_mean_exp(lr, axis=1), lt)
    if not 0.0 <= offline_a <= 1.0:
        raise ValueError(f"offline_a must lie in [0, 1], got {offline_a}")
    out = np.ones(lr.shape, bool) if out_mask is None else _bool_mask(out_mask, "out_mask", lr.shape)
    n_out = out.sum(axis=1)
    if (n_out == 0).any():
        raise ValueError(f"out_mask: {int((n_out == 0).sum())} examples have no OUT reference model")
    masked = np.where(out, lr, -np.inf)
    top = masked.max(axis=1)
    log_p_out = top + np.log(np.exp(masked - top[:, None]).sum(axis=1) / n_out)
    with np.errstate(divide="ignore"):  # a = 1: log(1 - a) = -inf, and logaddexp handles it
        log_prior = np.logaddexp(np.log1p(offline_a) + log_p_out, np.log(1.0 - offline_a)) - np.log(2.0)
    return _two_sum(-log_prior, lt)


def rmia_scores(log_target_x: Any, log_reference_x: Any, log_target_z: Any, log_reference_z: Any, *,
                gamma: float = 1.0, offline_a: float | None = None, in_mask: Any | None = None) -> np.ndarray:
    """RMIA (Zarifzadeh et al. 2024): fraction of population samples z with LR(x, z) >= gamma.

    LR(x, z) = (p(x|theta) / p(x)) / (p(z|theta) / p(z)): ``log_target_x`` (n,) / ``log_reference_x``
    (n, R) are the target's and the references' log p_y of the audited samples, ``log_target_z``
    (m,) / ``log_reference_z`` (m, R) of population samples outside the target's training set
    (offline: outside every reference's too). Online (``offline_a`` None) the references should
    hold x IN for about half of them; offline only OUT references of x count (``in_mask`` (n, R)
    False; all when None) and the same linear correction applies to p(z), as in the authors' ML
    Privacy Meter. Every comparison is exact (``_rmia_log_ratio``); the score is a count over z, so
    samples whose ratios fall between the same two z tie, as in the paper. O((n + m) log(n + m)).
    """
    lz = _finite(log_reference_z, "log_reference_z", 2)
    lx = _finite(log_reference_x, "log_reference_x", 2)
    if lz.shape[1] != lx.shape[1]:
        raise ValueError(f"log_reference_z must have {lx.shape[1]} columns (one per reference), got {lz.shape}")
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    if in_mask is not None and offline_a is None:
        raise ValueError("in_mask is only used offline (set offline_a)")
    out_x = None if in_mask is None else ~_bool_mask(in_mask, "in_mask", lx.shape)
    z_hi, z_lo = _rmia_log_ratio(log_target_z, lz, offline_a=offline_a)
    x_hi, x_lo = _rmia_log_ratio(log_target_x, lx, offline_a=offline_a, out_mask=out_x)
    # LR(x, z) >= gamma  <=>  log ratio(z) <= log ratio(x) - log gamma, compared exactly: renormalise
    # both to (hi, lo) pairs (FastTwoSum), whose lexicographic order is that of their sums.
    s, e = _two_sum(x_hi, -np.log(gamma))
    x_hi, x_lo = _two_sum(s, e + x_lo)
    z_hi, z_lo = _two_sum(z_hi, z_lo)
    hi, lo = np.concatenate([z_hi, x_hi]), np.concatenate([z_lo, x_lo])
    is_x = np.concatenate([np.zeros(z_hi.size, bool), np.ones(x_hi.size, bool)])
    order = np.lexsort((is_x, lo, hi))  # ties: every z equal to x counts (z sorts first)
    z_before = np.cumsum(~is_x[order])
    counts = np.empty(x_hi.size, np.int64)
    counts[order[is_x[order]] - z_hi.size] = z_before[is_x[order]]
    return counts / z_hi.size


# ---------------------------------------------------------------------------------------------
# embedding models


def centroid_similarity(embeddings: Any, identity: Any, known: Any, candidates: Any | None = None) -> np.ndarray:
    """Cosine similarity of each candidate's embedding to its identity centroid.

    Attacker knowledge: the model's embeddings of the samples flagged ``known`` (n,), e.g. other
    photos of the same people it holds, and everyone's identity label. A candidate's centroid
    is the mean of the L2-normalised embeddings of the known samples of its identity, excluding
    the candidate itself (leave-one-out when a candidate is also known). Training on a sample
    pulls its embedding toward its identity's cluster, so members score higher than unseen
    photos of the same identities. ``candidates`` (n,) selects the scored samples (all when
    None); scores are returned in their order. Every candidate needs one other known sample of
    its identity.
    """
    e = _finite(embeddings, "embeddings", 2)
    n = e.shape[0]
    ident = np.asarray(identity)
    if ident.shape != (n,):
        raise ValueError(f"identity must have shape ({n},), got {ident.shape}")
    kn = _bool_mask(known, "known", (n,))
    cand = np.ones(n, bool) if candidates is None else _bool_mask(candidates, "candidates", (n,))
    if not cand.any():
        raise ValueError("candidates selects no sample")
    unit = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    codes, inv = np.unique(ident, return_inverse=True)
    sums = np.zeros((codes.size, e.shape[1]))
    np.add.at(sums, inv[kn], unit[kn])
    counts = np.bincount(inv[kn], minlength=codes.size)
    idx = np.flatnonzero(cand)
    own = kn[idx]
    c_sum = sums[inv[idx]] - np.where(own[:, None], unit[idx], 0.0)
    c_count = counts[inv[idx]] - own
    if (c_count == 0).any():
        raise ValueError(f"known: {int((c_count == 0).sum())} candidates have no other known sample of their identity")
    norm_c = np.linalg.norm(c_sum, axis=1)
    return np.einsum("nd,nd->n", unit[idx], c_sum) / np.maximum(norm_c, 1e-12)


# ---------------------------------------------------------------------------------------------
# FD-MIA: score-based


def posterior_features(logits: Any, labels: Any) -> np.ndarray:
    """Single-model attack features [phi, correct] (n, 2): the exact scaled confidence of the true
    label and whether the model predicts it. For a binary model this carries everything in
    ML-Doctor's sorted posteriors plus correctness bit (Liu et al. 2022; Shokri et al. 2017), and
    unlike p_y it does not saturate at 1 for the confident predictions where members live."""
    phi = scaled_confidence(logits, labels)
    return np.column_stack([phi, (phi > 0).astype(np.float64)])


def fd_mia_features(logits_bias: Any, logits_fair: Any, labels: Any) -> np.ndarray:
    """FD-MIA attack features (n, 5): [phi_bias, phi_fair, phi_bias - phi_fair, correct_bias, correct_fair].

    phi is each model's exact scaled confidence of the true label. The explicit gap is the feature
    the FD-MIA paper identifies: fairness interventions move members' predictions differently from
    non-members', so the disagreement between the two models leaks membership that neither
    model's output shows alone.
    """
    fb = posterior_features(logits_bias, labels)
    ff = posterior_features(logits_fair, labels)
    return np.column_stack([fb[:, 0], ff[:, 0], fb[:, 0] - ff[:, 0], fb[:, 1], ff[:, 1]])


class ShadowAttackModel:
    """Attack model trained on shadow models' outputs (Shokri et al. 2017; ML-Doctor settings).

    A small MLP (standardised inputs) maps per-sample features, from :func:`posterior_features`
    or :func:`fd_mia_features`, to P(member). Fit on features of shadow models' own members and
    non-members, then score the target's. An MLP rather than a linear model, because the FD-MIA
    signal can sit in the magnitude of the gap rather than its sign. Full-batch L-BFGS: the
    feature sets are small, and it is deterministic given ``seed`` (the initial weights).
    ``alpha`` is the L2 penalty: without it the MLP memorises the shadow set and never converges.
    """

    def __init__(self, *, seed: int, hidden: tuple[int, ...] = (32,), alpha: float = 1.0,
                 max_iter: int = 1000) -> None:
        self.hidden = hidden
        self.alpha = alpha
        self.seed = seed
        self.max_iter = max_iter
        self.model_: Pipeline | None = None

    def fit(self, features: Any, is_member: Any) -> ShadowAttackModel:
        """Train on shadow features (n, k) and their membership (n,)."""
        x = _finite(features, "features", 2)
        y = _bool_mask(is_member, "is_member", (x.shape[0],))
        if y.all() or not y.any():
            raise ValueError("is_member needs at least one member and one non-member")
        mlp = MLPClassifier(hidden_layer_sizes=self.hidden, solver="lbfgs", max_iter=self.max_iter,
                            alpha=self.alpha, random_state=self.seed)
        self.model_ = make_pipeline(StandardScaler(), mlp).fit(x, y)
        return self

    def score(self, features: Any) -> np.ndarray:
        """P(member) for each row of ``features`` (higher = more likely member)."""
        if self.model_ is None:
            raise RuntimeError("ShadowAttackModel.score called before fit")
        x = _finite(features, "features", 2)
        n_features = self.model_.n_features_in_
        if x.shape[1] != n_features:
            raise ValueError(f"features must have {n_features} columns, got {x.shape[1]}")
        return self.model_.predict_proba(x)[:, 1]


# ---------------------------------------------------------------------------------------------
# FD-MIA: bivariate LiRA


def bivariate_normal_logpdf(x: Any, mean: Any, cov: Any, *, min_var: float = 1e-8) -> np.ndarray:
    """log N2(x; mean, cov) in closed form, broadcasting over leading axes; x, mean (..., 2), cov (..., 2, 2).

    Regularised so that it is finite for any input covariance: variances are floored at
    ``min_var``, the (symmetrised) correlation is clipped to +-MAX_ABS_CORR, so the determinant
    is always positive, even for covariances estimated from too few or collinear references.
    """
    x = np.asarray(x, dtype=np.float64)
    mean = np.asarray(mean, dtype=np.float64)
    cov = np.asarray(cov, dtype=np.float64)
    if x.shape[-1:] != (2,) or mean.shape[-1:] != (2,) or cov.shape[-2:] != (2, 2):
        raise ValueError(f"x and mean must end in 2 and cov in (2, 2); got {x.shape}, {mean.shape}, {cov.shape}")
    a = np.maximum(cov[..., 0, 0], min_var)
    d = np.maximum(cov[..., 1, 1], min_var)
    bound = MAX_ABS_CORR * np.sqrt(a * d)
    b = np.clip((cov[..., 0, 1] + cov[..., 1, 0]) / 2, -bound, bound)
    det = a * d - b * b
    u = x[..., 0] - mean[..., 0]
    v = x[..., 1] - mean[..., 1]
    maha = (d * u * u - 2 * b * u * v + a * v * v) / det
    return -np.log(2 * np.pi) - 0.5 * np.log(det) - 0.5 * maha


def _check_pairs(target: Any, reference: Any, in_mask: Any | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s = _finite(target, "target", 2)
    if s.shape[1] != 2:
        raise ValueError(f"target must have shape (n, 2), got {s.shape}")
    ref = _finite(reference, "reference", 3)
    if ref.shape[0] != s.shape[0] or ref.shape[2] != 2:
        raise ValueError(f"reference must have shape ({s.shape[0]}, R, 2), got {ref.shape}")
    mask = np.zeros(ref.shape[:2], bool) if in_mask is None else _bool_mask(in_mask, "in_mask", ref.shape[:2])
    return s, ref, mask


def _bivariate_side(ref: np.ndarray, use: np.ndarray, global_covariance: bool,
                    side: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-example mean (n, 2) and covariance (n, 2, 2) of the reference pairs selected by ``use``.

    Per-example covariances (ddof=1) need three references on this side to be full rank
    generically; examples with fewer fall back to the pooled covariance of the residuals around
    per-example means, which ``global_covariance`` uses for every example.
    """
    count = use.sum(axis=1)
    if (count == 0).any():
        raise ValueError(f"in_mask: {int((count == 0).sum())} examples have no {side} reference pair")
    w = use[:, :, None].astype(np.float64)
    mu = (ref * w).sum(axis=1) / count[:, None]
    res = (ref - mu[:, None, :]) * w
    scatter = np.einsum("nri,nrj->nij", res, res)
    dof = int(count.sum() - count.size)
    need_pooled = global_covariance or (count < 3).any()
    if need_pooled and dof <= 0:
        raise ValueError(f"reference: a {side} covariance needs at least one example with two {side} pairs")
    pooled = scatter.sum(axis=0) / dof if dof > 0 else np.zeros((2, 2))
    if global_covariance:
        return mu, np.broadcast_to(pooled, scatter.shape)
    own = scatter / np.maximum(count - 1, 1)[:, None, None]
    return mu, np.where((count >= 3)[:, None, None], own, pooled)


def fd_lira_online(target: Any, reference: Any, in_mask: Any, *, global_covariance: bool = False,
                   min_std: float = 1e-4) -> np.ndarray:
    """LiRA-based FD-MIA, online: log N2(s; mu_in, C_in) - log N2(s; mu_out, C_out).

    ``target`` (n, 2) holds each sample's pair (phi under the biased model, phi under the fair
    model); ``reference`` (n, R, 2) the pairs from R reference (biased, fair) model pairs;
    ``in_mask`` (n, R) whether reference pair r trained on sample i. The full covariance is what
    lets the statistic see membership in the gap between the two models even when each score
    alone is uninformative.
    """
    s, ref, mask = _check_pairs(target, reference, in_mask)
    mu_in, c_in = _bivariate_side(ref, mask, global_covariance, "IN")
    mu_out, c_out = _bivariate_side(ref, ~mask, global_covariance, "OUT")
    min_var = min_std**2
    return (bivariate_normal_logpdf(s, mu_in, c_in, min_var=min_var)
            - bivariate_normal_logpdf(s, mu_out, c_out, min_var=min_var))


def fd_lira_offline(target: Any, reference: Any, in_mask: Any | None = None, *, global_covariance: bool = False,
                    min_std: float = 1e-4) -> np.ndarray:
    """LiRA-based FD-MIA, offline: -log N2(s; mu_out, C_out) from OUT reference pairs only.

    A pair has no single "high" direction, so the one-sided univariate test does not carry over;
    the OUT negative log-likelihood (a Mahalanobis-distance test) flags pairs implausible for a
    non-member, notably a gap between the two models that the OUT correlation makes unlikely.
    """
    s, ref, mask = _check_pairs(target, reference, in_mask)
    mu_out, c_out = _bivariate_side(ref, ~mask, global_covariance, "OUT")
    return -bivariate_normal_logpdf(s, mu_out, c_out, min_var=min_std**2)
