"""Evaluation of a global model on data no client trained on.

Verification is open-set: pairs of images of the probe identities (never trained on). The
attribute task is scored on the held-out samples (nonmember and probe roles, not canaries), with
the fairness metrics of ``common.evaluation.attribute_fairness`` against the training data's own
bias.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from common.config import Config
from common.data.cache import build_dataset
from common.data.dataset import FaceDataset
from common.data.sources.synthfaces.generator import SynthConfig, generate
from common.evaluation.attribute_fairness import attribute_report
from common.evaluation.verification import verification_auc
from common.nn.face_model import FaceModel
from common.split.canaries import canary_plan
from common.split.manifest import Manifest
from common.train.fairness import sensitive_attribute
from common.train.loop import embed, predict_attribute, target_labels

MEMBERS_PREFIX = "members_"
"""Metrics of the members' own evaluation, averaged by the server (server/federated_evaluation.py),
carry this prefix in metrics.jsonl and status.json: members_verification_auc, ..."""


PUBLIC_EVALUATION_SEED_OFFSET = 2_000_003
"""Seeds the public evaluation population apart from the members' data and from the pretraining
population (``common.train.pretraining.PUBLIC_SEED_OFFSET``)."""


def public_evaluator(cfg: Config) -> GlobalEvaluator | None:
    """The server's evaluator on public data (``evaluation.public``; None when off): every image of
    the public set is a probe (open-set verification over its identities) and, for the attribute
    task, a held-out sample whose bias is measured against the same set's."""
    public = cfg.evaluation.public
    if not public:
        return None
    if public == "synthfaces":
        ds = generate(SynthConfig(num_identities=cfg.evaluation.public_identities, image_size=cfg.data.image_size,
                                  seed=cfg.seed + PUBLIC_EVALUATION_SEED_OFFSET, condition=cfg.data.condition))
    else:
        folder = dataclasses.replace(cfg.data, source="imagefolder", path=public, layout="manifest")
        try:
            ds = build_dataset(dataclasses.replace(cfg, data=folder))
        except (OSError, ValueError) as exc:
            raise ValueError(f"evaluation.public = {public!r}: cannot read it as an ImageFolder ({exc})") from None
    return GlobalEvaluator(cfg, ds, ds, ds)


def probe_identity_mask(manifest: Manifest, ds: FaceDataset) -> np.ndarray:
    """Samples of identities that are probes at identity level (never trained on: open set)."""
    probe_ids = np.asarray(manifest.identities["probe"], dtype=np.int64)
    return manifest.role_mask(ds, "probe") & np.isin(ds.identity, probe_ids)


class GlobalEvaluator:
    """Scores models on probe identities (open-set verification) and held-out samples (the
    attribute task, against the bias of the ``train`` samples): the server's, from one manifest
    (``from_manifest``), or a member's own, from its split (``data.layout = per-member``)."""

    def __init__(self, cfg: Config, train: FaceDataset, probe: FaceDataset, held_out: FaceDataset) -> None:
        self.cfg = cfg
        self.train, self.probe, self.held_out = train, probe, held_out

    @classmethod
    def from_manifest(cls, cfg: Config, ds: FaceDataset, manifest: Manifest) -> GlobalEvaluator:
        """The manifest's members, probe identities, and held-out samples without the audit's
        canaries (some of them were trained on with flipped labels)."""
        member = manifest.role_mask(ds, "member")
        canaries = np.zeros(len(ds), dtype=bool)
        canaries[ds.positions(canary_plan(cfg, ds, manifest).sample_ids)] = True
        return cls(cfg, ds.subset(member), ds.subset(probe_identity_mask(manifest, ds)),
                   ds.subset(~member & ~manifest.role_mask(ds, "aux") & ~canaries))

    def verification(self, model: FaceModel) -> float:
        """Open-set verification ROC AUC on the probe identities."""
        return verification_auc(embed(model, self.probe.images), self.probe.identity, seed=self.cfg.seed)

    def attribute(self, model: FaceModel, name: str) -> dict[str, float]:
        """Accuracy and fairness of the binary attribute ``name`` on the held-out samples."""
        sens = self.cfg.fairness.sensitive
        prob = predict_attribute(model, self.held_out.images)
        return attribute_report(prob, target_labels(self.held_out, name), sensitive_attribute(self.held_out, sens),
                                target_labels(self.train, name), sensitive_attribute(self.train, sens))

    def scores_attribute(self, model: FaceModel) -> bool:
        """Whether the attribute metrics apply: a model with an attribute head, and held-out samples
        that carry the attribute (a member's or a public folder may have no such label)."""
        name = self.cfg.train.attribute
        return (model.attribute is not None and len(self.held_out) > 0
                and (name == "gender" or name in self.held_out.labels))

    def evaluate(self, model: FaceModel) -> dict[str, float]:
        out = {"verification_auc": self.verification(model)}
        if self.scores_attribute(model):
            report = self.attribute(model, self.cfg.train.attribute)
            out.update({f"attribute_{k}": float(v) for k, v in report.items()})
        return out
