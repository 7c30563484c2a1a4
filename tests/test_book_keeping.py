"""Book-keeping DP-SGD (dp.grad_sample_mode = bk) against Opacus, on the project's real layers.

The clipped, summed gradient of one backward pass must equal what Opacus' hooks mode gives
(per-sample gradients, flat clipping, sum) on the default backbone, the cosine identity head and
the attribute head, per sample and per identity; the cosine head's own per-sample gradients must
equal functorch's (what Opacus fell back to before); noise is added once per step with std
sigma C from the noise generator, exactly the noise Opacus adds; and a run's ledger (sigma, q,
steps) and epsilon are those of the hooks mode and of Google's dp_accounting.
"""

from __future__ import annotations

import dataclasses

import dp_accounting
import pytest
import torch
import torch.nn.functional as F
from dp_accounting.rdp import RdpAccountant
from opacus import PrivacyEngine
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.utils import prepare_module
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.config import DPConfig, TrainConfig
from common.nn.build import build_identity_head, build_model
from common.nn.face_model import ModelSpec
from common.nn.heads import CosineClassifier
from common.train.book_keeping import BookKeepingModule, ghost_cheaper, make_private_book_keeping
from common.train.dp import spent_epsilon
from common.train.layer_samplers import cosine_grad_sample, cosine_norm_sample
from common.train.loop import _Joint, task_loss, train

pytestmark = pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook is firing",
                                        "ignore:The given NumPy array is not writable",
                                        "ignore:Optimal order is the largest alpha")

DEFAULT_SPEC = ModelSpec()  # the default backbone: width 32, blocks (1, 1, 1), 128-d, 64 px, attribute head
TRAIN = TrainConfig(task="both", attribute="gender", margin="arcface", margin_scale=30.0)
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def _batch(n: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 64, 64, generator=gen) * 2 - 1, torch.randint(0, classes, (n,), generator=gen),
            torch.randint(0, 2, (n,), generator=gen))


def _joint(classes: int) -> _Joint:
    return _Joint(build_model(DEFAULT_SPEC, 0), build_identity_head(DEFAULT_SPEC, classes, 1))


def _opacus_per_unit(joint: nn.Module, x, y_id, y_attr, units: torch.Tensor | None) -> list[torch.Tensor]:
    """Per-unit gradients (unit, *shape) of every trainable parameter from Opacus' hooks mode."""
    gsm = GradSampleModule(joint, loss_reduction="sum")
    try:
        cos, attr = gsm(x)
        task_loss(cos, attr, y_id, y_attr, TRAIN).sum().backward()
        samples = [p.grad_sample.detach().clone() for p in joint.parameters() if p.requires_grad]
    finally:
        gsm._close()
        for p in joint.parameters():
            p.grad = None
    if units is None:
        return samples
    inverse = torch.unique(units, sorted=True, return_inverse=True)[1]
    return [g.new_zeros((int(inverse.max()) + 1, *g.shape[1:])).index_add_(0, inverse, g) for g in samples]


@pytest.mark.parametrize("unit", ["sample", "identity"])
def test_clipped_sum_equals_opacus_hooks_on_the_default_backbone_and_both_heads(unit: str) -> None:
    classes = 12
    x, y_id, y_attr = _batch(16, classes)
    units = None if unit == "sample" else y_id
    joint = _joint(classes)
    params = [p for p in joint.parameters() if p.requires_grad]
    per_unit = _opacus_per_unit(joint, x, y_id, y_attr, units)
    norms = torch.stack([g.reshape(len(g), -1).double().norm(dim=1) for g in per_unit], 1).norm(dim=1)
    clip = float(norms.median())  # half the units above the clipping norm, half below
    assert (norms > clip).any() and (norms < clip).any()
    factor = (clip / (norms + 1e-6)).clamp(max=1.0).float()
    want = [torch.einsum("u,u...->...", factor, g) for g in per_unit]

    bk = BookKeepingModule(joint)
    try:
        cos, attr = bk(x)
        task_loss(cos, attr, y_id, y_attr, TRAIN).sum().backward()
        got_norms = bk.clip_and_sum(clip, units)
    finally:
        bk._close()
    torch.testing.assert_close(got_norms, norms, rtol=1e-5, atol=0)
    named = dict(zip(params, [n for n, p in joint.named_parameters() if p.requires_grad]))
    for p, w in zip(params, want):
        rel = float((p.grad - w).norm() / w.norm())
        assert rel <= 1e-5, (named[p], rel)
    # every kind of layer took part: instantiated (stem), ghost (last stage, embedding), both heads
    assert {"model.backbone.stem.0.weight", "model.backbone.stages.2.0.conv2.weight", "model.backbone.embed.weight",
            "head.weight", "model.attribute.fc.weight"} <= set(named.values())


def test_the_cosine_heads_samplers_equal_functorch() -> None:
    """What Opacus computed for the head before its samplers were registered (functorch)."""
    gen = torch.Generator().manual_seed(3)
    head = CosineClassifier(16, 7)
    x, g = torch.randn(9, 16, generator=gen), torch.randn(9, 7, generator=gen)

    def one(weight: torch.Tensor, xi: torch.Tensor, gi: torch.Tensor) -> torch.Tensor:
        return (torch.func.functional_call(head, {"weight": weight}, (xi[None],))[0] * gi).sum()
    want = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(head.weight.detach(), x, g)
    got = cosine_grad_sample(head, [x], g)[head.weight]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cosine_norm_sample(head, [x], g)[head.weight], want.reshape(9, -1).norm(dim=1),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_no_layer_of_the_model_falls_back_to_functorch_in_opacus_modes(mode: str) -> None:
    joint = _joint(5)
    wrapped = prepare_module(joint, grad_sample_mode=mode, batch_first=True, loss_reduction="sum")
    try:
        fallback = [name for name, m in joint.named_modules() if hasattr(m, "ft_compute_sample_grad")]
        assert fallback == []
    finally:
        wrapped._close()


def test_mixed_rule_instantiates_large_maps_and_ghosts_small_ones() -> None:
    """The rule on the default backbone at batch 64: the stem (T = 1024 positions) and the middle
    stage (T = 64) are instantiated, the last stage's 3x3 convolutions (T = 16) and the embedding
    layer (T = 1) take the ghost norm."""
    backbone = build_model(DEFAULT_SPEC, 0).backbone
    maps = backbone.blocks(torch.zeros(64, 3, 64, 64))
    assert not ghost_cheaper(backbone.stem[0], torch.zeros_like(maps[0]), 64)
    assert not ghost_cheaper(backbone.stages[1][0].conv2, torch.zeros_like(maps[2]), 64)
    assert ghost_cheaper(backbone.stages[2][0].conv2, torch.zeros_like(maps[3]), 64)
    assert ghost_cheaper(backbone.embed, torch.zeros(64, DEFAULT_SPEC.embedding_dim), 64)
    # identity units: pairs within an identity make the ghost norm dearer, never cheaper
    assert not ghost_cheaper(backbone.stages[2][0].conv2, torch.zeros_like(maps[3]), 64 * 64)


def test_noise_is_added_once_per_step_exactly_as_opacus_adds_it() -> None:
    """Same clipped sum, same noise generator state: the book-keeping step and Opacus' hooks step
    release the same noisy gradient; the noise has std sigma C (0.57 M values: 2 % is > 10 SE)."""
    classes, sigma, clip = 6, 1.7, 0.05
    x, y_id, y_attr = _batch(8, classes, seed=1)
    released = {}
    for mode in ("hooks", "bk"):
        joint = _joint(classes)
        params = [p for p in joint.parameters() if p.requires_grad]
        sgd = torch.optim.SGD(params, lr=1.0)
        noise = torch.Generator().manual_seed(5)
        if mode == "bk":
            module, opt = make_private_book_keeping(joint, sgd, noise_multiplier=sigma, max_grad_norm=clip,
                                                    expected_batch_size=8, generator=noise)
        else:
            loader = DataLoader(TensorDataset(x), batch_size=8)
            module, opt, _ = PrivacyEngine(secure_mode=False).make_private(
                module=joint, optimizer=sgd, data_loader=loader, noise_multiplier=sigma, max_grad_norm=clip,
                poisson_sampling=False, noise_generator=noise)
        before = [p.detach().clone() for p in params]
        cos, attr = module(x)
        loss = task_loss(cos, attr, y_id, y_attr, TRAIN)
        if mode == "bk":
            loss.sum().backward()
            clipped = module.clip_and_sum(clip)
            summed = [p.grad.clone() for p in params]
        else:
            loss.mean().backward()
        opt.step()
        module._close()
        released[mode] = torch.cat([((b - p.detach()) * 8).reshape(-1) for b, p in zip(before, params)])
        if mode == "bk":
            assert (clipped > clip).all()  # every sample clipped: the sum has norm <= 8 C
            noise_part = released[mode] - torch.cat([s.reshape(-1) for s in summed])
    assert float(noise_part.std()) == pytest.approx(sigma * clip, rel=0.02)
    rel = float((released["bk"] - released["hooks"]).norm() / released["hooks"].norm())
    assert rel < 1e-5


def _train(mode: str, unit: str, ds, spec: ModelSpec) -> tuple[torch.Tensor, list]:
    dp = DPConfig(mode="sample", unit=unit, max_images_per_identity=3, grad_sample_mode=mode, accountant="rdp",
                  max_grad_norm=0.5, delta=1e-5)
    cfg = dataclasses.replace(TRAIN, task="both", optimizer="sgd", lr=0.05, momentum=0.0, weight_decay=0.0,
                              batch_size=16, augment=False, max_seconds=0.0)
    model = build_model(spec, 0)
    head = build_identity_head(spec, ds.num_identities, 1)
    out = train(model, ds, cfg, dp, seed=0, epochs=2, head=head, noise_multiplier=0.8, noise_seed=7)
    weights = torch.cat([p.detach().flatten() for m in (model, head) for p in m.parameters()])
    return weights, out.dp_history


@pytest.mark.parametrize("unit", ["sample", "identity"])
def test_a_bk_run_trains_what_hooks_trains_with_the_same_ledger(synth_small, tiny_spec, unit: str) -> None:
    """Same data, seeds and noise seed: the same Poisson batches, clipped sums and noise, so the
    same weights (to float rounding) and the same accountant history; its epsilon is
    dp_accounting's for that history."""
    spec = dataclasses.replace(tiny_spec, attribute_head=True)
    w_hooks, h_hooks = _train("hooks", unit, synth_small, spec)
    w_bk, h_bk = _train("bk", unit, synth_small, spec)
    assert h_bk == h_hooks and h_bk
    start = torch.cat([p.detach().flatten() for m in (build_model(spec, 0),
                                                       build_identity_head(spec, synth_small.num_identities, 1))
                       for p in m.parameters()])
    assert float((w_bk - w_hooks).norm() / (w_hooks - start).norm()) < 1e-4
    acc = RdpAccountant(ORDERS)
    for sigma, q, steps in h_bk:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    assert spent_epsilon("rdp", h_bk, 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-3)


def test_frozen_parameters_stay_untouched_and_an_empty_step_is_zero() -> None:
    joint = _joint(4)
    joint.model.attribute.requires_grad_(False)
    bk = BookKeepingModule(joint)
    try:
        assert bk.clip_and_sum(1.0).numel() == 0  # nobody drawn: zero sums, noised by the optimiser
        assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in bk.trainable)
        x, y_id, _ = _batch(4, 4)
        cos, _ = bk(x)
        F.cross_entropy(cos * 30, y_id, reduction="none").sum().backward()
        bk.clip_and_sum(1.0)
        assert joint.model.attribute.fc.weight.grad is None and not joint.model.attribute.fc.weight.requires_grad
        assert all(p.requires_grad for p in bk.trainable)  # detached for the forward pass only
        with torch.no_grad():  # outside training the wrapper is a plain forward pass
            assert torch.equal(bk(x)[0], joint(x)[0])
    finally:
        bk._close()
    assert sum(len(m._forward_hooks) for m in joint.modules()) == 0


def test_a_layer_without_a_rule_is_named() -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.ones(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.gain

    with pytest.raises(ValueError, match=r"layer '1' \(Scale\)"):
        BookKeepingModule(nn.Sequential(nn.Linear(3, 3), Scale()))
