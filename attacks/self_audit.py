"""A member's audit of the final model on its own data, of which only numbers leave the member.

With ``data.layout = per-member`` no party holds the ground truth of every member's split, so
the server cannot audit; each member can. It attacks what it holds at the end of the run (the
global backbone with its own private identity head) with its training images as members and
half of its held-out images (``common.split.member``) as nonmembers:

* loss (Yeom et al. 2018): -cross-entropy of the head's logits, in float64;
* offline LiRA (Carlini et al. 2022): the scaled confidence against a Gaussian fitted to
  reference models that never saw either audited set: the run's initial (public) model with a
  fresh head, trained without DP by the run's client recipe (same trainable parameters, passes
  and rate) on the other half of the held-out images. Difficulty calibration (Watson et al.
  2022): an image that is hard for every model is not a member for being hard.

Each attack gets its AUC with a bootstrap interval, TPR where the nonmembers resolve the FPR,
and the empirical epsilon lower bound of its ROC (``roc_epsilon_lower_bound``, one image per
trial: the unit of a per-image epsilon). The result holds counts and statistics, never scores or
ids, so that sending it to the server tells it nothing about which image trained.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from attacks.empirical_epsilon import roc_epsilon_lower_bound
from attacks.metrics import attack_metrics
from attacks.scores import lira_offline, sample_loss, scaled_confidence
from common.config import Config, DPConfig
from common.data.dataset import FaceDataset
from common.nn.build import build_identity_head
from common.nn.face_model import FaceModel
from common.nn.heads import CosineClassifier
from common.train.finetune import restrict_training
from common.train.loop import embed, train

ATTACKS = ("loss", "lira-offline")


@dataclass(frozen=True)
class SelfAuditSets:
    """The member's audited images and the images its references train on: ``members`` trained
    the model, ``nonmembers`` and ``reference`` did not; all of the identities the references know
    (``classes``, sorted), so that every model scores them over the same classes."""

    members: FaceDataset
    nonmembers: FaceDataset
    reference: FaceDataset
    classes: np.ndarray

    @classmethod
    def from_split(cls, train: FaceDataset, held_out: FaceDataset, seed: int) -> SelfAuditSets:
        """Each identity's held-out images halved at random (seeded): the references get
        max(1, n // 2) of its n, the nonmembers the rest; identities without a held-out image
        are left out of the audit (no reference knows them)."""
        rng = np.random.default_rng(seed)
        to_reference = np.zeros(len(held_out), bool)
        for ident in np.unique(held_out.identity):
            own = rng.permutation(np.flatnonzero(held_out.identity == ident))
            to_reference[own[:max(1, own.size // 2)]] = True
        reference = held_out.subset(np.flatnonzero(to_reference))
        classes = np.unique(reference.identity)
        return cls(train.subset(np.flatnonzero(np.isin(train.identity, classes))),
                   held_out.subset(np.flatnonzero(~to_reference)), reference, classes)


def head_logits(model: FaceModel, head: CosineClassifier, ds: FaceDataset, scale: float) -> np.ndarray:
    """The identity head's logits (scale x cosine, no margin: the classifier as used), float64."""
    with torch.no_grad():
        cosine = head(torch.from_numpy(embed(model, ds.images)))
    return scale * cosine.double().numpy()


def reference_models(initial: FaceModel, sets: SelfAuditSets, cfg: Config, count: int,
                     seed: int) -> list[tuple[FaceModel, CosineClassifier]]:
    """``count`` references: copies of the initial model, each with a fresh head over
    ``sets.classes``, trained without DP on ``sets.reference`` by the clients' recipe (trainable
    parameters, rate, batch) for as many passes as the run made."""
    refs = []
    passes = cfg.federation.rounds * cfg.federation.local_epochs
    for k in range(count):
        model = copy.deepcopy(initial)
        restrict_training(model, cfg.federation.trainable)
        head = build_identity_head(model.spec, sets.classes.size, seed + k)
        train(model, sets.reference, cfg.train, DPConfig(mode="off"), seed=seed + k, epochs=passes, head=head,
              desc=f"self-audit reference {k}")
        refs.append((model, head))
    return refs


def self_audit(target: FaceModel, head: CosineClassifier, head_classes: np.ndarray, sets: SelfAuditSets,
               references: list[tuple[FaceModel, CosineClassifier]], cfg: Config, seed: int,
               n_boot: int = 1000) -> dict[str, Any]:
    """Every attack's numbers (see the module docstring) and the counts they rest on; the target's
    head (over ``head_classes``, sorted) is read on the columns of ``sets.classes`` only."""
    audited = [sets.members, sets.nonmembers]
    labels = np.concatenate([np.searchsorted(sets.classes, d.identity) for d in audited])
    is_member = np.concatenate([np.ones(len(sets.members), bool), np.zeros(len(sets.nonmembers), bool)])
    scale = cfg.train.margin_scale
    columns = np.searchsorted(head_classes, sets.classes)
    logits = np.concatenate([head_logits(target, head, d, scale) for d in audited])[:, columns]
    scores = {"loss": -sample_loss(logits, labels)}
    if references:
        ref = np.stack([scaled_confidence(np.concatenate([head_logits(m, h, d, scale) for d in audited]), labels)
                        for m, h in references])
        # Few references: one variance for all images (Carlini et al. 2022, offline with few models).
        scores["lira-offline"] = lira_offline(scaled_confidence(logits, labels), ref.T, global_variance=True)
    out: dict[str, Any] = {"members": int(is_member.sum()), "nonmembers": int((~is_member).sum()),
                           "reference_images": len(sets.reference), "references": len(references),
                           "unit": "one image", "attacks": {}}
    for name, s in scores.items():
        metrics = attack_metrics(s, is_member, None, seed, n_boot)
        metrics.pop("per_group")
        bound = roc_epsilon_lower_bound(s, is_member, cfg.dp.delta)
        out["attacks"][name] = {**metrics, "empirical_epsilon": bound.epsilon,
                                "empirical_epsilon_confidence": bound.confidence}
    return out
