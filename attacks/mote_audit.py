"""Membership inference against MOTE galleries, and FD-MIA on a fair / skewed gallery pair.

The question: given an enrolled person's model template and one of their photos, was this photo
an enrollment reference? Each identity model is trained on its reference embedding(s) (plus
synthetic and impostor samples), so a member is a reference image and a nonmember is another
member-role photo of the same person. Both were seen equally by the backbone, so the attack
isolates what the MOTE template itself leaks.

Targets (Tian et al. 2024, "FD-MIA": a fairness intervention opens a prediction gap between a
biased and a fair model that carries membership): the balanced gallery (b = 0.5) is the fair
model, the most skewed gallery of the run (|b - 0.5| largest) the biased one, both enrolled from
the same references with the same seeds. The score of a photo is the logit of its own
identity's model.

The attacker's shadow knowledge: it holds the final backbone and the ``aux`` population, enrolls
aux identities itself with the run's MOTE settings (a KDE and impostor pool from aux, references
chosen the same way), so it knows which shadow photos were references. From those it learns
- ``mote-lira``: one-dimensional Gaussians of the logit, IN vs OUT (global variance: the shadow
  identities are other people, so there are no per-example reference distributions);
- ``fd-mia-score``: an attack MLP on [fair logit, biased logit, their gap];
- ``fd-mia-lira``: bivariate Gaussians (full covariance) IN vs OUT over both logits.
``mote-score`` is the raw logit, which needs no shadow at all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attacks.registry import Target
from attacks.scores import ShadowAttackModel, bivariate_normal_logpdf
from common.config import Config
from common.data.dataset import FaceDataset
from common.data.disk_images import take_rows
from common.mote.enrollment import references
from common.mote.gallery import MoteGallery, enroll
from common.mote.kde import GenderKDE
from common.nn.face_model import FaceModel
from common.runs.layout import gallery_file
from common.runs.records import BALANCED_FACTOR, TargetKind
from common.split.manifest import Manifest
from common.train.loop import embed

log = logging.getLogger(__name__)

FAIR_B = BALANCED_FACTOR


def gallery_pair(run_path: Path, cfg: Config) -> tuple[float, float] | None:
    """(fair b, skewed b) when the run enrolled a balanced gallery and a skewed one, else None."""
    present = [b for b in cfg.mote.balancing_factors if (run_path / gallery_file(b)).is_file()]
    skewed = [b for b in present if b != FAIR_B]
    if FAIR_B not in present or not skewed:
        return None
    return FAIR_B, max(skewed, key=lambda b: (abs(b - FAIR_B), -b))


@dataclass
class MoteAuditSet:
    """Audited photos: each enrolled person's references (members) and as many of their other
    member-role photos (nonmembers), seeded."""

    positions: np.ndarray
    is_member: np.ndarray

    @classmethod
    def draw(cls, refs: dict[int, np.ndarray], candidates: np.ndarray, ds: FaceDataset, seed: int,
             max_per_class: int) -> MoteAuditSet:
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x307E]))
        members, others = [], []
        for ident, ref_pos in sorted(refs.items()):
            pool = np.setdiff1d(candidates[ds.identity[candidates] == ident], ref_pos)
            k = min(ref_pos.size, pool.size)
            if k:
                members.append(ref_pos[:k])
                others.append(np.sort(rng.choice(pool, k, replace=False)))
        if not members:
            raise ValueError("MOTE audit: no enrolled identity has a photo besides its references")
        m, o = np.concatenate(members), np.concatenate(others)
        if m.size > max_per_class:  # keep pairs together: the same people on both sides
            keep = np.sort(rng.choice(m.size, max_per_class, replace=False))
            m, o = m[keep], o[keep]
        return cls(np.concatenate([m, o]), np.concatenate([np.ones(m.size, bool), np.zeros(o.size, bool)]))


def own_logits(gallery: MoteGallery, embeddings: np.ndarray, identity: np.ndarray) -> np.ndarray:
    """Logit of each photo under its own identity's model."""
    column = {ident: i for i, ident in enumerate(gallery.identity_ids.tolist())}
    return gallery.logits(embeddings)[np.arange(identity.size), [column[int(i)] for i in identity]]


def shadow_logits(model: FaceModel, ds: FaceDataset, manifest: Manifest, cfg: Config, pair: tuple[float, float],
                  seed: int, max_per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """The attacker's shadow enrollment of aux identities: ((n, 2) fair/skewed logits, is_member)."""
    aux = np.flatnonzero(manifest.role_mask(ds, "aux"))
    ids, counts = np.unique(ds.identity[aux], return_counts=True)
    usable = ids[counts > cfg.mote.references]
    if usable.size < 2:
        raise ValueError(f"MOTE audit: the aux population has {usable.size} identities with more than "
                         f"{cfg.mote.references} photos; the shadow enrollment needs at least 2")
    refs = {int(i): aux[ds.identity[aux] == i][: cfg.mote.references] for i in usable}
    shadow = MoteAuditSet.draw(refs, aux, ds, seed, max_per_class)
    emb = embed(model, take_rows(ds.images, aux))
    row = {p: r for r, p in enumerate(aux.tolist())}
    ref_pos = np.concatenate(list(refs.values()))
    kde = GenderKDE.fit(emb, ds.identity[aux], ds.gender[aux], seed=seed)
    shadow_emb = emb[[row[p] for p in shadow.positions.tolist()]]
    logits = []
    for b in pair:
        gallery = enroll(emb[[row[p] for p in ref_pos.tolist()]], ds.identity[ref_pos], kde, emb, ds.identity[aux], b,
                         seed, cfg.mote, device=cfg.train.device)
        logits.append(own_logits(gallery, shadow_emb, ds.identity[shadow.positions]))
    log.info("MOTE audit: shadow enrollment of %d aux identities", usable.size)
    return np.column_stack(logits), shadow.is_member


def _gaussian_ratio(x: np.ndarray, inside: np.ndarray, target: np.ndarray) -> np.ndarray:
    """log N(target; IN) - log N(target; OUT), Gaussians (full covariance) fitted on ``x``."""
    def logpdf(rows: np.ndarray) -> np.ndarray:
        cov = np.atleast_2d(np.cov(rows, rowvar=False))
        if target.shape[1] == 1:
            var = max(float(cov[0, 0]), 1e-8)
            return -0.5 * ((target[:, 0] - rows[:, 0].mean()) ** 2 / var + np.log(2 * np.pi * var))
        return bivariate_normal_logpdf(target, rows.mean(0), cov)

    return logpdf(x[inside]) - logpdf(x[~inside])


def _features(pair: np.ndarray) -> np.ndarray:
    return np.column_stack([pair, pair[:, 0] - pair[:, 1]])


def mote_attack_scores(run_path: Path, cfg: Config, ds: FaceDataset, manifest: Manifest, model: FaceModel,
                       seed: int, max_per_class: int) -> tuple[MoteAuditSet, dict[Target, dict[str, np.ndarray]]] | None:
    """Every MOTE attack's per-photo scores, keyed by target (each gallery, then the pair) then
    attack; None without a fair + skewed gallery pair."""
    pair = gallery_pair(run_path, cfg)
    if pair is None:
        return None
    refs = references(manifest, ds, cfg)
    audited = MoteAuditSet.draw(refs, np.flatnonzero(manifest.role_mask(ds, "member")), ds, seed, max_per_class)
    emb = embed(model, take_rows(ds.images, audited.positions))
    who = ds.identity[audited.positions]
    target = np.column_stack([own_logits(MoteGallery.load(run_path / gallery_file(b)), emb, who) for b in pair])
    shadow, shadow_in = shadow_logits(model, ds, manifest, cfg, pair, seed, max_per_class)
    out: dict[Target, dict[str, np.ndarray]] = {}
    for col, b in enumerate(pair):
        gallery = Target(f"MOTE gallery b={b:.2f}", TargetKind.MOTE_GALLERY, balancing_factor=b, fair=b == FAIR_B)
        out[gallery] = {
            "mote-score": target[:, col],
            "mote-lira": _gaussian_ratio(shadow[:, [col]], shadow_in, target[:, [col]])}
    attack = ShadowAttackModel(seed=seed).fit(_features(shadow), shadow_in)
    out[Target(f"MOTE pair b={pair[0]:.2f} + b={pair[1]:.2f}", TargetKind.MOTE_PAIR)] = {
        "fd-mia-score": attack.score(_features(target)),
        "fd-mia-lira": _gaussian_ratio(shadow, shadow_in, target)}
    return audited, out
