"""MINT, the Membership Inference Test (DeAlcala et al., "Is my data in your AI model? Membership
Inference Test with application to face images"): an auditor with the model's activations learns
to tell data that trained it from data that did not.

* ``VanillaMINT``: the channel-wise maximum of each chosen block's activation map (training data
  tends to maximise intermediate activations), concatenated with the embedding, into an MLP:
  Dense 128 ReLU with an L1 penalty of 0.1 on that layer's activations (the paper's "L1 0.1";
  read as an activity regulariser, mean absolute activation) -> BatchNorm -> Dropout 0.5 -> 1
  sigmoid; Adam 1e-3, 20 epochs, batch 128.
* ``CNNMINT``: the full activation map of one block -> Conv 64 filters 5x5 ReLU -> MaxPool 2 ->
  Dense C ReLU -> Dropout 0.5 -> 1 sigmoid; Adam 1e-3, 30 epochs, batch 128.

Both follow sklearn's fit / score convention on activation features and are seeded. Batches are
class-balanced: each holds as many used as unused samples (drawn with replacement from the
smaller class when the two differ in size). The network is initialised and the batches drawn on
the CPU; it trains on ``device`` (a ``train.device`` value, ``common.train.device``) and scores on
the CPU.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.nn.face_model import FaceModel
from common.train.device import resolve_device
from common.train.loop import to_tensor

MINT_CNN_BLOCK = 1
"""CNN MINT's input in ``Activations.blocks`` (0 is the stem): the first stage's output, the
paper's "Conv Layer #1", its best CNN input on all three face recognisers (its Table IV)."""


@dataclass
class Activations:
    """Per-sample activation maps of the audited model's blocks, and its embedding."""

    blocks: list[np.ndarray]  # each (n, C, H, W)
    embedding: np.ndarray  # (n, L)


@torch.no_grad()
def activations(model: FaceModel, images: np.ndarray, batch_size: int = 128) -> Activations:
    """Activation maps after the stem and each stage, and the (unnormalised) embedding."""
    model.eval()
    blocks: list[list[np.ndarray]] = []
    emb = []
    for i in range(0, len(images), batch_size):
        maps = model.backbone.blocks(to_tensor(images[i:i + batch_size]))
        blocks.append([m.numpy() for m in maps])
        emb.append(model.backbone.embedding_from(maps[-1]).numpy())
    return Activations([np.concatenate([b[k] for b in blocks]) for k in range(len(blocks[0]))], np.concatenate(emb))


def vanilla_features(acts: Activations) -> np.ndarray:
    """Channel maxima of every block plus the embedding: (n, sum C + L)."""
    return np.concatenate([b.max(axis=(2, 3)) for b in acts.blocks] + [acts.embedding], axis=1).astype(np.float32)


class _MINTBase(ABC):
    """Standardisation, seeded class-balanced training and scoring; subclasses give the network."""

    epochs: int
    l1: float = 0.0

    def __init__(self, *, seed: int, epochs: int | None = None, batch_size: int = 128, lr: float = 1e-3,
                 device: str = "cpu") -> None:
        self.seed = seed
        self.device = resolve_device(device)
        self.epochs = epochs if epochs is not None else self.epochs
        self.batch_size = batch_size
        self.lr = lr
        self.net_: nn.Module | None = None
        self._mean: torch.Tensor | None = None
        self._std: torch.Tensor | None = None

    @abstractmethod
    def _build(self, x: torch.Tensor) -> nn.Module:
        """The network for (standardised) inputs shaped like ``x``; returns (logit, hidden) per batch."""

    def _standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self._mean) / self._std

    def fit(self, features: np.ndarray, used: np.ndarray) -> _MINTBase:
        x = torch.as_tensor(np.asarray(features, dtype=np.float32))
        y = np.asarray(used, dtype=bool)
        if y.shape != (x.shape[0],) or y.all() or not y.any():
            raise ValueError(f"MINT.fit: expected one used/unused flag per sample with both classes, got {y.shape}")
        dims = (0,) if x.ndim == 2 else (0, 2, 3)
        self._mean = x.mean(dim=dims, keepdim=True)
        self._std = x.std(dim=dims, keepdim=True).clamp_min(1e-6)
        x = self._standardise(x)
        gen = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            self.net_ = self._build(x).to(self.device)
        x = x.to(self.device)
        opt = torch.optim.Adam(self.net_.parameters(), lr=self.lr)
        pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
        half = max(1, self.batch_size // 2)
        steps = max(1, 2 * max(pos.size, neg.size) // self.batch_size)
        self.net_.train()
        with torch.random.fork_rng():
            torch.manual_seed(self.seed + 1)  # dropout
            for _ in range(self.epochs):
                for _ in range(steps):
                    idx = np.concatenate([pos[torch.randint(pos.size, (half,), generator=gen).numpy()],
                                          neg[torch.randint(neg.size, (half,), generator=gen).numpy()]])
                    target = torch.from_numpy(y[idx].astype(np.float32)).to(self.device)
                    logit, hidden = self.net_(x[idx])
                    loss = F.binary_cross_entropy_with_logits(logit, target) + self.l1 * hidden.abs().mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        self.net_.to("cpu").eval()
        return self

    @torch.no_grad()
    def score(self, features: np.ndarray) -> np.ndarray:
        """P(used in training) per sample."""
        if self.net_ is None:
            raise RuntimeError("MINT.score called before fit")
        x = self._standardise(torch.as_tensor(np.asarray(features, dtype=np.float32)))
        return torch.sigmoid(self.net_(x)[0]).numpy().astype(np.float64)


class _VanillaNet(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, 128)
        self.head = nn.Sequential(nn.BatchNorm1d(128), nn.Dropout(0.5), nn.Linear(128, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = F.relu(self.dense(x))
        return self.head(hidden).squeeze(1), hidden


class _CNNNet(nn.Module):
    def __init__(self, channels: int, height: int, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 64, 5, padding=2)
        self.dense = nn.Linear(64 * (height // 2) * (width // 2), channels)
        self.out = nn.Sequential(nn.Dropout(0.5), nn.Linear(channels, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.max_pool2d(F.relu(self.conv(x)), 2)
        hidden = F.relu(self.dense(torch.flatten(h, 1)))
        return self.out(hidden).squeeze(1), hidden


class VanillaMINT(_MINTBase):
    """MLP MINT on :func:`vanilla_features`."""

    epochs = 20
    l1 = 0.1

    def _build(self, x: torch.Tensor) -> nn.Module:
        if x.ndim != 2:
            raise ValueError(f"VanillaMINT: expected (n, features), got {tuple(x.shape)}")
        return _VanillaNet(x.shape[1])


class CNNMINT(_MINTBase):
    """CNN MINT on one block's activation maps (n, C, H, W)."""

    epochs = 30

    def _build(self, x: torch.Tensor) -> nn.Module:
        if x.ndim != 4:
            raise ValueError(f"CNNMINT: expected activation maps (n, C, H, W), got {tuple(x.shape)}")
        return _CNNNet(*x.shape[1:])


def identity_split(identity: np.ndarray, seed: int) -> np.ndarray:
    """True for the samples whose identity falls in the MINT training half (seeded, by identity),
    so that the MINT model is tested on people it never saw."""
    ids = np.unique(identity)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x312]))
    train_ids = rng.permutation(ids)[: ids.size // 2]
    return np.isin(identity, train_ids)
