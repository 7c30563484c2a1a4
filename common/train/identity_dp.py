"""Identity-level DP-SGD: one person, with all of their images, is the unit of privacy.

Sample-level DP-SGD (``dp.unit = sample``) protects one image; a person with k images gets only
group privacy over k images from it. With ``dp.unit = identity`` every step of the training loop
(``common.train.loop``) does, on Opacus' machinery:

1. Poisson sampling of identities (``IdentityPoissonLoader``): each identity of the client is
   drawn independently with rate q, from the DP sampler generator (``common.train.dp.dp_generators``);
   a drawn identity brings all of its images, at most ``dp.max_images_per_identity`` of them,
   always the same ones: the first in sample order (decided once, never from labels or content).
2. Per-identity sums of the per-sample gradients before the norm: by default from book-keeping's
   one backward pass (``dp.grad_sample_mode = bk``, ``common.train.book_keeping``: ``clip_and_sum``
   with the identities as units, then Opacus' noise, scaling and accountant as below); otherwise
   from Opacus' ``GradSampleModule`` (hooks, or functorch when ``dp.grad_sample_mode =
   functorch``). Opacus' ghost clipping computes only per-sample norms, never the gradient of one
   identity's images summed before clipping, so ``ghost`` falls back to hooks here.
3. With hooks or functorch, ``IdentityDPOptimizer`` (an Opacus ``DPOptimizer``) sums the per-sample gradients of each
   identity's images, clips each identity's sum, over all trainable parameters jointly, to
   ``dp.max_grad_norm`` = C, adds the clipped sums, adds Gaussian noise N(0, sigma^2 C^2) once
   per step from the DP noise generator, divides by the expected number of identities per step,
   q x identities, and steps the wrapped optimiser. A step in which no identity was drawn still
   takes a noise-only step, as Opacus does for an empty Poisson batch.
4. The Opacus accountant records (sigma, q, steps) through the optimiser's step hook, exactly as
   for samples: adding or removing one identity changes the clipped sum of a step by at most C,
   and identities are Poisson-sampled, so the sampled Gaussian mechanism's analysis applies with
   the identity as the unit (the divisor q x identities is treated as public, as Opacus treats
   its expected batch size).

The sampling rate (``identity_sample_rate``) is q = min(1, batch_size / (max_images_per_identity
x identities)), a function of the client's number of identities and the fixed cap only: the
expected number of images per step is at most ``batch_size`` (equal when every identity has at
least the cap). An epoch is ceil(1 / q) steps. The module imports nothing from ``common.config``
(the schema takes ``DP_UNITS`` from here).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn

from common.train.book_keeping import check_private_module
from common.train.weighted_clipping import group_factors, joint_norms

DP_UNITS: tuple[str, ...] = ("sample", "identity")
"""What one (epsilon, delta) protects: one image, or one person with all of their images."""


def num_identities(identity: np.ndarray) -> int:
    return int(np.unique(np.asarray(identity)).size)


def identity_sample_rate(identities: int, batch_size: int, max_images_per_identity: int) -> float:
    """Poisson rate of each identity: min(1, batch_size / (max_images_per_identity x identities))."""
    if identities < 1 or batch_size < 1 or max_images_per_identity < 1:
        raise ValueError(f"identity sampling needs >= 1 identity, batch size and image cap, got "
                         f"{identities}, {batch_size}, {max_images_per_identity}")
    return min(1.0, batch_size / (max_images_per_identity * identities))


def identity_steps_per_epoch(identities: int, batch_size: int, max_images_per_identity: int) -> int:
    """ceil(1 / q) for ``identity_sample_rate``'s q, computed exactly in integers."""
    identity_sample_rate(identities, batch_size, max_images_per_identity)  # checks the arguments
    return max(1, -(-(max_images_per_identity * identities) // batch_size))


def capped_members(identity: np.ndarray, max_images_per_identity: int) -> list[torch.Tensor]:
    """Per identity (in sorted identity order), the indices of its first ``max_images_per_identity``
    samples in sample order: which images of a person train depends on nothing but their order."""
    _, inverse = np.unique(np.asarray(identity), return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")  # grouped by identity, sample order kept within each
    groups = np.split(order, np.cumsum(np.bincount(inverse))[:-1]) if inverse.size else []
    return [torch.from_numpy(g[:max_images_per_identity].astype(np.int64)) for g in groups]


class IdentityPoissonLoader:
    """Batches of whole identities: each step draws every identity independently with probability
    ``sample_rate`` and yields the rows of ``tensors`` of the drawn identities' capped images
    (possibly none: a batch of length 0). ``len()`` is the number of steps per epoch.

    All randomness comes from ``generator`` (the DP sampler stream), one ``torch.rand`` over the
    identities per step, as Opacus' ``UniformWithReplacementSampler`` does over samples.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], identity: np.ndarray, *, batch_size: int,
                 max_images_per_identity: int, generator: torch.Generator) -> None:
        self.tensors = tuple(tensors)
        self.members = capped_members(identity, max_images_per_identity)
        n = len(self.members)
        self.sample_rate = identity_sample_rate(n, batch_size, max_images_per_identity)
        self.steps = identity_steps_per_epoch(n, batch_size, max_images_per_identity)
        self.expected_identities = self.sample_rate * n
        self.generator = generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for _ in range(self.steps):
            drawn = torch.rand(len(self.members), generator=self.generator) < self.sample_rate
            chosen = [self.members[i] for i in drawn.nonzero().flatten().tolist()]
            index = torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.int64)
            yield tuple(t[index] for t in self.tensors)


def identity_clipped_gradients(grad_samples: Sequence[torch.Tensor], identities: torch.Tensor,
                               max_grad_norm: float, weights: torch.Tensor | None = None,
                               groups: Sequence[int] | None = None, bounds: Sequence[float] | None = None,
                               ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Per-identity gradients, clipped.

    Args:
        grad_samples: one tensor (batch, *parameter shape) of per-sample gradients per parameter.
        identities: the identity of each sample of the batch (any integer codes).
        weights: a weight in [0, 1] per sample; each identity's clipped sum is multiplied by the
            mean weight of its samples (``common.train.weighted_clipping``).
        groups, bounds: each parameter's group and each group's clipping norm
            (``weighted_clipping.clip_bounds``); default: one group clipped to ``max_grad_norm``.

    Returns:
        per parameter, a tensor (identities in the batch, *parameter shape): each identity's
        summed per-sample gradients scaled by min(1, C / (norm + 1e-6)), with the norm taken over
        all parameters jointly (Opacus' flat-clipping factor); the identity codes (sorted); and the
        norms before clipping.
    """
    ids = torch.as_tensor(identities).reshape(-1)
    if any(len(g) != len(ids) for g in grad_samples):
        raise ValueError(f"per-sample gradients of {[len(g) for g in grad_samples]} samples for "
                         f"{len(ids)} identity labels")
    codes, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    n = len(codes)
    sums = [g.new_zeros((n, *g.shape[1:])).index_add_(0, inverse, g) for g in grad_samples]
    if n == 0 or not sums:
        return sums, codes, torch.zeros(n, device=ids.device)
    factors = group_factors(sums, groups or [0] * len(sums), bounds or (max_grad_norm,), weights, inverse)
    clipped = [s * f.to(s.dtype).reshape(n, *([1] * (s.dim() - 1))) for s, f in zip(sums, factors, strict=True)]
    return clipped, codes, joint_norms(sums)


class IdentityDPOptimizer(DPOptimizer):
    """Opacus' ``DPOptimizer`` with identity-level clipping: before each ``step()`` the caller
    sets ``identities`` (the identity of every sample of the batch, ``set_identities``); the
    per-sample gradients (``p.grad_sample``, loss reduction "sum") are summed per identity, each
    identity's sum is clipped to C over all parameters jointly, and the clipped sums are added.
    Noise (``add_noise``, N(0, sigma^2 C^2) from ``generator``, once per step), the step hook (the
    accountant) and the wrapped optimiser's step are Opacus' own; the noisy sum is divided by
    ``expected_identities`` = q x identities."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise_multiplier: float, max_grad_norm: float,
                 expected_identities: float, generator: torch.Generator | None,
                 groups: Mapping[int, int] | None = None, bounds: Sequence[float] | None = None) -> None:
        if not expected_identities > 0:
            raise ValueError(f"expected identities per step must be > 0, got {expected_identities}")
        super().__init__(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                         expected_batch_size=None, loss_reduction="sum", generator=generator, secure_mode=False)
        # Each of self.params' clipping group (id(parameter) -> group, absent = 0) and the groups' norms.
        self.groups = [(groups or {}).get(id(p), 0) for p in self.params]
        self.bounds = bounds
        self.expected_identities = float(expected_identities)
        self.identities: torch.Tensor | None = None
        self.weights: torch.Tensor | None = None

    def set_identities(self, identities: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """The identity (and optionally the weight in [0, 1]) of each sample of the batch the next
        ``step()`` takes. For an empty batch (no identity drawn: no forward or backward pass) the
        per-sample gradients are set to empty tensors, so that the step adds noise to a zero sum."""
        self.identities = torch.as_tensor(identities).reshape(-1)
        self.weights = weights
        if len(self.identities) == 0:
            for p in self.params:
                p.grad_sample = p.new_zeros((0, *p.shape))

    def clip_and_accumulate(self) -> None:
        if self.identities is None:
            raise ValueError("IdentityDPOptimizer.step: set_identities() was not called for this batch")
        for p in self.params:
            _check_processed_flag(p.grad_sample)
        clipped, _, _ = identity_clipped_gradients([g.to(p.dtype) for g, p in zip(self.grad_samples, self.params)],
                                                   self.identities, self.max_grad_norm, self.weights, self.groups,
                                                   self.bounds)
        for p, per_identity in zip(self.params, clipped):
            grad = per_identity.sum(dim=0)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
            _mark_as_processed(p.grad_sample)
        self.identities = self.weights = None  # consumed: the next batch must name its own

    def scale_grad(self) -> None:
        for p in self.params:
            p.grad /= self.expected_identities * self.accumulated_iterations


def identity_grad_sample_mode(grad_sample_mode: str) -> str:
    """The Opacus mode identity DP-SGD uses: functorch if asked for, else hooks (ghost clipping
    cannot give per-identity sums)."""
    return "functorch" if grad_sample_mode == "functorch" else "hooks"


def make_private_by_identity(module: nn.Module, optimizer: torch.optim.Optimizer, *, noise_multiplier: float,
                             max_grad_norm: float, expected_identities: float, grad_sample_mode: str,
                             generator: torch.Generator | None,
                             step_hook: Callable[[DPOptimizer], None] | None = None,
                             groups: Mapping[int, int] | None = None, bounds: Sequence[float] | None = None,
                             ) -> tuple[GradSampleModule, IdentityDPOptimizer]:
    """``module`` wrapped for per-sample gradients (loss reduction "sum": backpropagate the sum of
    the per-sample losses) and ``optimizer`` wrapped for identity-level clipping and noise;
    ``step_hook`` (the accountant's ``get_optimizer_hook_fn(q)``) runs once per noised step;
    ``groups`` / ``bounds``: id(parameter) -> clipping group (absent = 0) and each group's norm
    (``weighted_clipping.clip_bounds``; default: flat)."""
    check_private_module(module, optimizer)
    wrapped = prepare_module(module, grad_sample_mode=identity_grad_sample_mode(grad_sample_mode),
                             batch_first=True, loss_reduction="sum")
    wrapped.forbid_grad_accumulation()
    dp_opt = IdentityDPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                 expected_identities=expected_identities, generator=generator, groups=groups,
                                 bounds=bounds)
    if step_hook is not None:
        dp_opt.attach_step_hook(step_hook)
    return wrapped, dp_opt


def group_privacy(epsilon: float, delta: float, k: int) -> tuple[float, float]:
    """(k epsilon, k e^{(k-1) epsilon} delta): what (epsilon, delta)-DP for one record gives a group
    of k records (Dwork and Roth, Theorem 2.2 and its approximate-DP form); delta capped at 1."""
    if k < 1:
        raise ValueError(f"group privacy needs k >= 1, got {k}")
    exponent = (k - 1) * epsilon
    group_delta = 1.0 if exponent > 700 else min(1.0, k * math.exp(exponent) * delta)
    return k * epsilon, group_delta
