"""Loss weights under DP-SGD: each unit's gradient is clipped first, then weighted.

A weight that multiplies the loss before clipping is undone by clipping whenever a gradient is
larger than the norm C (up-weighted samples of a minority cell have gradient norms in the tens to
hundreds at C = 1): reweighting for fairness then changes nothing. Here each unit's (sample's or
identity's) clipped gradient is multiplied by its weight w in [0, 1] instead, so its contribution
has norm <= w C <= C and the sensitivity, and with it the accountant's epsilon, is unchanged. The
weights must not depend on the other units' data (``common.train.fairness.weights_from_counts``
divided by ``weight_bound``). Every engine of ``common.train.loop`` applies the same rule: the
book-keeping and identity paths in their own clipping, Opacus' per-sample modes through
``weight_clipped_grad_samples`` and ghost clipping through ``weighted_ghost_backward``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizerFastGradientClipping


def check_unit_weights(weights: torch.Tensor) -> None:
    """Refuse weights outside [0, 1]: they would raise a unit's contribution above the clipping norm."""
    if len(weights) and not (float(weights.min()) >= 0.0 and float(weights.max()) <= 1.0):
        raise ValueError(f"under DP-SGD sample weights scale the clipped gradients and must lie in [0, 1]; "
                         f"got [{float(weights.min()):.4g}, {float(weights.max()):.4g}] (divide by "
                         "common.train.fairness.weight_bound)")


def unit_weights(weights: torch.Tensor, inverse: torch.Tensor, count: int) -> torch.Tensor:
    """Each unit's weight: the mean weight of its samples in the batch (``inverse[i]``: the unit of
    sample i). A unit of one sample keeps its sample's weight."""
    w = weights.to(torch.float64).reshape(-1)
    sums = torch.zeros(count, dtype=torch.float64, device=w.device).index_add_(0, inverse, w)
    sizes = torch.zeros(count, dtype=torch.float64, device=w.device).index_add_(0, inverse, torch.ones_like(w))
    return sums / sizes.clamp(min=1.0)


def joint_norms(per_unit: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each unit's gradient norm over all parameters jointly (one tensor (units, *shape) per parameter)."""
    n = len(per_unit[0])
    return torch.stack([g.reshape(n, -1).norm(2, dim=-1) for g in per_unit], dim=1).norm(2, dim=1)


def clip_factor(norms: torch.Tensor, max_grad_norm: float, weights: torch.Tensor | None = None,
                inverse: torch.Tensor | None = None) -> torch.Tensor:
    """Opacus' flat-clipping factor min(1, C / (norm + 1e-6)) per unit, times the unit's weight when
    ``weights`` (one per sample, in [0, 1]) are given: what every engine multiplies each unit's
    gradient by. ``inverse[i]``: the unit of sample i (None: each sample is its own unit)."""
    factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    if weights is None:
        return factor
    weights = weights.to(norms.device)
    return factor * (weights if inverse is None else unit_weights(weights, inverse, len(norms))).to(factor.dtype)


def clip_bounds(max_grad_norm: float, head_share: float) -> tuple[float, ...]:
    """The clipping norm of each parameter group: (C,) for flat clipping over every parameter; with
    ``head_share`` s > 0, (C sqrt(1 - s), C sqrt(s)) for the shared parameters and the private
    identity head, clipped apart (per-layer clipping, McMahan et al. 2018, "Learning differentially
    private recurrent language models"). A unit's clipped gradient then has joint norm at most C,
    so the sensitivity, the noise and the accountant's epsilon are those of flat clipping.

    Why: a freshly initialised cosine head's per-sample gradient is ~60x the backbone's (norms
    ~560 vs ~9 on the demo), so flat clipping leaves the shared parameters ~2% of C, below the
    noise; split, they get C sqrt(1 - s) of their own."""
    if not 0.0 <= head_share < 1.0:
        raise ValueError(f"dp.head_clip_share: expected a value in [0, 1), got {head_share}")
    if head_share == 0.0:
        return (max_grad_norm,)
    return max_grad_norm * math.sqrt(1.0 - head_share), max_grad_norm * math.sqrt(head_share)


def group_factors(per_unit: Sequence[torch.Tensor], groups: Sequence[int], bounds: Sequence[float],
                  weights: torch.Tensor | None = None, inverse: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The clipping factor of every unit for each tensor of ``per_unit`` (one (units, ...) tensor per
    parameter, ``groups[k]`` its group): ``clip_factor`` of the unit's joint norm within the
    group against the group's bound; with one bound, exactly flat clipping (``joint_norms``)."""
    if len(bounds) == 1:
        return [clip_factor(joint_norms(per_unit), bounds[0], weights, inverse)] * len(per_unit)
    n = len(per_unit[0])
    squared = torch.zeros(len(bounds), n, dtype=torch.float64, device=per_unit[0].device)
    for g, t in zip(groups, per_unit, strict=True):
        squared[g] += t.reshape(n, -1).double().pow(2).sum(dim=1)
    factors = [clip_factor(squared[g].sqrt().to(per_unit[0].dtype), b, weights, inverse) for g, b in enumerate(bounds)]
    return [factors[g] for g in groups]


@torch.no_grad()
def weight_clipped_grad_samples(params: Sequence[torch.nn.Parameter], weights: torch.Tensor,
                                bounds: Sequence[float], groups: Mapping[int, int] | None = None) -> None:
    """Clip each sample's gradient (``p.grad_sample``) to its group's bound (``groups``: id(parameter)
    -> group, absent = 0; ``group_factors``; one bound: jointly over ``params`` with Opacus' factor
    min(1, C / (norm + 1e-6))) and multiply
    it by its weight, in place. Opacus' own clipping in the following ``step()`` then finds every
    norm <= C and leaves the gradients as they are (up to its 1e-6 guard)."""
    held = [p for p in params if getattr(p, "grad_sample", None) is not None]
    if not held or len(held[0].grad_sample) == 0:
        return
    group_of = groups or {}
    factors = group_factors([p.grad_sample for p in held], [group_of.get(id(p), 0) for p in held], bounds, weights)
    for p, factor in zip(held, factors, strict=True):
        p.grad_sample = p.grad_sample * factor.reshape(-1, *([1] * (p.grad_sample.dim() - 1)))


def weighted_ghost_backward(module: GradSampleModuleFastGradientClipping, optimizer: DPOptimizerFastGradientClipping,
                            per_sample_loss: torch.Tensor, weights: torch.Tensor) -> None:
    """Ghost clipping's two backward passes with the clipping coefficients weighted: the first pass
    gives the per-sample norms, the second back-propagates sum_i coef_i w_i loss_i. This is what
    Opacus' ``DPTensorFastGradientClipping.backward`` does with w = 1; it has no way to weight the
    coefficients."""
    per_sample_loss.mean().backward(retain_graph=True)
    optimizer.zero_grad()
    coef = module.get_clipping_coef().to(per_sample_loss.device) * weights.to(per_sample_loss.dtype)
    module.disable_hooks()
    try:
        (coef * per_sample_loss).sum().backward()
    finally:
        module.enable_hooks()
