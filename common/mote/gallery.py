"""A MOTE gallery: the enrolled identities' stacked networks, scored together,
stored as safetensors and validated when built or loaded; ``enroll`` trains one."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from common.config import MoteConfig
from common.mote.kde import (
    GenderKDE,
    ImpostorPool,
    build_enrollment_set,
)
from common.mote.networks import (
    HIDDEN,
    PARAM_NAMES,
    IndependentSteps,
    TrainResult,
    fit,
    identity_streams,
    param_shapes,
    parameter_count,
    public_stream,
)
from common.mote.private import PrivateRun
from common.nn.checkpoint import load_checkpoint, save_checkpoint
from common.train.device import resolve_device

log = logging.getLogger(__name__)

GALLERY_FORMAT = "facefl-mote-gallery"
GALLERY_VERSION = 1


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """A gallery's scores from its logits, in float64 (exact where float32 would round to 0 or 1)."""
    return torch.sigmoid(torch.from_numpy(np.asarray(logits).astype(np.float64))).numpy()


@dataclass
class MoteGallery:
    """Enrolled model templates of identities ``identity_ids``, stacked along the first axis.

    Scoring runs the first layer of every model as one matrix product over the whole gallery,
    which keeps a (probe, identity) decision in the microseconds (the paper: 0.31 ms per decision).
    """

    identity_ids: np.ndarray
    params: dict[str, torch.Tensor]
    balancing_factor: np.ndarray
    seed: int
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        """Refuse anything but the finite float tensors of one model per identity (all of one
        embedding size), unique ids and one factor in [0, 1] per identity: a gallery comes from a
        client or from disk, and a misshapen one would otherwise fail deep inside torch when
        galleries are merged or scored. Callers prefix the ValueError with where it came from."""
        ids = np.asarray(self.identity_ids)
        if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"MOTE gallery identity ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
        self.identity_ids = ids.astype(np.int64)
        k = ids.size
        missing = sorted(set(PARAM_NAMES) - set(self.params))
        if missing:
            raise ValueError(f"MOTE gallery lacks {missing}")
        tensors = {}
        for name in PARAM_NAMES:
            try:
                tensors[name] = torch.as_tensor(self.params[name])
            except (TypeError, RuntimeError, ValueError):
                raise ValueError(f"MOTE gallery parameter {name!r} is not a numeric array") from None
        w1 = tensors["w1"]
        dim = int(w1.shape[1]) if w1.ndim == 3 else 0
        want = {n: (k, *shape) for n, shape in param_shapes(dim).items()}
        bad = [f"{n} {tuple(t.shape)} (expected {want[n]})" for n, t in tensors.items() if tuple(t.shape) != want[n]]
        if dim < 1 or bad:
            raise ValueError(f"MOTE gallery of {k} identities has misshapen parameters: {', '.join(bad)}")
        bad = [n for n, t in tensors.items() if not t.is_floating_point() or not torch.isfinite(t).all()]
        if bad:
            raise ValueError(f"MOTE gallery parameters {bad} are not finite floats")
        if np.unique(self.identity_ids).size != k:
            raise ValueError("MOTE gallery identity ids are not unique")
        try:
            b = np.asarray(self.balancing_factor, dtype=np.float64)
        except (TypeError, ValueError):
            b = np.full(0, np.nan)
        if b.shape != (k,) or not ((b >= 0) & (b <= 1)).all():
            raise ValueError(f"MOTE gallery needs {k} balancing factors in [0, 1], "
                             f"got {str(self.balancing_factor)[:80]}")
        self.balancing_factor = b
        self.params = {n: t.detach().to(torch.float32).contiguous() for n, t in tensors.items()}
        self._w1_flat: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.identity_ids.size)

    @property
    def dim(self) -> int:
        return int(self.params["w1"].shape[1])

    def subset(self, identity_ids: Sequence[int] | np.ndarray) -> MoteGallery:
        """The models of ``identity_ids`` (in that order), e.g. the claimed identity of a verification."""
        wanted = np.asarray(identity_ids, dtype=np.int64).ravel().tolist()
        index = {ident: i for i, ident in enumerate(self.identity_ids.tolist())}
        missing = sorted(set(wanted) - set(index))
        if missing:
            raise KeyError(f"identities not enrolled: {missing}")
        pos = np.array([index[i] for i in wanted], dtype=np.int64)
        rows = torch.from_numpy(pos)
        return MoteGallery(np.asarray(wanted, dtype=np.int64), {n: t[rows] for n, t in self.params.items()},
                           self.balancing_factor[pos], self.seed, self.info)

    @classmethod
    def concat(cls, galleries: Sequence[MoteGallery], seed: int, info: dict[str, Any] | None = None) -> MoteGallery:
        """One gallery of every identity of ``galleries`` (e.g. one per client), sorted by identity id."""
        if not galleries:
            raise ValueError("MoteGallery.concat: no galleries")
        ids = np.concatenate([g.identity_ids for g in galleries])
        order = torch.from_numpy(np.argsort(ids, kind="stable"))
        params = {n: torch.cat([g.params[n] for g in galleries])[order] for n in PARAM_NAMES}
        b = np.concatenate([g.balancing_factor for g in galleries])[order.numpy()]
        return cls(ids[order.numpy()], params, b, seed, info or {})

    def storage_kb_per_identity(self, fp16: bool = False) -> float:
        """Stored parameter bytes per identity in KB (1 KB = 1000 bytes, as the paper's 297 KB)."""
        return parameter_count(self.dim) * (2 if fp16 else 4) / 1000

    def logits(self, probes: np.ndarray | torch.Tensor, chunk: int = 128) -> np.ndarray:
        """Logit of every probe against every identity model: (n_probe, k)."""
        x = torch.as_tensor(np.asarray(probes, dtype=np.float32)) if not torch.is_tensor(probes) else probes.float()
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MoteGallery: expected probes (n, {self.dim}), got {tuple(x.shape)}")
        k, (h1, _) = len(self), HIDDEN
        p = self.params
        if self._w1_flat is None:  # (d, k * h1): layer 1 of all identities as one GEMM
            self._w1_flat = p["w1"].permute(1, 0, 2).reshape(self.dim, k * h1).contiguous()
        out = torch.empty(x.shape[0], k)
        with torch.no_grad():
            for start in range(0, x.shape[0], chunk):
                xb = x[start: start + chunk]
                a1 = (xb @ self._w1_flat).view(-1, k, h1).transpose(0, 1) + p["b1"].unsqueeze(1)
                a2 = torch.baddbmm(p["b2"].unsqueeze(1), a1.clamp_min_(0), p["w2"]).clamp_min_(0)
                z = torch.baddbmm(p["b3"].view(k, 1, 1), a2, p["w3"].unsqueeze(-1)).squeeze(-1)
                out[start: start + xb.shape[0]] = z.T
        return out.numpy()

    def scores(self, probes: np.ndarray | torch.Tensor, chunk: int = 128) -> np.ndarray:
        """Sigmoid score of every probe against every identity model: (n_probe, k)."""
        return sigmoid(self.logits(probes, chunk))

    def save(self, path: str | os.PathLike[str], fp16: bool = False) -> None:
        """Write the gallery as safetensors (float32, or float16 to halve the storage) + metadata."""
        dtype = torch.float16 if fp16 else torch.float32
        meta = {"format": GALLERY_FORMAT, "version": GALLERY_VERSION, "identity_ids": self.identity_ids.tolist(),
                "balancing_factor": self.balancing_factor.tolist(), "embedding_dim": self.dim, "seed": int(self.seed),
                "hidden": list(HIDDEN), "dtype": str(dtype).removeprefix("torch."), "info": self.info}
        save_checkpoint(path, {n: t.to(dtype) for n, t in self.params.items()}, meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MoteGallery:
        """Read a gallery written by ``save`` (parameters come back as float32); anything else is
        a ValueError naming the file."""
        state, meta = load_checkpoint(path)
        if meta.get("format") != GALLERY_FORMAT or meta.get("version") != GALLERY_VERSION:
            raise ValueError(f"{path}: not a MOTE gallery (format {meta.get('format')!r}, "
                             f"version {meta.get('version')!r})")
        ids, factors, seed, info = (meta.get(k) for k in ("identity_ids", "balancing_factor", "seed", "info"))
        if not (isinstance(ids, list) and all(_is_int64(i) for i in ids)):
            raise ValueError(f"{path}: MOTE gallery metadata 'identity_ids' must be a list of integers")
        if not _is_int64(seed) or not isinstance(info, dict | None):
            raise ValueError(f"{path}: MOTE gallery metadata 'seed' must be an integer and 'info' an object")
        try:
            return cls(np.asarray(ids, dtype=np.int64), state, factors, seed, info or {})
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None


def _is_int64(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and -(2**63) <= x < 2**63


def _balancing_factors(balancing_factor: float | Sequence[float] | np.ndarray, k: int) -> np.ndarray:
    b = np.asarray(balancing_factor, dtype=np.float64)
    if b.ndim == 0:
        b = np.full(k, float(b))
    if b.shape != (k,) or not ((b >= 0) & (b <= 1)).all():
        raise ValueError(f"balancing_factor: expected one value in [0, 1] or {k} of them (one per enrolled identity, "
                         f"in sorted identity order), got shape {b.shape}")
    return b.copy()


def enroll(reference_emb: np.ndarray, reference_identity: np.ndarray, kde: GenderKDE, impostor_pool_emb: np.ndarray,
           impostor_pool_identity: np.ndarray, balancing_factor: float | Sequence[float] | np.ndarray, seed: int,
           settings: MoteConfig | None = None, private: PrivateRun | None = None, device: str = "cpu") -> MoteGallery:
    """Enrol every identity of ``reference_identity`` (sorted ids) as a MOTE model template.

    Identity ids are non-negative integers: with ``seed`` they seed each identity's random
    streams, so that without DP an identity's model does not depend on who else is enrolled with
    it. Impostors come from the pool minus the identity itself (the pool may contain the enrolled
    people).

    ``balancing_factor`` is one value for everybody or one per identity (MOTE's per-individual
    fairness knob: the male share of the synthetic samples). Identities are trained
    ``settings.enroll_batch`` at a time; the result does not depend on that grouping.

    With ``private``, the pool is public data and the whole gallery is one DP-SGD mechanism over
    ``private.records`` (``common.mote.private``): all identities train in one stack, whose noise
    generator must live on ``device`` (``dp_generators(noise_seed, device)``).

    ``device``: a ``train.device`` value; the networks train there and come back on the CPU.
    """
    settings = (settings or MoteConfig()).validate()
    where = resolve_device(device)  # cuda without CUDA fails before any work
    ref = np.asarray(reference_emb, dtype=np.float32)
    ref_id = np.asarray(reference_identity)
    if ref.ndim != 2 or ref_id.shape != (ref.shape[0],):
        raise ValueError(f"enroll: expected reference embeddings (n, d) and identities (n,), got {ref.shape}, "
                         f"{ref_id.shape}")
    if not np.issubdtype(ref_id.dtype, np.integer):
        raise ValueError(f"enroll: identity ids must be integers, got dtype {ref_id.dtype}")
    ids = np.unique(ref_id)
    if ids.size == 0:
        raise ValueError("enroll: no reference embeddings given")
    b = _balancing_factors(balancing_factor, ids.size)
    pool = ImpostorPool(impostor_pool_emb, impostor_pool_identity)
    parts: list[TrainResult] = []
    start = time.perf_counter()
    group = ids.size if private is not None else settings.enroll_batch
    for lo in range(0, ids.size, group):
        sets, init_gens, train_gens = [], [], []
        for ident, bi in zip(ids[lo: lo + group], b[lo: lo + group]):
            data_rng, init_gen, train_gen = identity_streams(seed, int(ident))
            sets.append(build_enrollment_set(int(ident), ref[ref_id == ident], kde, pool, float(bi), data_rng,
                                             n_synthetic=settings.synthetic, n_impostors=settings.impostors,
                                             n_synthetic_impostors=settings.synthetic_impostors,
                                             val_fraction=settings.val_fraction))
            init_gens.append(init_gen)
            train_gens.append(train_gen)
        source = (IndependentSteps(train_gens, settings) if private is None
                  else private.source(ids, settings, public_stream(seed, b)))
        parts.append(fit(sets, init_gens, source, settings, where))
    params = {n: torch.cat([r.params[n] for r in parts]) for n in PARAM_NAMES}
    epochs = np.concatenate([r.epochs for r in parts])
    log.info("MOTE: enrolled %d identities in %.1f s (mean %.1f epochs)", ids.size, time.perf_counter() - start,
             epochs.mean())
    info = {"settings": settings.to_dict(), "epochs": epochs.tolist(),
            "val_loss": np.concatenate([r.val_loss for r in parts]).tolist(), "steps": sum(r.steps for r in parts)}
    return MoteGallery(ids, params, b, seed, info)
