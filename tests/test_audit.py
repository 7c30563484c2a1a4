"""The membership audit on real trained models.

* On a deliberately overfit model (random labels, so that only memorisation fits them): the
  loss attack's AUC exceeds 0.7 and LiRA's TPR at 1% FPR exceeds 5%.
* Without signal the attacks sit at chance: an untrained model (loss attack) and a membership
  claim unrelated to the training sets (LiRA) give AUC within 0.5 +/- 0.05.
* Vectorised reference-model training gives the same models as training them one by one.
* ``facefl audit`` on a real federated attribute run writes report.json with every attack and
  every required key (no TPR the nonmembers cannot resolve; an empirical epsilon per attack;
  paired comparisons), the per-sample scores, raw.npz (which the snippet of docs/audit.md
  re-scores to the report's LiRA AUC) and one ROC figure per target family; reference models,
  trained with the target's recipe, are cached.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from sim_runs import TINY, simulated_run

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                         "ignore::FutureWarning")]


def _spec(width: int = 16):
    from common.nn.face_model import ModelSpec

    return ModelSpec(width=width, blocks=(1, 1), embedding_dim=32, image_size=32, attribute_head=True)


@pytest.fixture(scope="module")
def overfit(synth_open_set):
    """9 models, each trained on a random half of 320 faces with random labels; model 0 is the target."""
    from attacks.reference_models import train_references
    from common.config import TrainConfig
    from common.train.loop import attribute_logits

    ds = synth_open_set
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, len(ds))
    in_mask = np.argsort(rng.random((9, len(ds))), axis=0) < 5
    cfg = TrainConfig(batch_size=32, lr=0.003, augment=False, weight_decay=0.0)
    models = train_references(_spec(), ds.images, y, in_mask, cfg, epochs=30, seeds=list(range(9)))
    logits = np.stack([attribute_logits(m, ds.images) for m in models], axis=1)
    return logits, y, in_mask


def test_attacks_detect_membership_of_an_overfit_model(overfit) -> None:
    from attacks.metrics import roc_auc, tpr_at_fpr
    from attacks.scores import lira_online, sample_loss, scaled_confidence

    logits, y, in_mask = overfit
    member = in_mask[0]
    assert ((logits[:, 0] > 0) == y)[member].mean() > 0.95  # it memorised its random labels
    assert roc_auc(-sample_loss(logits[:, 0], y), member) > 0.7
    phi = np.stack([scaled_confidence(logits[:, r], y) for r in range(logits.shape[1])], axis=1)
    lira = lira_online(phi[:, 0], phi[:, 1:], in_mask[1:].T, global_variance=True)
    assert tpr_at_fpr(lira, member, 0.01) > 0.05
    assert roc_auc(lira, member) > 0.7


def test_attacks_are_at_chance_without_signal(overfit, synth_open_set) -> None:
    from attacks.metrics import roc_auc
    from attacks.scores import lira_online, sample_loss, scaled_confidence
    from common.nn.build import build_model
    from common.train.loop import attribute_logits

    logits, y, in_mask = overfit
    fake = np.random.default_rng(1).random(y.size) < 0.5  # a "membership" no model trained on
    phi = np.stack([scaled_confidence(logits[:, r], y) for r in range(logits.shape[1])], axis=1)
    lira = lira_online(phi[:, 0], phi[:, 1:], in_mask[1:].T, global_variance=True)
    assert abs(roc_auc(lira, fake) - 0.5) < 0.05
    untrained = attribute_logits(build_model(_spec(), 3), synth_open_set.images)
    assert abs(roc_auc(-sample_loss(untrained, y), fake) - 0.5) < 0.05
    assert abs(roc_auc(-sample_loss(untrained, y), in_mask[0]) - 0.5) < 0.05


def test_vectorised_reference_training_equals_sequential(synth_small) -> None:
    from attacks.reference_models import train_references
    from common.config import TrainConfig

    rng = np.random.default_rng(2)
    in_mask = rng.random((3, len(synth_small))) < 0.5
    y = synth_small.labels["smiling"]
    cfg = TrainConfig(batch_size=16)  # augmentation on: each model's own seeded stream
    args = (_spec(8), synth_small.images, y, in_mask, cfg, 2, [11, 12, 13])
    stacked, alone = train_references(*args, vectorised=True), train_references(*args, vectorised=False)
    for a, b in zip(stacked, alone, strict=True):
        for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            np.testing.assert_allclose(pa.numpy(), pb.numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
    assert not np.allclose(stacked[0].state_dict()["attribute.fc.weight"], stacked[1].state_dict()["attribute.fc.weight"])


def test_references_train_only_what_the_targets_clients_trained(synth_small) -> None:
    """A target whose clients fine-tuned only the normalisation layers and heads gets central
    references that do the same, stacked or one by one."""
    import torch

    from attacks.reference_models import train_references
    from common.config import TrainConfig
    from common.nn.build import build_model
    from common.train.finetune import restrict_training

    in_mask = np.random.default_rng(3).random((2, len(synth_small))) < 0.5
    fresh = build_model(_spec(8), 5)
    start = {n: t.clone() for n, t in fresh.state_dict().items()}
    restrict_training(fresh, "norms")
    allowed = {n for n, p in fresh.named_parameters() if p.requires_grad} | {n for n, _ in fresh.named_buffers()}
    for vectorised in (True, False):
        models = train_references(_spec(8), synth_small.images, synth_small.labels["smiling"], in_mask,
                                  TrainConfig(batch_size=16, lr=0.05), 1, [1, 2], vectorised=vectorised,
                                  init_state=start, trainable="norms")
        for model in models:
            moved = {n for n, p in model.state_dict().items() if not torch.equal(p, start[n])}
            assert "attribute.fc.weight" in moved and "backbone.stages.0.0.norm1.weight" in moved
            assert moved <= allowed, moved - allowed  # no convolution or embedding weight moved


AUDIT_RUN = TINY + ("train.task=attribute", "split.num_clients=2", "federation.min_train_clients=2",
                    "federation.min_available_clients=2", "data.identities=40", "data.images_per_identity=8",
                    "federation.local_epochs=2", "federation.rounds=2", "dp.mode=off")


@pytest.mark.timeout(300)
def test_audit_command_writes_the_report(tmp_path_factory, capsys) -> None:
    from workflow.cli import main

    run = simulated_run(tmp_path_factory, AUDIT_RUN, tag="audit")[0]
    argv = ["audit", str(run.path), "--references", "4", "--seed", "3"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "lira-online" in printed
    report = json.loads((run.path / "audit" / "report.json").read_text())
    main_attacks = [a for a in report["attacks"] if not a["target"].startswith("client")]
    assert [a["name"] for a in main_attacks] == ["loss", "lira-online", "lira-offline", "rmia", "shadow",
                                                 "mint-embedding", "mint-vanilla", "mint-cnn"]
    # The curious server's view: each client's own post-round model, attacked on its own members.
    updates = [a for a in report["attacks"] if a["target"].startswith("client")]
    assert report["update_level"] == {"available": True, "clients": 2}
    assert sorted((a["target"], a["name"]) for a in updates) == [
        (f"client {p} update (round 2)", name) for p in (0, 1) for name in ("lira-online", "loss")]
    assert all(0 < a["n_members"] < report["audited"]["members"] for a in updates)
    for a in main_attacks:
        for key in ("auc", "accuracy", "balanced_accuracy"):
            lo, hi = a["ci95"][key]
            assert 0 <= lo <= a[key] <= hi <= 1, (a["name"], key)
        # ~100 nonmembers resolve neither 0.1% nor 1% FPR: no number, and the table says so
        assert a["tpr_at_fpr"] == {"0.001": None, "0.01": None} and a["ci95"]["tpr_at_fpr"] == a["tpr_at_fpr"]
        assert set(a["per_group"]) == {"gender", "group"} and set(a["per_group"]["gender"]) <= {"female", "male"}
        bound = a["epsilon_lower_bound"]
        assert bound["epsilon"] >= 0 and bound["delta"] == 1e-5 and "Bonferroni" in bound["method"]
        if a["name"].startswith("mint"):  # scored on the identities MINT did not train on
            assert a["target"].endswith("white-box") and 0 < a["n_members"] < report["audited"]["members"]
        else:
            assert a["target"] and a["n_members"] == a["n_nonmembers"] == report["audited"]["members"]
    assert f"not resolvable at n = {report['audited']['nonmembers']}" in printed
    assert report["reference_recipe"] == "target"
    compared = {(c["a"], c["b"]) for c in report["comparisons"]}
    assert ("lira-online @ global model (final)", "loss @ global model (final)") in compared
    white_box = "@ global model (final), white-box"
    assert {(f"{m} {white_box}", f"mint-embedding {white_box}") for m in ("mint-vanilla", "mint-cnn")} <= compared
    for c in report["comparisons"]:
        assert c["ci95"][0] <= c["difference"] <= c["ci95"][1]
    scores = np.load(run.path / "audit" / "scores.npz")
    assert set(scores.files) == {"sample_ids", "is_member", "loss", "lira_online", "lira_offline", "rmia", "shadow",
                                 "mint_embedding", "mint_vanilla", "mint_cnn", "client0_loss", "client0_lira_online", "client1_loss",
                                 "client1_lira_online"}
    assert np.isnan(scores["mint_cnn"]).any() and np.isfinite(scores["loss"]).all()
    assert [p.name for p in sorted((run.path / "audit").glob("roc-*.png"))] == ["roc-clients.png", "roc-global.png"]
    raw = np.load(run.path / "audit" / "raw.npz")
    n, k = 2 * report["audited"]["members"], 4
    for target in ("global model (final)", "client 0 update (round 2)", "client 1 update (round 2)"):
        assert raw[f"{target}/ref_stat"].shape == raw[f"{target}/ref_in"].shape == (k, n)
        assert (raw[f"{target}/ref_in"].sum(axis=0) == k // 2).all()  # every sample IN for half of them
        assert raw[f"{target}/aux_ref_stat"].shape[0] == k and raw[f"{target}/aux_target_stat"].size > 0
    assert raw["client 0 update (round 2)/scored"].sum() < n
    np.testing.assert_array_equal(raw["global model (final)/sample_ids"], scores["sample_ids"])
    # The documented snippet (docs/audit.md) re-scores LiRA from raw.npz alone and gives the report's AUC.
    lira = next(a for a in main_attacks if a["name"] == "lira-online")
    assert _rescored_lira_auc(run.path) == pytest.approx(lira["auc"], abs=1e-9)
    assert (run.path / "models" / "initial.safetensors").is_file()  # the references' starting point
    cached = sorted(p.name for p in (run.path / "audit" / "references").iterdir())
    assert cached == ["index.json"] + [f"ref-{r:03d}.safetensors" for r in range(4)]
    mtimes = [p.stat().st_mtime_ns for p in (run.path / "audit" / "references").iterdir()]
    assert main(argv) == 0  # the second audit reuses the cached references and gives the same report
    assert [p.stat().st_mtime_ns for p in (run.path / "audit" / "references").iterdir()] == mtimes
    assert json.loads((run.path / "audit" / "report.json").read_text()) == report
    assert main(["audit", str(run.path), "--attacks", "centroid"]) == 2  # not for attribute models
    _compare_recipes(run.path, argv, raw, capsys)


def _compare_recipes(run_dir, argv, raw, capsys) -> None:
    """The same run audited with central references: other reference statistics on the same samples,
    and ``facefl compare`` pairs the two audits sample by sample."""
    import shutil

    from attacks.compare import compare_audits
    from workflow.cli import main

    central = run_dir.with_name(run_dir.name + "-central")
    shutil.copytree(run_dir, central)
    assert main([*argv[:1], str(central), *argv[2:], "--reference-recipe", "central"]) == 0
    assert json.loads((central / "audit" / "report.json").read_text())["reference_recipe"] == "central"
    raw_central = np.load(central / "audit" / "raw.npz")
    t = "global model (final)/"
    np.testing.assert_array_equal(raw_central[t + "ref_in"], raw[t + "ref_in"])  # the same keep matrix ...
    assert not np.allclose(raw_central[t + "ref_stat"], raw[t + "ref_stat"])  # ... other reference models
    capsys.readouterr()
    assert main(["compare", str(run_dir), str(central), "--json", str(central / "compare.json")]) == 0
    assert "A - B [95% paired CI]" in capsys.readouterr().out
    rows = {(r["attack"], r["metric"]): r for r in json.loads((central / "compare.json").read_text())["rows"]}
    assert rows[("loss", "auc")]["difference"] == 0 == rows[("loss", "auc")]["ci95"][1]  # no references: same
    lira = rows[("lira_online", "auc")]
    assert lira["difference"] == pytest.approx(lira["value_a"] - lira["value_b"]) and lira["value_a"] != lira["value_b"]
    assert lira["ci95"][0] <= lira["difference"] <= lira["ci95"][1]
    assert {m for _, m in rows} == {"auc"}  # ~100 nonmembers resolve no TPR
    scores = dict(np.load(central / "audit" / "scores.npz"))
    order = np.random.default_rng(0).permutation(scores["sample_ids"].size)  # another order: matched by id
    for key in scores:
        if scores[key].shape == order.shape:
            scores[key] = scores[key][order]
    np.savez(central / "audit" / "scores.npz", **scores)
    again = {(r["attack"], r["metric"]): r["difference"] for r in compare_audits(run_dir, central)}
    assert again[("lira_online", "auc")] == pytest.approx(lira["difference"], abs=1e-12)
    scores["is_member"] = ~scores["is_member"]
    np.savez(central / "audit" / "scores.npz", **scores)
    with pytest.raises(ValueError, match="is a member in one run and not in the other"):
        compare_audits(run_dir, central)


def _rescored_lira_auc(run_dir) -> float:
    """Runs the re-scoring snippet of docs/audit.md on ``run_dir``: its ``auc``."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "audit.md").read_text(encoding="utf-8")
    snippet = text.split("<!-- rescore-lira -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(snippet.replace("RUN_DIR", str(run_dir)), scope)  # noqa: S102 - the project's own documentation
    return float(scope["auc"])


@pytest.mark.timeout(300)
def test_audit_with_a_fair_twin_runs_fd_mia(tmp_path_factory) -> None:
    from attacks.audit import AuditSettings, run_audit

    biased = simulated_run(tmp_path_factory, AUDIT_RUN, tag="audit")[0]
    fair = simulated_run(tmp_path_factory, AUDIT_RUN + ("fairness.method=reweight",), tag="audit-fair")[0]
    settings = AuditSettings(attacks=("loss", "lira-online"), references=4, seed=3, n_boot=50)
    report = run_audit(biased.path, settings, fair_dir=fair.path)
    got = {(a["target"], a["name"]) for a in report["attacks"] if not a["target"].startswith("client")}
    assert got == {("global model (final)", "loss"), ("global model (final)", "lira-online"),
                   ("fair global model (final)", "loss"), ("fair global model (final)", "lira-online"),
                   ("biased + fair pair", "fd-mia-score"), ("biased + fair pair", "fd-mia-lira-online"),
                   ("biased + fair pair", "fd-mia-lira-offline")}
    assert report["fair_run"] == str(fair.path)
    # FD-MIA against its own family on the fair model, paired on the same samples (not the best of all)
    compared = {(c["a"], c["b"]): c for c in report["comparisons"]}
    kin = compared[("fd-mia-lira-online @ biased + fair pair", "lira-online @ fair global model (final)")]
    assert kin["ci95"][0] <= kin["difference"] <= kin["ci95"][1]
    assert not any(a.startswith("fd-mia-lira-offline") and "fair global" in b for a, b in compared)  # kin not run
    assert len(list((biased.path / "audit" / "references-fair").glob("ref-*.safetensors"))) == 4
    with pytest.raises(ValueError, match="fairness.method is 'none'"):
        run_audit(fair.path, settings, fair_dir=biased.path)  # arguments swapped: refused, not mislabelled


def test_central_reference_twins_refuse_a_fair_run_they_cannot_replay(tmp_path) -> None:
    """FD-MIA's reference twins use the fair run's intervention: central ones can only reweight."""
    from attacks.audit import _fair_twin
    from common.config import load_config
    from common.config.loader import dump_toml
    from common.runs.rundir import RunDir

    fair = tmp_path / "fair"
    fair.mkdir()
    (fair / "config.toml").write_text(dump_toml(load_config(None, ["fairness.method=fair_mixup", "dp.mode=off", "train.task=attribute"])))
    with pytest.raises(ValueError, match="central reference twins only reweight"):
        _fair_twin(RunDir(tmp_path), fair, load_config(None), None, "central")


def test_mint_learns_activation_patterns_and_is_tested_on_unseen_identities() -> None:
    from attacks.metrics import roc_auc
    from attacks.mint import CNNMINT, VanillaMINT, identity_split

    rng = np.random.default_rng(5)
    n = 600
    identity = rng.integers(0, 60, n)
    used = rng.random(n) < 0.5
    train = identity_split(identity, seed=1)
    assert set(identity[train]).isdisjoint(identity[~train]) and 0.3 < train.mean() < 0.7
    feats = rng.normal(size=(n, 24)).astype(np.float32)
    feats[used, :4] += 1.0  # training data drives some units higher (the paper's rationale)
    signal = VanillaMINT(seed=0).fit(feats[train], used[train]).score(feats[~train])
    assert roc_auc(signal, used[~train]) > 0.9
    blank = rng.normal(size=(n, 24)).astype(np.float32)  # activations that do not depend on training
    noise = VanillaMINT(seed=0).fit(blank[train], used[train]).score(blank[~train])
    assert abs(roc_auc(noise, used[~train]) - 0.5) < 0.1
    maps = rng.normal(size=(n, 3, 8, 8)).astype(np.float32)
    maps[used, 0, 2:4, 2:4] += 1.5  # a spatial pattern the channel maximum would blur
    cnn = CNNMINT(seed=0, epochs=10).fit(maps[train], used[train]).score(maps[~train])
    assert roc_auc(cnn, used[~train]) > 0.8
    a = VanillaMINT(seed=3).fit(feats[train], used[train]).score(feats[~train])
    np.testing.assert_array_equal(a, VanillaMINT(seed=3).fit(feats[train], used[train]).score(feats[~train]))


def test_applicable_attacks_follow_the_models_outputs() -> None:
    from attacks.registry import ATTRIBUTE_ATTACKS, MOTE_ATTACKS, applicable_attacks
    from common.config import load_config
    from common.nn.build import model_spec

    def attacks(task: str) -> set[str]:
        cfg = load_config(None, [f"train.task={task}"])
        return set(applicable_attacks(cfg, model_spec(cfg)))

    assert attacks("attribute") == set(ATTRIBUTE_ATTACKS)  # no embedding task: no centroid, no MOTE
    assert attacks("identity") == {"centroid", "mint-embedding", "mint-vanilla", "mint-cnn", *MOTE_ATTACKS}
    assert attacks("both") == attacks("attribute") | attacks("identity")


@pytest.mark.parametrize("config", ["preset:demo", "docs/sweeps/attribute.toml", "docs/sweeps/identity.toml",
                                    "docs/sweeps/audit.toml"])
def test_the_demo_and_the_sweep_configs_resolve_tpr_at_one_percent_fpr(config: str) -> None:
    """Their split gives the audit >= 1,000 members and nonmembers (audit.toml: after its 50 canaries).
    The roles depend on identities and demographics, not pixels: rendered at 32 px to stay fast."""
    from pathlib import Path

    from attacks.audit import AuditSettings, audited_samples
    from common.config import load_config
    from common.config.loader import preset
    from common.data.cache import build_dataset
    from common.runs.records import resolvable
    from common.split.build import build_manifest

    root = Path(__file__).resolve().parents[1]
    path, overrides = (None, preset("demo")) if config == "preset:demo" else (root / config, [])
    cfg = load_config(path, [*overrides, "data.image_size=32"])
    ds = build_dataset(cfg)
    manifest = build_manifest(cfg, ds)
    spare = manifest.role_mask(ds, "nonmember").sum() - 50 if config.endswith("audit.toml") else None
    _, is_member = audited_samples(manifest, ds, AuditSettings())
    assert resolvable(int((~is_member).sum() if spare is None else spare), 0.01)
    assert is_member.sum() == (~is_member).sum() >= 1000
