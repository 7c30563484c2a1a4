"""Client partitioners: which client trains on which member sample.

Federated results depend strongly on how skewed the clients' data are, so the split offers the
usual regimes: IID, label-skew Dirichlet with the identity as the label, identity-disjoint
clients (each person's images live at one organisation, the realistic consortium case) and
attribute skew (e.g. one client holds mostly women). The partitioners only see member samples,
as arrays of identities and (for ``attribute``) attribute values, and return a client index per
sample; ``common.split.manifest`` turns that into the manifest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

log = logging.getLogger(__name__)

PARTITIONS: tuple[str, ...] = ("iid", "dirichlet", "identity_disjoint", "attribute")
MAX_DRAWS = 100
"""Redraws (each with the next derived seed) before a partition that leaves a client short fails."""

_PARTITION_STREAM = 3


def seeded_rng(seed: int, *stream: int) -> np.random.Generator:
    """A generator for one named random stream of a seed, so that steps never share draws."""
    return np.random.default_rng(np.random.SeedSequence([seed, *stream]))


def identity_modes(identity: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique identities and each one's most frequent value (ties: the smallest value).

    Attributes are per image in the data, but identity-level decisions (stratification, attribute
    skew) need one value per person; real annotations are occasionally inconsistent.
    """
    ids, inv = np.unique(identity, return_inverse=True)
    vals, vinv = np.unique(values, return_inverse=True)
    counts = np.zeros((ids.size, vals.size), dtype=np.int64)
    np.add.at(counts, (inv, vinv), 1)
    return ids, vals[counts.argmax(axis=1)]


def shuffled_groups(identity: np.ndarray, rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Samples grouped by identity in a random order within each, so that the first ``k`` of an
    identity are a random draw of its images.

    Returns ``(order, group, rank, sizes)``: sample positions in that order, the identity index
    (into the sorted unique identities) and the rank within its identity of each ordered sample,
    and the number of samples of each identity.
    """
    _, inv, sizes = np.unique(identity, return_inverse=True, return_counts=True)
    order = np.lexsort((rng.random(identity.size), inv))
    rank = np.arange(identity.size) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    return order, inv[order], rank, sizes


def _slot(cum_props: np.ndarray, frac: np.ndarray) -> np.ndarray:
    """Client whose share (cumulative proportions per row) contains each relative position."""
    return np.minimum((cum_props <= frac[:, None]).sum(axis=1), cum_props.shape[1] - 1)


def _iid(identity: np.ndarray, attribute: np.ndarray | None, k: int, alpha: float,
         rng: np.random.Generator) -> np.ndarray:
    """Shuffle and deal: client sizes differ by at most one."""
    clients = np.empty(identity.size, dtype=np.int64)
    clients[rng.permutation(identity.size)] = np.arange(identity.size) % k
    return clients


def _dirichlet(identity: np.ndarray, attribute: np.ndarray | None, k: int, alpha: float,
               rng: np.random.Generator) -> np.ndarray:
    """Per identity, client proportions ~ Dir(alpha); its samples are cut by those proportions."""
    order, grouped, rank, sizes = shuffled_groups(identity, rng)
    props = rng.dirichlet(np.full(k, alpha), size=sizes.size)
    clients = np.empty(identity.size, dtype=np.int64)
    clients[order] = _slot(np.cumsum(props, axis=1)[grouped], (rank + 0.5) / sizes[grouped])
    return clients


def _identity_disjoint(identity: np.ndarray, attribute: np.ndarray | None, k: int, alpha: float,
                       rng: np.random.Generator) -> np.ndarray:
    """Whole identities, largest first (random among equals), each to the lightest client."""
    ids, inv, sizes = np.unique(identity, return_inverse=True, return_counts=True)
    order = rng.permutation(ids.size)
    order = order[np.argsort(-sizes[order], kind="stable")]
    loads = np.zeros(k, dtype=np.int64)
    owner = np.empty(ids.size, dtype=np.int64)
    for i in order:
        c = int(loads.argmin())
        owner[i] = c
        loads[c] += sizes[i]
    return owner[inv]


def _attribute(identity: np.ndarray, attribute: np.ndarray | None, k: int, alpha: float,
               rng: np.random.Generator) -> np.ndarray:
    """Per attribute value (-1 its own stratum), proportions ~ Dir(alpha) over clients; whole
    identities of that value go to clients so that sample shares follow the proportions."""
    if attribute is None:
        raise ValueError("partition 'attribute' needs the attribute values of the member samples")
    ids, inv, sizes = np.unique(identity, return_inverse=True, return_counts=True)
    _, modes = identity_modes(identity, attribute)
    strata, stratum = np.unique(modes, return_inverse=True)
    props = rng.dirichlet(np.full(k, alpha), size=strata.size)
    order = np.lexsort((rng.permutation(ids.size), stratum))
    s_sizes = sizes[order]
    s_stratum = stratum[order]
    totals = np.bincount(s_stratum, weights=s_sizes, minlength=strata.size)
    starts = np.cumsum(s_sizes) - s_sizes - (np.cumsum(totals) - totals)[s_stratum]
    owner = np.empty(ids.size, dtype=np.int64)
    owner[order] = _slot(np.cumsum(props, axis=1)[s_stratum], (starts + s_sizes / 2) / totals[s_stratum])
    return owner[inv]


_PARTITIONERS: dict[str, Callable[[np.ndarray, np.ndarray | None, int, float, np.random.Generator], np.ndarray]] = {
    "iid": _iid, "dirichlet": _dirichlet, "identity_disjoint": _identity_disjoint, "attribute": _attribute,
}
_WHOLE_IDENTITIES = ("identity_disjoint", "attribute")


def assign_clients(identity: np.ndarray, attribute: np.ndarray | None = None, *, scheme: str,
                   num_clients: int, alpha: float, min_samples: int, seed: int) -> np.ndarray:
    """Client index (0..num_clients-1) of each member sample.

    Args:
        identity: identity code of each member sample.
        attribute: attribute value of each member sample (only for ``scheme="attribute"``).
        scheme: one of ``PARTITIONS``.
        num_clients: number of clients.
        alpha: Dirichlet concentration (``dirichlet`` and ``attribute``); small = skewed.
        min_samples: every client must get at least this many samples.
        seed: the split seed; draw ``d`` uses the stream ``(seed, partition tag, d)``.

    Raises:
        ValueError: unknown scheme, too few samples or identities for the clients, or no draw in
            ``MAX_DRAWS`` gave every client ``min_samples`` (alpha too small for the data).
    """
    if scheme not in _PARTITIONERS:
        raise ValueError(f"partition: expected one of {PARTITIONS}, got {scheme!r}")
    identity = np.asarray(identity, dtype=np.int64)
    n = identity.size
    if n == 0 or n < num_clients * min_samples:
        raise ValueError(f"partition {scheme!r}: {n} member samples are too few for {num_clients} clients "
                         f"with at least {max(min_samples, 1)} samples each")
    n_ids = np.unique(identity).size
    if scheme in _WHOLE_IDENTITIES and min_samples > 0 and n_ids < num_clients:
        raise ValueError(f"partition {scheme!r} keeps identities whole: {n_ids} member identities are "
                         f"too few for {num_clients} clients")
    smallest = 0
    for draw in range(MAX_DRAWS):
        clients = _PARTITIONERS[scheme](identity, attribute, num_clients, alpha,
                                        seeded_rng(seed, _PARTITION_STREAM, draw))
        smallest = int(np.bincount(clients, minlength=num_clients).min())
        if smallest >= min_samples:
            if draw:
                log.info("partition %r: draw %d gave every client >= %d samples", scheme, draw, min_samples)
            return clients
    raise ValueError(f"partition {scheme!r}: no draw in {MAX_DRAWS} gave each of {num_clients} clients "
                     f">= {min_samples} samples (smallest got {smallest}); alpha={alpha} is too small for "
                     f"{n} samples of {n_ids} identities: raise alpha, or lower num_clients or "
                     f"min_samples_per_client")
