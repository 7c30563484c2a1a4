"""MINT at the paper's terms: ``facefl mint-study``.

DeAlcala et al. ("Is my data in your AI model? Membership Inference Test with application to face
images") audit a face recogniser trained on a database D against external data E whose
identities it never saw; the MINT model trains on thousands of activations (1K to 100K) and is
tested on identities it did not train on; its baseline is the same MLP on the embedding alone.
The federated audit (``attacks.audit``) cannot meet those terms: its nonmembers include held-out
photos of member identities and its MINT trains on a few hundred samples. This study can:

* D and E come from one SynthFaces population split by identity (seeded): the audited model
  trains on D's photos only, E's identities are never seen (``used_identities`` and
  ``external_identities``, generated as needed);
* the audited model is a face recogniser (identity task, the configured margin loss) trained
  from scratch on D for ``train.epochs`` epochs, without DP or (``dp.mode = sample``) with DP-SGD
  at ``dp.target_epsilon`` per image;
* MINT trains on half of D's and half of E's identities and is scored on the other halves,
  identity-disjoint, with every training sample counted (the premise: at least
  ``MIN_TRAINING_SAMPLES``);
* attacks: ``mint-embedding`` (the vanilla MLP on the embedding alone, the paper's baseline),
  ``mint-vanilla`` (channel maxima of every block with the embedding, the paper's best
  "combination") and ``mint-cnn`` (the first stage's full maps, the paper's Conv Layer #1, best in
  its CNN table); each MINT variant against the baseline by a paired bootstrap on the same test
  samples, resampling people rather than photos (``identity_bootstrap``);
* the audited model's own premise, "something to find": its closed-set identification accuracy
  on its training photos against held-out photos of the same people (the memorisation gap), and
  its verification AUC on E (it is a face recogniser).

Written to ``mint_study.json`` (every number, with sample counts and the premise checks) and
``mint_study.npz`` (sample ids, identities, used flags, MINT halves and each attack's scores:
enough to recompute every figure) in a run directory of its own, with the audited model.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacks.metrics import DEFAULT_FPR_TARGETS, RocCurve, roc_auc, roc_figures, tpr_at_fpr
from attacks.mint import CNNMINT, MINT_CNN_BLOCK, VanillaMINT, activations, identity_split, vanilla_features
from common.config import Config
from common.data.cache import build_dataset
from common.data.dataset import FaceDataset
from common.evaluation.verification import verification_auc
from common.nn.build import build_identity_head, build_model, model_spec
from common.nn.checkpoint import save_checkpoint
from common.nn.face_model import FaceModel
from common.nn.heads import CosineClassifier
from common.report.tables import per_unit
from common.runs.io import atomic_save_npz, atomic_write_json
from common.runs.records import fpr_key, resolvable
from common.runs.rundir import RunDir
from common.train.dp import noise_for, poisson_sample_rate, spent_epsilon, steps_per_epoch
from common.train.loop import embed, identity_classes, train

log = logging.getLogger(__name__)

MIN_TRAINING_SAMPLES = 5000
"""The premise: MINT's own training set (D and E samples together) has at least this many; the
paper's smallest scenario is 1K, its main ones 50K and 100K."""

STUDY_FILE, SCORES_FILE, MODEL_FILE, ROC_FILE = "mint_study.json", "mint_study.npz", "audited.safetensors", \
    "mint_study_roc.png"
ATTACKS = ("mint-embedding", "mint-vanilla", "mint-cnn")
BASELINE = "mint-embedding"


@dataclass(frozen=True)
class StudyDesign:
    """The study's sizes; SynthFaces renders ``used_identities + external_identities`` people with
    ``data.images_per_identity`` photos each."""

    used_identities: int = 600
    external_identities: int = 600
    held_out_per_identity: int = 1  # photos of each D identity kept out of training: the memorisation gap
    n_boot: int = 1000

    def validate(self, cfg: Config) -> None:
        if cfg.data.source != "synthfaces":
            raise ValueError(f"mint-study: data.source = {cfg.data.source!r}; the study generates its never-seen "
                             "identities, so it needs data.source = 'synthfaces'")
        for name in ("used_identities", "external_identities"):
            if getattr(self, name) < 4:
                raise ValueError(f"mint-study: {name} = {getattr(self, name)}, expected >= 4 (two per MINT half)")
        if not 0 < self.held_out_per_identity < cfg.data.images_per_identity:
            raise ValueError(f"mint-study: held_out_per_identity = {self.held_out_per_identity}, expected 1.."
                             f"{cfg.data.images_per_identity - 1} (data.images_per_identity = "
                             f"{cfg.data.images_per_identity})")


def split_people(ds: FaceDataset, design: StudyDesign, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boolean masks over ``ds``: D's training photos, D's held-out photos, E's photos. The
    identities are split at random (seeded); each D identity keeps its last photos out."""
    ids = np.unique(ds.identity)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5D]))
    used_ids = rng.permutation(ids)[: design.used_identities]
    in_d = np.isin(ds.identity, used_ids)
    held_out = np.zeros(len(ds), bool)
    for person in used_ids:
        held_out[np.flatnonzero(ds.identity == person)[-design.held_out_per_identity:]] = True
    return in_d & ~held_out, held_out, ~in_d


def train_audited(cfg: Config, used: FaceDataset, seed: int, progress: bool) -> tuple[FaceModel, CosineClassifier,
                                                                                         dict[str, Any]]:
    """The audited face recogniser, trained from scratch on ``used`` (identity task), with DP-SGD
    when ``dp.mode = sample``; returns it, its identity head and what its privacy is."""
    train_cfg = dataclasses.replace(cfg.train, task="identity")
    spec = model_spec(cfg, attribute_head=False)
    model = build_model(spec, seed)
    head = build_identity_head(spec, identity_classes(used.identity)[0].size, seed + 1)
    q = poisson_sample_rate(len(used), train_cfg.batch_size)
    sigma = noise_for(cfg.dp, q, cfg.train.epochs * steps_per_epoch(q))  # 0 without DP
    outcome = train(model, used, train_cfg, cfg.dp, seed=seed, epochs=cfg.train.epochs, head=head,
                    noise_multiplier=sigma, progress=progress, desc="audited model")
    privacy: dict[str, Any] = {"dp": cfg.dp.mode, "epochs": cfg.train.epochs, "steps": outcome.steps}
    if cfg.dp.mode != "off":
        privacy.update(unit=per_unit(cfg.dp.unit), delta=cfg.dp.delta, noise_multiplier=sigma,
                       epsilon=spent_epsilon(cfg.dp.accountant, outcome.dp_history or [], cfg.dp.delta))
    return model, head, privacy


@torch.no_grad()
def identification_accuracy(model: FaceModel, head: CosineClassifier, ds: FaceDataset, classes: np.ndarray) -> float:
    """Closed-set top-1 accuracy of ``head`` over ``classes`` on ``ds``'s photos."""
    cos = head(torch.from_numpy(embed(model, ds.images)))
    return float((classes[cos.argmax(dim=1).numpy()] == ds.identity).mean())


def _balanced_accuracy_at_half(scores: np.ndarray, used: np.ndarray) -> float:
    """The paper's accuracy: MINT's sigmoid output thresholded at 0.5, balanced over the classes."""
    guess = scores >= 0.5
    return float((guess[used].mean() + (~guess[~used]).mean()) / 2)


def identity_bootstrap(scores: dict[str, np.ndarray], used: np.ndarray, identity: np.ndarray, seed: int,
                       n_boot: int) -> dict[str, np.ndarray]:
    """Each attack's AUC on ``n_boot`` resamples of the test people, used and external resampled
    separately, each drawn person with all of their photos; every attack on the same resamples.
    A person's photos are not independent samples (one face, one embedding cluster): a bootstrap over
    photos would give intervals too narrow to trust."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xB007]))
    people = [np.unique(identity[used]), np.unique(identity[~used])]
    rows_of = {p: np.flatnonzero(identity == p) for group in people for p in group}
    out = {name: np.empty(n_boot) for name in scores}
    for b in range(n_boot):
        idx = np.concatenate([rows_of[p] for group in people for p in rng.choice(group, group.size)])
        for name, s in scores.items():
            out[name][b] = roc_auc(s[idx], used[idx])
    return out


def _interval(values: np.ndarray) -> list[float]:
    return [float(v) for v in np.percentile(values, [2.5, 97.5])]


def score_attacks(scores: dict[str, np.ndarray], used: np.ndarray, identity: np.ndarray, seed: int,
                  n_boot: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every attack's numbers and each MINT variant minus the baseline, with intervals from
    ``identity_bootstrap``; TPR at an FPR only where the external samples resolve it."""
    boot = identity_bootstrap(scores, used, identity, seed, n_boot)
    n_ext = int((~used).sum())
    results = {name: {"auc": roc_auc(s, used), "auc_ci95": _interval(boot[name]),
                      "accuracy_at_0.5": _balanced_accuracy_at_half(s, used),
                      "tpr_at_fpr": {fpr_key(t): tpr_at_fpr(s, used, t) if resolvable(n_ext, t) else None
                                     for t in DEFAULT_FPR_TARGETS},
                      "n_used": int(used.sum()), "n_external": n_ext,
                      "people": [int(np.unique(identity[used]).size), int(np.unique(identity[~used]).size)]}
               for name, s in scores.items()}
    comparisons = [{"a": name, "b": BASELINE, "value_a": results[name]["auc"], "value_b": results[BASELINE]["auc"],
                    "difference": results[name]["auc"] - results[BASELINE]["auc"],
                    "ci95": _interval(boot[name] - boot[BASELINE]), "n_boot": n_boot, "seed": seed,
                    "resampled": "people"} for name in scores if name != BASELINE]
    return results, comparisons


def mint_attack_scores(model: FaceModel, images: np.ndarray, used: np.ndarray, in_train: np.ndarray,
                       seed: int, device: str) -> dict[str, np.ndarray]:
    """Each attack's P(used) on the test half (``~in_train``), trained on the other half."""
    acts = activations(model, images)
    features = {"mint-embedding": acts.embedding.astype(np.float32), "mint-vanilla": vanilla_features(acts),
                "mint-cnn": acts.blocks[MINT_CNN_BLOCK]}
    out = {}
    for name in ATTACKS:
        make = CNNMINT if name == "mint-cnn" else VanillaMINT
        x = features[name]
        out[name] = make(seed=seed, device=device).fit(x[in_train], used[in_train]).score(x[~in_train])
        log.info("mint-study: %s trained on %d samples", name, int(in_train.sum()))
    return out


def run_mint_study(cfg: Config, runs_root: str | Path, design: StudyDesign = StudyDesign(),
                   progress: bool = True) -> tuple[RunDir, dict[str, Any]]:
    """Generate D and E, train the audited model, run the three MINT attacks; write and return
    the results (see the module docstring)."""
    design.validate(cfg)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, identities=design.used_identities + design.external_identities))
    run = RunDir.create(runs_root, "mint-study", cfg)
    ds = build_dataset(cfg, progress=progress)
    d_train, d_held, external = split_people(ds, design, cfg.seed)
    used_ds = ds.subset(d_train)
    model, head, privacy = train_audited(cfg, used_ds, cfg.seed, progress)
    save_checkpoint(run.path / MODEL_FILE, model.state_dict(), {"task": "identity", "spec": model.spec.to_dict()})
    classes = identity_classes(used_ds.identity)[0]
    train_acc = identification_accuracy(model, head, used_ds, classes)
    held_acc = identification_accuracy(model, head, ds.subset(d_held), classes)
    ext = ds.subset(external)
    verification = verification_auc(embed(model, ext.images), ext.identity, seed=cfg.seed)

    rows = np.flatnonzero(d_train | external)
    used = d_train[rows]
    identity = ds.identity[rows]
    in_train = np.zeros(rows.size, bool)  # MINT's halves: half of D's people and half of E's, by identity
    for group in (used, ~used):
        in_train[group] = identity_split(identity[group], cfg.seed)
    if set(identity[in_train]) & set(identity[~in_train]) or set(identity[used]) & set(identity[~used]):
        raise AssertionError("mint-study: the identity halves overlap")  # by construction; guards the claim
    scores = mint_attack_scores(model, ds.images[rows], used, in_train, cfg.seed, cfg.train.device)
    test_used = used[~in_train]
    results, comparisons = score_attacks(scores, test_used, identity[~in_train], cfg.seed, design.n_boot)
    n_train = int(in_train.sum())
    study = {
        "design": dataclasses.asdict(design) | {"images_per_identity": cfg.data.images_per_identity,
                                                 "image_size": cfg.data.image_size, "seed": cfg.seed},
        "premise": {
            "mint_training_samples": n_train, "mint_training_used": int((used & in_train).sum()),
            "mint_training_external": int((~used & in_train).sum()), "min_training_samples": MIN_TRAINING_SAMPLES,
            "enough_samples": n_train >= MIN_TRAINING_SAMPLES,
            "external_identities_never_seen": True, "mint_halves_identity_disjoint": True,
            "audited_train_top1": train_acc, "audited_held_out_top1": held_acc,
            "memorisation_gap": train_acc - held_acc, "held_out_photos": int(d_held.sum()),
            "audited_verification_auc_external": verification,
        },
        "audited_model": privacy,
        "test": {"used": int(test_used.sum()), "external": int((~test_used).sum())},
        "attacks": results,
        "comparisons": comparisons,
    }
    atomic_write_json(run.path / STUDY_FILE, study)
    atomic_save_npz(run.path / SCORES_FILE, sample_ids=ds.sample_ids[rows].astype(str), identity=identity,
                    is_used=used, in_mint_train=in_train,
                    **{f"scores_{name.replace('-', '_')}": s for name, s in scores.items()})
    roc_figures([RocCurve("global", name, s, test_used) for name, s in scores.items()],
                lambda family: run.path / ROC_FILE)
    log.info("mint-study written to %s", run.path)
    return run, study


def study_rows(study: dict[str, Any]) -> list[tuple[str, ...]]:
    """(attack, AUC [CI], accuracy at 0.5, minus the embedding baseline [CI]) rows to print."""
    diffs = {c["a"]: c for c in study["comparisons"]}
    out = []
    for name, r in study["attacks"].items():
        lo, hi = r["auc_ci95"]
        d = diffs.get(name)
        vs = "(baseline)" if d is None else f"{d['difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
        out.append((name, f"{r['auc']:.3f} [{lo:.3f}, {hi:.3f}]", f"{r['accuracy_at_0.5']:.3f}", vs))
    return out
