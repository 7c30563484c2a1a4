"""Gender inference from stolen templates or stolen MOTE models (comparison-score attack).

The attack of Osorio-Roig et al. ("Attacking soft-biometric privacy enhancement via
comparison-based inference"), as the MOTE paper (Groß, Heindorf & Terhörst) uses it to test
privacy: the attacker owns embeddings of an auxiliary population with known gender. A stolen
vector template is compared (cosine similarity) with every known male and every known female
template; the gender whose average similarity is higher is the guess. A stolen MOTE model is
attacked the same way, with the model's own output on the known templates as the comparison
score. Balanced accuracy near 0.5 means the stored templates do not leak gender.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from sklearn.metrics import balanced_accuracy_score

from common.evaluation.mote import TemplateSet
from common.mote.gallery import MoteGallery
from common.runs.records import TEMPLATES

MALE, FEMALE = 1, 0


def _unit_rows(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty (n, d) array, got shape {arr.shape}")
    return arr / np.maximum(np.linalg.norm(arr, axis=1, keepdims=True), 1e-12)


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

    def predict_mote(self, gallery: MoteGallery, score: Literal["sigmoid", "logit"] = "sigmoid") -> np.ndarray:
        """Gender guess per stolen model template (gallery order), from its average output on the
        known male and female templates. ``score`` "sigmoid" is the model's decision score, as in
        the paper; "logit" averages pre-sigmoid outputs, which saturated models do not flatten."""
        if score not in ("sigmoid", "logit"):
            raise ValueError(f"score must be 'sigmoid' or 'logit', got {score!r}")
        run = gallery.scores if score == "sigmoid" else gallery.logits
        return _decide(run(self.male).mean(axis=0), run(self.female).mean(axis=0))


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


def template_leakage(stolen: TemplateSet) -> dict[str, dict[str, float | int]]:
    """The attack on the template gallery and on each MOTE gallery of a run (``facefl evaluate``),
    keyed like the verification report's methods."""
    attack = GenderInference(stolen.aux_embeddings[stolen.aux_gender == MALE],
                             stolen.aux_embeddings[stolen.aux_gender == FEMALE])
    out = {TEMPLATES: attack_accuracy(attack.predict_templates(stolen.templates), stolen.gender)}
    for name, gallery in stolen.galleries.items():
        out[name] = attack_accuracy(attack.predict_mote(gallery), stolen.gender)
    return out
