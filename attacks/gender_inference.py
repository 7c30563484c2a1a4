"""Gender inference from stolen templates or stolen MOTE models (comparison-score attack).

The attack of Osorio-Roig et al. ("Attacking soft-biometric privacy enhancement via
comparison-based inference"), as the MOTE paper (Groß, Heindorf & Terhörst) uses it to test
privacy: the attacker owns embeddings of an auxiliary population with known gender. A stolen
vector template is compared (cosine similarity) with every known male and every known female
template; the gender whose average similarity is higher is the guess. A stolen MOTE model is
attacked the same way, with the model's own output on the known templates as the comparison
score. Balanced accuracy near 0.5 means the stored templates do not leak gender.

The MOTE paper reports exactly 50% for its models, "all gender predictions collapse to a single
class". Which score the attack compares decides whether that is privacy or an artefact, so a MOTE
gallery is attacked four ways (``MOTE_VARIANTS``), each with its collapse diagnostics (the share
of models guessed as the majority class, the share of ties):

- ``sigmoid``: the mean sigmoid score per gender, the paper's description; a saturated model
  scores every auxiliary template alike (0.0 below a logit of -745 in float64, 1.0 above 37; in
  float32 from -104 and 17), and its two means tie;
- ``logit``: the mean logit per gender, which saturation does not flatten;
- ``calibrated``: each model's logit difference in units of its own logit spread, guessed male
  above the gallery's median difference: a bias of all models towards one gender cannot make
  every guess the same class;
- ``decision``: the share of each gender's auxiliary templates the model accepts at the
  operating threshold (FMR 1e-3 of the run's evaluation); a model that rejects every impostor
  ties at 0 = 0.
Ties go to female (0) in every variant, as in ``_decide``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import balanced_accuracy_score

from common.evaluation.mote import TemplateSet
from common.mote.gallery import MoteGallery, sigmoid
from common.runs.records import TEMPLATES

MALE, FEMALE = 1, 0


def _unit_rows(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty (n, d) array, got shape {arr.shape}")
    return arr / np.maximum(np.linalg.norm(arr, axis=1, keepdims=True), 1e-12)


MOTE_VARIANTS: tuple[str, ...] = ("sigmoid", "logit", "calibrated", "decision")


def _decide(mean_male: np.ndarray, mean_female: np.ndarray) -> np.ndarray:
    """1 (male) where the male average is strictly higher, else 0 (female; ties go to female)."""
    return (mean_male > mean_female).astype(np.int64)


class GenderInference:
    """The attacker's labelled auxiliary templates and the two attack variants."""

    def __init__(self, male_templates: np.ndarray, female_templates: np.ndarray) -> None:
        self.male = np.asarray(male_templates, dtype=np.float64)
        self.female = np.asarray(female_templates, dtype=np.float64)
        self._male_unit = _unit_rows(self.male, "male_templates")
        self._female_unit = _unit_rows(self.female, "female_templates")
        if self.male.shape[1] != self.female.shape[1]:
            raise ValueError(f"male and female templates differ in dimension: {self.male.shape[1]} vs "
                             f"{self.female.shape[1]}")

    def predict_templates(self, templates: np.ndarray) -> np.ndarray:
        """Gender guess (1 male, 0 female) per stolen vector template, from average cosine scores.

        The average cosine with a set equals the dot product of the unit template with the set's
        mean unit vector, so each template costs one dot product per gender.
        """
        t = _unit_rows(templates, "templates")
        if t.shape[1] != self.male.shape[1]:
            raise ValueError(f"templates have {t.shape[1]} dimensions, the attacker's {self.male.shape[1]}")
        return _decide(t @ self._male_unit.mean(axis=0), t @ self._female_unit.mean(axis=0))

    def predict_mote(self, gallery: MoteGallery, score: str = "sigmoid", threshold: float | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Gender guess per stolen model template (gallery order) and whether it was a tie, by one
        of ``MOTE_VARIANTS`` (the module docstring); ``threshold``: the operating threshold on the
        sigmoid score, for ``decision``."""
        return mote_guesses(gallery.logits(self.male), gallery.logits(self.female), score, threshold)


def mote_guesses(logits_male: np.ndarray, logits_female: np.ndarray, score: str, threshold: float | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``GenderInference.predict_mote`` from the models' logits on the attacker's male and female
    templates ((n, k) each), so that one gallery's logits serve every variant."""
    if score not in MOTE_VARIANTS:
        raise ValueError(f"score must be one of {MOTE_VARIANTS}, got {score!r}")
    if score in ("sigmoid", "decision"):
        male, female = sigmoid(logits_male), sigmoid(logits_female)
        if score == "decision":
            if threshold is None:
                raise ValueError("the decision variant needs the gallery's operating threshold")
            male, female = male >= threshold, female >= threshold
        male, female = male.mean(axis=0), female.mean(axis=0)
        return _decide(male, female), male == female
    logit_m, logit_f = np.asarray(logits_male, np.float64), np.asarray(logits_female, np.float64)
    diff = logit_m.mean(axis=0) - logit_f.mean(axis=0)
    if score == "logit":
        return (diff > 0).astype(np.int64), diff == 0
    spread = np.concatenate([logit_m, logit_f]).std(axis=0)
    calibrated = diff / np.maximum(spread, 1e-12)  # in units of each model's own spread ...
    cut = np.median(calibrated)  # ... against the gallery's median: half the enrolled are guessed male
    return (calibrated > cut).astype(np.int64), calibrated == cut


def attack_accuracy(predicted: np.ndarray, gender: np.ndarray) -> dict[str, float | int]:
    """Balanced accuracy (sklearn) and per-class accuracy of gender guesses; unknown (-1) left out."""
    pred, true = np.asarray(predicted).ravel(), np.asarray(gender).ravel()
    if pred.shape != true.shape:
        raise ValueError(f"{pred.size} predictions for {true.size} gender labels")
    known = true >= 0
    pred, true = pred[known], true[known]
    if not ((true == MALE).any() and (true == FEMALE).any()):
        raise ValueError("balanced accuracy needs both male and female targets")
    return {"balanced_accuracy": float(balanced_accuracy_score(true, pred)),
            "male_accuracy": float(np.mean(pred[true == MALE] == MALE)),
            "female_accuracy": float(np.mean(pred[true == FEMALE] == FEMALE)),
            "n_male": int((true == MALE).sum()), "n_female": int((true == FEMALE).sum())}


def collapse(predicted: np.ndarray, ties: np.ndarray) -> dict[str, float]:
    """Share of models guessed as the majority class, and share of ties (guessed by the tie rule)."""
    pred = np.asarray(predicted)
    return {"majority_share": float(max(pred.mean(), 1 - pred.mean())), "tie_share": float(np.mean(ties))}


def template_leakage(stolen: TemplateSet, thresholds: dict[str, float]) -> dict[str, dict[str, Any]]:
    """The attack on the template gallery and on each MOTE gallery of a run (``facefl evaluate``),
    keyed like the verification report's methods. A MOTE entry holds the paper's variant
    (``sigmoid``) at its top level and all four under ``variants``, each with ``collapse``
    diagnostics; ``thresholds``: each gallery's operating threshold (its evaluation's tau)."""
    attack = GenderInference(stolen.aux_embeddings[stolen.aux_gender == MALE],
                             stolen.aux_embeddings[stolen.aux_gender == FEMALE])
    out: dict[str, dict[str, Any]] = {TEMPLATES: attack_accuracy(attack.predict_templates(stolen.templates),
                                                                  stolen.gender)}
    for name, gallery in stolen.galleries.items():
        logits = gallery.logits(attack.male), gallery.logits(attack.female)
        variants = {}
        for variant in MOTE_VARIANTS:
            predicted, ties = mote_guesses(*logits, variant, thresholds.get(name))
            variants[variant] = {**attack_accuracy(predicted, stolen.gender), **collapse(predicted, ties)}
        out[name] = {**variants["sigmoid"], "variants": variants}
    return out
