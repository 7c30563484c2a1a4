"""scripts/make_results.py counts FD-MIA only on pairs that meet the paper's premise, within its
family and with the audit's paired intervals."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from common.runs.records import AuditReport
from common.runs.results import RunResults


def _script(monkeypatch):
    path = Path(__file__).parents[1] / "scripts" / "make_results.py"
    spec = importlib.util.spec_from_file_location("make_results", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "make_results", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _run_dir(root: Path, name: str, deo: float, positive_rates: tuple[float, float] = (0.6, 0.4)) -> Path:
    path = root / name
    path.mkdir()
    (path / "config.toml").write_text("")
    (path / "metrics.jsonl").write_text(json.dumps({"event": "round", "round": 1, "verification_auc": 0.8,
                                                    "attribute_deo_sum": deo,
                                                    "attribute_positive_rate_s0": positive_rates[0],
                                                    "attribute_positive_rate_s1": positive_rates[1]}) + "\n")
    return path


def _comparison(difference: float, lo: float, hi: float) -> dict:
    return {"a": "fd-mia-score @ biased + fair pair", "b": "shadow @ fair global model (final)",
            "value_a": 0.6 + difference, "value_b": 0.6, "difference": difference, "ci95": [lo, hi]}


def test_fd_mia_counts_only_pairs_that_meet_the_premise(tmp_path, monkeypatch) -> None:
    mr = _script(monkeypatch)
    runs = []
    for name, biased, fair, rates, comparison in (
            ("met", 0.30, 0.06, (0.6, 0.4), _comparison(0.05, 0.01, 0.09)),
            ("not-fairer", 0.30, 0.20, (0.6, 0.4), _comparison(-0.04, -0.08, 0.0)),
            ("not-biased", 0.10, 0.01, (0.6, 0.4), _comparison(-0.02, -0.05, 0.01)),
            ("constant", 0.30, 0.05, (0.95, 0.96), _comparison(-0.03, -0.06, 0.0))):  # 'fair' by saying yes
        biased_dir, fair_dir = _run_dir(tmp_path, name, biased), _run_dir(tmp_path, name + "-fair", fair, rates)
        results = RunResults.load(biased_dir)
        results.audit = AuditReport(str(biased_dir), str(fair_dir), "attribute", {}, {}, 4, 0, {}, (0.01,), [],
                                    comparisons=[comparison])
        runs.append(mr.Run(tmp_path, name, {}, 0, results))
    finding = mr.fd_mia(runs)
    assert finding.verdict == "reproduced" and "in 1 of 1 paired comparisons" in finding.headline
    assert "met by 1 of 4 pairs" in finding.premise
    text = "\n".join(finding.body)
    assert "+0.050 [+0.010, +0.090]" in text and "-0.040" not in text  # the unmet pairs are listed, not counted
    assert text.count("| no |") == 3 and "0.950 / 0.960" in text


def _study(root: Path, name: str, samples: int, comparisons: list[tuple[float, float, float]],
           train_top1: float = 1.0) -> Path:
    path = root / name
    path.mkdir()
    study = {"design": {"seed": 0}, "audited_model": {"dp": "off", "epochs": 30},
             "premise": {"mint_training_samples": samples, "mint_training_used": samples // 2,
                         "mint_training_external": samples - samples // 2, "enough_samples": samples >= 5000,
                         "external_identities_never_seen": True, "mint_halves_identity_disjoint": True,
                         "audited_train_top1": train_top1, "audited_held_out_top1": 0.4,
                         "memorisation_gap": train_top1 - 0.4},
             "comparisons": [{"a": "mint-vanilla", "b": "mint-embedding", "value_a": 0.7 + d, "value_b": 0.7,
                              "difference": d, "ci95": [lo, hi]} for d, lo, hi in comparisons]}
    (path / "mint_study.json").write_text(json.dumps(study))
    return path


def test_mint_at_the_papers_terms_counts_premise_met_studies_and_says_when_it_is_underpowered(tmp_path,
                                                                                              monkeypatch) -> None:
    mr = _script(monkeypatch)
    _study(tmp_path, "small", 800, [(0.2, 0.15, 0.25)])  # premise not met: listed, not counted
    _study(tmp_path, "tight", 6000, [(-0.01, -0.03, 0.01)])  # could detect 0.06: a real "not reproduced"
    _study(tmp_path, "nothing-learnt", 6000, [(0.2, 0.15, 0.25)], train_top1=0.41)  # nothing to find: not counted
    finding = mr.mint_paper_terms(mr.load_mint_studies([tmp_path]))
    assert finding.verdict == "not reproduced" and "in 0 of 1 paired comparisons" in finding.headline
    assert "met by 1 of 3 studies" in finding.premise
    assert mr.detectable([-0.03, 0.01]) == pytest.approx(2.8016 * 0.04 / 3.92)
    _study(tmp_path, "wide", 6000, [(-0.02, -0.12, 0.08)])  # could not: the verdict says so
    assert mr.mint_paper_terms(mr.load_mint_studies([tmp_path])).verdict == "inconclusive (underpowered)"


def test_gender_inference_says_which_way_gives_the_papers_half_and_checks_the_backbone(tmp_path, monkeypatch) -> None:
    from common.runs.records import MoteEvaluation

    mr = _script(monkeypatch)

    def leak(ba_male: float, ba_female: float, ties: float = 0.0) -> dict:
        return {"balanced_accuracy": (ba_male + ba_female) / 2, "male_accuracy": ba_male, "female_accuracy": ba_female,
                "n_male": 100, "n_female": 100, "majority_share": 0.5, "tie_share": ties}

    results = RunResults.load(_run_dir(tmp_path, "accurate", 0.0))
    results.evaluation = MoteEvaluation(1e-3, 200, 500, {"templates": {"fnmr": 0.02}, "MOTE b=0.50": {"fnmr": 0.03}},
                                        {"templates": leak(0.7, 0.7), "MOTE b=0.50": {**leak(0.65, 0.65), "variants": {
                                            "sigmoid": leak(0.65, 0.65), "decision": leak(0.03, 0.99, ties=0.96)}}})
    finding = mr.gender_inference([mr.Run(tmp_path, "accurate", {}, 0, results)])
    assert "met in 1 of 1 runs" in finding.premise  # FNMR 0.02 <= 0.1 at FMR 1e-3
    text = "\n".join(finding.body)
    assert "sigmoid in 0 of 1 runs" in text and "decision in 1 of 1 runs (mean share of ties 0.960)" in text
    assert finding.verdict == "not reproduced"  # MOTE leaks 0.65 on an accurate backbone
    # A backbone that misses the premise is listed but never counted, even where the paper's claim holds.
    blurry = RunResults.load(_run_dir(tmp_path, "blurry", 0.0))
    blurry.evaluation = MoteEvaluation(1e-3, 200, 500, {"templates": {"fnmr": 0.5}, "MOTE b=0.50": {"fnmr": 0.6}},
                                       {"templates": leak(0.8, 0.8), "MOTE b=0.50": leak(0.5, 0.5)})
    both = mr.gender_inference([mr.Run(tmp_path, "accurate", {}, 0, results), mr.Run(tmp_path, "blurry", {}, 0, blurry)])
    assert both.verdict == "not reproduced" and "in 0 of the 1 runs that meet the premise" in both.headline


def test_a_not_reproduced_that_could_not_see_the_papers_effect_is_called_underpowered(tmp_path, monkeypatch) -> None:
    mr = _script(monkeypatch)
    runs = []
    for name, comparison in (("tight", _comparison(-0.01, -0.04, 0.02)), ("wide", _comparison(-0.02, -0.20, 0.16))):
        biased_dir, fair_dir = _run_dir(tmp_path, name, 0.9), _run_dir(tmp_path, name + "-fair", 0.1)
        results = RunResults.load(biased_dir)
        results.audit = AuditReport(str(biased_dir), str(fair_dir), "attribute", {}, {}, 4, 0, {}, (0.01,), [],
                                    comparisons=[comparison])
        runs.append(mr.Run(tmp_path, name, {}, 0, results))
    assert mr.fd_mia(runs[:1]).verdict == "not reproduced"  # 2.8 x 0.0153 = 0.043 < the paper's 0.11
    finding = mr.fd_mia(runs)  # the wide one could only see 0.23
    assert finding.verdict == "inconclusive (underpowered)" and "1 of 2 could detect the paper's +0.11" in finding.headline
    assert "paired bootstrap" in finding.test and "0.658" in finding.test


def test_mote_fairness_is_judged_on_paired_differences_over_seeds(tmp_path, monkeypatch) -> None:
    from common.runs.records import MoteEvaluation

    mr = _script(monkeypatch)
    mean, ci, mde = mr.mean_interval([0.1, 0.2, 0.3])
    half = 4.3027 * 0.1 / 3 ** 0.5  # t(0.975, 2) x the standard error of the mean
    assert mean == pytest.approx(0.2) and ci == pytest.approx([0.2 - half, 0.2 + half], rel=1e-4)
    assert mde == pytest.approx((4.3027 + 1.0607) * 0.1 / 3 ** 0.5, rel=1e-3)

    def runs(diffs: list[float]) -> list:
        out = []
        for seed, d in enumerate(diffs):
            results = RunResults.load(_run_dir(tmp_path, f"{len(list(tmp_path.iterdir()))}", 0.0))
            methods = {"templates": {"fdr": 0.95, "igarbe": 0.9, "fnmr": 0.05},
                       "MOTE b=0.50": {"fdr": 0.95 + d, "igarbe": 0.9 + d, "fnmr": 0.05}}
            results.evaluation = MoteEvaluation(1e-3, 10, 10, methods)
            out.append(mr.Run(tmp_path, f"s{seed}", {"dp.target_epsilon": "8"}, seed, results))
        return out

    assert mr.mote_fairness(runs([-0.02, -0.021, -0.019])).verdict == "not reproduced"  # clearly less fair
    assert mr.mote_fairness(runs([-0.03, 0.02, 0.001])).verdict == "inconclusive (within noise)"  # mean < 0, CI has 0
    finding = mr.mote_fairness(runs([0.01, 0.0, 0.02]))
    assert finding.verdict == "reproduced" and "Student-t" in finding.test
