"""Sample-weighted FedAvg (McMahan et al., AISTATS 2017), computed exactly and in a fixed order, and
the seeded sampling of each round's clients: the server's strategy and the audit's reference
federations (``attacks.federated_references``) share both.

Updates are summed in float64 in ascending client order, so the same replies always give the
same bits whatever order the network delivered them in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def weighted_average(updates: Sequence[tuple[int, Mapping[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    """Mean of the updates weighted by their sample counts; keys, shapes and dtypes must agree."""
    if not updates:
        raise ValueError("weighted_average: no updates")
    total = sum(n for n, _ in updates)
    if total <= 0:
        raise ValueError(f"weighted_average: sample counts must sum to > 0, got {[n for n, _ in updates]}")
    _, first = updates[0]
    out: dict[str, np.ndarray] = {}
    for key, ref in first.items():
        acc = np.zeros(ref.shape, dtype=np.float64)
        for n, arrays in updates:
            acc += (n / total) * arrays[key].astype(np.float64)
        out[key] = acc.astype(ref.dtype)
    return out


def sample_partitions(seed: int, server_round: int, partitions: Sequence[int], fraction: float,
                      min_nodes: int) -> list[int]:
    """The partition ids trained in ``server_round`` (all of them at fraction 1): ceil(fraction x
    N), at least ``min_nodes``, drawn from the run seed and the round, so that a run, and an audit's
    reference federation replaying its recipe, sample the same way."""
    ids = sorted(partitions)
    k = min(len(ids), max(min_nodes, math.ceil(fraction * len(ids))))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xFEDA, server_round]))
    return sorted(rng.choice(ids, size=k, replace=False).tolist())
