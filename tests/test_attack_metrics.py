"""Attack metrics and membership statistics: the numbers every leakage claim rests on.

Each metric is checked against a brute-force or closed-form reference computed independently
here, and each statistic on a synthetic case whose answer is known by construction.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import multivariate_normal, norm
from sklearn.metrics import roc_auc_score

from attacks.metrics import (
    attack_metrics,
    log_log_roc_plot,
    roc_auc,
    roc_points,
    tpr_at_fpr,
)
from attacks.scores import (
    ShadowAttackModel,
    bivariate_normal_logpdf,
    centroid_similarity,
    fd_lira_offline,
    fd_lira_online,
    fd_mia_features,
    lira_offline,
    lira_online,
    posterior_features,
    rmia_scores,
    sample_loss,
    scaled_confidence,
    scaled_confidence_from_logits,
)


def _brute_force(scores: np.ndarray, member: np.ndarray) -> list[tuple[float, float, float]]:
    """(threshold, fpr, tpr) for every threshold that admits ``scores >= t``, plus admit-nothing."""
    out = [(np.inf, 0.0, 0.0)]
    for t in np.unique(scores):
        admitted = scores >= t
        out.append((t, (admitted & ~member).sum() / (~member).sum(), (admitted & member).sum() / member.sum()))
    return out


def _scores_with_ties(n: int, levels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    member = rng.random(n) < 0.5
    member[:2] = [True, False]
    return rng.integers(0, levels, n).astype(float) + 0.5 * member * rng.random(n).round(), member


# --------------------------------------------------------------------------------- TPR @ FPR


@settings(max_examples=150, deadline=None)
@given(data=st.lists(st.tuples(st.integers(0, 6), st.booleans()), min_size=2, max_size=40)
       .filter(lambda d: any(m for _, m in d) and not all(m for _, m in d)),
       target=st.sampled_from([0.0, 0.001, 0.01, 0.1, 0.2, 1 / 3, 0.5, 0.9, 1.0]))
def test_tpr_at_fpr_never_exceeds_target_and_matches_brute_force(data: list[tuple[int, bool]], target: float) -> None:
    scores = np.array([float(s) for s, _ in data])  # few levels: many ties, mixed blocks
    member = np.array([m for _, m in data])
    got = tpr_at_fpr(scores, member, target)
    valid = [(t, fpr, tpr) for t, fpr, tpr in _brute_force(scores, member) if fpr <= target]
    assert got == max(tpr for _, _, tpr in valid)
    # The value is attained by some threshold whose FPR is within the target (never a tie-split).
    assert any(tpr == got for _, _, tpr in valid)
    # The batched path used by attack_metrics agrees.
    key = f"{target:g}"
    assert attack_metrics(scores, member, None, seed=0, n_boot=0, fpr_targets=[target])["tpr_at_fpr"][key] == got


def test_tied_block_that_would_exceed_target_is_excluded() -> None:
    # Top block (score 5) holds 2 members and 1 of 4 non-members: FPR 0.25 if admitted.
    scores = np.array([5, 5, 5, 3, 3, 1, 1, 1.0])
    member = np.array([1, 1, 0, 1, 0, 0, 0, 1], bool)
    assert tpr_at_fpr(scores, member, 0.2) == 0.0  # admitting the block would give FPR 0.25
    assert tpr_at_fpr(scores, member, 0.25) == 0.5
    assert tpr_at_fpr(scores, member, 0.49) == 0.5  # next block (score 3) would give FPR 0.5
    assert tpr_at_fpr(scores, member, 0.5) == 0.75


def test_roc_points_one_point_per_distinct_score() -> None:
    scores, member = _scores_with_ties(60, 5, seed=3)
    fpr, tpr, thr = roc_points(scores, member)
    assert (fpr[0], tpr[0], thr[0]) == (0.0, 0.0, np.inf)
    assert (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0) and np.all(np.diff(thr) < 0)
    expected = _brute_force(scores, member)
    expected = [expected[0]] + sorted(expected[1:], key=lambda r: -r[0])
    np.testing.assert_allclose(np.column_stack([fpr, tpr]), [(f, t) for _, f, t in expected])


@pytest.mark.parametrize("seed", range(8))
def test_auc_and_best_threshold_accuracy_match_brute_force(seed: int) -> None:
    scores, member = _scores_with_ties(int(np.random.default_rng(seed).integers(5, 80)), 6, seed)
    assert roc_auc(scores, member) == pytest.approx(roc_auc_score(member, scores), abs=1e-12)
    n1, n0 = member.sum(), (~member).sum()
    best = max(_brute_force(scores, member), key=lambda r: ((r[2] + 1 - r[1]) / 2, r[0]))  # highest among ties
    metrics = attack_metrics(scores, member, None, seed=0, n_boot=0)
    acc, bal = metrics["accuracy"], metrics["balanced_accuracy"]
    assert bal == pytest.approx((best[2] + 1 - best[1]) / 2)
    assert acc == pytest.approx((best[2] * n1 + (1 - best[1]) * n0) / (n1 + n0))


def test_auc_extremes_and_chance() -> None:
    member = np.repeat([True, False], 500)
    separated = np.where(member, 1.0, 0.0) + np.linspace(0, 0.5, 1000)
    assert roc_auc(separated, member) == 1.0
    assert roc_auc(-separated, member) == 0.0
    assert roc_auc(np.ones(1000), member) == 0.5
    rng = np.random.default_rng(0)
    assert abs(roc_auc(rng.normal(size=20_000), rng.random(20_000) < 0.5) - 0.5) < 0.02
    metrics = attack_metrics(separated, member, None, seed=0, n_boot=0)
    assert (metrics["accuracy"], metrics["balanced_accuracy"]) == (1.0, 1.0)
    assert tpr_at_fpr(separated, member, 0.001) == 1.0


# --------------------------------------------------------------------------------- bootstrap and report


def _signal(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    member = rng.random(n) < 0.5
    return rng.normal(0.6 * member, 1.0), member


def test_bootstrap_is_seeded_and_brackets_the_estimate() -> None:
    scores, member = _signal()
    start = time.perf_counter()
    a = attack_metrics(scores, member, None, seed=7, n_boot=1000)
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0, f"1000 bootstrap resamples of 2000 scores took {elapsed:.1f} s"
    assert a == attack_metrics(scores, member, None, seed=7, n_boot=1000)
    b = attack_metrics(scores, member, None, seed=8, n_boot=1000)
    assert a["ci95"] != b["ci95"]
    assert a["auc"] == b["auc"]  # point estimates do not depend on the seed
    ci = a["ci95"]
    for key in ("auc", "accuracy", "balanced_accuracy"):
        lo, hi = ci[key]
        assert lo < a[key] < hi, key
    for key, (lo, hi) in ci["tpr_at_fpr"].items():
        assert lo <= a["tpr_at_fpr"][key] <= hi, key
    assert 0.62 < a["auc"] < 0.72 and ci["auc"][1] - ci["auc"][0] < 0.1
    assert a["n_members"] + a["n_nonmembers"] == 2000 and a["n_boot"] == 1000 and a["seed"] == 7


def test_per_group_breakdown() -> None:
    scores, member = _signal(400, seed=1)
    gender = np.random.default_rng(2).integers(0, 2, 400)
    only_members = np.where(member, 1, 2)
    out = attack_metrics(scores, member, groups={"gender": gender, "odd": only_members}, seed=0, n_boot=50)
    for g in (0, 1):
        sel = gender == g
        got = out["per_group"]["gender"][str(g)]
        assert got["auc"] == pytest.approx(roc_auc(scores[sel], member[sel]))
        assert got["tpr_at_fpr"]["0.01"] == tpr_at_fpr(scores[sel], member[sel], 0.01)
        assert (got["n_members"], got["n_nonmembers"]) == (member[sel].sum(), (~member[sel]).sum())
        assert "ci95" not in got
    undefined = out["per_group"]["odd"]["1"]
    assert undefined["auc"] is None and undefined["n_nonmembers"] == 0 and undefined["n_members"] == member.sum()


@pytest.mark.parametrize("scores, member, match", [
    ([0.1, 0.2], [True], "is_member must have the shape"),
    ([], [], "scores is empty"),
    ([0.1, np.nan], [True, False], "NaN"),
    ([0.1, 0.2], [True, True], "at least one member and one non-member"),
    ([[0.1, 0.2]], [[True, False]], "scores must be 1-D"),
])
def test_metric_input_errors(scores: list, member: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        attack_metrics(scores, member, None, seed=0, n_boot=0)


def test_group_and_target_errors() -> None:
    scores, member = _signal(20)
    with pytest.raises(ValueError, match=r"groups\['g'\]"):
        attack_metrics(scores, member, {"g": np.zeros(3)}, seed=0, n_boot=0)
    with pytest.raises(ValueError, match="target FPR"):
        tpr_at_fpr(scores, member, 1.5)


def test_log_log_roc_plot_writes_png_atomically(tmp_path: Path) -> None:
    curves = {"strong": _signal(300, 0), "none": (np.zeros(300), _signal(300, 1)[1])}
    path = tmp_path / "plots" / "roc.png"
    log_log_roc_plot(curves, path, title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["roc.png"]  # no temporary file left behind


# --------------------------------------------------------------------------------- scaled confidence


def test_loss_and_scaled_confidence() -> None:
    p = np.array([0.9, 0.2, 0.5, 1.0, 0.0])
    y = np.array([1, 1, 0, 1, 1])
    phi = scaled_confidence(p, y)
    np.testing.assert_allclose(phi[:3], [np.log(9), np.log(0.25), 0.0], atol=1e-12)
    assert np.isfinite(phi).all() and phi[3] > 25 and phi[4] < -25  # clipped, not infinite
    np.testing.assert_allclose(sample_loss(p, y)[:3], -np.log([0.9, 0.2, 0.5]))
    probs = np.array([[0.7, 0.2, 0.1], [1 - 1e-10, 5e-11, 5e-11]])
    np.testing.assert_allclose(scaled_confidence(probs, [0, 0]), [np.log(0.7 / 0.3), np.log((1 - 1e-10) / 1e-10)],
                               rtol=1e-12)  # the other classes are summed, not taken as 1 - p_y
    logits = np.array([[2.0, -1.0, 0.5], [0.0, 3.0, 1.0]])
    soft = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(scaled_confidence_from_logits(logits, [0, 2]), scaled_confidence(soft, [0, 2]))
    np.testing.assert_allclose(scaled_confidence_from_logits(np.array([40.0, 40.0]), [1, 0]), [40.0, -40.0])
    with pytest.raises(ValueError, match="labels must lie"):
        scaled_confidence(p, [1, 1, 0, 1, 2])
    with pytest.raises(ValueError, match="probs must be finite probabilities"):
        sample_loss([0.5, 1.5], [1, 1])


# --------------------------------------------------------------------------------- LiRA


# Hand-made table: 3 samples, 6 reference models.
TARGET = np.array([2.0, -0.5, 1.0])
REFERENCE = np.array([[2.5, 1.0, 2.1, 0.2, 1.7, 0.4],
                      [0.0, -1.0, 0.3, -0.4, -2.0, -1.1],
                      [1.5, 1.6, 0.0, 1.9, -0.2, 0.1]])
IN_MASK = np.array([[1, 0, 1, 0, 1, 0],
                    [1, 0, 1, 0, 0, 1],
                    [1, 1, 0, 1, 0, 0]], bool)


def _side(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-example mean and std (ddof=1) and the pooled within-example std of the masked scores."""
    mu = np.array([REFERENCE[i, mask[i]].mean() for i in range(3)])
    sd = np.array([REFERENCE[i, mask[i]].std(ddof=1) if mask[i].sum() > 1 else np.nan for i in range(3)])
    pooled = np.sqrt(sum(((REFERENCE[i, mask[i]] - mu[i]) ** 2).sum() for i in range(3)) / (mask.sum() - 3))
    return mu, sd, pooled


def test_lira_reproduces_gaussian_likelihood_ratio() -> None:
    mu_in, sd_in, pooled_in = _side(IN_MASK)
    mu_out, sd_out, pooled_out = _side(~IN_MASK)
    expected = norm.logpdf(TARGET, mu_in, sd_in) - norm.logpdf(TARGET, mu_out, sd_out)
    np.testing.assert_allclose(lira_online(TARGET, REFERENCE, IN_MASK), expected, rtol=1e-12)
    expected_global = norm.logpdf(TARGET, mu_in, pooled_in) - norm.logpdf(TARGET, mu_out, pooled_out)
    np.testing.assert_allclose(lira_online(TARGET, REFERENCE, IN_MASK, global_variance=True), expected_global,
                               rtol=1e-12)
    p_value = norm.sf((TARGET - mu_out) / sd_out)  # 1 - Phi(z), the one-sided test of Carlini et al.
    np.testing.assert_allclose(lira_offline(TARGET, REFERENCE, IN_MASK), -np.log(p_value), rtol=1e-10)
    np.testing.assert_allclose(lira_offline(TARGET, REFERENCE, IN_MASK, test="neg_logpdf"),
                               -norm.logpdf(TARGET, mu_out, sd_out), rtol=1e-12)
    # Offline without a mask: every reference model is OUT.
    all_out = norm.logsf(TARGET, REFERENCE.mean(axis=1), REFERENCE.std(axis=1, ddof=1))
    np.testing.assert_allclose(lira_offline(TARGET, REFERENCE), -all_out, rtol=1e-12)


def test_lira_guards() -> None:
    mask = IN_MASK.copy()
    mask[0] = [1, 0, 0, 0, 0, 0]  # one IN reference: its std falls back to the pooled IN std
    _, _, pooled_in = _side(mask)
    mu_out0 = REFERENCE[0, 1:].mean()
    got = lira_online(TARGET, REFERENCE, mask)[0]
    sd_out0 = REFERENCE[0, 1:].std(ddof=1)
    assert got == pytest.approx(norm.logpdf(2.0, 2.5, pooled_in) - norm.logpdf(2.0, mu_out0, sd_out0))
    constant = np.ones((3, 6))  # zero variance everywhere: floored, finite
    assert np.isfinite(lira_online(TARGET, constant, IN_MASK)).all()
    with pytest.raises(ValueError, match="1 examples have no IN reference"):
        lira_online(TARGET, REFERENCE, np.vstack([np.zeros(6, bool), IN_MASK[1:]]))
    with pytest.raises(ValueError, match="reference must have shape"):
        lira_online(TARGET, REFERENCE[:2], IN_MASK)
    with pytest.raises(ValueError, match="target contains NaN"):
        lira_offline(np.array([np.nan, 0, 0]), REFERENCE)
    with pytest.raises(ValueError, match="test must be"):
        lira_offline(TARGET, REFERENCE, test="two_sided")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------- FD-MIA


def _gap_only_pairs(n: int, r: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(target pairs, reference pairs, in_mask, is_member) where membership lives only in the gap.

    Both models' scores have the same N(m_i, 1) marginals for members and non-members; for
    non-members the two models agree (correlation 0.9), members' scores decorrelate (0.0), so the
    gap s_bias - s_fair is wider for members while each marginal carries no information.
    """
    rng = np.random.default_rng(seed)
    m = rng.normal(1.0, 1.0, n)[:, None]

    def draw(rho: float, shape: tuple[int, ...]) -> np.ndarray:
        chol = np.linalg.cholesky(np.array([[1.0, rho], [rho, 1.0]]))
        return rng.standard_normal(shape + (2,)) @ chol.T

    in_mask = rng.random((n, r)).argsort(axis=1) < r // 2  # each sample IN for exactly half
    ref = m[:, :, None] + np.where(in_mask[..., None], draw(0.0, (n, r)), draw(0.9, (n, r)))
    member = rng.random(n) < 0.5
    target = m + np.where(member[:, None], draw(0.0, (n,)), draw(0.9, (n,)))
    return target, ref, in_mask, member


def test_bivariate_logpdf_matches_scipy_and_survives_singular_covariance() -> None:
    x = np.array([[0.3, -1.2], [2.0, 1.0]])
    mean = np.array([0.1, -0.5])
    cov = np.array([[1.5, 0.6], [0.6, 0.8]])
    np.testing.assert_allclose(bivariate_normal_logpdf(x, mean, cov), multivariate_normal(mean, cov).logpdf(x))
    singular = np.array([[[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]])
    assert np.isfinite(bivariate_normal_logpdf(x, mean, singular)).all()


def test_fd_lira_sees_the_gap_single_model_lira_does_not() -> None:
    target, ref, in_mask, member = _gap_only_pairs(1000, 16, seed=0)
    single_online = roc_auc(lira_online(target[:, 0], ref[..., 0], in_mask, global_variance=True), member)
    single_offline = roc_auc(lira_offline(target[:, 1], ref[..., 1], in_mask, test="neg_logpdf"), member)
    assert abs(single_online - 0.5) < 0.06 and abs(single_offline - 0.5) < 0.06
    for global_covariance in (False, True):
        online = roc_auc(fd_lira_online(target, ref, in_mask, global_covariance=global_covariance), member)
        offline = roc_auc(fd_lira_offline(target, ref, in_mask, global_covariance=global_covariance), member)
        assert online > 0.7 and offline > 0.7, (global_covariance, online, offline)
    with pytest.raises(ValueError, match=r"reference must have shape \(1000, R, 2\)"):
        fd_lira_online(target, ref[..., :1], in_mask)


def test_fd_lira_online_formula() -> None:
    target, ref, in_mask, _ = _gap_only_pairs(4, 8, seed=1)
    got = fd_lira_online(target, ref, in_mask)
    for i in range(4):
        a, b = ref[i, in_mask[i]], ref[i, ~in_mask[i]]
        expected = (multivariate_normal(a.mean(0), np.cov(a.T)).logpdf(target[i])
                    - multivariate_normal(b.mean(0), np.cov(b.T)).logpdf(target[i]))
        assert got[i] == pytest.approx(expected, rel=1e-9)


def test_score_based_fd_mia_beats_single_model() -> None:
    def sigmoid(x: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-x))

    shadow, _, _, shadow_member = _gap_only_pairs(1000, 2, seed=2)
    target, _, _, member = _gap_only_pairs(1000, 2, seed=3)
    labels = np.ones(1000, int)
    fd = ShadowAttackModel(seed=0).fit(fd_mia_features(sigmoid(shadow[:, 0]), sigmoid(shadow[:, 1]), labels),
                                       shadow_member)
    fd_auc = roc_auc(fd.score(fd_mia_features(sigmoid(target[:, 0]), sigmoid(target[:, 1]), labels)), member)
    single = ShadowAttackModel(seed=0).fit(posterior_features(sigmoid(shadow[:, 1]), labels), shadow_member)
    single_auc = roc_auc(single.score(posterior_features(sigmoid(target[:, 1]), labels)), member)
    assert fd_auc > 0.7 and abs(single_auc - 0.5) < 0.06, (fd_auc, single_auc)
    with pytest.raises(ValueError, match="features must have 5 columns"):
        fd.score(np.zeros((3, 2)))


# --------------------------------------------------------------------------------- RMIA


def _rmia_case(signal: float, seed: int, n: int = 1000, m: int = 500, r: int = 8):
    """True-label probabilities: members get +signal logits under the target (and IN references)."""
    rng = np.random.default_rng(seed)

    def sigmoid(x: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-x))

    hard_x, hard_z = rng.normal(1.0, 1.5, (n, 1)), rng.normal(1.0, 1.5, (m, 1))
    member = rng.random(n) < 0.5
    in_mask = rng.random((n, r)).argsort(axis=1) < r // 2
    target_x = sigmoid(hard_x[:, 0] + signal * member + rng.normal(0, 0.3, n))
    ref_x = sigmoid(hard_x + signal * in_mask + rng.normal(0, 0.3, (n, r)))
    target_z = sigmoid(hard_z[:, 0] + rng.normal(0, 0.3, m))
    ref_z = sigmoid(hard_z + rng.normal(0, 0.3, (m, r)))
    return target_x, ref_x, target_z, ref_z, in_mask, member


def test_rmia_detects_members_and_is_chance_without_signal() -> None:
    tx, rx, tz, rz, in_mask, member = _rmia_case(1.0, seed=0)
    assert roc_auc(rmia_scores(tx, rx, tz, rz), member) > 0.65
    assert roc_auc(rmia_scores(tx, rx, tz, rz, offline_a=0.3, in_mask=in_mask), member) > 0.65
    tx, rx, tz, rz, in_mask, member = _rmia_case(0.0, seed=1)
    assert abs(roc_auc(rmia_scores(tx, rx, tz, rz), member) - 0.5) < 0.06
    with pytest.raises(ValueError, match="in_mask is only used offline"):
        rmia_scores(tx, rx, tz, rz, in_mask=in_mask)
    with pytest.raises(ValueError, match="reference_z must have shape"):
        rmia_scores(tx, rx, tz, rz[:, :3])


def test_rmia_matches_pairwise_definition() -> None:
    tx, rx, tz, rz, in_mask, _ = _rmia_case(1.0, seed=2, n=40, m=30, r=4)
    for gamma in (0.5, 1.0, 2.0):
        ratio_x, ratio_z = tx / rx.mean(axis=1), tz / rz.mean(axis=1)
        expected = (ratio_x[:, None] / ratio_z[None, :] >= gamma).mean(axis=1)
        np.testing.assert_allclose(rmia_scores(tx, rx, tz, rz, gamma=gamma), expected)
    a = 0.4
    p_out = np.array([rx[i, ~in_mask[i]].mean() for i in range(40)])
    ratio_x = tx / (((1 + a) * p_out + 1 - a) / 2)
    ratio_z = tz / (((1 + a) * rz.mean(axis=1) + 1 - a) / 2)
    expected = (ratio_x[:, None] / ratio_z[None, :] >= 1.0).mean(axis=1)
    np.testing.assert_allclose(rmia_scores(tx, rx, tz, rz, offline_a=a, in_mask=in_mask), expected)


# --------------------------------------------------------------------------------- embeddings


def test_centroid_similarity_leave_one_out() -> None:
    emb = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [1.0, 1.0], [-1.0, 0.0]])
    identity = np.array([7, 7, 7, 9, 9])
    known = np.array([True, True, False, False, True])
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)

    def cos(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    # Known samples are scored against the others of their identity, never against themselves.
    expected = [cos(unit[0], unit[1]), cos(unit[1], unit[0]), cos(unit[2], unit[0] + unit[1]), cos(unit[3], unit[4])]
    got = centroid_similarity(emb, identity, known, candidates=[1, 1, 1, 1, 0])
    np.testing.assert_allclose(got, expected)
    # Sample 4 is the only known sample of identity 9: excluding itself leaves nothing.
    with pytest.raises(ValueError, match="1 candidates have no other known sample"):
        centroid_similarity(emb, identity, known)
