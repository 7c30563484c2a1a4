"""The one training loop: central baselines, federated clients and attack shadow models.

It trains a ``FaceModel`` and, for the identity task, a private ``CosineClassifier`` on one
``FaceDataset``, with or without DP-SGD (Opacus, Poisson sampling). Initialisation, augmentation
and dropout draw from generators seeded by the caller (the same seed gives the same weights on
CPU); DP-SGD's noise and sampling draw from fresh OS entropy unless the caller passes a noise
seed (see ``common.train.dp``). ``dp.unit = sample`` protects one image, ``dp.unit = identity`` one
person (whole identities sampled, clipped and noised, ``common.train.identity_dp``); both run on
book-keeping DP-SGD by default (``dp.grad_sample_mode = bk``, one backward pass,
``common.train.book_keeping``), or on Opacus' ``make_private`` modes (hooks, ghost, functorch).
It trains on ``train.device`` (``common.train.device``): batches are read, augmented and sampled on
the CPU, then moved; the caller's model and head come back on the CPU.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from common.config import DPConfig, TrainConfig
from common.data.dataset import FaceDataset
from common.nn.face_model import FaceModel
from common.nn.heads import CosineClassifier, margin_logits
from common.train import threads
from common.train.book_keeping import make_private_book_keeping
from common.train.device import resolve_device
from common.train.dp import History, accountant_history, dp_generators, make_accountant
from common.train.fairness import fair_mixup_penalty
from common.train.identity_dp import IdentityPoissonLoader, make_private_by_identity
from common.train.weighted_clipping import (
    check_unit_weights,
    clip_bounds,
    weight_clipped_grad_samples,
    weighted_ghost_backward,
)

log = logging.getLogger(__name__)


def to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (n, H, W, 3) or (n, 3, H, W) -> float32 (n, 3, H, W) in [-1, 1]."""
    x = torch.as_tensor(images)
    if x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    return x.float().div_(127.5).sub_(1.0)


def augment(x: torch.Tensor, generator: torch.Generator, max_shift: float = 0.08) -> torch.Tensor:
    """Random horizontal flip and translation (seeded), applied per sample. An empty batch (Poisson
    sampling under DP-SGD can draw nobody) comes back as it is, drawing nothing."""
    n = x.shape[0]
    if n == 0:
        return x
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * max_shift * 2
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = 1
    theta[:, 1, 1] = 1
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


def one_cycle_lr(step: int, total: int, peak: float, warmup: float = 0.15) -> float:
    """Learning rate at ``step`` of ``total``: linear warm-up from peak/25, then cosine to ~0.

    The schedule spans a whole run (all rounds of a federation), so that local training in round
    r continues the curve where round r-1 left it instead of restarting its warm-up.
    """
    total = max(total, 1)
    ramp = max(int(warmup * total), 1)
    if step < ramp:
        return peak * (0.04 + 0.96 * step / ramp)
    progress = min((step - ramp) / max(total - ramp, 1), 1.0)
    return peak * (1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * progress)))


def target_labels(ds: FaceDataset, attribute: str) -> np.ndarray:
    """Binary target for the attribute task: a task label, or the gender code (1 = male)."""
    if attribute == "gender":
        return ds.gender.astype(np.int64)
    if attribute not in ds.labels:
        raise KeyError(f"train.attribute: {attribute!r} is not a label of data set {ds.source!r} "
                       f"(labels: {sorted(ds.labels)} or 'gender')")
    return ds.labels[attribute].astype(np.int64)


@dataclass
class TrainOutcome:
    """What one call to ``train`` did; DP fields are zero / empty without DP."""

    steps: int
    samples: int
    loss: float
    seconds: float
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    dp_history: History | None = None

    @property
    def samples_per_second(self) -> float:
        return self.samples / max(self.seconds, 1e-9)


class _Joint(nn.Module):
    """Model and private identity head as one module, so DP clipping covers both."""

    def __init__(self, model: FaceModel, head: CosineClassifier | None) -> None:
        super().__init__()
        self.model = model
        self.head = head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        feats, attr = self.model(x)
        return (self.head(feats) if self.head is not None else None), attr


def _batches(loader: DataLoader, epochs: int, max_seconds: float, start: float):
    """Batches of ``epochs`` passes, stopping early once ``max_seconds`` have elapsed (0 = never)."""
    for _ in range(epochs):
        threads.balance()  # share the cores with the other facefl processes running now
        for batch in loader:
            if max_seconds and time.perf_counter() - start > max_seconds:
                return
            yield batch


def task_loss(cosine: torch.Tensor | None, attr_logit: torch.Tensor | None, y_id: torch.Tensor,
              y_attr: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Per-sample loss: the margin loss on ``cosine`` and / or BCE on ``attr_logit`` (None = task off)."""
    ref = cosine if cosine is not None else attr_logit
    if ref is None:
        raise ValueError("task_loss: neither an identity nor an attribute output")
    loss = ref.new_zeros(ref.shape[0])
    if cosine is not None:
        loss = loss + F.cross_entropy(margin_logits(cosine, y_id, cfg.margin, cfg.margin_scale), y_id, reduction="none")
    if attr_logit is not None:
        bce = F.binary_cross_entropy_with_logits(attr_logit, y_attr.float(), reduction="none")
        loss = loss + (cfg.attribute_weight * bce if cosine is not None else bce)
    return loss


def identity_classes(identity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted identity codes and each sample's local class index (stable across rounds)."""
    classes, local = np.unique(identity, return_inverse=True)
    return classes, local.astype(np.int64)


def train(model: FaceModel, ds: FaceDataset, cfg: TrainConfig, dp: DPConfig, *, seed: int, epochs: int,
          head: CosineClassifier | None = None, noise_multiplier: float = 0.0, dp_history: History | None = None,
          sample_weight: np.ndarray | None = None, mixup: tuple[float, np.ndarray] | None = None,
          schedule: tuple[int, int] | None = None, noise_seed: int | None = None, progress: bool = False,
          desc: str = "train") -> TrainOutcome:
    """Train ``model`` in place; see ``_train`` for the arguments.

    Runs with torch's global RNG forked and seeded (dropout draws from it), with modules the
    task does not use frozen (an idle attribute head has no per-sample gradients for Opacus), and
    on ``cfg.device``: model and head move there for the call and back to the CPU after it, even
    when it fails, so that callers and their state dicts only ever see CPU tensors.
    """
    device = resolve_device(cfg.device)
    idle = model.attribute if (model.attribute is not None and cfg.task == "identity") else None
    frozen = [p for p in (idle.parameters() if idle is not None else []) if p.requires_grad]
    modules = [m for m in (model, head) if m is not None]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for p in frozen:
            p.requires_grad_(False)
        try:
            for m in modules:
                m.to(device)
            return _train(model, ds, cfg, dp, seed=seed, epochs=epochs, device=device, head=head,
                          noise_multiplier=noise_multiplier, dp_history=dp_history,
                          sample_weight=sample_weight, mixup=mixup, schedule=schedule, noise_seed=noise_seed,
                          progress=progress, desc=desc)
        finally:
            for m in modules:
                m.to("cpu")
            for p in frozen:
                p.requires_grad_(True)


def _train(model: FaceModel, ds: FaceDataset, cfg: TrainConfig, dp: DPConfig, *, seed: int, epochs: int,
          device: torch.device, head: CosineClassifier | None = None, noise_multiplier: float = 0.0,
          dp_history: History | None = None, sample_weight: np.ndarray | None = None,
          mixup: tuple[float, np.ndarray] | None = None, schedule: tuple[int, int] | None = None,
          noise_seed: int | None = None, progress: bool = False, desc: str = "train") -> TrainOutcome:
    """Train ``model`` (and ``head``) in place for ``epochs`` epochs on ``ds``.

    Args:
        device: where ``model`` and ``head`` already are; each batch moves there after augmentation.
        head: identity head over ``identity_classes(ds.identity)``; required for identity tasks.
        noise_multiplier: DP noise (already calibrated by the caller for the whole run).
        dp_history: accountant history of earlier calls; returned extended by this call's steps.
        sample_weight: optional per-sample weights (fairness reweighting): without DP they weight
            the loss; under DP-SGD they must lie in [0, 1] and weight each clipped gradient
            (``common.train.weighted_clipping``), as clipping would undo a weighted loss.
        mixup: (lambda, sensitive attribute per sample) to add the Fair Mixup penalty (not with DP).
        schedule: (first step, total steps) of the run's learning-rate schedule; default: this call
            alone. Federated clients pass their position in the whole run.
        noise_seed: seeds DP-SGD's noise and Poisson sampling (and nothing else). None: fresh
            entropy from the operating system, which nobody else can predict; a value only for
            reproducible research runs (``dp.reproducible_noise``) or a re-run that must release
            the same update (the client keeps its secret seed on its own node).
    """
    use_id = cfg.task in ("identity", "both")
    use_attr = cfg.task in ("attribute", "both")
    if use_id and head is None:
        raise ValueError("train: the identity task needs an identity head")
    if use_attr and model.attribute is None:
        raise ValueError("train: the attribute task needs a model with an attribute head")
    if len(ds) == 0:
        raise ValueError("train: empty training set")
    if mixup is not None and (dp.mode != "off" or not use_attr):
        raise ValueError("train: the Fair Mixup penalty needs the attribute task and no DP-SGD")
    gen = torch.Generator().manual_seed(seed)
    y_id = torch.from_numpy(identity_classes(ds.identity)[1])
    y_attr = torch.from_numpy(target_labels(ds, cfg.attribute)) if use_attr else torch.zeros(len(ds), dtype=torch.int64)
    w = torch.ones(len(ds)) if sample_weight is None else torch.as_tensor(sample_weight, dtype=torch.float32)
    sens = torch.from_numpy(np.asarray(mixup[1], dtype=np.int64)) if mixup else torch.zeros(len(ds), dtype=torch.int64)
    # The penalty draws from its own stream, so a fair run sees the same batches as its biased twin.
    mix_gen = torch.Generator().manual_seed(seed + 2)
    # The loaders draw positions; each batch's images are read then (a data set on disk,
    # ``DiskImages``, is never loaded whole).
    positions = torch.arange(len(ds))
    batch = min(cfg.batch_size, len(ds))
    private = dp.mode == "sample"
    if private:
        check_unit_weights(w)
    # Under DP the noise and the Poisson sampler draw from their own streams, seeded by noise_seed:
    # the protection of every sample rests on them, so they never derive from ``seed``.
    noise_gen, sampler_gen = dp_generators(noise_seed, device) if private else (None, gen)
    # dp.unit = identity: whole identities are Poisson-sampled and clipped (common.train.identity_dp).
    by_identity = private and dp.unit == "identity"
    loader: DataLoader | IdentityPoissonLoader
    if by_identity:
        loader = IdentityPoissonLoader((positions, y_id, y_attr, w, sens), ds.identity, batch_size=cfg.batch_size,
                                       max_images_per_identity=dp.max_images_per_identity, generator=sampler_gen)
    else:
        loader = DataLoader(TensorDataset(positions, y_id, y_attr, w, sens), batch_size=batch, shuffle=True,
                            generator=sampler_gen)

    joint = _Joint(model, head if use_id else None)
    params = [p for p in joint.parameters() if p.requires_grad]
    # The private identity head clipped apart from the shared parameters (dp.head_clip_share).
    bounds = clip_bounds(dp.max_grad_norm, dp.head_clip_share if use_id else 0.0)
    groups = {id(p): 1 for p in joint.head.parameters()} if joint.head is not None and len(bounds) > 1 else {}
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    accountant = None
    module: nn.Module = joint
    if private and noise_multiplier <= 0:
        raise ValueError("train: DP-SGD (dp.mode = sample) needs a noise multiplier > 0")
    book_keeping = private and dp.grad_sample_mode == "bk"
    if book_keeping:
        if not by_identity:  # Opacus' Poisson sampler, rate and expected batch as make_private sets them
            loader = DPDataLoader.from_data_loader(loader)
        accountant = make_accountant(dp.accountant, dp_history)
        expected = loader.expected_identities if by_identity else int(len(ds) * loader.sample_rate)
        module, opt = make_private_book_keeping(
            joint, opt, noise_multiplier=noise_multiplier, max_grad_norm=dp.max_grad_norm,
            expected_batch_size=expected, generator=noise_gen,
            step_hook=accountant.get_optimizer_hook_fn(sample_rate=loader.sample_rate),
            groups=groups)
    elif by_identity:
        accountant = make_accountant(dp.accountant, dp_history)
        module, opt = make_private_by_identity(
            joint, opt, noise_multiplier=noise_multiplier, max_grad_norm=dp.max_grad_norm,
            expected_identities=loader.expected_identities, grad_sample_mode=dp.grad_sample_mode,
            generator=noise_gen, step_hook=accountant.get_optimizer_hook_fn(sample_rate=loader.sample_rate),
            groups=groups, bounds=bounds)
    elif private:
        engine = PrivacyEngine(accountant=dp.accountant, secure_mode=False)
        engine.accountant = make_accountant(dp.accountant, dp_history)
        wrapped = engine.make_private(
            module=joint, optimizer=opt, data_loader=loader, noise_multiplier=noise_multiplier,
            max_grad_norm=dp.max_grad_norm, poisson_sampling=True, grad_sample_mode=dp.grad_sample_mode,
            noise_generator=noise_gen, criterion=nn.CrossEntropyLoss())
        # Ghost clipping also returns a wrapped criterion (3rd item); the loss is wrapped below instead.
        module, opt, loader = wrapped[0], wrapped[1], wrapped[-1]
        accountant = engine.accountant
    steps_total = epochs * len(loader)
    first_step, run_steps = schedule or (0, steps_total)
    module.train()
    start = time.perf_counter()
    steps = samples = 0
    loss_sum = 0.0
    bar = tqdm(total=steps_total, desc=desc, disable=not progress, leave=False, unit="step")
    try:
        for pb, yb_id, yb_attr, wb, sb in _batches(loader, epochs, cfg.max_seconds, start):
            # Nobody drawn: no forward or backward pass, but a noise-only step (as Opacus takes).
            empty = (by_identity or book_keeping) and len(pb) == 0
            yb_id, yb_attr, wb, sb = (t.to(device) for t in (yb_id, yb_attr, wb, sb))
            per_sample = torch.zeros(0)
            if not empty:
                x = to_tensor(torch.from_numpy(ds.images[pb.numpy()]).permute(0, 3, 1, 2).contiguous())
                if cfg.augment:
                    x = augment(x, gen)
                x = x.to(device)
                cos, attr = module(x)
                per_sample = task_loss(cos if use_id else None, attr if use_attr else None, yb_id, yb_attr, cfg)
                if not private:  # under DP the weights scale the clipped gradients below
                    per_sample = per_sample * wb
            opt.zero_grad(set_to_none=True)
            # Warm-up then anneal (for SGD and Adam alike): ArcFace from scratch diverges without it.
            for group in opt.param_groups:
                group["lr"] = one_cycle_lr(first_step + steps, run_steps, cfg.lr)
            if book_keeping or by_identity:  # the summed loss; the units are clipped after the pass
                if not empty:
                    per_sample.sum().backward()
                if book_keeping:  # clipped sums per sample or identity from the one pass
                    module.clip_and_sum(bounds, yb_id if by_identity else None, wb)
                else:  # hooks / functorch: the optimiser groups the per-sample gradients and clips them
                    opt.set_identities(yb_id, wb)
            elif private and dp.grad_sample_mode == "ghost":
                weighted_ghost_backward(module, opt, per_sample, wb)
            elif private:  # Opacus' hooks / functorch: clip and weight here, Opacus' clipping then keeps them
                per_sample.mean().backward()
                weight_clipped_grad_samples(params, wb, bounds, groups)
            elif mixup is not None:
                (per_sample.mean() + mixup[0] * fair_mixup_penalty(model, x, yb_attr, sb, mix_gen)).backward()
            else:
                per_sample.mean().backward()
            opt.step()
            steps += 1
            samples += len(pb)
            loss_sum += float(per_sample.detach().sum())
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / max(samples, 1):.3f}")
    finally:
        bar.close()
        if private:
            module._close()  # remove Opacus hooks: the caller gets back a plain model
            for p in joint.parameters():  # Opacus keeps the un-noised clipped sum of the last batch
                p.__dict__.pop("summed_grad", None)
                p.grad = None
    outcome = TrainOutcome(steps=steps, samples=samples, loss=loss_sum / max(samples, 1),
                           seconds=time.perf_counter() - start)
    if private:
        outcome.noise_multiplier = noise_multiplier
        outcome.sample_rate = float(loader.sample_rate)
        outcome.dp_history = accountant_history(accountant)
    log.debug("%s: %d steps, %.1f samples/s, loss %.4f", desc, steps, outcome.samples_per_second, outcome.loss)
    return outcome


@torch.no_grad()
def embed(model: FaceModel, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """L2-normalised embeddings of uint8 images, in eval mode."""
    model.eval()
    out = [model.embed(to_tensor(images[i:i + batch_size])).numpy() for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.empty((0, model.spec.embedding_dim), np.float32)


@torch.no_grad()
def attribute_logits(model: FaceModel, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The attribute head's logits of uint8 images, in eval mode, as float64. Membership statistics
    are computed from these (stable log-sigmoid), never from rounded probabilities: a float32
    sigmoid is 1.0 for every logit above about 16.6, where the most confident members live."""
    if model.attribute is None:
        raise ValueError("model has no attribute head")
    model.eval()
    out = [model(to_tensor(images[i:i + batch_size]))[1].double().numpy() for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.empty(0, np.float64)


def predict_attribute(model: FaceModel, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Attribute probabilities (sigmoid of the logit) of uint8 images, in eval mode: for accuracy
    and fairness metrics; membership statistics use ``attribute_logits``."""
    return 1.0 / (1.0 + np.exp(-attribute_logits(model, images, batch_size)))
