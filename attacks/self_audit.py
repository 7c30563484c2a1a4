"""A member's audit of the final model on its own data, of which only numbers leave the member.

With ``data.layout = per-member`` no party holds the ground truth of every member's split, so
the server cannot audit; each member can. It attacks what it holds at the end of the run (the
global backbone with its own private identity head) with its training images as members and
half of its held-out images (``common.split.member``) as nonmembers:

* loss (Yeom et al. 2018): -cross-entropy of the head's logits, in float64;
* offline LiRA (Carlini et al. 2022): the scaled confidence against a Gaussian fitted to
  reference models that never saw either audited set: the run's initial (public) model with a
  fresh head, trained by the member's own recipe (trainable parameters, passes, rate, DP-SGD at
  its noise multiplier) on the other half of the held-out images. Difficulty calibration (Watson
  et al. 2022): an image that is hard for every model is not a member for being hard.

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
    the model, ``nonmembers`` and ``reference`` did not. ``classes`` (sorted): the identities the
    references know, on which offline LiRA is scored (every model over the same classes)."""

    members: FaceDataset
    nonmembers: FaceDataset
    reference: FaceDataset
    classes: np.ndarray

    @classmethod
    def from_split(cls, train: FaceDataset, held_out: FaceDataset, seed: int) -> SelfAuditSets:
        """Each identity's n held-out images halved at random (seeded): n // 2 train the
        references, the rest are nonmembers (an identity with one held-out image gives it to the
        nonmembers: the loss attack needs no reference)."""
        rng = np.random.default_rng(seed)
        to_reference = np.zeros(len(held_out), bool)
        for ident in np.unique(held_out.identity):
            own = rng.permutation(np.flatnonzero(held_out.identity == ident))
            to_reference[own[:own.size // 2]] = True
        reference = held_out.subset(np.flatnonzero(to_reference))
        return cls(train, held_out.subset(np.flatnonzero(~to_reference)), reference, np.unique(reference.identity))

    def known(self) -> tuple[np.ndarray, np.ndarray]:
        """Masks of the members and nonmembers whose identity the references know."""
        return np.isin(self.members.identity, self.classes), np.isin(self.nonmembers.identity, self.classes)


def head_logits(model: FaceModel, head: CosineClassifier, ds: FaceDataset, scale: float) -> np.ndarray:
    """The identity head's logits (scale x cosine, no margin: the classifier as used), float64."""
    with torch.no_grad():
        cosine = head(torch.from_numpy(embed(model, ds.images)))
    return scale * cosine.double().numpy()


def reference_models(initial: FaceModel, sets: SelfAuditSets, cfg: Config, count: int, seed: int,
                     noise_multiplier: float = 0.0) -> list[tuple[FaceModel, CosineClassifier]]:
    """``count`` references: copies of the initial model, each with a fresh head over
    ``sets.classes``, trained on ``sets.reference`` by the member's own recipe: its trainable
    parameters, rate and batch, its DP-SGD (``noise_multiplier``; 0 without DP) with fresh noise,
    for as many passes as the run made. None without reference images."""
    if not len(sets.reference):
        return []
    refs = []
    passes = cfg.federation.rounds * cfg.federation.local_epochs
    for k in range(count):
        model = copy.deepcopy(initial)
        restrict_training(model, cfg.federation.trainable)
        head = build_identity_head(model.spec, sets.classes.size, seed + k)
        train(model, sets.reference, cfg.train, cfg.dp if noise_multiplier > 0 else DPConfig(mode="off"),
              seed=seed + k, epochs=passes, head=head, noise_multiplier=noise_multiplier,
              desc=f"self-audit reference {k}")
        refs.append((model, head))
    return refs


def self_audit(target: FaceModel, head: CosineClassifier, head_classes: np.ndarray, sets: SelfAuditSets,
               references: list[tuple[FaceModel, CosineClassifier]], cfg: Config, seed: int,
               n_boot: int = 1000) -> dict[str, Any]:
    """Every attack's numbers (see the module docstring) and the counts they rest on. The loss
    attack reads the target's head (over ``head_classes``, sorted) on every audited image; offline
    LiRA only on the images of identities the references know, on those identities' columns. An
    attack without members or nonmembers is skipped with the reason."""
    scale = cfg.train.margin_scale
    out: dict[str, Any] = {"members": len(sets.members), "nonmembers": len(sets.nonmembers),
                           "reference_images": len(sets.reference), "references": len(references),
                           "unit": "one image", "attacks": {}, "skipped": {}}
    if not (len(sets.members) and len(sets.nonmembers)):
        out["skipped"] = {name: "no held-out image to serve as a nonmember (split.member_nonmember_fraction)"
                          for name in ATTACKS}
        return out
    logits = [head_logits(target, head, d, scale) for d in (sets.members, sets.nonmembers)]
    is_member = np.concatenate([np.ones(len(sets.members), bool), np.zeros(len(sets.nonmembers), bool)])
    labels = np.concatenate([np.searchsorted(head_classes, d.identity) for d in (sets.members, sets.nonmembers)])
    scores = {"loss": (-sample_loss(np.concatenate(logits), labels), is_member)}
    keep_m, keep_n = sets.known()
    if not (keep_m.any() and keep_n.any()):
        out["skipped"]["lira-offline"] = ("no identity has two held-out images: the references would know nobody "
                                          "audited (raise split.member_nonmember_fraction)")
    elif not references:
        out["skipped"]["lira-offline"] = "audit.self_references = 0"
    else:
        kept = [sets.members.subset(np.flatnonzero(keep_m)), sets.nonmembers.subset(np.flatnonzero(keep_n))]
        y = np.concatenate([np.searchsorted(sets.classes, d.identity) for d in kept])
        columns = np.searchsorted(head_classes, sets.classes)
        target_phi = scaled_confidence(np.concatenate([logits[0][keep_m], logits[1][keep_n]])[:, columns], y)
        ref = np.stack([scaled_confidence(np.concatenate([head_logits(m, h, d, scale) for d in kept]), y)
                        for m, h in references])
        # Few references: one variance for all images (Carlini et al. 2022, offline with few models).
        scores["lira-offline"] = (lira_offline(target_phi, ref.T, global_variance=True),
                                  np.concatenate([np.ones(keep_m.sum(), bool), np.zeros(keep_n.sum(), bool)]))
    for name, (s, m) in scores.items():
        metrics = attack_metrics(s, m, None, seed, n_boot)
        metrics.pop("per_group")
        bound = roc_epsilon_lower_bound(s, m, cfg.dp.delta)
        out["attacks"][name] = {**metrics, "empirical_epsilon": bound.epsilon,
                                "empirical_epsilon_confidence": bound.confidence}
    return out
