"""Attack metrics and membership statistics: the numbers every leakage claim rests on.

Each metric is checked against a brute-force or closed-form reference computed independently
here, and each statistic on a synthetic case whose answer is known by construction.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import multivariate_normal, norm
from sklearn.metrics import roc_auc_score

import attacks.metrics
from attacks.metrics import (
    RocCurve,
    attack_metrics,
    roc_auc,
    roc_figures,
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
    log_true_prob,
    posterior_features,
    rmia_scores,
    sample_loss,
    scaled_confidence,
)
from common.report.plots import log_log_roc, roc_figure
from common.runs.rundir import RunDir


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
    # The batched path used by attack_metrics agrees where the nonmembers resolve the target, and
    # reports nothing where they do not (at least 10 expected false positives).
    key = f"{target:g}"
    reported = attack_metrics(scores, member, None, seed=0, n_boot=0, fpr_targets=[target])["tpr_at_fpr"][key]
    assert reported == (got if (~member).sum() * target >= 10 else None)


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
    assert ci["tpr_at_fpr"]["0.001"] is None and a["tpr_at_fpr"]["0.001"] is None  # needs 10,000 nonmembers
    wider = attack_metrics(*_signal(4000), None, seed=7, n_boot=200)  # ~2000 nonmembers resolve 1% FPR
    lo, hi = wider["ci95"]["tpr_at_fpr"]["0.01"]
    assert lo <= wider["tpr_at_fpr"]["0.01"] <= hi
    assert 0.62 < a["auc"] < 0.72 and ci["auc"][1] - ci["auc"][0] < 0.1
    assert a["n_members"] + a["n_nonmembers"] == 2000 and a["n_boot"] == 1000 and a["seed"] == 7


def test_per_group_breakdown() -> None:
    """Groups get their own metrics where they have the samples for them: an AUC from 50 members and
    50 nonmembers, a TPR only where the group's nonmembers resolve the FPR; smaller groups say why not."""
    scores, member = _signal(4800, seed=1)
    gender = np.random.default_rng(2).integers(0, 2, 4800)
    only_members = np.where(member, 1, 2)
    small = np.where(np.arange(4800) < 60, 1, 0)  # group 1: about 30 members and 30 nonmembers
    out = attack_metrics(scores, member, groups={"gender": gender, "odd": only_members, "small": small},
                         seed=0, n_boot=50)
    for g in (0, 1):
        sel = gender == g
        got = out["per_group"]["gender"][str(g)]
        assert got["auc"] == pytest.approx(roc_auc(scores[sel], member[sel]))
        assert got["tpr_at_fpr"]["0.01"] == tpr_at_fpr(scores[sel], member[sel], 0.01)  # ~1200 nonmembers
        assert got["tpr_at_fpr"]["0.001"] is None  # would need 10,000
        assert (got["n_members"], got["n_nonmembers"]) == (member[sel].sum(), (~member[sel]).sum())
        assert "ci95" not in got and "omitted" not in got
    undefined = out["per_group"]["odd"]["1"]
    assert undefined["auc"] is None and undefined["n_nonmembers"] == 0 and undefined["n_members"] == member.sum()
    few = out["per_group"]["small"]["1"]
    assert few["auc"] is None and few["tpr_at_fpr"] == {"0.001": None, "0.01": None}
    assert few["n_members"] + few["n_nonmembers"] == 60 and "fewer than 50" in few["omitted"]


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


def _roc(family: str, label: str, n_members: int, n_nonmembers: int, seed: int = 0) -> RocCurve:
    member = np.arange(n_members + n_nonmembers) < n_members
    return RocCurve(family, label, np.random.default_rng(seed).normal(0.6 * member, 1.0), member)


def test_roc_figures_write_one_png_per_family_atomically(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    curves = [_roc("clients", "loss (client 0)", 200, 150), _roc("global", "loss", 300, 300, 1),
              _roc("clients", "loss (client 1)", 100, 120, 2), _roc("global", "lira", 300, 300, 3)]
    written = roc_figures(curves, run.audit_roc)
    assert list(written.items()) == [("global", run.audit_roc("global")), ("clients", run.audit_roc("clients"))]
    assert all(path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for path in written.values())
    # no figure for the family without curves, and no temporary file left behind
    assert sorted(p.name for p in run.audit.iterdir()) == ["roc-clients.png", "roc-global.png"]


def test_roc_figures_title_counts_and_show_tpr_only_where_resolvable(monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: dict[Path, tuple[list[str], float, str]] = {}
    monkeypatch.setattr(attacks.metrics, "log_log_roc",
                        lambda curves, path, lo, title: drawn.update({path: (list(curves), lo, title)}))
    curves = [_roc("global", "loss", 600, 1000), _roc("global", "lira", 600, 1000, 1),
              _roc("mote", "loss (gallery)", 50, 999, 2), _roc("mote", "loss (pair)", 40, 1000, 3)]
    assert roc_figures(curves, lambda family: Path(family)) == {"global": Path("global"), "mote": Path("mote")}

    def legend(c: RocCurve, tpr: bool) -> str:
        auc = f"{c.label}: AUC {roc_auc(c.scores, c.is_member):.3f}"
        return auc + f", TPR@1% FPR {tpr_at_fpr(c.scores, c.is_member, 0.01):.3f}" if tpr else auc

    assert drawn[Path("global")] == ([legend(curves[0], True), legend(curves[1], True)], 1e-3,
                                     "final global model: membership inference\n(600 members vs 1000 nonmembers)")
    # 999 nonmembers x 1% is below 10 expected false positives: that curve's TPR@1% FPR is noise
    assert drawn[Path("mote")] == ([legend(curves[2], False), legend(curves[3], True)], 1e-3,
                                   "MOTE galleries: membership inference\n(up to 50 members vs up to 1000 nonmembers)")


def test_roc_figures_reject_unknown_families_and_shared_labels(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown family 'server'"):
        _roc("server", "loss", 10, 10)
    with pytest.raises(ValueError, match=r"share a label: \['loss'\]"):
        roc_figures([_roc("global", "loss", 10, 10), _roc("global", "loss", 10, 10, 1)], RunDir(tmp_path).audit_roc)


@pytest.mark.parametrize("n", [14, 30])
def test_roc_figure_legend_lies_outside_the_axes_and_every_curve_is_distinct(n: int, tmp_path: Path) -> None:
    from matplotlib.colors import to_hex

    x = np.logspace(-3, 0, 50)
    curves = {f"attack {i} (client {i}): AUC 0.5": (x, x ** (1.0 / (1.0 + i / 10))) for i in range(n)}
    fig = roc_figure(curves, 1e-3, title="test")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [*curves, "chance"]
    assert legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1  # right of the axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    styles = {(to_hex(lines[label].get_color()), lines[label].get_linestyle()) for label in curves}
    assert len(styles) == n
    assert (to_hex(lines["chance"].get_color()), lines["chance"].get_linestyle()) not in styles
    assert ax.get_xlim() == ax.get_ylim() == (1e-3, 1.0)

    path = tmp_path / "roc.png"
    log_log_roc(curves, path, 1e-3)
    width, height = struct.unpack(">II", path.read_bytes()[16:24])  # the PNG's IHDR
    assert width > height  # widened to the legend rather than clipping it


# --------------------------------------------------------------------------------- scaled confidence


def test_loss_and_scaled_confidence_from_logits() -> None:
    z = np.array([np.log(9), np.log(0.25), 0.0, 40.0, -40.0])  # p = 0.9, 0.2, 0.5 and saturated
    y = np.array([1, 1, 0, 1, 1])
    np.testing.assert_allclose(scaled_confidence(z, y), [np.log(9), np.log(0.25), 0.0, 40.0, -40.0], atol=1e-12)
    np.testing.assert_allclose(sample_loss(z, y)[:3], -np.log([0.9, 0.2, 0.5]), rtol=1e-12)
    assert sample_loss(z, y)[3] == pytest.approx(np.exp(-40.0), rel=1e-9)  # not 0: no rounding to p = 1
    assert sample_loss(z, y)[4] == pytest.approx(40.0, rel=1e-12)
    logits = np.array([[2.0, -1.0, 0.5], [0.0, 3.0, 1.0]])
    soft = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(scaled_confidence(logits, [0, 2]), np.log(soft[[0, 1], [0, 2]] / (1 - soft[[0, 1], [0, 2]])))
    np.testing.assert_allclose(log_true_prob(logits, [0, 2]), np.log(soft[[0, 1], [0, 2]]), rtol=1e-12)
    with pytest.raises(ValueError, match="labels must lie"):
        scaled_confidence(z, [1, 1, 0, 1, 2])
    with pytest.raises(ValueError, match="logits contains NaN"):
        sample_loss([0.5, np.inf], [1, 1])


@pytest.mark.parametrize("label", [0, 1])
def test_statistics_are_exact_and_strictly_monotone_up_to_logit_40(label: int) -> None:
    """phi, the loss and RMIA separate every pair of distinct logits in [-40, 40]: nothing saturates
    where float32 probabilities would (1 - p = 0 beyond a logit of ~16.6), nor where log p_y = -e^(-40)
    meets an O(1) reference term (RMIA compares its ratios exactly)."""
    z = np.linspace(-40.0, 40.0, 4001)
    y = np.full(z.size, label)
    toward = 1 if label == 1 else -1  # the true label's direction: larger is more confident
    for score in (scaled_confidence(z, y), -sample_loss(z, y), log_true_prob(z, y)):
        steps = np.diff(score) * toward
        assert (steps > 0).all(), "two distinct logits got the same (or a reversed) score"
    np.testing.assert_array_equal(scaled_confidence(z, y), toward * z)  # exact, not just monotone
    # RMIA: with a population z between every two audited logits, each logit gets its own count
    refs = np.tile([-3.0, -1.0, -0.5, -0.1], (z.size, 1))  # the same references for every sample
    rank = rmia_scores(log_true_prob(z, y), refs, log_true_prob(z + 0.01, y), refs)
    assert (np.diff(rank) * toward > 0).all()


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
    shadow, _, _, shadow_member = _gap_only_pairs(1000, 2, seed=2)
    target, _, _, member = _gap_only_pairs(1000, 2, seed=3)
    labels = np.ones(1000, int)
    fd = ShadowAttackModel(seed=0).fit(fd_mia_features(shadow[:, 0], shadow[:, 1], labels), shadow_member)
    fd_auc = roc_auc(fd.score(fd_mia_features(target[:, 0], target[:, 1], labels)), member)
    single = ShadowAttackModel(seed=0).fit(posterior_features(shadow[:, 1], labels), shadow_member)
    single_auc = roc_auc(single.score(posterior_features(target[:, 1], labels)), member)
    assert fd_auc > 0.7 and abs(single_auc - 0.5) < 0.06, (fd_auc, single_auc)
    with pytest.raises(ValueError, match="features must have 5 columns"):
        fd.score(np.zeros((3, 2)))


# --------------------------------------------------------------------------------- RMIA


def _rmia_case(signal: float, seed: int, n: int = 1000, m: int = 500, r: int = 8):
    """True-label log-probabilities: members get +signal logits under the target (and IN references)."""
    rng = np.random.default_rng(seed)

    def sigmoid(x: np.ndarray) -> np.ndarray:
        return -np.logaddexp(0.0, -x)  # log sigmoid

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
    with pytest.raises(ValueError, match="log_reference_z must have 8 columns"):
        rmia_scores(tx, rx, tz, rz[:, :3])


def test_rmia_matches_pairwise_definition() -> None:
    tx, rx, tz, rz, in_mask, _ = _rmia_case(1.0, seed=2, n=40, m=30, r=4)
    np.testing.assert_array_equal(rmia_scores(tx, rx, tz, rz), rmia_scores(tx, rx, tz, rz))
    tx, rx, tz, rz = np.exp(tx), np.exp(rx), np.exp(tz), np.exp(rz)  # the definition, in probabilities
    log = np.log
    for gamma in (0.5, 1.0, 2.0):
        ratio_x, ratio_z = tx / rx.mean(axis=1), tz / rz.mean(axis=1)
        expected = (ratio_x[:, None] / ratio_z[None, :] >= gamma).mean(axis=1)
        np.testing.assert_allclose(rmia_scores(log(tx), log(rx), log(tz), log(rz), gamma=gamma), expected)
    a = 0.4
    p_out = np.array([rx[i, ~in_mask[i]].mean() for i in range(40)])
    ratio_x = tx / (((1 + a) * p_out + 1 - a) / 2)
    ratio_z = tz / (((1 + a) * rz.mean(axis=1) + 1 - a) / 2)
    expected = (ratio_x[:, None] / ratio_z[None, :] >= 1.0).mean(axis=1)
    np.testing.assert_allclose(rmia_scores(log(tx), log(rx), log(tz), log(rz), offline_a=a, in_mask=in_mask), expected)


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


def test_paired_difference_is_exact_at_the_point_and_tighter_than_unpaired() -> None:
    """Two attacks on the same samples: the difference of their AUCs with a paired bootstrap
    interval; shared per-sample difficulty cancels, so it is much narrower than either AUC's own
    interval, and it covers 0 when the two attacks only differ by a little noise."""
    from attacks.metrics import paired_difference

    scores, member = _signal(2000, seed=4)
    rng = np.random.default_rng(5)
    better = scores + 0.8 * member
    noisy = scores + rng.normal(0, 0.05, scores.size)
    d = paired_difference(better, scores, member, seed=0, n_boot=400)
    assert d["difference"] == pytest.approx(roc_auc(better, member) - roc_auc(scores, member), abs=1e-12)
    assert 0 < d["ci95"][0] <= d["difference"] <= d["ci95"][1]
    width = d["ci95"][1] - d["ci95"][0]
    own = attack_metrics(scores, member, None, seed=0, n_boot=400)["ci95"]["auc"]
    assert width < 0.6 * (own[1] - own[0])
    same = paired_difference(noisy, scores, member, seed=0, n_boot=400)
    assert same["ci95"][0] <= 0 <= same["ci95"][1]
    assert paired_difference(better, scores, member, seed=0, n_boot=100, metric="0.01")["difference"] > 0
    with pytest.raises(ValueError, match="cannot resolve"):
        paired_difference(better, scores, member, seed=0, metric="0.001")
