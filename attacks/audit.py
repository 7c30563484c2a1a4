"""Black-box membership audit of a run's final global model: ``facefl audit RUN_DIR``.

Ground truth comes from the run's manifest. The audited samples are member-role samples (some
client trained on them) against nonmember-role samples (same distribution, never trained on),
balanced and seeded, at most ``max_per_class`` of each. The attacker's own data is the ``aux``
population.

* Attribute models (binary posterior):
  - ``loss``: minus the sample's loss (Yeom et al. 2018).
  - ``lira-online`` and ``lira-offline`` (Carlini et al. 2022): ``references`` models of the
    target's architecture, each trained on a random half of (audited + aux), so that every
    audited sample is IN for exactly half of them (``attacks.reference_models``, vectorised,
    cached in ``audit/references``). The offline test is the one-sided p-value against the OUT
    Gaussian; with fewer than 64 references the variance is global (fixed), as the paper advises.
  - ``rmia`` (Zarifzadeh et al. 2024, online): the aux samples are the population z.
* Embedding models (identity task, no posterior): ``centroid``, the cosine similarity of a
  sample's embedding to the mean embedding of the other audited images of its identity.

Every attack gets ``attacks.metrics.attack_metrics``: AUC, accuracy and balanced accuracy at
the best threshold, TPR at FPR 0.1% and 1%, seeded bootstrap 95% intervals, and per gender and
group. Written to ``audit/report.json``, ``audit/scores.npz`` and ``audit/roc.png``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from attacks.metrics import attack_metrics, log_log_roc_plot
from attacks.reference_models import train_references
from attacks.scores import centroid_similarity, lira_offline, lira_online, rmia_scores, sample_loss, scaled_confidence
from common.builders import build_dataset, build_model
from common.config import Config, load_config
from common.data.dataset import GENDER_NAMES, FaceDataset
from common.data.splits import Manifest
from common.io import atomic_save_npz, atomic_write_json, read_json
from common.models.checkpoint import load_checkpoint, save_checkpoint
from common.models.face_model import FaceModel, ModelSpec
from common.rundir import RunDir
from common.training import embed, predict_attribute, target_labels

log = logging.getLogger(__name__)

ATTRIBUTE_ATTACKS = ("loss", "lira-online", "lira-offline", "rmia")
EMBEDDING_ATTACKS = ("centroid",)


@dataclass
class AuditSettings:
    attacks: tuple[str, ...] | None = None  # None: every attack that applies to the task
    references: int = 16
    max_per_class: int = 500
    seed: int = 0
    n_boot: int = 1000


def _load_target(run: RunDir) -> tuple[FaceModel, ModelSpec]:
    path = run.models / "final.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no plaintext final model (an HE run must be decrypted first with "
                                "`facefl keys decrypt-model`)")
    state, meta = load_checkpoint(path)
    spec = ModelSpec.from_dict(meta["spec"])
    model = build_model(spec, 0)
    model.load_state_dict(state)
    model.eval()
    return model, spec


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


def _reference_probs(run: RunDir, cfg: Config, spec: ModelSpec, ds: FaceDataset, population: np.ndarray,
                     labels: np.ndarray, in_mask: np.ndarray, seed: int) -> np.ndarray:
    """Reference models' P(label = 1) on the population (n, R); trained once and cached."""
    cache = run.path / "audit" / "references"
    epochs = cfg.federation.rounds * cfg.federation.local_epochs
    seeds = [int(np.random.SeedSequence([seed, 0x5EF, r]).generate_state(1)[0] & 0x7FFFFFFF)
             for r in range(in_mask.shape[0])]
    key = hashlib.sha256(json.dumps({"ids": ds.sample_ids[population].tolist(), "mask": np.packbits(in_mask).tolist(),
                                     "seeds": seeds, "epochs": epochs, "spec": spec.to_dict(),
                                     "train": cfg.to_dict()["train"]}, sort_keys=True).encode()).hexdigest()
    index = cache / "index.json"
    if index.exists() and read_json(index).get("key") == key:
        models = []
        for r in range(len(seeds)):
            model = build_model(spec, 0)
            model.load_state_dict(load_checkpoint(cache / f"ref-{r:03d}.safetensors")[0])
            models.append(model.eval())
        log.info("audit: %d reference models from the cache", len(models))
    else:
        models = train_references(spec, ds.images[population], labels, in_mask, cfg.train, epochs, seeds)
        for r, model in enumerate(models):
            save_checkpoint(cache / f"ref-{r:03d}.safetensors", model.state_dict(), {"reference": r, "key": key})
        atomic_write_json(index, {"key": key, "references": len(seeds), "epochs": epochs, "seeds": seeds})
    return np.stack([predict_attribute(m, ds.images[population]) for m in models], axis=1)


def _true_prob(p1: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Probability of the true label from P(label = 1), any leading shape."""
    y = labels.reshape(labels.shape + (1,) * (p1.ndim - 1))
    return np.where(y == 1, p1, 1.0 - p1)


def _attribute_scores(run: RunDir, cfg: Config, model: FaceModel, spec: ModelSpec, ds: FaceDataset,
                      manifest: Manifest, pos: np.ndarray, settings: AuditSettings,
                      wanted: tuple[str, ...]) -> dict[str, np.ndarray]:
    labels_all = target_labels(ds, cfg.train.attribute)
    aux = np.flatnonzero(manifest.role_mask(ds, "aux") & (labels_all >= 0))
    keep = labels_all[pos] >= 0
    if not keep.all():
        raise ValueError(f"audit: {int((~keep).sum())} audited samples have no {cfg.train.attribute!r} label")
    p_target = predict_attribute(model, ds.images[pos])
    y = labels_all[pos]
    out: dict[str, np.ndarray] = {}
    if "loss" in wanted:
        out["loss"] = -sample_loss(p_target, y)
    if not {"lira-online", "lira-offline", "rmia"} & set(wanted):
        return out
    population = np.concatenate([pos, aux])
    in_mask = _in_mask(settings.references, population.size, settings.seed)
    p_ref = _reference_probs(run, cfg, spec, ds, population, labels_all[population], in_mask, settings.seed)
    n = pos.size
    phi_t = scaled_confidence(p_target, y)
    phi_r = np.stack([scaled_confidence(p_ref[:n, r], y) for r in range(p_ref.shape[1])], axis=1)
    # Per-example variances need many references; with fewer than 64 LiRA's fixed (global)
    # variance is the stronger test (Carlini et al. 2022, Sec. VI).
    global_variance = settings.references < 64
    if "lira-online" in wanted:
        out["lira-online"] = lira_online(phi_t, phi_r, in_mask[:, :n].T, global_variance=global_variance)
    if "lira-offline" in wanted:
        out["lira-offline"] = lira_offline(phi_t, phi_r, in_mask[:, :n].T, global_variance=global_variance)
    if "rmia" in wanted:
        if aux.size == 0:
            raise ValueError("audit: RMIA needs an aux population (split.aux > 0)")
        y_aux = labels_all[aux]
        out["rmia"] = rmia_scores(_true_prob(p_target, y), _true_prob(p_ref[:n], y),
                                  _true_prob(predict_attribute(model, ds.images[aux]), y_aux),
                                  _true_prob(p_ref[n:], y_aux))
    return out


def _embedding_scores(model: FaceModel, ds: FaceDataset, manifest: Manifest,
                      settings: AuditSettings) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Centroid statistic: the attacker holds every member- and nonmember-role photo of the audited
    people (the model's embeddings of them, and who is who), and scores a photo by its cosine to
    the mean of the *other* photos of its identity. Photos whose identity has no other are not
    audited."""
    photos = manifest.role_mask(ds, "member") | manifest.role_mask(ds, "nonmember")
    ids, counts = np.unique(ds.identity[photos], return_counts=True)
    eligible = photos & np.isin(ds.identity, ids[counts >= 2])
    pos, is_member = audited_samples(manifest, ds, settings, eligible)
    known = np.flatnonzero(eligible)
    candidates = np.isin(known, pos)
    scores = centroid_similarity(embed(model, ds.images[known]), ds.identity[known], np.ones(known.size, bool),
                                 candidates)
    order = np.searchsorted(known[candidates], pos)  # scores come in ``known`` order; pos is not sorted
    return pos, is_member, {"centroid": scores[order]}


def _names(codes: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    return np.array([names[c] if 0 <= c < len(names) else "unknown" for c in codes.tolist()])


def run_audit(run_dir: str | os.PathLike[str], settings: AuditSettings) -> dict[str, Any]:
    """Audit the run's final model; writes audit/report.json, scores.npz, roc.png; returns the report."""
    run = RunDir(run_dir)
    cfg = load_config(run.config_path)
    model, spec = _load_target(run)
    ds = build_dataset(cfg)
    manifest = Manifest.load(run.manifest_path, expect_fingerprint=ds.fingerprint())
    applicable = ATTRIBUTE_ATTACKS if spec.attribute_head else EMBEDDING_ATTACKS
    wanted = applicable if settings.attacks is None else settings.attacks
    unknown = sorted(set(wanted) - set(applicable))
    if unknown:
        raise ValueError(f"--attacks: {unknown} do not apply to this run's model (task {cfg.train.task!r}); "
                         f"available: {', '.join(applicable)}")
    if spec.attribute_head:
        pos, is_member = audited_samples(manifest, ds, settings)
        scores = _attribute_scores(run, cfg, model, spec, ds, manifest, pos, settings, tuple(wanted))
    else:
        pos, is_member, scores = _embedding_scores(model, ds, manifest, settings)
    groups = {"gender": _names(ds.gender[pos], GENDER_NAMES), "group": _names(ds.group[pos], ds.group_names)}
    attacks = [{"name": name, "target": "global model (final)",
                **attack_metrics(s, is_member, groups, seed=settings.seed, n_boot=settings.n_boot)}
               for name, s in scores.items()]
    report = {"run": str(run.path), "task": cfg.train.task, "dp": {"mode": cfg.dp.mode,
              "target_epsilon": cfg.dp.target_epsilon}, "audited": {"members": int(is_member.sum()),
              "nonmembers": int((~is_member).sum())}, "references": settings.references, "seed": settings.seed,
              "attacks": attacks}
    out = run.path / "audit"
    atomic_save_npz(out / "scores.npz", sample_ids=ds.sample_ids[pos], is_member=is_member,
                    **{name.replace("-", "_"): s for name, s in scores.items()})
    log_log_roc_plot({name: (s, is_member) for name, s in scores.items()}, out / "roc.png",
                     title=f"membership inference, {cfg.train.task} model")
    atomic_write_json(out / "report.json", report)
    return report


def summary_rows(report: dict[str, Any]) -> list[tuple]:
    rows = []
    for a in report["attacks"]:
        ci = a["ci95"] or {}
        rows.append((a["name"], f"{a['auc']:.3f} [{ci['auc'][0]:.3f}, {ci['auc'][1]:.3f}]" if ci else f"{a['auc']:.3f}",
                     f"{a['balanced_accuracy']:.3f}", f"{a['tpr_at_fpr']['0.001']:.3f}", f"{a['tpr_at_fpr']['0.01']:.3f}"))
    return rows
