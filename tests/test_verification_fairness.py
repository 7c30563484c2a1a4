"""Global threshold at a target FMR and the group-fairness figures built on it (FDR, GARBE, IR)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.evaluation.verification_fairness import (
    fdr,
    fnmr_fmr,
    garbe,
    gini,
    igarbe,
    inequity_rate,
    threshold_at_fmr,
    verification_report,
)


@settings(max_examples=300, deadline=None)
@given(scores=st.one_of(st.lists(st.integers(-5, 5).map(float), min_size=1, max_size=60),  # many ties
                        st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=60)),
       target=st.one_of(st.sampled_from([0.0, 1e-3, 0.01, 0.1, 0.29, 0.5, 1.0]), st.floats(0.0, 1.0)),
       float32=st.booleans())
def test_threshold_never_exceeds_the_target_and_is_the_most_permissive_score(scores: list[float], target: float,
                                                                               float32: bool) -> None:
    imp = np.asarray(scores, dtype=np.float32 if float32 else np.float64)
    tau = threshold_at_fmr(imp, target)
    fmr = float(np.mean(imp >= tau))
    assert fmr <= target
    # No lower impostor score value would also satisfy the target.
    for v in np.unique(imp[imp < tau]):
        assert float(np.mean(imp >= v)) > target
    if tau > imp.max():  # no score qualified: tau is the next value up, nothing above max in between
        assert float(np.mean(imp >= imp.max())) > target
        assert np.float32(tau) > imp.max() if float32 else tau == np.nextafter(imp.max(), np.inf)


def test_threshold_hand_cases() -> None:
    imp = np.arange(1000) / 1000
    assert threshold_at_fmr(imp, 1e-3) == 0.999
    assert fnmr_fmr([0.5, 0.999, 1.0], imp, 0.999) == (1 / 3, 1e-3)
    assert threshold_at_fmr(imp, 0.0) > 0.999 and np.mean(imp >= threshold_at_fmr(imp, 0.0)) == 0
    assert threshold_at_fmr(imp, 1.0) == 0.0
    # A tie straddling the boundary moves tau to the next value up: 2/5 allowed, [0.7, 0.7, 0.9] is 3/5.
    assert threshold_at_fmr([0.1, 0.2, 0.7, 0.7, 0.9], 0.4) == 0.9
    assert threshold_at_fmr([0.5] * 10, 0.5) > 0.5
    with pytest.raises(ValueError):
        threshold_at_fmr([], 1e-3)
    with pytest.raises(ValueError):
        threshold_at_fmr([0.1, float("nan")], 1e-3)
    with pytest.raises(ValueError):
        threshold_at_fmr([0.1], 1.5)


def test_fnmr_fmr_counts_ties_as_matches() -> None:
    assert fnmr_fmr([0.2, 0.5, 0.8, 0.9], [0.1, 0.5, 0.6], tau=0.5) == (0.25, 2 / 3)
    fnmr, fmr = fnmr_fmr([], [0.1], 0.5)
    assert math.isnan(fnmr) and fmr == 0.0


def test_fdr_garbe_ir_hand_computed() -> None:
    fmr = {"female": 0.01, "male": 0.03}
    fnmr = {"female": 0.1, "male": 0.2}
    assert fdr(fmr, fnmr) == pytest.approx(1 - (0.5 * 0.02 + 0.5 * 0.1))
    assert fdr(fmr, fnmr, alpha=0.25) == pytest.approx(1 - (0.25 * 0.02 + 0.75 * 0.1))
    # Gini of (0.01, 0.03): 2/1 * (2 * 0.02) / (2 * 4 * 0.02) = 0.5, the same for (0.1, 0.2): 2 * 0.2 / (8 * 0.15)
    assert gini([0.01, 0.03]) == pytest.approx(0.5)
    assert gini([0.1, 0.2]) == pytest.approx(1 / 3)
    assert gini([0.1, 0.2, 0.3]) == pytest.approx(1.5 * 0.8 / (2 * 9 * 0.2))
    assert garbe(fmr, fnmr) == pytest.approx(0.5 * 0.5 + 0.5 / 3)
    assert igarbe(fmr, fnmr, alpha=0.3) == pytest.approx(1 - (0.3 * 0.5 + 0.7 / 3))
    assert inequity_rate(fmr, fnmr) == pytest.approx(3 ** 0.5 * 2 ** 0.5)
    assert inequity_rate([0.01, 0.04], [0.1, 0.8], alpha=0.25) == pytest.approx(4 ** 0.25 * 8 ** 0.75)
    assert fdr([0.01, 0.03], [0.1, 0.2]) == fdr(fmr, fnmr)  # sequences work as well as mappings


def test_equal_and_zero_rates() -> None:
    for rates in ([0.02, 0.02, 0.02], [0.0, 0.0, 0.0]):
        assert garbe(rates, rates) == 0.0 and igarbe(rates, rates) == 1.0
        assert fdr(rates, rates) == 1.0
        assert inequity_rate(rates, rates) == 1.0
    assert inequity_rate([0.0, 0.01], [0.1, 0.1]) == math.inf  # a zero best rate: documented as inf
    assert inequity_rate([0.0, 0.01], [0.1, 0.2], alpha=0.0) == 2.0  # ... unless its exponent is 0
    assert math.isnan(garbe([0.1, float("nan")], [0.1, 0.1]))
    assert math.isnan(inequity_rate([0.1, float("nan")], [0.1, 0.1]))


def test_group_rate_inputs_are_checked() -> None:
    with pytest.raises(ValueError, match="differ"):
        fdr({"a": 0.1, "b": 0.2}, {"a": 0.1, "c": 0.2})
    with pytest.raises(TypeError):
        fdr({"a": 0.1}, [0.1])
    with pytest.raises(ValueError, match="alpha"):
        garbe([0.1, 0.2], [0.1, 0.2], alpha=1.5)
    with pytest.raises(ValueError, match="2 groups"):
        gini([0.1])


def test_verification_report() -> None:
    rng = np.random.default_rng(0)
    gen = np.concatenate([rng.normal(3.0, 1.0, 500), rng.normal(2.0, 1.0, 500)])
    gen_group = np.repeat([0, 1], 500)
    imp = np.concatenate([rng.normal(0.0, 1.0, 5000), rng.normal(0.5, 1.0, 5000)])
    imp_group = np.repeat([0, 1], 5000)
    rep = verification_report(gen, gen_group, imp, imp_group, groups=[0, 1], target_fmr=1e-2)
    assert rep["tau"] == threshold_at_fmr(imp, 1e-2) and rep["fmr"] <= 1e-2
    assert 0.9 < rep["auc"] < 1.0
    for g in (0, 1):
        fnmr, fmr = fnmr_fmr(gen[gen_group == g], imp[imp_group == g], rep["tau"])
        assert rep["groups"][g] == {"fnmr": fnmr, "fmr": fmr, "n_genuine": 500, "n_impostor": 5000}
    assert rep["groups"][1]["fnmr"] > rep["groups"][0]["fnmr"] and rep["groups"][1]["fmr"] > rep["groups"][0]["fmr"]
    fmr_by = {g: r["fmr"] for g, r in rep["groups"].items()}
    fnmr_by = {g: r["fnmr"] for g, r in rep["groups"].items()}
    assert rep["fdr"] == fdr(fmr_by, fnmr_by) < 1.0
    assert rep["igarbe"] == 1 - rep["garbe"] == igarbe(fmr_by, fnmr_by)
    assert rep["ir"] == inequity_rate(fmr_by, fnmr_by) > 1.0
    with pytest.raises(ValueError, match="one group per score"):
        verification_report(gen, gen_group[:10], imp, imp_group, groups=[0, 1])
