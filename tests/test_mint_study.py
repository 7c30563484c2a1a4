"""``facefl mint-study``: MINT at the paper's terms (workflow/mint_study.py). A tiny study, really
trained: the sets it claims are identity-disjoint are, its counts are the samples it used, and
every reported number is recomputed from the npz it keeps."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sim_runs import TINY

from attacks.metrics import roc_auc
from common.config import load_config
from common.runs.io import load_npz, read_json
from workflow.mint_study import ATTACKS, ROC_FILE, SCORES_FILE, STUDY_FILE, StudyDesign, run_mint_study, score_attacks

DESIGN = StudyDesign(used_identities=8, external_identities=8, held_out_per_identity=1, n_boot=50)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    cfg = load_config(None, [*TINY, "data.images_per_identity=6", "train.epochs=2", "dp.mode=off"])
    run, study = run_mint_study(cfg, tmp_path_factory.mktemp("mint"), DESIGN, progress=False)
    return run.path, study


def test_the_sets_are_identity_disjoint_and_counted(study) -> None:
    path, result = study
    npz = load_npz(path / SCORES_FILE)
    identity, used, in_train = npz["identity"], npz["is_used"], npz["in_mint_train"]
    assert not set(identity[used]) & set(identity[~used])  # E: people the audited model never saw
    assert not set(identity[in_train]) & set(identity[~in_train])  # MINT is tested on other people
    assert len(set(identity[used])) == DESIGN.used_identities
    assert len(set(identity[~used])) == DESIGN.external_identities
    p = result["premise"]
    assert p["mint_training_samples"] == in_train.sum() == p["mint_training_used"] + p["mint_training_external"]
    assert p["mint_training_used"] == (used & in_train).sum() == DESIGN.used_identities // 2 * 5
    assert not p["enough_samples"]  # 40 samples: the study says its premise is not met
    assert p["held_out_photos"] == DESIGN.used_identities
    assert 0.0 <= p["audited_held_out_top1"] <= 1.0 and 0.0 <= p["audited_train_top1"] <= 1.0
    assert read_json(path / STUDY_FILE) == result and (path / ROC_FILE).is_file()


def test_every_number_is_recomputed_from_the_kept_scores(study) -> None:
    path, result = study
    npz = load_npz(path / SCORES_FILE)
    test = ~npz["in_mint_train"]
    scores = {name: npz[f"scores_{name.replace('-', '_')}"] for name in ATTACKS}
    assert all(s.shape == (test.sum(),) for s in scores.values())
    results, comparisons = score_attacks(scores, npz["is_used"][test], npz["identity"][test], 0, DESIGN.n_boot)
    assert json.loads(json.dumps(results)) == result["attacks"]
    assert json.loads(json.dumps(comparisons)) == result["comparisons"]
    assert {c["a"] for c in comparisons} == {"mint-vanilla", "mint-cnn"}
    assert results["mint-cnn"]["auc"] == pytest.approx(roc_auc(scores["mint-cnn"], npz["is_used"][test]))


def test_intervals_resample_people_not_photos() -> None:
    """Ten photos of each person that share one score are one observation, not ten: the interval
    over people is as wide as with one photo each, where one over photos would shrink."""
    rng = np.random.default_rng(0)
    people = np.arange(60)
    used_people = people < 30
    per_person = rng.normal(used_people * 0.3, 1.0)
    one = score_attacks({"mint-embedding": per_person}, used_people, people, 0, 300)[0]["mint-embedding"]
    ten = score_attacks({"mint-embedding": np.repeat(per_person, 10)}, np.repeat(used_people, 10),
                        np.repeat(people, 10), 0, 300)[0]["mint-embedding"]
    width = [r["auc_ci95"][1] - r["auc_ci95"][0] for r in (one, ten)]
    assert ten["auc"] == pytest.approx(one["auc"], abs=0.02) and width[1] == pytest.approx(width[0], rel=0.35)


@pytest.mark.parametrize(("overrides", "design", "match"), [
    (("data.source=imagefolder", "data.path=/nonexistent"), DESIGN, "data.source"),
    ((), StudyDesign(used_identities=2), "used_identities"),
    (("data.images_per_identity=2",), StudyDesign(held_out_per_identity=2), "held_out_per_identity"),
])
def test_bad_designs_fail_before_any_work(tmp_path, overrides, design, match) -> None:
    cfg = load_config(None, [*TINY, *overrides])
    with pytest.raises(ValueError, match=match):
        run_mint_study(cfg, tmp_path, design, progress=False)
    assert not any(tmp_path.iterdir())
