"""Two audits on the same samples, compared pairwise: ``facefl compare RUN_A RUN_B``.

Runs that share data, split and audit seed (a DP budget against no DP, a fairness intervention
against none, one run audited with target-recipe and with central references) audit the same
members and nonmembers. Two intervals that overlap do not say the runs differ or not; the paired
bootstrap of ``attacks.metrics.paired_difference`` resamples the same samples for both and gives
the interval of the difference itself.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from attacks.metrics import DEFAULT_FPR_TARGETS, paired_difference
from common.runs.records import resolvable
from common.runs.rundir import RunDir

IDS, MEMBER = "sample_ids", "is_member"


def audit_scores(run_dir: str | os.PathLike[str]) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{scores.npz key: (sample ids, is_member, scores)} of a run's audit, each score array with the
    ids and ground truth of its audited set (the key's longest ``<set>sample_ids`` prefix)."""
    path = RunDir(run_dir).audit_scores_path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no audit scores (run `facefl audit {run_dir}` first)")
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    sets = sorted((k[:-len(IDS)] for k in arrays if k.endswith(IDS)), key=len, reverse=True)
    out = {}
    for key, scores in arrays.items():
        if key.endswith((IDS, MEMBER)):
            continue
        prefix = next((p for p in sets if key.startswith(p)), None)
        if prefix is None or arrays[prefix + IDS].shape != scores.shape:
            raise ValueError(f"{path}: {key!r} belongs to no audited set (expected a <set>{IDS} of its length)")
        out[key] = (arrays[prefix + IDS], arrays[prefix + MEMBER].astype(bool), scores)
    return out


def compare_audits(run_a: str | os.PathLike[str], run_b: str | os.PathLike[str], seed: int = 0,
                   n_boot: int = 1000) -> list[dict[str, Any]]:
    """Per attack both audits scored: A minus B in AUC and in TPR at each FPR the shared nonmembers
    resolve, with paired 95% bootstrap intervals, on the samples both audited (finite in both)."""
    a, b = audit_scores(run_a), audit_scores(run_b)
    shared = [k for k in a if k in b]
    if not shared:
        raise ValueError(f"{run_a} and {run_b}: no attack in common (scores.npz keys {sorted(a)} vs {sorted(b)})")
    rows = []
    for key in shared:
        (ids_a, m_a, s_a), (ids_b, m_b, s_b) = a[key], b[key]
        _, ia, ib = np.intersect1d(ids_a, ids_b, return_indices=True)
        differ = np.flatnonzero(m_a[ia] != m_b[ib])
        if differ.size:
            raise ValueError(f"{key}: sample {ids_a[ia[differ[0]]]} is a member in one run and not in the other "
                             "(the runs must share data and split)")
        ok = np.isfinite(s_a[ia]) & np.isfinite(s_b[ib])
        member, x, y = m_a[ia][ok], s_a[ia][ok], s_b[ib][ok]
        if member.all() or not member.any():
            continue
        metrics = ["auc", *(str(f) for f in DEFAULT_FPR_TARGETS if resolvable(int((~member).sum()), f))]
        rows += [{"attack": key, **paired_difference(x, y, member, seed=seed, n_boot=n_boot, metric=m)}
                 for m in metrics]
    return rows
