"""Book-keeping DP-SGD (``dp.grad_sample_mode = bk``): clipped, summed gradients from one backward pass.

Bu, Wang, Zha and Karypis, "Differentially Private Optimization on Large Model at Small Cost"
(ICML 2023) — book-keeping; Bu, Mao and Xu, "Scalable and Efficient Training of Large
Convolutional Neural Networks with Differential Privacy" (NeurIPS 2022) — mixed ghost clipping.

Why: Opacus' ghost clipping runs the backward pass twice (norms first, then the loss reweighted
by the clipping factors); its hooks mode lets autograd compute weight gradients it never uses and
instantiates every layer's per-sample gradient, the embedding layer's included. Here:

1. The forward pass runs with the trainable parameters detached from autograd (the first
   layer's output starts the graph), so the one backward pass computes gradients w.r.t.
   activations only; hooks book-keep each layer's input (activation a) and output gradient
   (backprop g) of the summed per-sample loss.
2. From (a, g), each layer contributes its per-unit squared gradient norms, by the cheaper of
   (Bu et al. 2022): the instantiated per-sample gradient (Opacus' own grad sampler for the layer
   type: unfolded convolutions, GroupNorm, ...), or the ghost norm, <grad_i, grad_j> =
   sum_{t,s} <a_it, a_js> <g_it, g_js> over the T output positions, which never forms the
   p x D gradient. Both ways pay one T p D product (the per-sample gradients, or the clipped
   sum's product below), so the choice weighs what differs: the ghost norm's two T x T Grams,
   T^2 (D + p) multiply-adds per pair, against writing and reading the p x D per-sample gradient,
   ``MOVE_COST`` p D (``ghost_cheaper``). Bu et al. (2022) weigh 2 T^2 against p D, memory
   alone; on this machine the two rules differ on the middle stage (T = 64), where
   instantiating is the faster. Pairs: the batch for samples, the same-identity pairs for
   identities.
3. The norms over all layers give each unit's clipping factor c_u = min(1, C / (norm + 1e-6))
   (Opacus' flat clipping); the clipped sum is, per layer, sum_i c_u(i) grad_i: a weighted sum
   of the instantiated gradients, or one product of the c-weighted backprops with the
   activations for ghost layers. It is written to ``p.grad``; noise, scaling and the accountant
   are Opacus' (``DPOptimizerFastGradientClipping``, ``make_private_book_keeping``).

A unit is one sample (``dp.unit = sample``) or one identity (``dp.unit = identity``: each
identity's per-sample gradients are summed before the norm, ``clip_and_sum(units=...)``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.utils.tensor_utils import unfold2d
from opacus.validators import ModuleValidator
from torch import nn

from common.nn.heads import CosineClassifier
from common.train.layer_samplers import cosine_pair_products, cosine_parts, cosine_weighted_gradient
from common.train.weighted_clipping import clip_factor

GRAD_SAMPLE_MODES: tuple[str, ...] = ("bk", "ghost", "hooks", "functorch")
"""``dp.grad_sample_mode``: this module's book-keeping, or one of Opacus' modes."""

INSTANTIATE_BUDGET = 2**24
"""Floats of one layer's per-sample gradients (64 MB) above which the ghost norm is taken when
its Grams are smaller."""

UNFOLD_BUDGET = 2**25
"""Floats of unfolded convolution input held at once (128 MB)."""

GHOST_TYPES = (nn.Linear, nn.Conv2d)
"""Layer types with a ghost norm here; every other type instantiates through Opacus' grad sampler."""


@dataclass
class _Record:
    """What one layer saw in this step's forward and backward pass."""

    activation: torch.Tensor
    backprop: torch.Tensor | None = None


def _positions(layer: nn.Module, activation: torch.Tensor, backprop: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(a: (B, T, D), g: (B, T, p)) with T output positions: a Linear's middle dimensions, or a
    convolution's output pixels with a its unfolded input patches."""
    n = activation.shape[0]
    if isinstance(layer, nn.Conv2d):
        unfolded = unfold2d(activation, kernel_size=layer.kernel_size, padding=layer.padding,
                            stride=layer.stride, dilation=layer.dilation)  # (B, D, T)
        return unfolded.transpose(1, 2), backprop.reshape(n, backprop.shape[1], -1).transpose(1, 2)
    return activation.reshape(n, -1, activation.shape[-1]), backprop.reshape(n, -1, backprop.shape[-1])


def conv_grad_sample(layer: nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor
                     ) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a Conv2d (groups = 1), as Opacus' grad sampler computes them
    (unfolded input patches times backprops) with the product taken as (D x T)(T x p), which is
    30-45% faster on the early, large-map convolutions than Opacus' (p x T)(T x D) einsum here.
    The input is unfolded ``UNFOLD_BUDGET`` floats at a time (an IResNet's first blocks at 112 px
    unfold to 7 M floats per image)."""
    a, n = activations[0].to(backprops.dtype), len(backprops)
    g = backprops.reshape(n, layer.out_channels, -1)
    grads = {}
    if layer.weight.requires_grad:
        per_image = layer.weight[0].numel() * g.shape[2]
        step = max(1, UNFOLD_BUDGET // per_image)
        out = g.new_empty((n, layer.weight[0].numel(), layer.out_channels))  # (B, D, p)
        for start in range(0, n, step):
            part = slice(start, start + step)
            unfolded = unfold2d(a[part], kernel_size=layer.kernel_size, padding=layer.padding, stride=layer.stride,
                                dilation=layer.dilation)  # (b, D, T)
            torch.bmm(unfolded, g[part].transpose(1, 2), out=out[part])
        grads[layer.weight] = out.transpose(1, 2).view(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        grads[layer.bias] = g.sum(2)
    return grads


def _weighted_sum(coef: torch.Tensor, per_unit: torch.Tensor) -> torch.Tensor:
    """sum_u coef_u per_unit[u] as one matrix-vector product over the tensor's memory order (a
    grad sampler may return a transposed view; reading it in memory order is ~6x faster here)."""
    order = sorted(range(1, per_unit.dim()), key=lambda d: -per_unit.stride(d))
    in_memory = per_unit.permute(0, *order)
    if not in_memory.is_contiguous():
        return torch.tensordot(coef, per_unit, dims=1)
    summed = (coef @ in_memory.reshape(len(per_unit), -1)).view(in_memory.shape[1:])
    return summed.permute(*sorted(range(len(order)), key=lambda i: order[i]))


MOVE_COST = 16
"""Multiply-adds of a dense product that take as long as moving one float through memory on the
bench machine (GEMM ~50 G multiply-adds/s against ~3 G floats/s read or written by the
per-sample gradients' norm, weighted sum and allocation): the exchange rate of ``ghost_cheaper``."""


def ghost_cheaper(layer: nn.Module, backprop: torch.Tensor, pairs: int) -> bool:
    """Whether the ghost norm's Grams, T^2 (D + p) multiply-adds per pair, cost less than the
    instantiated per-sample gradient's memory, ``MOVE_COST`` p D per sample; and, whatever the
    time, whether the layer's per-sample gradients would exceed ``INSTANTIATE_BUDGET`` floats
    where the Grams would not (they are kept until every layer's norm is known)."""
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or isinstance(layer.padding, str):
            return False
        positions = backprop[0].numel() // layer.out_channels
        p, d = layer.out_channels, layer.weight[0].numel()
    elif isinstance(layer, nn.Linear):
        positions = backprop[0].numel() // layer.out_features
        p, d = layer.out_features, layer.in_features
    else:
        return False
    instantiated, grams = p * d * len(backprop), positions**2 * pairs
    if instantiated > INSTANTIATE_BUDGET and grams < instantiated:  # memory first: a deep IResNet at batch 64
        return True
    return grams * (d + p) < MOVE_COST * instantiated


class BookKeepingModule(nn.Module):
    """``module`` with book-keeping hooks on every layer that holds trainable parameters.

    Use: ``out = bk(x)``; ``loss_per_sample.sum().backward()``; ``bk.clip_and_sum(C, units)``
    writes the clipped sum of per-unit gradients into each trainable parameter's ``.grad``.
    Parameters frozen (``requires_grad = False``) when it is built stay frozen and untouched.
    """

    def __init__(self, module: nn.Module, groups: Mapping[int, int] | None = None) -> None:
        """``groups``: id(parameter) -> its clipping group (``weighted_clipping.clip_bounds``); a
        layer's parameters share one group; default: every parameter in group 0."""
        super().__init__()
        self._module = module
        self.trainable = [p for p in module.parameters() if p.requires_grad]
        group_of = groups or {}
        self._layer_group: dict[nn.Module, int] = {}
        self.layers: dict[nn.Module, str] = {}
        samplers = GradSampleModule.GRAD_SAMPLERS
        for name, layer in module.named_modules():
            own = [p for p in layer.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if not isinstance(layer, (*GHOST_TYPES, CosineClassifier)) and type(layer) not in samplers:
                raise ValueError(f"dp.grad_sample_mode = bk: no per-sample gradient rule for layer {name!r} "
                                 f"({type(layer).__name__}); register an Opacus grad sampler for it or use "
                                 f"grad_sample_mode = hooks")
            self.layers[layer] = name
            layer_groups = {group_of.get(id(p), 0) for p in own}
            if len(layer_groups) > 1:
                raise ValueError(f"dp.head_clip_share: layer {name!r} has parameters in two clipping groups")
            self._layer_group[layer] = layer_groups.pop()
        self._records: dict[nn.Module, _Record] = {}
        self._recording = False
        self._handles = [layer.register_forward_hook(self._capture) for layer in self.layers]

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self._module(x, *args, **kwargs)
        self._records.clear()
        self._recording = True
        for p in self.trainable:
            p.requires_grad_(False)
        try:  # autograd then computes activation gradients only (from the first layer's output on)
            return self._module(x, *args, **kwargs)
        finally:
            self._recording = False
            for p in self.trainable:
                p.requires_grad_(True)

    def _capture(self, layer: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not self._recording:  # the wrapped module called on its own: a plain forward pass
            return None
        if not output.requires_grad:  # nothing before this layer needs a gradient: the graph starts here
            output = output.detach().requires_grad_(True)
        if layer in self._records:
            raise RuntimeError(f"dp.grad_sample_mode = bk: layer {self.layers[layer]!r} ran twice in one "
                               "forward pass (shared parameters are not supported)")
        record = _Record(inputs[0].detach())
        self._records[layer] = record

        def keep(grad: torch.Tensor) -> None:
            record.backprop = grad.detach()
        output.register_hook(keep)
        return output

    @torch.no_grad()
    def clip_and_sum(self, max_grad_norm: float | Sequence[float], units: torch.Tensor | None = None,
                     weights: torch.Tensor | None = None) -> torch.Tensor:
        """Clip each unit's gradient (over all trainable parameters jointly) to ``max_grad_norm``,
        or, given one bound per clipping group (``weighted_clipping.clip_bounds``), within each
        group to its bound; sum, and store the sum in ``p.grad``; return the norms before clipping
        (over all parameters), one per unit.

        Args:
            units: a code per sample of the batch (e.g. its identity); None: each sample is a unit.
                Units are ordered by sorted code.
            weights: a weight in [0, 1] per sample; each unit's clipped gradient is multiplied by
                the mean weight of its samples (``common.train.weighted_clipping``).
        """
        records = [(layer, r) for layer, r in self._records.items() if r.backprop is not None]
        self._records.clear()
        for p in self.trainable:
            p.grad = torch.zeros_like(p)
        if not records:  # nobody was drawn (Poisson sampling): a zero sum, to be noised
            return torch.zeros(0)
        n, device = records[0][1].activation.shape[0], records[0][1].activation.device
        if units is None:
            inverse = torch.arange(n, device=device)
        else:
            inverse = torch.unique(torch.as_tensor(units, device=device).reshape(-1), sorted=True,
                                   return_inverse=True)[1]
        count = int(inverse.max()) + 1
        left, right = (inverse[:, None] == inverse[None, :]).nonzero(as_tuple=True)
        bounds = (max_grad_norm,) if isinstance(max_grad_norm, (int, float)) else tuple(max_grad_norm)
        squared = torch.zeros(len(bounds), count, dtype=torch.float64, device=device)
        finishers: list[tuple[int, Callable[[torch.Tensor], None]]] = []
        for layer, r in records:
            part, finish = self._layer_rule(layer, r.activation, r.backprop, inverse, count, left, right)
            group = self._layer_group[layer] if len(bounds) > 1 else 0
            squared[group] += part.double()
            finishers.append((group, finish))
        coefs = [clip_factor(sq.clamp(min=0).sqrt(), bound, weights, inverse) for sq, bound in zip(squared, bounds)]
        for group, finish in finishers:
            finish(coefs[group])
        return squared.sum(dim=0).clamp(min=0).sqrt()

    def _layer_rule(self, layer: nn.Module, a: torch.Tensor, g: torch.Tensor, inverse: torch.Tensor,
                    count: int, left: torch.Tensor, right: torch.Tensor
                    ) -> tuple[torch.Tensor, Callable[[torch.Tensor], None]]:
        """(per-unit squared norm of the layer's gradient, a function that adds the clipped sum
        given the per-unit clipping factors to the layer's ``.grad``)."""
        if isinstance(layer, CosineClassifier):
            parts = cosine_parts(layer, a, g)
            pair = cosine_pair_products(parts, left, right)

            def finish_cosine(coef: torch.Tensor) -> None:
                layer.weight.grad += cosine_weighted_gradient(parts, coef[inverse].to(g.dtype))
            return pair.new_zeros(count).index_add_(0, inverse[left], pair), finish_cosine
        if isinstance(layer, GHOST_TYPES) and ghost_cheaper(layer, g, len(left)):
            return self._ghost(layer, a, g, inverse, count, left, right)
        sampler = conv_grad_sample if type(layer) is nn.Conv2d and layer.groups == 1 else \
            GradSampleModule.GRAD_SAMPLERS[type(layer)]
        grads = sampler(layer, [a], g)
        if count < len(inverse):
            grads = {p: s.new_zeros((count, *s.shape[1:])).index_add_(0, inverse, s) for p, s in grads.items()}
        squared = sum(torch.linalg.vector_norm(s, dim=tuple(range(1, s.dim()))) ** 2 for s in grads.values())

        def finish_instantiated(coef: torch.Tensor) -> None:
            for p, s in grads.items():
                p.grad += _weighted_sum(coef.to(s.dtype), s)
        return squared, finish_instantiated

    @staticmethod
    def _ghost(layer: nn.Module, a: torch.Tensor, g: torch.Tensor, inverse: torch.Tensor, count: int,
               left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], None]]:
        a = a.to(g.dtype)
        pos_a, pos_g = _positions(layer, a, g)
        diagonal = len(left) == len(inverse)  # every unit one sample: pairs (i, i), no gather needed
        a_l, a_r = (pos_a, pos_a) if diagonal else (pos_a[left], pos_a[right])
        g_l, g_r = (pos_g, pos_g) if diagonal else (pos_g[left], pos_g[right])
        if pos_a.shape[1] == 1:
            grams_g = (g_l[:, 0] * g_r[:, 0]).sum(1)
            pair = (a_l[:, 0] * a_r[:, 0]).sum(1) * grams_g
        else:
            grams_g_full = torch.bmm(g_l, g_r.transpose(1, 2))
            pair = (torch.bmm(a_l, a_r.transpose(1, 2)) * grams_g_full).sum((1, 2))
            grams_g = grams_g_full.sum((1, 2))
        if layer.bias is not None and layer.bias.requires_grad:
            pair = pair + grams_g
        squared = pair.new_zeros(count).index_add_(0, inverse[left], pair)

        def finish_ghost(coef: torch.Tensor) -> None:
            weighted = g * coef[inverse].to(g.dtype).reshape(-1, *([1] * (g.dim() - 1)))
            if isinstance(layer, nn.Conv2d):  # the layer's own weight-gradient kernel, on reweighted backprops
                layer.weight.grad += torch.ops.aten.convolution_backward(
                    weighted, a, layer.weight, None, layer.stride, layer.padding, layer.dilation,
                    False, [0, 0], layer.groups, [False, True, False])[1]
                reduce = (0, 2, 3)
            else:
                flat_g, flat_a = weighted.reshape(-1, weighted.shape[-1]), a.reshape(-1, a.shape[-1])
                layer.weight.grad += flat_g.T @ flat_a
                reduce = tuple(range(g.dim() - 1))
            if layer.bias is not None and layer.bias.requires_grad:
                layer.bias.grad += weighted.sum(reduce)
        return squared, finish_ghost

    def _close(self) -> None:
        """Remove the hooks (Opacus' GradSampleModule name, so the training loop closes either)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._records.clear()


def check_private_module(module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """What Opacus' ``PrivacyEngine.make_private`` checks before wrapping: layers DP-SGD can train
    (no BatchNorm), and an optimiser over the module's own parameters."""
    ModuleValidator.validate(module, strict=True)
    params = {id(p) for p in module.parameters()}
    if any(id(p) not in params for group in optimizer.param_groups for p in group["params"]):
        raise ValueError("DP-SGD: the optimiser holds parameters the module does not")


def make_private_book_keeping(module: nn.Module, optimizer: torch.optim.Optimizer, *, noise_multiplier: float,
                              max_grad_norm: float, expected_batch_size: float,
                              generator: torch.Generator | None,
                              step_hook: Callable[[DPOptimizerFastGradientClipping], None] | None = None,
                              groups: Mapping[int, int] | None = None,
                              ) -> tuple[BookKeepingModule, DPOptimizerFastGradientClipping]:
    """``module`` wrapped for book-keeping and ``optimizer`` wrapped by Opacus to add N(0, sigma^2 C^2)
    once per step to the clipped sum in ``p.grad`` and divide by ``expected_batch_size`` (expected
    samples, or expected identities, per step); ``step_hook`` (the accountant's) runs per step;
    ``groups``: the parameters' clipping groups (``BookKeepingModule``)."""
    check_private_module(module, optimizer)
    dp_opt = DPOptimizerFastGradientClipping(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                             expected_batch_size=expected_batch_size, loss_reduction="mean",
                                             generator=generator, secure_mode=False)
    if step_hook is not None:
        dp_opt.attach_step_hook(step_hook)
    return BookKeepingModule(module, groups), dp_opt
