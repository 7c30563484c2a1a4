"""Per-sample gradients of the project's layers Opacus has no sampler for, registered with Opacus.

Without one Opacus falls back to functorch (a vmap of the layer per batch: slow), and the
book-keeping mode (``common.train.book_keeping``) refuses the layer. Importing this module
registers them for Opacus' hooks and ghost modes, and so for book-keeping too.

PReLU (the IResNet's activation, ``common.nn.iresnet``): y = max(0, x) + a min(0, x), so the
gradient of sample i w.r.t. a channel's slope is the sum over that channel's positions of
g min(0, x); one slope shared by all channels sums over everything.

``CosineClassifier`` computes cos_ic = <e_i, w_c> / |W_c| with e_i = x_i / |x_i|: a custom module,
for which Opacus would otherwise fall back to functorch (slow, and per sample a full vmap of the
head). With g_ic = dL_i/dcos_ic and w_c = W_c / |W_c|, the gradient of sample i w.r.t. row c is

    dL_i/dW_c = g_ic (e_i - cos_ic w_c) / |W_c|

(the derivative of a normalised row), so two samples' gradients have the inner product

    <dL_i/dW, dL_j/dW> = sum_c g_ic g_jc (<e_i, e_j> - cos_ic cos_jc) / |W_c|^2,

which gives every per-sample (or per-identity) norm in O(B K) per pair without instantiating the
B x K x d per-sample gradients (a "ghost norm" for this layer). Importing this module registers
the grad sampler (Opacus' hooks mode) and the norm sampler (Opacus' ghost clipping); the
book-keeping mode (``common.train.book_keeping``) uses ``cosine_pair_products`` and
``cosine_weighted_gradient``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from opacus.grad_sample.utils import register_grad_sampler, register_norm_sampler
from torch import nn

from common.nn.heads import CosineClassifier


class CosineParts(NamedTuple):
    """What every per-sample quantity of the head is made of, computed as the forward pass does
    (F.normalize's eps included): e (B, d) normalised embeddings, w (K, d) normalised rows,
    row_norm (K,) |W_c|, cos (B, K), and g (B, K) the backprops over |W_c|."""

    e: torch.Tensor
    w: torch.Tensor
    row_norm: torch.Tensor
    cos: torch.Tensor
    g: torch.Tensor


def cosine_parts(layer: CosineClassifier, activation: torch.Tensor, backprop: torch.Tensor) -> CosineParts:
    weight = layer.weight.detach()
    row_norm = weight.norm(dim=1).clamp(min=1e-12)
    e, w = F.normalize(activation.to(weight.dtype), dim=1), weight / row_norm[:, None]
    return CosineParts(e, w, row_norm, e @ w.T, backprop.to(weight.dtype) / row_norm)


def cosine_pair_products(parts: CosineParts, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """<dL_i/dW, dL_j/dW> for each pair (i, j) = (left[k], right[k]); shape (pairs,)."""
    e, _, _, cos, g = parts
    ee = (e[left] * e[right]).sum(1, keepdim=True)
    return (g[left] * g[right] * (ee - cos[left] * cos[right])).sum(1)


def cosine_weighted_gradient(parts: CosineParts, coef: torch.Tensor) -> torch.Tensor:
    """sum_i coef_i dL_i/dW, with one (K, B) x (B, d) product."""
    summed = (parts.g * coef[:, None]).T @ parts.e  # d/dw_c of the weighted loss over |W_c|, (K, d)
    return summed - (summed * parts.w).sum(1, keepdim=True) * parts.w


@register_grad_sampler(nn.PReLU)
def prelu_grad_sample(layer: nn.PReLU, activations: list[torch.Tensor],
                      backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients (B, num_parameters) of a PReLU's slopes."""
    if not layer.weight.requires_grad:
        return {}
    product = backprops * activations[0].to(backprops.dtype).clamp(max=0)
    if layer.num_parameters == 1:
        return {layer.weight: product.reshape(len(product), -1).sum(1, keepdim=True)}
    return {layer.weight: product.reshape(*product.shape[:2], -1).sum(2)}


@register_grad_sampler(CosineClassifier)
def cosine_grad_sample(layer: CosineClassifier, activations: list[torch.Tensor],
                       backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients (B, K, d) of the head's weight."""
    if not layer.weight.requires_grad:
        return {}
    e, w, _, cos, g = cosine_parts(layer, activations[0], backprops)
    return {layer.weight: g[:, :, None] * (e[:, None, :] - cos[:, :, None] * w[None])}


@register_norm_sampler(CosineClassifier)
def cosine_norm_sample(layer: CosineClassifier, activations: list[torch.Tensor],
                       backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient norms (B,) of the head's weight, without the per-sample gradients."""
    if not layer.weight.requires_grad:
        return {}
    every = torch.arange(len(backprops), device=backprops.device)
    squared = cosine_pair_products(cosine_parts(layer, activations[0], backprops), every, every)
    return {layer.weight: squared.clamp(min=0).sqrt()}
