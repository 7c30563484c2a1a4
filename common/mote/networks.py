"""MOTE model templates: one small verification network per enrolled identity, trained in batches.

Groß, Heindorf & Terhörst, "A Responsible Face Recognition Approach for Small and Mid-Scale Systems
Through Personalized Neural Networks" (MOTE) replace a stored embedding by a binary classifier
that answers "is this probe embedding identity i?". Each classifier is trained on the identity's
reference embedding(s), synthetic genuine samples drawn around it from gender KDEs
(``mote_kde``), and impostor embeddings of other people.

Enrolling identities one network at a time wastes a CPU on tiny matrix products, so k identities
are trained together: every weight is stacked along a leading identity axis and every layer is one
batched matrix product. Nothing couples the identities: each has its own initialisation, batch
sampling, dropout and DP-noise stream (a ``torch.Generator`` seeded from (seed, identity id)), Adam
is element-wise, and the learning-rate schedule depends only on the step. Training {a, b, c}
together therefore gives the same networks as training each alone: bit for bit on this stack, as
kernels whose result depends on k are avoided (see ``_logits`` and ``StackedAdam``); the tests
allow 1e-5. An identity whose validation loss stopped improving drops out of the stack with its
best-validation weights, so the remaining ones train faster.

Under DP (``mote.dp_target_epsilon`` or ``mote.dp_noise_multiplier``) the identities of a gallery
are not independent any more: one impostor record trains every model of the stack, so the stack is
trained as one DP-SGD mechanism (``common.mote.private``). This module supplies the pieces both
paths share: the hand-written backward pass (``backprop``), per-row gradient norms and Gram
matrices, and the training loop with early stopping (``fit``).

Device. ``fit`` trains on a torch device (``train.device``, ``common.train.device``). Every random
draw (initialisation, batches, dropout) comes from a CPU generator and is moved there, so that an
identity's streams stay those of its CPU generators; the result comes back on the CPU.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from common.config import MoteConfig
from common.mote.kde import (
    EnrollmentSet,
)
from common.train import threads

log = logging.getLogger(__name__)

PARAM_NAMES = ("w1", "b1", "w2", "b2", "w3", "b3")
_SEED_TAG = 0x4D07E  # separates MOTE's per-identity streams from other uses of the same seed
_ADAM_BETA2 = 0.999


HIDDEN: tuple[int, int] = (128, 64)
"""Hidden layer widths of every per-identity network (the MOTE paper's)."""


def steps_per_epoch(settings: MoteConfig) -> int:
    """Balanced batches per epoch: as many as the nominal training set (synthetic genuine +
    impostors, minus the validation share) fills. It depends on the settings only, so every
    identity in a stack follows the same learning-rate schedule."""
    nominal = (settings.synthetic + settings.impostors + settings.synthetic_impostors) * (1 - settings.val_fraction)
    return max(1, math.ceil(nominal / settings.batch_size))


def parameter_count(dim: int) -> int:
    """Parameters of one model template for ``dim``-dimensional embeddings (74,049 at d = 512)."""
    h1, h2 = HIDDEN
    return dim * h1 + h1 + h1 * h2 + h2 + h2 + 1


def param_shapes(dim: int) -> dict[str, tuple[int, ...]]:
    """Per-identity shapes; weights are stored (in, out) so that a layer is ``x @ w + b``."""
    h1, h2 = HIDDEN
    return {"w1": (dim, h1), "b1": (h1,), "w2": (h1, h2), "b2": (h2,), "w3": (h2,), "b3": ()}


def _torch_generator(seq: np.random.SeedSequence) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(int(seq.generate_state(1, np.uint64)[0]))
    return gen


def identity_streams(seed: int, ident: int) -> tuple[np.random.Generator, torch.Generator, torch.Generator]:
    """(data rng, init generator, training generator) of one identity: depend on (seed, id) only."""
    if int(ident) < 0:
        raise ValueError(f"identity ids must be non-negative integers (they seed the identity's streams), got {ident}")
    data, init, train = np.random.SeedSequence([int(seed), _SEED_TAG, int(ident)]).spawn(3)
    return np.random.default_rng(data), _torch_generator(init), _torch_generator(train)


def public_stream(seed: int, balancing_factors: np.ndarray) -> torch.Generator:
    """The generator of a private gallery's public draws (genuine and public rows, dropout): from
    the run seed and the gallery's factors, as these draws protect nothing."""
    factors = [round(float(f) * 1e6) for f in np.asarray(balancing_factors).ravel()]
    return _torch_generator(np.random.SeedSequence([int(seed), _SEED_TAG, 0x9B, *factors]))


def _init_params(gen: torch.Generator, dim: int) -> torch.Tensor:
    """Flat (P,) parameters with ``nn.Linear``'s default init: U(+-1/sqrt(fan_in)) for weight and bias."""
    h1, h2 = HIDDEN
    fan_in = {"w1": dim, "b1": dim, "w2": h1, "b2": h1, "w3": h2, "b3": h2}
    return torch.cat([(torch.rand(math.prod(shape), generator=gen) * 2 - 1) / math.sqrt(fan_in[name])
                      for name, shape in param_shapes(dim).items()])


def _logits(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Stacked forward pass without dropout: x (k, n, d) -> logits (k, n).

    The output layer is a product-and-sum, not a batched matrix-vector product: torch picks a
    different kernel for a single matrix-vector product than for a batch of them, and training
    alone must reproduce training in a batch.
    """
    a1 = torch.baddbmm(p["b1"].unsqueeze(1), x, p["w1"]).clamp_min_(0)
    a2 = torch.baddbmm(p["b2"].unsqueeze(1), a1, p["w2"]).clamp_min_(0)
    return (a2 * p["w3"].unsqueeze(1)).sum(-1) + p["b3"].unsqueeze(1)


def _positive(z: torch.Tensor) -> torch.Tensor:
    """1.0 where z > 0, else 0.0, written straight into a float tensor (bool-to-float is slow on CPU)."""
    return torch.gt(z, 0, out=torch.empty_like(z))


@dataclass(frozen=True)
class Backprop:
    """Activations and errors of one stacked forward and backward pass of the per-row BCE loss.

    A row's gradient of a layer is outer(layer input, error) (plus the error for the bias), so
    everything DP-SGD needs, each row's gradient norm, the inner products of two rows' gradients
    and any weighted sum of them, follows from these tensors without materialising a per-row
    gradient (the trick behind ghost clipping). Shapes: x (k, n, d), a1/d1 (k, n, h1), a2/d2
    (k, n, h2), d3 (k, n).
    """

    x: torch.Tensor
    a1: torch.Tensor
    a2: torch.Tensor
    d1: torch.Tensor
    d2: torch.Tensor
    d3: torch.Tensor

    def rows(self, index: slice) -> Backprop:
        """The same pass restricted to the rows ``index`` of every model."""
        return Backprop(*(t[:, index] for t in (self.x, self.a1, self.a2, self.d1, self.d2, self.d3)))

    def sq_norms(self) -> torch.Tensor:
        """(k, n): squared norm of each row's gradient, |input|^2 |error|^2 summed over layers."""
        def sq(t: torch.Tensor) -> torch.Tensor:
            return t.square().sum(-1)

        return (sq(self.x) + 1) * sq(self.d1) + (sq(self.a1) + 1) * sq(self.d2) + (sq(self.a2) + 1) * self.d3.square()

    def gram(self) -> torch.Tensor:
        """(k, n, n): inner product of rows r's and s's gradients of each model (diagonal = ``sq_norms``):
        <in_r (x) e_r, in_s (x) e_s> = <in_r, in_s> <e_r, e_s>, plus <e_r, e_s> for the bias."""
        def inner(t: torch.Tensor) -> torch.Tensor:
            return torch.bmm(t, t.transpose(1, 2))

        d3 = self.d3.unsqueeze(-1)
        return ((inner(self.x) + 1) * inner(self.d1) + (inner(self.a1) + 1) * inner(self.d2)
                + (inner(self.a2) + 1) * inner(d3))

    def weighted_sum(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sum over rows of weight[i, r] times row r's gradient of model i, per layer (k, ...)."""
        d3, d2, d1 = self.d3 * weight, self.d2 * weight.unsqueeze(-1), self.d1 * weight.unsqueeze(-1)
        return {"w1": torch.bmm(self.x.transpose(1, 2), d1), "b1": d1.sum(1), "w2": torch.bmm(self.a1.transpose(1, 2), d2),
                "b2": d2.sum(1), "w3": (self.a2 * d3.unsqueeze(-1)).sum(1), "b3": d3.sum(1)}


def backprop(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, m1: torch.Tensor,
             m2: torch.Tensor) -> Backprop:
    """Forward and backward pass of each row's BCE-with-logits loss, by hand.

    x (k, n, d), y (k, n) or (n,), m1/m2 scaled dropout masks (k, n, h)."""
    z1 = torch.baddbmm(p["b1"].unsqueeze(1), x, p["w1"])
    g1 = _positive(z1).mul_(m1)  # ReLU derivative times dropout mask, shared by forward and backward
    a1 = z1 * g1
    z2 = torch.baddbmm(p["b2"].unsqueeze(1), a1, p["w2"])
    g2 = _positive(z2).mul_(m2)
    a2 = z2 * g2
    z3 = (a2 * p["w3"].unsqueeze(1)).sum(-1) + p["b3"].unsqueeze(1)
    d3 = torch.sigmoid(z3) - y  # (k, n): each row's dloss/dlogit
    d2 = d3.unsqueeze(-1) * p["w3"].unsqueeze(1) * g2
    d1 = torch.bmm(d2, p["w2"].transpose(1, 2)).mul_(g1)
    return Backprop(x, a1, a2, d1, d2, d3)


def clip_factors(sq_norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """min(1, C / |g|): the factor that clips a gradient of squared norm ``sq_norms`` to norm C."""
    return (max_grad_norm / (sq_norms.sqrt() + 1e-6)).clamp(max=1.0)


def gradients(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor,
              max_grad_norm: float | None = None) -> dict[str, torch.Tensor]:
    """Gradient of each identity's mean BCE-with-logits loss over its batch (k, B rows); with
    ``max_grad_norm`` C each row's gradient is clipped to norm C before averaging."""
    bp = backprop(p, x, y, m1, m2)
    weight = torch.full_like(bp.d3, 1.0 / x.shape[1])
    if max_grad_norm is not None:
        weight = weight * clip_factors(bp.sq_norms(), max_grad_norm)
    return bp.weighted_sum(weight)


def one_cycle_schedule(lr: float, total_steps: int) -> list[tuple[float, float]]:
    """(learning rate, Adam beta1) per step of torch's OneCycleLR with its defaults (incl. beta1 cycling)."""
    dummy = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([dummy], lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps)
    out = []
    for step in range(total_steps):
        group = opt.param_groups[0]
        out.append((float(group["lr"]), float(group["betas"][0])))
        if step + 1 < total_steps:
            opt.step()  # no gradient: a no-op that keeps the scheduler's call-order check quiet
            sched.step()
    return out


class StackedAdam:
    """``torch.optim.Adam`` (fused kernel, L2 weight decay) on flat (k, P) parameters.

    Adam is element-wise, so stacking does not couple identities. The learning rate and beta1
    are set every step from the one-cycle schedule, and rows (identities that stopped early) can
    leave together with their moment estimates. Rows are zero-padded to a multiple of 64
    elements so that each identity's parameters fall on the same SIMD lanes of the fused kernel
    whatever k is: without it, training alone differs from training in a batch in the last bit.
    """

    _ALIGN = 64

    def __init__(self, params: torch.Tensor, weight_decay: float) -> None:
        self.weight_decay = weight_decay
        self._width = params.shape[1]
        self._padded = F.pad(params.detach(), (0, -self._width % self._ALIGN)).requires_grad_(True)
        self._opt = torch.optim.Adam([self._padded], weight_decay=weight_decay, fused=True)

    @property
    def padded_width(self) -> int:
        return int(self._padded.shape[1])

    @property
    def params(self) -> torch.Tensor:
        """The current (k, P) parameters (a view: updated in place by ``step``)."""
        return self._padded.detach()[:, : self._width]

    def step(self, grad: torch.Tensor, lr: float, beta1: float) -> None:
        group = self._opt.param_groups[0]
        group["lr"], group["betas"] = lr, (beta1, _ADAM_BETA2)
        if grad.shape[1] != self.padded_width:
            grad = F.pad(grad, (0, self.padded_width - self._width))
        self._padded.grad = grad
        self._opt.step()

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the rows ``keep`` (a boolean mask over the current rows)."""
        state = self._opt.state.get(self._padded, {})
        self._padded = self._padded.detach()[keep].clone().requires_grad_(True)
        self._opt = torch.optim.Adam([self._padded], weight_decay=self.weight_decay, fused=True)
        if state:
            self._opt.state[self._padded] = {"step": state["step"].clone(), "exp_avg": state["exp_avg"][keep].clone(),
                                             "exp_avg_sq": state["exp_avg_sq"][keep].clone()}


def unflatten(flat: torch.Tensor, dim: int) -> dict[str, torch.Tensor]:
    """Views of flat (k, P) parameters as the stacked tensors of each layer (PARAM_NAMES order)."""
    out, offset = {}, 0
    for name, shape in param_shapes(dim).items():
        size = math.prod(shape)
        out[name] = flat[:, offset: offset + size].view(flat.shape[0], *shape)
        offset += size
    return out


def flatten(tensors: dict[str, torch.Tensor], width: int | None = None) -> torch.Tensor:
    """The inverse of ``unflatten``: (k, P), or (k, width) zero-padded on the right."""
    flat = [tensors[n].reshape(tensors[n].shape[0], -1) for n in PARAM_NAMES]
    out = torch.zeros(flat[0].shape[0], width or sum(f.shape[1] for f in flat), device=flat[0].device)
    offset = 0
    for f in flat:
        out[:, offset: offset + f.shape[1]] = f
        offset += f.shape[1]
    return out


def _pad(arrays: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (n_i, d) arrays into (k, max n_i, d) zero-padded, with the counts n_i."""
    counts = torch.tensor([a.shape[0] for a in arrays])
    out = torch.zeros(len(arrays), int(counts.max()), arrays[0].shape[1])
    for i, a in enumerate(arrays):
        out[i, : a.shape[0]] = torch.from_numpy(a)
    return out, counts


@dataclass
class Stack:
    """Training data of the identities still in training, zero-padded along the sample axis.

    ``train`` holds each identity's genuine rows at [0, n_gen) and its impostor rows at
    [gen_width, gen_width + n_imp), so one gather builds a balanced batch.
    """

    train: torch.Tensor
    n_gen: torch.Tensor
    n_imp: torch.Tensor
    gen_val: torch.Tensor
    imp_val: torch.Tensor
    imp_val_mask: torch.Tensor
    gen_width: int

    @classmethod
    def build(cls, sets: Sequence[EnrollmentSet]) -> Stack:
        for s in sets:
            if s.genuine_val.shape[0] == 0 or s.impostor_val.shape[0] == 0:
                raise ValueError("MOTE early stopping needs genuine and impostor validation samples")
        gen, n_gen = _pad([s.genuine_train for s in sets])
        imp, n_imp = _pad([s.impostor_train for s in sets])
        gen_val, _ = _pad([s.genuine_val for s in sets])
        imp_val, n_imp_val = _pad([s.impostor_val for s in sets])
        mask = torch.arange(imp_val.shape[1]) < n_imp_val.unsqueeze(1)
        return cls(torch.cat([gen, imp], dim=1), n_gen, n_imp, gen_val, imp_val, mask, gen.shape[1])

    def _tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "gen_width"]

    def select(self, keep: torch.Tensor) -> Stack:
        return Stack(*(t[keep] for t in self._tensors()), self.gen_width)

    def to(self, device: torch.device) -> Stack:
        return Stack(*(t.to(device) for t in self._tensors()), self.gen_width)

    def batch(self, picks: torch.Tensor, n_genuine: int) -> torch.Tensor:
        """(k, B, d) rows for uniform draws (k, B): the first ``n_genuine`` genuine, the rest impostors."""
        gen = (picks[:, :n_genuine] * self.n_gen.unsqueeze(1)).long().clamp_max(self.n_gen.unsqueeze(1) - 1)
        imp = (picks[:, n_genuine:] * self.n_imp.unsqueeze(1)).long().clamp_max(self.n_imp.unsqueeze(1) - 1)
        rows = torch.arange(picks.shape[0], device=picks.device).unsqueeze(1)
        return self.train[rows, torch.cat([gen, imp + self.gen_width], dim=1)]

    def val_loss(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """Balanced validation BCE (mean of the genuine and the impostor mean), no dropout: (k,)."""
        genuine = F.softplus(-_logits(p, self.gen_val)).mean(1)  # every identity has the same count
        impostor = (F.softplus(_logits(p, self.imp_val)) * self.imp_val_mask).sum(1) / self.imp_val_mask.sum(1)
        return (genuine + impostor) / 2


def dropout_masks(drop_bytes: torch.Tensor, rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled (inverted) dropout masks of both hidden layers from uniform bytes (..., h1 + h2): a
    unit is kept iff its byte >= round(256 rate), which quantises the rate to 1/256."""
    threshold = round(rate * 256)
    mask = torch.ge(drop_bytes, threshold, out=torch.empty(drop_bytes.shape, device=drop_bytes.device))
    mask.mul_(256 / (256 - threshold))
    return mask[..., : HIDDEN[0]], mask[..., HIDDEN[0]:]


def random_bytes(gen: torch.Generator, n: int) -> torch.Tensor:
    """``n`` uniform bytes (8 per 64-bit draw, several times cheaper than uniform floats)."""
    words = torch.empty(-(-n // 8), dtype=torch.int64).random_(-(2 ** 63), 2 ** 63 - 1, generator=gen)
    return words.view(torch.uint8)[:n]


class StepSource(Protocol):
    """Where a training step's gradient comes from: each identity on its own (``IndependentSteps``)
    or the whole stack as one DP-SGD mechanism (``common.mote.private``)."""

    steps_per_epoch: int

    def grads(self, p: dict[str, torch.Tensor], data: Stack, step: int) -> torch.Tensor:
        """(k, P) gradient of the identities in ``data`` at the epoch's ``step``-th step."""
        ...

    def select(self, keep: torch.Tensor) -> None:
        """Only the identities ``keep`` (a mask over the current ones) train on."""
        ...


class IndependentSteps:
    """Each identity draws its batches and dropout from its own generator, a whole epoch at a time
    (at the epoch's first step) in a fixed order, so that its stream never depends on which
    identities share the stack; the draws then move to the stack's device."""

    def __init__(self, gens: Sequence[torch.Generator], settings: MoteConfig) -> None:
        self.gens = list(gens)
        self.settings = settings
        self.steps_per_epoch = steps_per_epoch(settings)
        half = settings.batch_size // 2
        self._y = torch.cat([torch.ones(half), torch.zeros(half)])
        self._picks = self._bytes = torch.empty(0)

    def _draw_epoch(self, device: torch.device) -> None:
        k, steps, batch, hidden = len(self.gens), self.steps_per_epoch, self.settings.batch_size, sum(HIDDEN)
        self._picks = torch.empty(k, steps, batch)
        self._bytes = torch.empty(k, steps * batch * hidden, dtype=torch.uint8)
        for i, gen in enumerate(self.gens):
            self._picks[i].uniform_(generator=gen)
            self._bytes[i] = random_bytes(gen, steps * batch * hidden)
        self._picks, self._bytes = self._picks.to(device), self._bytes.view(k, steps, batch, hidden).to(device)
        self._y = self._y.to(device)

    def grads(self, p: dict[str, torch.Tensor], data: Stack, step: int) -> torch.Tensor:
        if step == 0:
            self._draw_epoch(data.train.device)
        m1, m2 = dropout_masks(self._bytes[:, step], self.settings.dropout)
        x = data.batch(self._picks[:, step], self.settings.batch_size // 2)
        return flatten(gradients(p, x, self._y, m1, m2))

    def select(self, keep: torch.Tensor) -> None:
        self.gens = [g for g, kept in zip(self.gens, keep.tolist()) if kept]
        self._picks, self._bytes = self._picks[keep], self._bytes[keep]


@dataclass(frozen=True)
class TrainResult:
    """Best-validation weights (stacked), epochs trained and best validation loss per identity."""

    params: dict[str, torch.Tensor]
    epochs: np.ndarray
    val_loss: np.ndarray
    steps: int = 0


def fit(sets: Sequence[EnrollmentSet], init_gens: Sequence[torch.Generator], source: StepSource,
        settings: MoteConfig, device: torch.device = torch.device("cpu")) -> TrainResult:
    """Train one model template per enrollment set, all k at once, on ``device``, with the
    gradients of ``source``; Adam on a one-cycle schedule; an identity whose validation loss
    stopped improving leaves the stack with its best-validation weights (see the module
    docstring). The result is on the CPU."""
    k, dim = len(sets), sets[0].genuine_train.shape[1]
    adam = StackedAdam(torch.stack([_init_params(gen, dim) for gen in init_gens]).to(device), settings.weight_decay)
    best = adam.params.clone()
    best_loss = torch.full((k,), math.inf, device=device)
    bad = torch.zeros(k, dtype=torch.long, device=device)
    epochs = torch.zeros(k, dtype=torch.long, device=device)
    data = Stack.build(sets).to(device)
    active = torch.arange(k, device=device)
    schedule = one_cycle_schedule(settings.lr, settings.epochs * source.steps_per_epoch)
    step = 0
    for _ in range(settings.epochs):
        threads.balance()
        for s in range(source.steps_per_epoch):
            lr, beta1 = schedule[step]
            step += 1
            adam.step(source.grads(unflatten(adam.params, dim), data, s), lr, beta1)
        epochs[active] += 1
        params = adam.params
        loss = data.val_loss(unflatten(params, dim))
        improved = loss < best_loss[active] - settings.min_delta
        best[active[improved]] = params[improved]
        best_loss[active[improved]] = loss[improved]
        bad[active] = torch.where(improved, 0, bad[active] + 1)
        keep = bad[active] < settings.patience
        if not keep.all():
            adam.select(keep)
            data = data.select(keep)
            source.select(keep)
            active = active[keep]
        if active.numel() == 0:
            break
    return TrainResult({n: t.cpu().clone() for n, t in unflatten(best, dim).items()}, epochs.cpu().numpy(),
                       best_loss.cpu().numpy(), step)

