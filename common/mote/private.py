"""MOTE enrollment with DP-SGD: a gallery trained as one accounted mechanism over impostor records.

What is protected. A MOTE model template (Groß, Heindorf & Terhörst) is trained on its subject's
reference embedding(s), synthetic genuine samples around them, and impostors: embeddings of the
other people the enrolling client holds. The template is a function of its subject's reference
by design, so DP cannot hide the reference (docs/threat-models.md). What DP protects here is the
enrollment population used as impostors: one *impostor record* is one of the client's member
images that is not a reference (``dp.unit = sample``) or one person with all such images, at most
``dp.max_images_per_identity`` of them, the first in sample order (``dp.unit = identity``).

Why the stack is one mechanism. A record is an impostor for every enrolled identity of the client
(except its own person's model), so a per-model epsilon would say nothing about the gallery. Each
step therefore Poisson-samples records once for the whole stack, computes every sampled record's
gradient over all models as one vector (the sum over its rows, in every model), clips that joint
vector to ``mote.dp_max_grad_norm`` C, and adds N(0, (sigma C)^2) to every parameter of the
stack: the subsampled Gaussian mechanism with sensitivity C, accounted by Opacus' RDP (or PRV)
accountant at the record sampling rate (Abadi et al. 2016; Mironov et al. 2019). The norms come
from the Gram matrices of the rows' gradients (``Backprop.gram``), never from materialised
per-record gradients.

What is not private data. The gender KDEs are fitted on the public population (the pretraining
SynthFaces, ``common.train.pretraining.public_population``), the synthetic genuine samples are
the reference plus public KDE offsets, and the public population also supplies a fixed share of
each batch's impostors (the synthetic-impostor share of the non-DP recipe) and every validation
impostor. Early stopping thus reads only released parameters and public data (post-processing);
the accountant charges the planned maximum, ``mote.epochs`` epochs of every gallery, whatever
early stopping does, because a stopping time chosen from the outputs is free only as
post-processing of the longest run. Each balancing factor's gallery is one more release of the
same records: the client's MOTE epsilon composes over its galleries.

Randomness. The noise and the record sampling draw from the client's secret generators
(``common.train.dp.dp_generators``), like the backbone's; the public draws (which public or
genuine rows, dropout) come from the run seed, as they protect nothing. Sampling and the public
draws happen on the CPU and move to the stack's device; the noise is drawn there (its generator
lives on that device).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from common.config import DPConfig, MoteConfig
from common.mote.networks import (
    HIDDEN,
    Backprop,
    Stack,
    backprop,
    clip_factors,
    dropout_masks,
    flatten,
    random_bytes,
)
from common.train.dp import calibrate_noise

RECORD_UNITS = {"sample": "impostor record = one image (embedding) of the enrollment population",
                "identity": "impostor record = one person of the enrollment population, all of their images"}


@dataclass(frozen=True)
class ImpostorRecords:
    """The protected impostor rows of one client: embeddings (n, d), the record each row belongs
    to (0..records-1) and the person it shows."""

    embeddings: np.ndarray
    record: np.ndarray
    identity: np.ndarray
    unit: str
    rows_per_record: int

    @classmethod
    def build(cls, embeddings: np.ndarray, identity: np.ndarray, unit: str, max_images_per_identity: int) -> ImpostorRecords:
        """Records of ``unit`` from rows in sample order: one per row, or one per person with its
        first ``max_images_per_identity`` rows (a fixed cap, so that a record's size is bounded
        without looking at the data)."""
        emb, ident = np.asarray(embeddings, dtype=np.float32), np.asarray(identity)
        if unit == "sample":
            return cls(emb, np.arange(ident.size), ident, unit, 1)
        if unit != "identity":
            raise ValueError(f"MOTE DP: unknown unit {unit!r} (expected 'sample' or 'identity')")
        keep = np.zeros(ident.size, dtype=bool)
        for person in np.unique(ident):
            keep[np.flatnonzero(ident == person)[:max_images_per_identity]] = True
        _, record = np.unique(ident[keep], return_inverse=True)
        return cls(emb[keep], record, ident[keep], unit, max_images_per_identity)

    @property
    def count(self) -> int:
        return int(self.record.max()) + 1 if self.record.size else 0


@dataclass(frozen=True)
class MoteMechanism:
    """The accounted parameters of one client's private MOTE enrollment (all of its galleries)."""

    unit: str
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps_per_epoch: int
    epochs: int
    galleries: int
    records: int
    public_rows: int
    delta: float

    @property
    def steps_per_gallery(self) -> int:
        return self.epochs * self.steps_per_epoch

    def ledger(self, reproducible_noise: bool, steps_taken: Sequence[int]) -> dict[str, Any]:
        """What the client reports; the server derives the history, delta and epsilons from it."""
        return {"unit": self.unit, "noise_multiplier": self.noise_multiplier, "max_grad_norm": self.max_grad_norm,
                "sample_rate": self.sample_rate, "steps_per_gallery": self.steps_per_gallery,
                "galleries": self.galleries, "records": self.records, "public_rows_per_step": self.public_rows,
                "steps_taken": list(map(int, steps_taken)), "reproducible_noise": reproducible_noise}


def plan(records: ImpostorRecords, settings: MoteConfig, dp: DPConfig, galleries: int) -> MoteMechanism:
    """Sampling rate, steps and noise of a client's private enrollment.

    A batch is half genuine rows; of its impostor half, ``public_rows`` come from the public
    population (the synthetic share of the non-DP recipe) and the rest, in expectation, from the
    records: q = that count / (records x rows per record), ceil(1 / q) steps an epoch. The noise
    multiplier spends ``mote.dp_target_epsilon`` over every step of every gallery, or is given.
    """
    if records.count == 0:
        raise ValueError("MOTE DP: the client holds no impostor record (no member image besides the references)")
    half = settings.batch_size // 2
    share = settings.synthetic_impostors / (settings.impostors + settings.synthetic_impostors)
    public_rows = min(half - 1, round(half * share))
    q = min(1.0, (half - public_rows) / (records.count * records.rows_per_record))
    per_epoch = math.ceil(1 / q)
    steps = settings.epochs * per_epoch * galleries
    if 0 < settings.dp_target_epsilon < math.inf:
        sigma = calibrate_noise(settings.dp_target_epsilon, dp.delta, q, steps, dp.accountant)
    else:
        sigma = settings.dp_noise_multiplier
    return MoteMechanism(records.unit, float(sigma), settings.dp_max_grad_norm, q, per_epoch, settings.epochs,
                         galleries, records.count, public_rows, dp.delta)


def record_weights(bp_records: Backprop, same: torch.Tensor, own: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """(k, n) weight of each record row in each model: 0 in its own person's model, else the
    factor that clips its record's joint gradient (over all rows of the record and all models)
    to norm C. ``same`` (n, n) is 1 where two rows belong to one record; ``own`` (k, n) is 1
    where a row shows the model's own person."""
    keep = 1.0 - own
    pair = bp_records.gram() * keep.unsqueeze(-1) * keep.unsqueeze(1)
    per_row = (pair.sum(0) * same).sum(1)  # row r: sum over models and over the rows s of r's record of <g_r, g_s>
    sq = same @ per_row  # the squared norm of r's record, on every row of that record
    return keep * clip_factors(sq.clamp_min(0), max_grad_norm).unsqueeze(0)


class PrivateSteps:
    """The DP-SGD steps of one gallery (see the module docstring)."""

    def __init__(self, identities: np.ndarray, records: ImpostorRecords, mechanism: MoteMechanism,
                 settings: MoteConfig, noise_gen: torch.Generator, sampler_gen: torch.Generator,
                 public_gen: torch.Generator) -> None:
        self.identities = torch.as_tensor(np.asarray(identities, dtype=np.int64))
        self.rows = torch.from_numpy(records.embeddings)
        self.record = torch.from_numpy(records.record.astype(np.int64))
        self.person = torch.from_numpy(np.asarray(records.identity, dtype=np.int64))
        self.count = records.count
        self.mech = mechanism
        self.settings = settings
        self.noise_gen, self.sampler_gen, self.public_gen = noise_gen, sampler_gen, public_gen
        self.steps_per_epoch = mechanism.steps_per_epoch

    def sample(self) -> torch.Tensor:
        """Row indices of this step's records: each record in with probability q, all its rows or none."""
        chosen = torch.rand(self.count, generator=self.sampler_gen) < self.mech.sample_rate
        return torch.nonzero(chosen[self.record]).squeeze(1)

    def grads(self, p: dict[str, torch.Tensor], data: Stack, step: int) -> torch.Tensor:
        k, half, n_pub = self.identities.numel(), self.settings.batch_size // 2, self.mech.public_rows
        device = data.train.device
        rows = self.sample()
        n = rows.numel()
        x_pub = data.batch(torch.rand(k, half + n_pub, generator=self.public_gen).to(device), half)
        x = torch.cat([x_pub, self.rows[rows].to(device).unsqueeze(0).expand(k, n, -1)], dim=1)
        y = torch.cat([torch.ones(half, device=device), torch.zeros(n_pub + n, device=device)])
        drop = random_bytes(self.public_gen, k * x.shape[1] * sum(HIDDEN)).view(k, x.shape[1], sum(HIDDEN))
        bp = backprop(p, x, y, *dropout_masks(drop.to(device), self.settings.dropout))
        C = self.mech.max_grad_norm
        weight = x.new_empty((k, x.shape[1]))
        # A record's norm C is shared by its k models (about C / sqrt(k) each): public rows are
        # clipped to that share per model, or they would outweigh the impostors k^(1/2) to 1.
        weight[:, : half + n_pub] = clip_factors(bp.rows(slice(0, half + n_pub)).sq_norms(), C / math.sqrt(k))
        if n:
            record = self.record[rows]
            same = (record.unsqueeze(0) == record.unsqueeze(1)).float().to(device)
            own = (self.person[rows].unsqueeze(0) == self.identities.unsqueeze(1)).float().to(device)
            weight[:, half + n_pub:] = record_weights(bp.rows(slice(half + n_pub, None)), same, own, C)
        grads = flatten(bp.weighted_sum(weight))
        grads.add_(torch.randn(grads.shape, generator=self.noise_gen, device=device),
                   alpha=self.mech.noise_multiplier * C)
        return grads / self.settings.batch_size

    def select(self, keep: torch.Tensor) -> None:
        self.identities = self.identities[keep.cpu()]


@dataclass(frozen=True)
class PrivateRun:
    """What a private enrollment needs beyond the public data: the protected records, the
    accounted mechanism and the client's secret generators (noise, record sampling)."""

    records: ImpostorRecords
    mechanism: MoteMechanism
    noise_gen: torch.Generator
    sampler_gen: torch.Generator

    def source(self, identities: np.ndarray, settings: MoteConfig, public_gen: torch.Generator) -> PrivateSteps:
        return PrivateSteps(identities, self.records, self.mechanism, settings, self.noise_gen, self.sampler_gen,
                            public_gen)
