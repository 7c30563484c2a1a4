"""Synthetic training data for MOTE model templates: gender KDEs and per-identity enrollment sets.

MOTE (Groß, Heindorf & Terhörst, "A Responsible Face Recognition Approach for Small and Mid-Scale
Systems Through Personalized Neural Networks") trains one small classifier per enrolled identity
from a single reference embedding. The missing intra-class variation is borrowed from an
enrollment population: its embeddings are centred on their identity centroid, so that only the
variation around an identity remains, and one Gaussian KDE per gender models that variation.
Drawing a fraction b of an identity's synthetic samples from the male KDE and 1 - b from the
female one (the balancing factor) sets, per individual, which variation the classifier learns to
accept.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # sklearn costs 0.7 s to import: only enrollment, never a training message, loads it
    from sklearn.neighbors import KernelDensity

log = logging.getLogger(__name__)

# METHODS.md suggests 10**linspace(-2.5, 0.4, 40); the grid here starts lower (same spacing): the
# default SynthFaces backbone's identity-centred offsets are about 0.06 long in 128-d, and the
# cross-validated optimum (about 0.003-0.004) sat on the old grid's lower edge.
DEFAULT_BANDWIDTHS = 10 ** np.linspace(-3.5, 0.4, 54)
GENDER_NAMES = {0: "female", 1: "male"}


def _identity_centroids(embeddings: np.ndarray, identity: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unique identities, their centroids, row -> index into the unique identities)."""
    ids, inverse, counts = np.unique(identity, return_inverse=True, return_counts=True)
    sums = np.zeros((ids.size, embeddings.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, embeddings)
    return ids, sums / counts[:, None], inverse


def _fit_one(offsets: np.ndarray, bandwidths: np.ndarray, cv_folds: int, seed: int) -> KernelDensity:
    """A Gaussian KDE whose bandwidth maximises the held-out log-likelihood over ``bandwidths``."""
    from sklearn.model_selection import GridSearchCV, KFold
    from sklearn.neighbors import KernelDensity

    if bandwidths.size == 1:
        return KernelDensity(kernel="gaussian", bandwidth=float(bandwidths[0])).fit(offsets)
    search = GridSearchCV(KernelDensity(kernel="gaussian"), {"bandwidth": bandwidths},
                          cv=KFold(cv_folds, shuffle=True, random_state=seed), n_jobs=1)
    search.fit(offsets)
    best = float(search.best_params_["bandwidth"])
    if best in (float(bandwidths.min()), float(bandwidths.max())):
        log.warning("KDE bandwidth %.4g is at the edge of the search grid [%.4g, %.4g]: widen the grid",
                    best, bandwidths.min(), bandwidths.max())
    return search.best_estimator_


@dataclass(frozen=True)
class GenderKDE:
    """One Gaussian KDE per gender over identity-centred embeddings (MOTE, Sec. 3.2).

    Sampling is done here rather than by ``KernelDensity.sample`` so that it draws from a numpy
    ``Generator`` the caller owns (one stream per identity): a Gaussian KDE sample is a random
    training offset plus isotropic noise of the fitted bandwidth, which is exactly what sklearn does.
    """

    male: KernelDensity
    female: KernelDensity

    @classmethod
    def fit(cls, embeddings: np.ndarray, identity: np.ndarray, gender: np.ndarray, *,
            bandwidths: Sequence[float] | np.ndarray | None = None, cv_folds: int = 5, seed: int = 0) -> GenderKDE:
        """Fit the male and female KDEs; gender 0 = female, 1 = male, -1 (unknown) rows are ignored.

        Each row is centred on the centroid of all rows of its identity. Identities with a single
        row are left out: their centred offset is exactly zero and says nothing about variation.
        The bandwidth is chosen by ``cv_folds``-fold cross-validated log-likelihood over
        ``bandwidths`` (default ``DEFAULT_BANDWIDTHS``; one value skips the search).
        """
        x = np.asarray(embeddings, dtype=np.float64)
        identity, gender = np.asarray(identity), np.asarray(gender)
        if x.ndim != 2 or identity.shape != (x.shape[0],) or gender.shape != (x.shape[0],):
            raise ValueError(f"GenderKDE.fit: expected embeddings (n, d) with identity and gender of shape (n,), got "
                             f"{x.shape}, {identity.shape}, {gender.shape}")
        grid = np.asarray(DEFAULT_BANDWIDTHS if bandwidths is None else bandwidths, dtype=np.float64).ravel()
        if grid.size == 0 or (grid <= 0).any():
            raise ValueError("GenderKDE.fit: bandwidths must be a non-empty list of positive values")
        usable = cls.check_population(identity, gender, cv_folds if grid.size > 1 else 1)
        _, centroids, inverse = _identity_centroids(x, identity)
        offsets = x - centroids[inverse]
        kdes = {}
        for code, name in GENDER_NAMES.items():
            rows = offsets[(gender == code) & usable]
            kdes[name] = _fit_one(rows, grid, cv_folds, seed)
            log.info("%s KDE: %d offsets, bandwidth %.4g", name, rows.shape[0], kdes[name].bandwidth_)
        return cls(male=kdes["male"], female=kdes["female"])

    @staticmethod
    def check_population(identity: np.ndarray, gender: np.ndarray, need: int = 5) -> np.ndarray:
        """The rows whose centred offset says something (their identity has >= 2 rows), after
        checking that each gender has at least ``need`` of them (the folds of the bandwidth
        search); a ValueError naming the gender otherwise. Callers run it before long work."""
        _, inverse = np.unique(np.asarray(identity), return_inverse=True)
        usable = np.bincount(inverse)[inverse] >= 2
        for code, name in GENDER_NAMES.items():
            count = int((usable & (np.asarray(gender) == code)).sum())
            if count < need:
                raise ValueError(f"GenderKDE: the {name} KDE needs at least {need} centred embeddings (images of "
                                 f"{name} identities with >= 2 images), got {count}")
        return usable

    @property
    def dim(self) -> int:
        return int(self.male.n_features_in_)

    @staticmethod
    def _draw(kde: KernelDensity, n: int, rng: np.random.Generator) -> np.ndarray:
        data = np.asarray(kde.tree_.data)
        centres = data[rng.integers(0, data.shape[0], size=n)]
        return centres + rng.normal(scale=kde.bandwidth_, size=centres.shape)

    def sample(self, n_male: int, n_female: int, rng: np.random.Generator) -> np.ndarray:
        """``n_male`` male then ``n_female`` female offsets, shape (n_male + n_female, d)."""
        if n_male < 0 or n_female < 0:
            raise ValueError(f"GenderKDE.sample: counts must be >= 0, got {n_male}, {n_female}")
        return np.concatenate([self._draw(self.male, n_male, rng), self._draw(self.female, n_female, rng)])


@dataclass(frozen=True)
class EnrollmentSet:
    """Training and validation data of one identity's model template (float32 arrays (n, d))."""

    genuine_train: np.ndarray
    genuine_val: np.ndarray
    impostor_train: np.ndarray
    impostor_val: np.ndarray


class ImpostorPool:
    """Embeddings of other people, used as negatives, with their identity centroids precomputed."""

    def __init__(self, embeddings: np.ndarray, identity: np.ndarray) -> None:
        self.embeddings = np.asarray(embeddings, dtype=np.float32)
        self.identity = np.asarray(identity)
        if self.embeddings.ndim != 2 or self.identity.shape != (self.embeddings.shape[0],):
            raise ValueError(f"ImpostorPool: expected embeddings (n, d) and identity (n,), got "
                             f"{self.embeddings.shape} and {self.identity.shape}")
        self.ids, self.centroids, _ = _identity_centroids(self.embeddings.astype(np.float64), self.identity)

    def excluding(self, ident: int) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings, identity centroids) of everyone but ``ident``."""
        return self.embeddings[self.identity != ident], self.centroids[self.ids != ident]


def _split(rows: np.ndarray, val_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random (train, val) split holding out round(val_fraction * n) rows."""
    order = rng.permutation(rows.shape[0])
    n_val = round(val_fraction * rows.shape[0])
    return rows[order[n_val:]], rows[order[:n_val]]


def split_counts(n: int, balancing_factor: float) -> tuple[int, int]:
    """(male, female) counts of ``n`` synthetic samples: round(b * n) male, the rest female."""
    if not 0.0 <= balancing_factor <= 1.0:
        raise ValueError(f"balancing factor must be in [0, 1], got {balancing_factor}")
    n_male = round(balancing_factor * n)
    return n_male, n - n_male


def build_enrollment_set(ident: int, reference: np.ndarray, kde: GenderKDE, pool: ImpostorPool,
                         balancing_factor: float, rng: np.random.Generator, *, n_synthetic: int = 100,
                         n_impostors: int = 400, n_synthetic_impostors: int = 100,
                         val_fraction: float = 0.2) -> EnrollmentSet:
    """The enrollment data of identity ``ident`` (MOTE, Sec. 3.2 and 3.3).

    * Genuine: the reference embedding(s) (always in training: they are the only real positives)
      plus ``n_synthetic`` samples c_i + offset around the reference centroid c_i, round(b * n)
      offsets from the male KDE and the rest from the female KDE.
    * Impostors: ``n_impostors`` real embeddings of other identities drawn without replacement
      from ``pool`` (all of them if the pool is smaller) plus ``n_synthetic_impostors`` samples
      around the centroids of randomly drawn other pool identities, with the same male/female
      split, so that b shapes the variation model of the whole training set.
    * Validation: ``val_fraction`` of the synthetic genuine samples and of both kinds of impostors.
    """
    ref = np.atleast_2d(np.asarray(reference, dtype=np.float64))
    if ref.shape[1] != kde.dim:
        raise ValueError(f"identity {ident}: reference embeddings have {ref.shape[1]} dimensions, the KDE {kde.dim}")
    others, other_centroids = pool.excluding(ident)
    if other_centroids.shape[0] == 0:
        raise ValueError(f"identity {ident}: the impostor pool holds no other identity")
    genuine = ref.mean(axis=0) + kde.sample(*split_counts(n_synthetic, balancing_factor), rng)
    real = others[rng.choice(others.shape[0], size=min(n_impostors, others.shape[0]), replace=False)]
    around = other_centroids[rng.integers(0, other_centroids.shape[0], size=n_synthetic_impostors)]
    synthetic_imp = around + kde.sample(*split_counts(n_synthetic_impostors, balancing_factor), rng)
    gen_train, gen_val = _split(genuine, val_fraction, rng)
    real_train, real_val = _split(real, val_fraction, rng)
    syn_train, syn_val = _split(synthetic_imp, val_fraction, rng)
    f32 = np.float32
    return EnrollmentSet(genuine_train=np.concatenate([ref, gen_train]).astype(f32), genuine_val=gen_val.astype(f32),
                         impostor_train=np.concatenate([real_train, syn_train]).astype(f32),
                         impostor_val=np.concatenate([real_val, syn_val]).astype(f32))
