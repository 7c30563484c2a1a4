"""The one-run canary audit (Steinke, Nasr & Jagielski 2023, "Privacy auditing with one (1) training
run"): score every canary of the run (``common.split.canaries``) on the final global model and turn
the scores into a lower bound on the epsilon of the whole training run.

The score is the exact log-likelihood the model gives the canary's flipped label, the label it was
trained with if it was included: only training on it makes that label likely, so included canaries
score high (Jagielski, Ullman & Oprea 2020 audit DP-SGD with the same mislabelled canaries). It is
computed from float64 logits with a stable log-sigmoid, since the most memorised canaries sit where
a float32 probability rounds to 1.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from attacks.empirical_epsilon import one_run_audit
from common.config import Config
from common.data.dataset import FaceDataset
from common.data.disk_images import take_rows
from common.nn.face_model import FaceModel
from common.runs.rundir import RunDir
from common.split.canaries import load_canaries
from common.train.loop import attribute_logits, target_labels

STATISTIC = "log-likelihood of the flipped (trained) label"
RAW_ARRAYS = ("canary/sample_ids", "canary/included", "canary/score")
"""The raw arrays' names in audit/raw.npz, in the order of the result's ``arrays``."""


def flipped_label_log_likelihood(logits: np.ndarray, label: np.ndarray) -> np.ndarray:
    """log p(label | x) of a binary head: log-sigmoid(z) for label 1, log-sigmoid(-z) for label 0,
    as -logaddexp(0, -+z), exact for every float64 logit."""
    z = np.asarray(logits, dtype=np.float64)
    return np.where(np.asarray(label) == 1, -np.logaddexp(0.0, -z), -np.logaddexp(0.0, z))


def canary_audit(run: RunDir | str | os.PathLike[str], model: FaceModel, cfg: Config, ds: FaceDataset,
                 delta: float, confidence: float = 0.95) -> dict[str, Any] | None:
    """Audit ``model`` (the run's final global model) with the run's canaries; None without any.

    Returns a JSON-ready dict (but for ``arrays``): ``counts`` (m, included, excluded), the
    ``statistic``, the ``attribute``, ``bound`` (``attacks.empirical_epsilon.EpsilonBound.to_dict``:
    a lower bound on epsilon at ``delta``, holding with probability ``confidence``, for the whole
    run with respect to one canary image), ``raw`` (the names of the raw arrays) and ``arrays``
    (those names -> numpy arrays: the canaries' ids, whether each was included, its score).
    """
    run = run if isinstance(run, RunDir) else RunDir(run)
    plan = load_canaries(run)
    if plan is None:
        return None
    where = run.canaries_path
    plan.check_data(ds)
    if plan.attribute != cfg.train.attribute:
        raise ValueError(f"{where}: canaries flip {plan.attribute!r}, but the run's train.attribute is "
                         f"{cfg.train.attribute!r}")
    included = np.asarray(plan.included, dtype=bool)
    if included.all() or not included.any():
        raise ValueError(f"{where}: {int(included.sum())} of {plan.m} canaries are included; the one-run audit "
                         "compares included with excluded ones and needs both (raise audit.canaries)")
    pos = ds.positions(plan.sample_ids)
    label = np.asarray(plan.label)
    if (target_labels(ds, plan.attribute)[pos] != 1 - label).any():
        raise ValueError(f"{where}: label: not every canary's recorded label is the flip of its {plan.attribute!r} "
                         "label in the data")
    score = flipped_label_log_likelihood(attribute_logits(model, take_rows(ds.images, pos)), label)
    bound = one_run_audit(score, included, delta, confidence)
    arrays = dict(zip(RAW_ARRAYS, (np.asarray(plan.sample_ids, dtype=np.str_), included, score), strict=True))
    return {
        "counts": {"m": plan.m, "included": int(included.sum()), "excluded": int((~included).sum())},
        "statistic": STATISTIC,
        "attribute": plan.attribute,
        "bound": bound.to_dict(),
        "raw": list(RAW_ARRAYS),
        "arrays": arrays,
    }
