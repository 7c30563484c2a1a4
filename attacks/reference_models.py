"""Reference (shadow) models for LiRA and RMIA, trained together with stacked weights.

LiRA (Carlini et al. 2022) needs many models of the target's architecture, each trained on a
random half of a population, so that every audited example is IN for about half of them. Here
the R models train at once: their parameters are stacked (``torch.func.stack_module_state``) and
one ``vmap``-ed ``functional_call`` runs all of them on their own batches, with one Adam over
the stacked tensors. Adam and weight decay are element-wise and the models share no parameter,
so each stacked model follows exactly the updates it would get alone; only the floating-point
order of the batched convolutions differs (the tests check the two paths agree).

The recipe is the target's local recipe, centrally: the attribute task (binary cross-entropy),
the same optimiser, peak learning rate, one-cycle schedule, batch size and augmentation, for
``epochs`` passes over each model's half (the federated target's rounds x local epochs). The
references are trained without DP-SGD: the attacker mimics the data distribution and the
architecture, and a DP target only makes its own scores less separable.

Batches: each model draws its own stream of permutations of its IN set (own generator), so the
sequential path (``vectorised=False``) sees the very same batches and augmentations. They are
drawn and augmented on the CPU and then moved to ``train.device``, where the models train
(``common.train.device``); the models are initialised on the CPU and returned on it.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state
from tqdm.auto import tqdm

from common.config import TrainConfig
from common.nn.build import build_model
from common.nn.face_model import FaceModel, ModelSpec
from common.train.device import resolve_device
from common.train.finetune import restrict_training
from common.train.loop import augment, one_cycle_lr, to_tensor

log = logging.getLogger(__name__)


class _BatchStream:
    """Endless batches of one model's IN set: successive seeded permutations, cut into batches."""

    def __init__(self, members: np.ndarray, batch: int, seed: int) -> None:
        self.members = members
        self.batch = batch
        self.gen = torch.Generator().manual_seed(seed)
        self.queue = np.empty(0, dtype=np.int64)

    def next(self) -> np.ndarray:
        while self.queue.size < self.batch:
            perm = torch.randperm(self.members.size, generator=self.gen).numpy()
            self.queue = np.concatenate([self.queue, self.members[perm]])
        out, self.queue = self.queue[: self.batch], self.queue[self.batch:]
        return out


def training_steps(in_mask: np.ndarray, batch: int, epochs: int) -> int:
    """Steps for every model: ``epochs`` passes over the average IN-set size."""
    return max(1, epochs * math.ceil(float(in_mask.sum(axis=1).mean()) / batch))


def _check(spec: ModelSpec, images: np.ndarray, labels: np.ndarray, in_mask: np.ndarray, seeds: Sequence[int]) -> None:
    if not spec.attribute_head:
        raise ValueError("reference models: the spec has no attribute head (LiRA needs a class posterior)")
    n = images.shape[0]
    if labels.shape != (n,) or in_mask.ndim != 2 or in_mask.shape[1] != n:
        raise ValueError(f"reference models: {n} images, labels {labels.shape}, in_mask {in_mask.shape}: expected "
                         f"labels ({n},) and in_mask (R, {n})")
    if len(seeds) != in_mask.shape[0]:
        raise ValueError(f"reference models: {len(seeds)} seeds for {in_mask.shape[0]} models")
    if (in_mask.sum(axis=1) == 0).any():
        raise ValueError("reference models: a model has an empty training set")


def _batch(images: np.ndarray, labels: np.ndarray, weights: np.ndarray, idx: np.ndarray, gen: torch.Generator,
           cfg: TrainConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, labels, weights) of ``idx``, augmented on the CPU (``gen`` is a CPU stream), on ``device``."""
    x = to_tensor(images[idx])
    return ((augment(x, gen) if cfg.augment else x).to(device), torch.from_numpy(labels[idx]).float().to(device),
            torch.from_numpy(weights[idx]).float().to(device))


def train_references(spec: ModelSpec, images: np.ndarray, labels: np.ndarray, in_mask: np.ndarray,
                     cfg: TrainConfig, epochs: int, seeds: Sequence[int], vectorised: bool = True,
                     sample_weights: np.ndarray | None = None,
                     init_state: dict[str, torch.Tensor] | None = None, trainable: str = "all",
                     progress: bool = False) -> list[FaceModel]:
    """Train one attribute model per row of ``in_mask`` (R, n) on its IN samples; model r uses
    ``seeds[r]`` for its initialisation, batches and augmentation. ``sample_weights`` (R, n)
    weights each model's per-sample loss (a fairness reweighting computed on its own IN set).
    ``init_state``: start every model from these weights instead (the target's public initial
    model, e.g. after public pretraining), so that references differ from it only by their data.
    ``trainable``: what each model trains (``federation.trainable``, ``common.train.finetune``), as
    the target's clients did. ``progress``: a bar over the models (they dominate an audit's time)."""
    labels = np.asarray(labels, dtype=np.int64)
    in_mask = np.asarray(in_mask, dtype=bool)
    _check(spec, images, labels, in_mask, seeds)
    weights = np.ones(in_mask.shape) if sample_weights is None else np.asarray(sample_weights, dtype=np.float64)
    if weights.shape != in_mask.shape:
        raise ValueError(f"reference models: sample_weights {weights.shape}, expected {in_mask.shape}")
    device = resolve_device(cfg.device)
    models = [build_model(spec, int(s)).to(device) for s in seeds]
    for m in models:
        if init_state is not None:
            m.load_state_dict(init_state)
        restrict_training(m, trainable)
    batch = min(cfg.batch_size, int(in_mask.sum(axis=1).min()))  # one batch size: the stacked models step together
    streams = [_BatchStream(np.flatnonzero(row), batch, int(s) + 1) for row, s in zip(in_mask, seeds, strict=True)]
    aug_gens = [torch.Generator().manual_seed(int(s) + 2) for s in seeds]
    total = training_steps(in_mask, streams[0].batch, epochs)
    if vectorised:
        _train_stacked(models, images, labels, weights, streams, aug_gens, cfg, total, device)
    else:
        for model, w, stream, gen in tqdm(list(zip(models, weights, streams, aug_gens, strict=True)),
                                          desc="reference models", unit="model", disable=not progress):
            _train_one(model, images, labels, w, stream, gen, cfg, total, device)
    return [m.to("cpu").eval() for m in models]


def _optimizer(params: list[torch.Tensor], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _train_one(model: FaceModel, images: np.ndarray, labels: np.ndarray, weights: np.ndarray, stream: _BatchStream,
               gen: torch.Generator, cfg: TrainConfig, total: int, device: torch.device) -> None:
    opt = _optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    model.train()
    for step in range(total):
        x, y, w = _batch(images, labels, weights, stream.next(), gen, cfg, device)
        for group in opt.param_groups:
            group["lr"] = one_cycle_lr(step, total, cfg.lr)
        opt.zero_grad(set_to_none=True)
        (F.binary_cross_entropy_with_logits(model(x)[1], y, reduction="none") * w).mean().backward()
        opt.step()


def _train_stacked(models: list[FaceModel], images: np.ndarray, labels: np.ndarray, weights: np.ndarray,
                   streams: list[_BatchStream], gens: list[torch.Generator], cfg: TrainConfig, total: int,
                   device: torch.device) -> None:
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    base.train()

    def logit(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(base, (p, b), (x,))[1]

    forward = torch.vmap(logit, randomness="different")
    opt = _optimizer([p for p in params.values() if p.requires_grad], cfg)  # frozen ones stay as they are
    for step in range(total):
        xs, ys, ws = zip(*(_batch(images, labels, w, st.next(), g, cfg, device)
                           for w, st, g in zip(weights, streams, gens, strict=True)), strict=True)
        for group in opt.param_groups:
            group["lr"] = one_cycle_lr(step, total, cfg.lr)
        opt.zero_grad(set_to_none=True)
        out = forward(params, buffers, torch.stack(xs))
        # Sum over models of each model's mean loss: model r's gradient is its own loss's gradient.
        loss = F.binary_cross_entropy_with_logits(out, torch.stack(ys), reduction="none") * torch.stack(ws)
        loss.mean(dim=1).sum().backward()
        opt.step()
    with torch.no_grad():
        for r, model in enumerate(models):
            for name, p in model.named_parameters():
                p.copy_(params[name][r])
