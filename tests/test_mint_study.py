"""``facefl mint-study``: MINT at the paper's terms (workflow/mint_study.py). A tiny study, really
trained: the sets it claims are identity-disjoint are, its counts are the samples it used, and
every reported number is recomputed from the npz it keeps."""

from __future__ import annotations

import pytest
from sim_runs import TINY

from attacks.metrics import paired_difference, roc_auc
from common.config import load_config
from common.runs.io import load_npz, read_json
from workflow.mint_study import ATTACKS, ROC_FILE, SCORES_FILE, STUDY_FILE, StudyDesign, run_mint_study

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
    test_used = npz["is_used"][~npz["in_mint_train"]]
    for name in ATTACKS:
        scores = npz[f"scores_{name.replace('-', '_')}"]
        assert scores.shape == test_used.shape
        assert result["attacks"][name]["auc"] == pytest.approx(roc_auc(scores, test_used))
    for comp in result["comparisons"]:
        again = paired_difference(npz[f"scores_{comp['a'].replace('-', '_')}"],
                                  npz[f"scores_{comp['b'].replace('-', '_')}"], test_used, comp["seed"], comp["n_boot"])
        assert again["difference"] == pytest.approx(comp["difference"]) and again["ci95"] == comp["ci95"]
    assert {c["a"] for c in result["comparisons"]} == {"mint-vanilla", "mint-cnn"}


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
