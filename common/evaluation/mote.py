"""``facefl evaluate``: verification with MOTE model templates against plain embedding templates.

Galleries (MOTE, Groß, Heindorf & Terhörst): the enrolled identities' MOTE models, one gallery
per balancing factor, from ``mote/``. Template baseline: the L2-normalised mean embedding of the
same reference images, compared by cosine similarity. Probes: every probe-role image, scored
against every enrolled identity; a (probe, identity) pair is genuine when the probe shows that
identity (its held-out probe images, never a reference, never trained on) and an impostor pair
otherwise, which includes the probe-role identities nobody enrolled. For each method: ROC AUC,
one global threshold with FMR <= 1e-3 and the FNMR there, overall and per gender and skin-tone
group, with FDR, iGARBE and IR (``common.evaluation.verification_fairness``). The template-privacy attack
(``attacks.gender_inference``) runs on the returned ``TemplateSet``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import roc_curve

from common.data.dataset import GENDER_NAMES, FaceDataset
from common.data.disk_images import take_rows
from common.evaluation.verification_fairness import verification_report
from common.he.checkpoints import load_final_model
from common.mote.enrollment import references
from common.mote.gallery import MoteGallery
from common.report.plots import log_log_roc
from common.runs.load import load_run
from common.runs.records import TEMPLATES, MoteEvaluation, mote_method
from common.runs.rundir import RunDir
from common.train.loop import embed

TARGET_FMR = 1e-3


@dataclass
class TemplateSet:
    """What a template thief could steal, and the attacker's labelled auxiliary embeddings."""

    templates: np.ndarray  # (k, d) unit rows, one per enrolled identity
    gender: np.ndarray  # (k,) the enrolled identities' gender
    galleries: dict[str, MoteGallery]  # the evaluation's method name ("MOTE b=0.50") -> gallery
    aux_embeddings: np.ndarray
    aux_gender: np.ndarray


def _pairs(scores: np.ndarray, probe_identity: np.ndarray, enrolled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(genuine mask over the (probe, identity) score matrix, probe index of each entry)."""
    genuine = probe_identity[:, None] == enrolled[None, :]
    return genuine, np.broadcast_to(np.arange(scores.shape[0])[:, None], scores.shape)


def _method_report(scores: np.ndarray, genuine: np.ndarray, probe_of: np.ndarray, gender: np.ndarray,
                   group: np.ndarray, group_names: tuple[str, ...]) -> dict[str, Any]:
    gen, imp = scores[genuine], scores[~genuine]
    by_gender = verification_report(gen, gender[probe_of[genuine]], imp, gender[probe_of[~genuine]], (0, 1), TARGET_FMR)
    by_group = verification_report(gen, group[probe_of[genuine]], imp, group[probe_of[~genuine]],
                                   tuple(range(len(group_names))), TARGET_FMR)
    out = {k: v for k, v in by_gender.items() if k != "groups"}
    out["gender"] = {GENDER_NAMES[g]: r for g, r in by_gender["groups"].items()}
    out["group"] = {"per_group": {group_names[g]: r for g, r in by_group["groups"].items()},
                    **{k: by_group[k] for k in ("fdr", "garbe", "igarbe", "ir")}}
    return out


def templates_of(embeddings: np.ndarray, identity: np.ndarray, enrolled: np.ndarray) -> np.ndarray:
    """One unit template per enrolled identity: the mean of its reference embeddings, normalised."""
    templates = np.stack([embeddings[identity == j].mean(axis=0) for j in enrolled.tolist()])
    return templates / np.maximum(np.linalg.norm(templates, axis=1, keepdims=True), 1e-12)


def compare_methods(probes: np.ndarray, probe_data: FaceDataset, enrolled: np.ndarray, templates: np.ndarray,
                    galleries: dict[str, MoteGallery]) -> tuple[MoteEvaluation, dict[str, tuple], int]:
    """Verification of the templates and of each gallery with the same probe embeddings (of the
    images ``probe_data``) against every enrolled identity: the report, each method's ROC
    (false match rate, true match rate) and the number of impostor comparisons."""
    scores = {TEMPLATES: probes.astype(np.float64) @ templates.T.astype(np.float64)}
    scores.update({name: g.scores(probes) for name, g in galleries.items()})
    genuine, probe_of = _pairs(scores[TEMPLATES], probe_data.identity, enrolled)
    if not genuine.any():
        raise ValueError("no probe image shows an enrolled identity: nothing to verify")
    report = MoteEvaluation(TARGET_FMR, int(enrolled.size), len(probe_data), {})
    curves = {}
    for name, s in scores.items():
        report.methods[name] = _method_report(s, genuine, probe_of, probe_data.gender, probe_data.group,
                                              probe_data.group_names)
        fmr, tmr, _ = roc_curve(genuine.ravel(), s.ravel())
        curves[f"{name} (AUC {report.methods[name]['auc']:.3f})"] = (fmr, tmr)
    return report, curves, int((~genuine).sum())


def evaluate_mote(run_dir: str | os.PathLike[str]) -> tuple[MoteEvaluation, TemplateSet]:
    """Verification of templates and of each MOTE gallery on the run's probes; ROC plot in mote/."""
    run = RunDir(run_dir)
    cfg, ds, manifest = load_run(run)
    model = load_final_model(run)
    galleries = {mote_method(b): MoteGallery.load(run.gallery(b)) for b in cfg.mote.balancing_factors}
    enrolled = next(iter(galleries.values())).identity_ids
    if any(not np.array_equal(g.identity_ids, enrolled) for g in galleries.values()):
        raise ValueError(f"{run.mote}: the galleries enroll different identities")
    refs = references(manifest, ds, cfg)
    missing = sorted(set(enrolled.tolist()) - set(refs))
    if missing:
        raise ValueError(f"{run.mote}: identities {missing[:5]} are enrolled but have no member images")
    probe_pos = np.flatnonzero(manifest.role_mask(ds, "probe"))
    ref_pos = np.concatenate([refs[i] for i in enrolled.tolist()])
    if np.isin(probe_pos, ref_pos).any():  # roles are disjoint by construction; never score a reference
        raise ValueError(f"{run.manifest_path}: a reference image has the probe role")
    probe_data = ds.subset(probe_pos)
    ref_emb = embed(model, take_rows(ds.images, ref_pos))
    templates = templates_of(ref_emb, ds.identity[ref_pos], enrolled)
    report, curves, impostors = compare_methods(embed(model, probe_data.images), probe_data, enrolled, templates,
                                                galleries)
    log_log_roc(curves, run.mote_roc_path, max(1e-5, 1.0 / impostors),
                xlabel="false match rate", ylabel="true match rate (1 - FNMR)", title="MOTE vs templates")

    aux = np.flatnonzero(manifest.role_mask(ds, "aux") & (ds.gender >= 0))
    id_gender = {int(i): int(g) for i, g in zip(ds.identity[ref_pos], ds.gender[ref_pos], strict=True)}
    return report, TemplateSet(templates, np.array([id_gender[int(i)] for i in enrolled]), galleries,
                               embed(model, take_rows(ds.images, aux)), ds.gender[aux].astype(np.int64))


def save_evaluation(run_dir: str | os.PathLike[str], report: MoteEvaluation) -> tuple[list[str], list[tuple]]:
    """Write ``mote/evaluation.json``; return the summary table (header, rows)."""
    report.save(RunDir(run_dir).mote_evaluation_path)
    header = ["method", "AUC", "FNMR@FMR=1e-3", "FNMR female", "FNMR male", "FDR", "iGARBE", "IR",
              "gender inference BA"]
    rows = []
    for name, r in report.methods.items():
        ba = report.leakage(name).get("balanced_accuracy")
        rows.append((name, f"{r['auc']:.4f}", f"{r['fnmr']:.4f}", f"{r['gender']['female']['fnmr']:.4f}",
                     f"{r['gender']['male']['fnmr']:.4f}", f"{r['fdr']:.4f}", f"{r['igarbe']:.4f}", f"{r['ir']:.3f}",
                     "-" if ba is None else f"{ba:.3f}"))
    return header, rows
