"""Sample-weighted FedAvg (McMahan et al., AISTATS 2017), computed exactly and in a fixed order.

Updates are summed in float64 in ascending client order, so the same replies always give the
same bits whatever order the network delivered them in.
"""

from __future__ import annotations

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
