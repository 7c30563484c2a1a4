"""Black-box membership audit of a run's final global model: ``facefl audit RUN_DIR [--fair DIR]``.

Ground truth comes from the run's manifest. The audited samples are member-role samples (some
client trained on them) against nonmember-role samples (same distribution, never trained on),
balanced and seeded, at most ``max_per_class`` of each. The attacker's own data is the ``aux``
population.

* Attribute models (binary posterior):
  - ``loss``: minus the sample's loss (Yeom et al. 2018).
  - reference models: ``references`` models of the target's architecture, each on a random half
    of (audited + aux) so that every audited sample is IN for exactly half of them, trained by the
    target's own recipe (``recipe="target"``: FedAvg with its clients, rounds, DP-SGD noise and
    fairness intervention, ``attacks.federated_references``) or centrally without DP
    (``recipe="central"``, ``attacks.reference_models``); cached in ``audit/references*``.
  - ``shadow`` (Shokri et al. 2017, ML-Doctor's features): the reference models are the shadow
    models; an attack model learns membership from their outputs on aux samples only.
  - ``lira-online`` and ``lira-offline`` (Carlini et al. 2022). The offline test is the one-sided
    p-value against the OUT Gaussian; with fewer than 64 references the variance is global
    (fixed), as the paper advises.
  - ``rmia`` (Zarifzadeh et al. 2024, online): the aux samples are the population z.
  - with ``--fair`` (a fair twin run: same data and split, a fairness intervention): the same
    attacks on the fair model, and FD-MIA (Tian et al. 2024) on the biased / fair pair, with
    reference pairs (each plain reference's fair twin, trained on the same half by the fair run's
    recipe).
* Embedding models (identity task, no posterior): ``centroid``, the cosine similarity of a
  sample's embedding to the mean embedding of the other photos of its identity.
* Both: ``mint-vanilla`` and ``mint-cnn`` (``attacks.mint``), the white-box auditor, trained on
  the audited samples of half the identities and reported on the other half, and its baseline
  ``mint-embedding`` (the same MLP on the embedding only, the same halves).

Every statistic comes from float64 logits (``attacks.scores``). Every attack gets
``attacks.metrics.attack_metrics``: AUC, accuracy and balanced accuracy at the best threshold, TPR
at FPR 0.1% and 1% where the nonmembers resolve it, seeded bootstrap 95% intervals, per gender and
group where large enough, and the epsilon lower bound its ROC proves
(``attacks.empirical_epsilon``); paired differences between attacks; the one-run canary audit
when the run has canaries. Written to ``audit/report.json`` (``common.runs.records.AuditReport``),
``audit/scores.npz``, ``audit/raw.npz`` (what re-scoring needs) and one ROC figure per target
family. Every attack, what it applies to and what it needs: ``attacks.registry``; the file
formats: docs/audit.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from attacks.canary_audit import canary_audit
from attacks.empirical_epsilon import roc_epsilon_lower_bound
from attacks.federated_references import TargetRecipe, federated_model, initial_state, reference_clients
from attacks.metrics import DEFAULT_FPR_TARGETS, RocCurve, attack_metrics, paired_difference, roc_figures
from attacks.mint import (
    CNNMINT,
    MINT_CNN_BLOCK,
    VanillaMINT,
    activations,
    identity_split,
    vanilla_features,
)
from attacks.mote_audit import mote_attack_scores
from attacks.reference_models import train_references
from attacks.registry import MOTE_ATTACKS, REFERENCE_ATTACKS, Target, applicable_attacks, for_target
from attacks.scores import (
    ShadowAttackModel,
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
from common.config import Config, load_config
from common.data.dataset import GENDER_NAMES, FaceDataset
from common.data.disk_images import take_rows
from common.he.checkpoints import load_final_model
from common.nn.build import load_model
from common.nn.checkpoint import save_checkpoint
from common.nn.face_model import FaceModel, ModelSpec
from common.runs import layout
from common.runs.io import atomic_save_npz, atomic_write_json, read_json
from common.runs.load import load_run
from common.runs.records import AttackEntry, AuditReport, TargetKind, tpr_label, tpr_text
from common.runs.rundir import RunDir
from common.split.canaries import canary_mask
from common.split.manifest import Manifest
from common.train.fairness import reweight, sensitive_attribute
from common.train.loop import attribute_logits, embed, target_labels

log = logging.getLogger(__name__)

REFERENCE_RECIPES = ("target", "central")

GLOBAL = Target("global model (final)", TargetKind.GLOBAL)
FAIR = Target("fair global model (final)", TargetKind.FAIR, "fair_", "fair model")
PAIR = Target("biased + fair pair", TargetKind.PAIR)
WHITE_BOX = Target("global model (final), white-box", TargetKind.WHITE_BOX)
FD_MIA_KIN = {"fd-mia-score": "shadow", "fd-mia-lira-online": "lira-online", "fd-mia-lira-offline": "lira-offline"}
"""Each FD-MIA attack on the pair and the single-model attack of its family on the fair model: an attack
model on outputs, LiRA online, LiRA offline (the paper's comparison, Tian et al. 2024)."""
UPDATE_ATTACKS = for_target(TargetKind.CLIENT)  # against each client's own post-round model


@dataclass
class AuditSettings:
    attacks: tuple[str, ...] | None = None  # None: every attack that applies to the task
    references: int = 16
    max_per_class: int = 5000  # audited members and as many nonmembers: TPR at 0.1% FPR needs >= 10,000 nonmembers
    recipe: str = "target"  # how references train: "target" (the run's own recipe) or "central" (``REFERENCE_RECIPES``)
    seed: int = 0
    n_boot: int = 1000
    vectorised: bool = False  # stacked-weight training of the references; slower on CPU (bench/attacks.py)
    progress: bool = False  # a bar while reference models train


def audited_samples(manifest: Manifest, ds: FaceDataset, settings: AuditSettings,
                    eligible: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(positions, is_member): a seeded, balanced sample of (eligible) members and nonmembers."""
    rng = np.random.default_rng(np.random.SeedSequence([settings.seed, 0xA0D1]))
    ok = np.ones(len(ds), bool) if eligible is None else eligible
    members = np.flatnonzero(manifest.role_mask(ds, "member") & ok)
    nonmembers = np.flatnonzero(manifest.role_mask(ds, "nonmember") & ok)
    k = min(members.size, nonmembers.size, settings.max_per_class)
    if k < 2:
        raise ValueError(f"audit: {members.size} members and {nonmembers.size} nonmembers: need 2 of each")
    pos = np.concatenate([np.sort(rng.choice(members, k, replace=False)), np.sort(rng.choice(nonmembers, k, replace=False))])
    return pos, np.concatenate([np.ones(k, bool), np.zeros(k, bool)])


def _in_mask(references: int, n: int, seed: int) -> np.ndarray:
    """(R, n): each sample IN for exactly half of the models (Carlini et al.'s keep matrix)."""
    if references < 2 or references % 2:
        raise ValueError(f"--references: expected an even number >= 2, got {references}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x1E5]))
    return np.argsort(rng.random((references, n)), axis=0) < references // 2


@dataclass
class References:
    """Reference models' outputs on the population: the audited samples first, then ``aux``.
    They are trained (or read from the cache) on first use: the loss attack needs none."""

    n_audited: int
    labels: np.ndarray  # (n_pop,) binary labels
    in_mask: np.ndarray  # (R, n_pop)
    outputs: Callable[[], np.ndarray]  # -> (n_pop, R) attribute logits

    @cached_property
    def logits(self) -> np.ndarray:
        return self.outputs()

    @cached_property
    def phi(self) -> np.ndarray:
        """(n_pop, R) every reference's exact scaled confidence of every population sample."""
        return _per_model(scaled_confidence, self.logits, self.labels)

    @property
    def audited(self) -> slice:
        return slice(0, self.n_audited)

    @property
    def aux(self) -> slice:
        return slice(self.n_audited, None)


def _reference_seeds(seed: int, references: int) -> list[int]:
    return [int(np.random.SeedSequence([seed, 0x5EF, r]).generate_state(1)[0] & 0x7FFFFFFF) for r in range(references)]


def reference_logits(run: RunDir, source: RunDir, cfg: Config, spec: ModelSpec, ds: FaceDataset,
                     population: np.ndarray, labels: np.ndarray, in_mask: np.ndarray, settings: AuditSettings,
                     fair: bool = False) -> np.ndarray:
    """Reference models' attribute logits on the population (n, R); trained once and cached in the
    audited ``run``'s directory.

    ``settings.recipe``: ``target`` replays the recipe ``source`` recorded (the target; for FD-MIA's
    twins, the fair run with its own intervention) on each reference's half
    (``attacks.federated_references``); ``central``
    trains each reference centrally without DP with the target's local recipe and trainable
    parameters (``attacks.reference_models``), and ``fair`` then reweights it (Kamiran & Calders) on its own
    IN set: the twin of the plain reference on the same half (FD-MIA's reference pairs).
    """
    cache = run.reference_cache(fair)
    seeds = _reference_seeds(settings.seed, in_mask.shape[0])
    recipe = TargetRecipe.of_run(source, cfg) if settings.recipe == "target" else None
    initial = source.initial_model
    key = hashlib.sha256(json.dumps({
        "ids": ds.sample_ids[population].tolist(), "mask": np.packbits(in_mask).tolist(), "seeds": seeds,
        "spec": spec.to_dict(), "fair": fair, "recipe": settings.recipe, "vectorised": settings.vectorised,
        "initial": hashlib.sha256(initial.read_bytes()).hexdigest() if initial.exists() else None,
        "config": cfg.to_dict(), "target": recipe.key() if recipe is not None else None},
        sort_keys=True).encode()).hexdigest()
    index = cache / layout.REFERENCE_INDEX
    if index.exists() and read_json(index).get("key") == key:
        models = [load_model(cache / layout.reference_model_file(r), spec)[0] for r in range(len(seeds))]
        log.info("audit: %d reference models from %s", len(models), cache)
    else:
        models = _train_references(source, cfg, spec, ds, population, labels, in_mask, seeds, settings, recipe, fair)
        for r, model in enumerate(models):
            save_checkpoint(cache / layout.reference_model_file(r), model.state_dict(), {"reference": r, "key": key})
        atomic_write_json(index, {"key": key, "references": len(seeds), "recipe": settings.recipe, "seeds": seeds,
                                  "fair": fair})
    return np.stack([attribute_logits(m, take_rows(ds.images, population)) for m in models], axis=1)


def _train_references(source: RunDir, cfg: Config, spec: ModelSpec, ds: FaceDataset, population: np.ndarray,
                      labels: np.ndarray, in_mask: np.ndarray, seeds: list[int], settings: AuditSettings,
                      recipe: TargetRecipe | None, fair: bool) -> list[FaceModel]:
    if recipe is not None:
        return [federated_model(recipe, reference_clients(cfg, ds.subset(population[row]), seed), seed)
                for row, seed in tqdm(list(zip(in_mask, seeds, strict=True)), desc="reference federations",
                                      unit="model", disable=not settings.progress)]
    weights = None
    if fair:
        sens = sensitive_attribute(ds.subset(population), cfg.fairness.sensitive)
        weights = np.ones(in_mask.shape)
        for r, row in enumerate(in_mask):
            weights[r, row] = reweight(sens[row], labels[row])
    epochs = cfg.federation.rounds * cfg.federation.local_epochs
    return train_references(spec, take_rows(ds.images, population), labels, in_mask, cfg.train, epochs, seeds,
                            vectorised=settings.vectorised, sample_weights=weights, init_state=initial_state(source),
                            trainable=cfg.federation.trainable, progress=settings.progress)


def _per_model(stat: Callable[[np.ndarray, np.ndarray], np.ndarray], logits: np.ndarray,
               labels: np.ndarray) -> np.ndarray:
    """``stat`` (``scaled_confidence``, ``log_true_prob``) of (n,) binary logits, or of each column
    (one model each) of (n, R) ones: a 2-D array is a multiclass model to ``attacks.scores``."""
    if logits.ndim == 1:
        return stat(logits, labels)
    return np.stack([stat(logits[:, r], labels) for r in range(logits.shape[1])], axis=1)


def single_model_scores(z_target: np.ndarray, refs: References, wanted: tuple[str, ...],
                        settings: AuditSettings) -> dict[str, np.ndarray]:
    """Black-box attacks on one binary model, from its attribute logits on the population."""
    a, x = refs.audited, refs.aux
    y, y_aux = refs.labels[a], refs.labels[x]
    out: dict[str, np.ndarray] = {}
    if "loss" in wanted:
        out["loss"] = -sample_loss(z_target[a], y)
    if not set(wanted) & set(REFERENCE_ATTACKS):
        return out
    phi_t, phi_r, inside = scaled_confidence(z_target[a], y), refs.phi[a], refs.in_mask[:, a].T
    # Per-example variances need many references; with fewer than 64 LiRA's fixed (global)
    # variance is the stronger test (Carlini et al. 2022, Sec. VI).
    global_variance = settings.references < 64
    if "lira-online" in wanted:
        out["lira-online"] = lira_online(phi_t, phi_r, inside, global_variance=global_variance)
    if "lira-offline" in wanted:
        out["lira-offline"] = lira_offline(phi_t, phi_r, inside, global_variance=global_variance)
    if "rmia" in wanted:
        log_p = partial(_per_model, log_true_prob)
        out["rmia"] = rmia_scores(log_p(z_target[a], y), log_p(refs.logits[a], y),
                                  log_p(z_target[x], y_aux), log_p(refs.logits[x], y_aux))
    if "shadow" in wanted:
        # The reference models double as shadow models (trained by the same recipe): the attack
        # model learns from their outputs on the aux samples, whose membership in each is known,
        # and never sees an audited sample's label.
        feats = np.concatenate([posterior_features(refs.logits[x, r], y_aux) for r in range(refs.logits.shape[1])])
        model = ShadowAttackModel(seed=settings.seed).fit(feats, refs.in_mask[:, x].ravel())
        out["shadow"] = model.score(posterior_features(z_target[a], y))
    return out


def fd_mia_scores(z_bias: np.ndarray, z_fair: np.ndarray, refs: References, refs_fair: References,
                  settings: AuditSettings) -> dict[str, np.ndarray]:
    """FD-MIA (Tian et al. 2024) on a biased / fair model pair: score-based (an attack model on
    both models' outputs, learnt from reference pairs on aux) and LiRA-based (bivariate Gaussian
    over both scaled scores, full covariance, from the same reference pairs)."""
    a, x = refs.audited, refs.aux
    y, y_aux = refs.labels[a], refs.labels[x]
    feats = np.concatenate([fd_mia_features(refs.logits[x, r], refs_fair.logits[x, r], y_aux)
                            for r in range(refs.logits.shape[1])])
    attack = ShadowAttackModel(seed=settings.seed).fit(feats, refs.in_mask[:, x].ravel())
    pair_t = np.column_stack([scaled_confidence(z_bias[a], y), scaled_confidence(z_fair[a], y)])
    pair_r = np.stack([refs.phi[a], refs_fair.phi[a]], axis=2)
    inside = refs.in_mask[:, a].T
    global_cov = settings.references < 64
    return {"fd-mia-score": attack.score(fd_mia_features(z_bias[a], z_fair[a], y)),
            "fd-mia-lira-online": fd_lira_online(pair_t, pair_r, inside, global_covariance=global_cov),
            "fd-mia-lira-offline": fd_lira_offline(pair_t, pair_r, inside, global_covariance=global_cov)}


def _embedding_audit_set(ds: FaceDataset, manifest: Manifest, settings: AuditSettings,
                         usable: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(audited positions, is_member, the attacker's known photos) for the centroid statistic.

    The attacker holds every member- and nonmember-role photo of the audited people (the model's
    embeddings of them, and who is who); photos whose identity has no other are not audited.
    """
    photos = (manifest.role_mask(ds, "member") | manifest.role_mask(ds, "nonmember")) & usable
    ids, counts = np.unique(ds.identity[photos], return_counts=True)
    eligible = photos & np.isin(ds.identity, ids[counts >= 2])
    pos, is_member = audited_samples(manifest, ds, settings, eligible)
    return pos, is_member, np.flatnonzero(eligible)


def centroid_scores(model: FaceModel, ds: FaceDataset, pos: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Cosine of each audited photo's embedding to the mean of the other known photos of its identity."""
    candidates = np.isin(known, pos)
    scores = centroid_similarity(embed(model, take_rows(ds.images, known)), ds.identity[known], np.ones(known.size, bool),
                                 candidates)
    return scores[np.searchsorted(known[candidates], pos)]  # scores come in ``known`` order


def mint_scores(model: FaceModel, ds: FaceDataset, pos: np.ndarray, is_member: np.ndarray,
                wanted: tuple[str, ...], seed: int, device: str = "cpu") -> dict[str, np.ndarray]:
    """MINT (white-box) scores; NaN for the MINT model's own training half. The MINT model trains on
    the audited samples of half the identities and is scored on the other half (identity-disjoint).
    ``mint-embedding``, the vanilla MLP on the embedding alone on the same halves, comes first: the
    audit's paired comparisons then say what the activations add over the embedding (DeAlcala et al.
    compare MINT with exactly that baseline).
    The CNN variant reads the first stage's maps (``MINT_CNN_BLOCK``). The MINT models train on
    ``device`` (a ``train.device`` value)."""
    acts = activations(model, take_rows(ds.images, pos))
    train = identity_split(ds.identity[pos], seed)
    for part, name in ((train, "training"), (~train, "test")):
        if is_member[part].all() or not is_member[part].any():
            raise ValueError(f"MINT: its {name} half of the identities has only one class of samples")
    out: dict[str, np.ndarray] = {}
    for name, make, feats in (("mint-embedding", VanillaMINT, lambda: acts.embedding.astype(np.float32)),
                              ("mint-vanilla", VanillaMINT, lambda: vanilla_features(acts)),
                              ("mint-cnn", CNNMINT, lambda: acts.blocks[MINT_CNN_BLOCK])):
        if name in wanted:
            x = feats()
            s = np.full(pos.size, np.nan)
            s[~train] = make(seed=seed, device=device).fit(x[train], is_member[train]).score(x[~train])
            out[name] = s
    return out


def _names(codes: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    return np.array([names[c] if 0 <= c < len(names) else "unknown" for c in codes.tolist()])


def _fair_twin(run: RunDir, fair_dir: str | os.PathLike[str], cfg: Config, manifest: Manifest,
               recipe: str) -> tuple[RunDir, Config]:
    """The fair run of an FD-MIA pair: same data, split and model, a fairness intervention on.
    Its reference twins must use its intervention: the central recipe can only reweight."""
    fair = RunDir(fair_dir)
    fair_cfg = load_config(fair.config_path)
    if fair_cfg.fairness.method == "none":
        raise ValueError(f"--fair {fair.path}: fairness.method is 'none'; the fair run needs an intervention")
    if cfg.fairness.method != "none":
        raise ValueError(f"{run.path}: the audited (biased) run has fairness.method {cfg.fairness.method!r}")
    if recipe == "central" and fair_cfg.fairness.method != "reweight":
        raise ValueError(f"--fair {fair.path}: fairness.method {fair_cfg.fairness.method!r}, but central reference "
                         "twins only reweight; audit with the target recipe, whose twins replay the fair run's own")
    other = Manifest.load(fair.manifest_path)
    if other.fingerprint != manifest.fingerprint or other.samples != manifest.samples:
        raise ValueError(f"--fair {fair.path}: its data or split differs from {run.path}'s: FD-MIA needs one split")
    return fair, fair_cfg


def run_audit(run_dir: str | os.PathLike[str], settings: AuditSettings,
              fair_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Audit the run's final model (and, with ``fair_dir``, the fair model and the FD-MIA pair);
    writes audit/report.json, scores.npz, raw.npz and the ROC figures; returns the report as written
    (``AuditReport.to_dict()``)."""
    if settings.recipe not in REFERENCE_RECIPES:
        raise ValueError(f"reference recipe: expected one of {', '.join(REFERENCE_RECIPES)}, got {settings.recipe!r}")
    run = RunDir(run_dir)
    cfg, ds, manifest = load_run(run)
    model = load_final_model(run)
    applicable = applicable_attacks(cfg, model.spec)
    wanted = applicable if settings.attacks is None else tuple(settings.attacks)
    unknown = sorted(set(wanted) - set(applicable))
    if unknown:
        raise ValueError(f"--attacks: {unknown} do not apply to this run's model (task {cfg.train.task!r}); "
                         f"available: {', '.join(applicable)}")
    if fair_dir is not None and not model.spec.attribute_head:
        raise ValueError("--fair: FD-MIA needs attribute models (train.task = attribute or both)")
    usable = ~canary_mask(run, ds)  # the canaries are the one-run audit's, never ordinary audited samples
    update_level = _update_level_availability(run, cfg)
    clients = [load_model(path, model.spec) for path in update_level.pop("paths", [])]
    sets: dict[str, AuditedSet] = {}  # scores.npz key prefix -> audited samples with their scores
    if model.spec.attribute_head:
        sets[""] = _attribute_set(run, cfg, ds, manifest, model, clients, settings, wanted, fair_dir, usable)
    if cfg.train.task in ("identity", "both"):
        sets["embedding_" if sets else ""] = _embedding_set(ds, manifest, model, clients, settings, wanted, usable)
    main = next(iter(sets.values()))
    main.scores.update({(WHITE_BOX, name): s for name, s in mint_scores(
        model, ds, main.positions, main.is_member, wanted, settings.seed, cfg.train.device).items()})
    mote = _mote_set(run, cfg, ds, manifest, model, settings, wanted)
    if mote is not None:
        sets[MOTE_PREFIX] = mote
    canaries = canary_audit(run, model, cfg, ds, cfg.dp.delta) if model.spec.attribute_head else None
    canary_arrays = canaries.pop("arrays") if canaries is not None else {}
    mote_audited = None if mote is None else {
        "members": int(mote.is_member.sum()), "nonmembers": int((~mote.is_member).sum()),
        "what": "enrollment references vs other member-role photos of the same people"}
    report = AuditReport(
        run=str(run.path), fair_run=None if fair_dir is None else str(fair_dir), task=cfg.train.task,
        dp={"mode": cfg.dp.mode, "target_epsilon": cfg.dp.target_epsilon},
        audited={"members": int(main.is_member.sum()), "nonmembers": int((~main.is_member).sum())},
        references=settings.references, seed=settings.seed, update_level=update_level,
        fpr_targets=tuple(DEFAULT_FPR_TARGETS),
        attacks=[entry for audited in sets.values() for entry in audited.metrics(ds, settings, cfg.dp.delta)],
        mote_audited=mote_audited, reference_recipe=settings.recipe, canary_audit=canaries,
        comparisons=[c for audited in sets.values() for c in audited.comparisons(settings)])
    arrays: dict[str, np.ndarray] = {}
    for prefix, audited in sets.items():
        arrays.update({f"{prefix}sample_ids": ds.sample_ids[audited.positions], f"{prefix}is_member": audited.is_member,
                       **{prefix + t.key(n): s for (t, n), s in audited.scores.items()}})
    atomic_save_npz(run.audit_scores_path, **arrays)
    atomic_save_npz(run.audit_raw_path, **{k: v for audited in sets.values() for k, v in audited.raw.items()},
                    **canary_arrays)
    roc_figures([RocCurve(t.kind.family, t.label(n), s[np.isfinite(s)], audited.is_member[np.isfinite(s)])
                 for audited in sets.values() for (t, n), s in audited.scores.items()], run.audit_roc)
    report.save(run.audit_report_path)
    return report.to_dict()


def _client_target(meta: dict[str, Any]) -> Target:
    p = int(meta["partition"])
    return Target(f"client {p} update (round {meta['round']})", TargetKind.CLIENT, f"client{p}_", f"client {p}",
                  partition=p)


def _own_members(is_member: np.ndarray, pos: np.ndarray, manifest: Manifest, ds: FaceDataset,
                 meta: dict[str, Any]) -> np.ndarray:
    """This client's members and every audited nonmember: what a curious server learns about the
    client whose update it reads (other clients' members are left out)."""
    return ~is_member | np.isin(pos, manifest.client_indices(ds, int(meta["partition"])))


def _attribute_set(run: RunDir, cfg: Config, ds: FaceDataset, manifest: Manifest, model: FaceModel,
                   clients: list[tuple[FaceModel, dict[str, Any]]], settings: AuditSettings, wanted: tuple[str, ...],
                   fair_dir: str | os.PathLike[str] | None, usable: np.ndarray) -> AuditedSet:
    """Black-box attacks on the attribute posterior: the global model, each client update, and
    with ``fair_dir`` the fair model and the FD-MIA pair."""
    spec = model.spec
    pos, is_member = audited_samples(manifest, ds, settings, usable)
    labels_all = target_labels(ds, cfg.train.attribute)
    population = np.concatenate([pos, np.flatnonzero(manifest.role_mask(ds, "aux") & (labels_all >= 0))])
    if (labels_all[pos] < 0).any() or population.size == pos.size:
        raise ValueError(f"audit: every audited sample needs a {cfg.train.attribute!r} label and the aux "
                         "population must not be empty (split.aux > 0)")
    in_mask = _in_mask(settings.references, population.size, settings.seed)
    labels = labels_all[population]
    refs = References(pos.size, labels, in_mask, partial(reference_logits, run, run, cfg, spec, ds, population, labels,
                                                         in_mask, settings))
    z_target = attribute_logits(model, take_rows(ds.images, population))
    scores = {(GLOBAL, name): s for name, s in single_model_scores(z_target, refs, wanted, settings).items()}
    raw = {GLOBAL: (z_target, refs)}
    if fair_dir is not None:
        fair, fair_cfg = _fair_twin(run, fair_dir, cfg, manifest, settings.recipe)
        z_fair = attribute_logits(load_final_model(fair), take_rows(ds.images, population))
        refs_fair = References(pos.size, labels, in_mask, partial(
            reference_logits, run, fair, fair_cfg, spec, ds, population, labels, in_mask, settings, fair=True))
        scores.update({(FAIR, name): s for name, s in single_model_scores(z_fair, refs_fair, wanted, settings).items()})
        pair = fd_mia_scores(z_target, z_fair, refs, refs_fair, settings)
        scores.update({(PAIR, name): s for name, s in pair.items()})
        raw[FAIR] = (z_fair, refs_fair)
    scored = {}
    for client, meta in clients:
        target, mine = _client_target(meta), _own_members(is_member, pos, manifest, ds, meta)
        z_client = attribute_logits(client, take_rows(ds.images, population))
        found = single_model_scores(z_client, refs, tuple(a for a in UPDATE_ATTACKS if a in wanted), settings)
        scores.update({(target, name): np.where(mine, s, np.nan) for name, s in found.items()})
        raw[target], scored[target] = (z_client, refs), mine
    uses_references = bool(set(wanted) & set(REFERENCE_ATTACKS)) or fair_dir is not None
    return AuditedSet(pos, is_member, scores,
                      _raw_arrays(ds, population, pos.size, is_member, scored, raw) if uses_references else {})


def _raw_arrays(ds: FaceDataset, population: np.ndarray, n_audited: int, is_member: np.ndarray,
                scored: dict[Target, np.ndarray],
                raw: dict[Target, tuple[np.ndarray, References]]) -> dict[str, np.ndarray]:
    """``audit/raw.npz``'s entries of every target attacked with reference models (docs/audit.md):
    under ``<target name>/``, the audited samples' ids, membership, the target's exact statistic
    phi, each reference's phi and whether it trained on the sample, and the same for the aux
    population (what RMIA compares against); ``scored``: the audited samples the report scores
    for this target (a client's update: its own members and every nonmember)."""
    a, x = slice(0, n_audited), slice(n_audited, None)
    out: dict[str, np.ndarray] = {}
    for target, (z, refs) in raw.items():
        phi_t = scaled_confidence(z, refs.labels)
        p = f"{target.name}/"
        out.update({p + "sample_ids": ds.sample_ids[population[a]], p + "is_member": is_member,
                    p + "scored": scored.get(target, np.ones(n_audited, bool)),
                    p + "target_stat": phi_t[a], p + "ref_stat": refs.phi[a].T, p + "ref_in": refs.in_mask[:, a],
                    p + "aux_sample_ids": ds.sample_ids[population[x]], p + "aux_target_stat": phi_t[x],
                    p + "aux_ref_stat": refs.phi[x].T, p + "aux_ref_in": refs.in_mask[:, x]})
    return out


def _embedding_set(ds: FaceDataset, manifest: Manifest, model: FaceModel, clients: list[tuple[FaceModel, dict[str, Any]]],
                   settings: AuditSettings, wanted: tuple[str, ...], usable: np.ndarray) -> AuditedSet:
    """The centroid statistic on the embedding, for the global model and each client update."""
    pos, is_member, known = _embedding_audit_set(ds, manifest, settings, usable)
    scores = {}
    if "centroid" in wanted:
        scores[(GLOBAL, "centroid")] = centroid_scores(model, ds, pos, known)
        for client, meta in clients:
            mine = _own_members(is_member, pos, manifest, ds, meta)
            scores[(_client_target(meta), "centroid")] = np.where(mine, centroid_scores(client, ds, pos, known), np.nan)
    return AuditedSet(pos, is_member, scores)


@dataclass
class AuditedSet:
    """Scores of several (target, attack)s on one set of audited samples with its ground truth."""

    positions: np.ndarray
    is_member: np.ndarray
    scores: dict[tuple[Target, str], np.ndarray]
    raw: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # audit/raw.npz entries

    def metrics(self, ds: FaceDataset, settings: AuditSettings, delta: float) -> list[AttackEntry]:
        """One report entry per attack, with the epsilon its ROC proves at ``delta``
        (``attacks.empirical_epsilon``); NaN scores (MINT's training half, other clients' members)
        are left out."""
        groups = {"gender": _names(ds.gender[self.positions], GENDER_NAMES),
                  "group": _names(ds.group[self.positions], ds.group_names)}
        entries = []
        for (target, name), s in self.scores.items():
            ok = np.isfinite(s)
            bound = roc_epsilon_lower_bound(s[ok], self.is_member[ok], delta).to_dict()
            entries.append(AttackEntry.from_dict({"name": name, **target.entry_fields(), **attack_metrics(
                s[ok], self.is_member[ok], {k: v[ok] for k, v in groups.items()}, seed=settings.seed,
                n_boot=settings.n_boot, fpr_targets=DEFAULT_FPR_TARGETS), "epsilon_lower_bound": bound}))
        return entries

    def comparisons(self, settings: AuditSettings) -> list[dict[str, Any]]:
        """Paired differences in AUC on the same samples (``attacks.metrics.paired_difference``):
        every attack on a target against that target's first attack (the loss attack for attribute
        models, the raw logit for MOTE galleries: does the stronger attack really find more?), every
        attack on the fair model against the same attack on the biased one, and each FD-MIA attack
        on the pair against its single-model kin on the fair model (``FD_MIA_KIN``: FD-MIA is
        compared within its family, not with the best of all attacks picked afterwards)."""
        by_target: dict[Target, dict[str, np.ndarray]] = {}
        for (target, name), s in self.scores.items():
            by_target.setdefault(target, {})[name] = s
        pairs = [((t, a), (t, next(iter(attacks)))) for t, attacks in by_target.items() for a in list(attacks)[1:]]
        pairs += [((FAIR, a), (GLOBAL, a)) for a in by_target.get(FAIR, {}) if a in by_target.get(GLOBAL, {})]
        pairs += [((PAIR, fd), (FAIR, kin)) for fd, kin in FD_MIA_KIN.items()
                  if fd in by_target.get(PAIR, {}) and kin in by_target.get(FAIR, {})]
        out = []
        for (ta, a), (tb, b) in pairs:
            sa, sb = by_target[ta][a], by_target[tb][b]
            ok = np.isfinite(sa) & np.isfinite(sb)
            out.append({"a": f"{a} @ {ta.name}", "b": f"{b} @ {tb.name}", **paired_difference(
                sa[ok], sb[ok], self.is_member[ok], seed=settings.seed, n_boot=settings.n_boot)})
        return out


MOTE_PREFIX = "mote_"  # scores.npz keys of the MOTE audited set


def _mote_set(run: RunDir, cfg: Config, ds: FaceDataset, manifest: Manifest, model: FaceModel,
              settings: AuditSettings, wanted: tuple[str, ...]) -> AuditedSet | None:
    """The MOTE gallery attacks (``attacks.mote_audit``) when the run has a fair + skewed pair."""
    if not set(wanted) & set(MOTE_ATTACKS) or cfg.train.task not in ("identity", "both"):
        return None
    found = mote_attack_scores(run.path, cfg, ds, manifest, model, settings.seed, settings.max_per_class)
    if found is None:
        log.info("audit: no MOTE gallery pair (b = 0.5 and a skewed b) in %s", run.mote)
        return None
    audited, by_target = found
    scores = {}
    for i, (found_target, attacks) in enumerate(by_target.items()):
        target = dataclasses.replace(found_target, key_prefix=f"{i}_", short=found_target.name)
        scores.update({(target, attack): s for attack, s in attacks.items() if attack in wanted})
    return AuditedSet(audited.positions, audited.is_member, scores)


def _update_level_availability(run: RunDir, cfg: Config) -> dict[str, Any]:
    """Whether a curious server held per-client models in this run, and where they are."""
    if cfg.he.enabled:
        return {"available": False, "reason": "HE: the server held only the encrypted sum of the clients' updates"}
    paths = sorted(run.client_models.glob(layout.CLIENT_MODEL_GLOB))
    if not paths:
        return {"available": False, "reason": "no client models saved (federation.save_client_models = false)"}
    return {"available": True, "clients": len(paths), "paths": paths}


def summary_header(report: AuditReport) -> tuple[str, ...]:
    """The printed table's header: one TPR column per target FPR of the report."""
    return ("attack", "target", "AUC [95% CI]", "balanced acc.", *(tpr_label(k) for k in report.fpr_keys),
            "epsilon >= (95%)")


def summary_rows(report: AuditReport) -> list[tuple]:
    rows = []
    for a in report.attacks:
        auc_ci = a.ci("auc")
        rows.append((a.name, a.target,
                     f"{a.auc:.3f} [{auc_ci[0]:.3f}, {auc_ci[1]:.3f}]" if auc_ci else f"{a.auc:.3f}",
                     f"{a.balanced_accuracy:.3f}", *(tpr_text(a, k) for k in report.fpr_keys),
                     f"{a.epsilon_lower_bound['epsilon']:.2f}" if a.epsilon_lower_bound else "-"))
    return rows
