"""Selective encryption: which entries of the shared model travel encrypted.

FedML-HE (Jin et al., "FedML-HE: An Efficient Homomorphic-Encryption-Based Privacy-Preserving
Federated Learning System", 2023) encrypts only the most privacy-sensitive fraction of the
parameters and sends the rest in plaintext, cutting the HE overhead several-fold. Its criterion
is a sensitivity map computed from gradients; the choice here is the diagonal of the empirical
Fisher information, E[g_j(x)^2] over per-sample gradients g(x) of the training loss: a parameter
whose gradient varies strongly with the training sample is one whose update tells most about
the client's data. It is computed once, by the server, on the public pretraining population
(no private data, no privacy cost), after pretraining, and the resulting mask is sent to every
client, so all clients encrypt exactly the same entries.

The layout flattens a state dict in sorted key order; ``mask[i]`` is True when flat entry i is
encrypted. The mask (and how much the server sees) is recorded in the run directory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from common.config import Config
from common.data.dataset import FaceDataset
from common.nn.face_model import FaceModel
from common.nn.heads import CosineClassifier
from common.train.loop import target_labels, task_loss, to_tensor


@dataclass
class EncryptionLayout:
    """Flattening of a state dict and the mask of its encrypted entries."""

    keys: list[str]
    shapes: list[tuple[int, ...]]
    mask: np.ndarray

    @classmethod
    def for_state(cls, state: Mapping[str, np.ndarray], mask: np.ndarray | None = None) -> EncryptionLayout:
        keys = sorted(state)
        shapes = [tuple(np.shape(state[k])) for k in keys]
        size = sum(math.prod(s) for s in shapes)
        if mask is None:
            mask = np.ones(size, dtype=bool)
        mask = np.asarray(mask)
        if mask.shape != (size,):
            raise ValueError(f"encryption mask has shape {mask.shape}, the model has {size} values")
        return cls(keys, shapes, mask.astype(bool))

    @property
    def n_encrypted(self) -> int:
        return int(self.mask.sum())

    @property
    def n_plain(self) -> int:
        return int(self.mask.size - self.mask.sum())

    def flatten(self, state: Mapping[str, np.ndarray]) -> np.ndarray:
        for k, shape in zip(self.keys, self.shapes, strict=True):
            if k not in state or tuple(np.shape(state[k])) != shape:
                raise ValueError(f"state does not match the encryption layout at {k!r} (expected shape {shape})")
        return np.concatenate([np.asarray(state[k], dtype=np.float64).ravel() for k in self.keys])

    def split(self, state: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(values to encrypt, float64; values sent in plaintext, float32)."""
        flat = self.flatten(state)
        return flat[self.mask], flat[~self.mask].astype(np.float32)

    def merge(self, encrypted: np.ndarray, plain: np.ndarray) -> dict[str, np.ndarray]:
        """Rebuild the float32 state dict from the decrypted and the plaintext values."""
        if encrypted.shape != (self.n_encrypted,) or plain.shape != (self.n_plain,):
            raise ValueError(f"expected {self.n_encrypted} encrypted and {self.n_plain} plaintext values, got "
                             f"{encrypted.shape} and {plain.shape}")
        flat = np.empty(self.mask.size, dtype=np.float64)
        flat[self.mask] = encrypted
        flat[~self.mask] = plain
        out, start = {}, 0
        for k, shape in zip(self.keys, self.shapes, strict=True):
            n = math.prod(shape)
            out[k] = flat[start:start + n].reshape(shape).astype(np.float32)
            start += n
        return out

    def visibility(self) -> dict[str, dict[str, int]]:
        """Per tensor: how many entries the server sees in plaintext and how many encrypted."""
        out, start = {}, 0
        for k, shape in zip(self.keys, self.shapes, strict=True):
            n = math.prod(shape)
            enc = int(self.mask[start:start + n].sum())
            out[k] = {"encrypted": enc, "plaintext": n - enc}
            start += n
        return out


def fisher_diagonal(model: FaceModel, head: CosineClassifier, public: FaceDataset, cfg: Config,
                    samples: int = 64) -> dict[str, np.ndarray]:
    """Mean squared per-sample gradient of the training loss, on ``samples`` public images."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0xF15E]))
    idx = np.sort(rng.choice(len(public), size=min(samples, len(public)), replace=False))
    classes = np.unique(public.identity)
    y_id = torch.from_numpy(np.searchsorted(classes, public.identity[idx]).astype(np.int64))
    use_attr = cfg.train.task != "identity" and model.attribute is not None
    y_attr = torch.from_numpy(target_labels(public, cfg.train.attribute)[idx]) if use_attr else torch.zeros_like(y_id)
    params = dict(model.named_parameters())
    acc = {k: torch.zeros_like(p) for k, p in params.items()}
    model.eval()  # no dropout: the map must not depend on a random draw
    x_all = to_tensor(public.images[idx])
    for i in range(len(idx)):
        feats, attr = model(x_all[i:i + 1])
        loss = task_loss(head(feats), attr if use_attr else None, y_id[i:i + 1], y_attr[i:i + 1], cfg.train).sum()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (k, _), g in zip(params.items(), grads, strict=True):
            if g is not None:
                acc[k] += g.detach() ** 2
    state = model.state_dict()
    return {k: (acc[k] / len(idx)).numpy().astype(np.float64) if k in acc else np.zeros(tuple(v.shape))
            for k, v in state.items()}


def top_fraction_mask(layout: EncryptionLayout, sensitivity: Mapping[str, np.ndarray], fraction: float) -> np.ndarray:
    """Mask of the ``ceil(fraction * size)`` most sensitive entries (ties: lower flat index first)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"he.encrypt_fraction: expected a value in (0, 1], got {fraction}")
    flat = layout.flatten(sensitivity)
    k = math.ceil(fraction * flat.size)
    order = np.lexsort((np.arange(flat.size), -flat))
    mask = np.zeros(flat.size, dtype=bool)
    mask[order[:k]] = True
    return mask
