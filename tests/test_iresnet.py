"""ArcFace-class backbones (model.arch = iresnet18/50/100) and arcface_torch checkpoints.

The IResNet with GroupNorm passes Opacus' validator, trains a DP-SGD step (book-keeping, the
default), gives 512-d L2-normalised embeddings at 112 px; book-keeping's clipped sum equals
Opacus' hooks on it (PReLU and GroupNorm on 2-d embeddings included); a checkpoint in
arcface_torch's key layout (BatchNorm statistics, DDP's ``module.`` prefix; .pt or .safetensors)
loads, and one with a foreign key, a wrong shape, a missing key or pickled code is refused,
naming what is wrong.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from opacus.grad_sample import GradSampleModule
from opacus.validators import ModuleValidator
from safetensors.torch import save_file
from torch import nn

from common.config import ConfigError, DPConfig, TrainConfig, load_config
from common.data.dataset import FaceDataset
from common.nn.arcface_checkpoint import load_arcface_backbone
from common.nn.build import build_initial_model, build_model, model_spec
from common.nn.face_model import FaceModel, ModelSpec
from common.train.book_keeping import BookKeepingModule
from common.train.layer_samplers import prelu_grad_sample
from common.train.loop import embed, train

pytestmark = pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook is firing",
                                        "ignore:The given NumPy array is not writable")

SPEC_112 = ModelSpec(arch="iresnet18", embedding_dim=512, image_size=112, attribute_head=True)
SPEC_32 = dataclasses.replace(SPEC_112, image_size=32)


def _faces(n: int, size: int, seed: int = 0) -> FaceDataset:
    rng = np.random.default_rng(seed)
    return FaceDataset(images=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
                       identity=np.arange(n, dtype=np.int64) % 2, gender=np.arange(n, dtype=np.int64) % 2,
                       group=np.zeros(n, np.int64), age=np.zeros(n, np.int64), labels={},
                       sample_ids=[f"s{i}" for i in range(n)], source="test")


def test_iresnet18_at_112_px_validates_trains_a_dp_step_and_embeds_in_512_d() -> None:
    model = build_model(SPEC_112, 0)
    assert ModuleValidator.validate(model, strict=False) == []
    data = _faces(4, 112)
    before = [p.detach().clone() for p in model.backbone.parameters()]
    cfg = TrainConfig(task="attribute", attribute="gender", batch_size=2, augment=False, optimizer="sgd", lr=0.1,
                      momentum=0.0, weight_decay=0.0)
    out = train(model, data, cfg, DPConfig(mode="sample", grad_sample_mode="bk", max_grad_norm=1.0), seed=0,
                epochs=1, noise_multiplier=1.0, noise_seed=1)
    assert out.steps == 2 and out.dp_history
    moved = [not torch.equal(b, p) for b, p in zip(before, model.backbone.parameters()) if p.requires_grad]
    assert all(moved)
    assert torch.equal(model.backbone.features.weight, torch.ones(512))  # frozen at 1, as arcface_torch
    emb = embed(model, data.images)
    assert emb.shape == (4, 512) and np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_book_keeping_equals_opacus_hooks_on_an_iresnet() -> None:
    model = build_model(SPEC_32, 0)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(6, 3, 32, 32, generator=gen) * 2 - 1, torch.randint(0, 2, (6,), generator=gen).float()
    params = [p for p in model.parameters() if p.requires_grad]

    def loss(module: nn.Module) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(module(x)[1], y, reduction="none")

    gsm = GradSampleModule(model, loss_reduction="sum")
    loss(gsm).sum().backward()
    samples = [p.grad_sample.detach().clone() for p in params]
    gsm._close()
    # in float64: float32 norms over 11 M-value gradients drift by 4e-5 (book-keeping's do not)
    norms = torch.stack([g.reshape(6, -1).double().norm(dim=1) for g in samples], 1).norm(dim=1)
    clip = float(norms.median())
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    bk = BookKeepingModule(model)
    loss(bk).sum().backward()
    torch.testing.assert_close(bk.clip_and_sum(clip), norms, rtol=1e-5, atol=0)
    bk._close()
    for p, g in zip(params, samples):
        want = torch.einsum("u,u...->...", factor.float(), g)
        assert float((p.grad - want).norm() / want.norm()) <= 1e-5


@pytest.mark.parametrize("shared", [True, False])
def test_prelu_per_sample_gradients_equal_functorch(shared: bool) -> None:
    layer = nn.PReLU(1 if shared else 5, init=0.3)
    gen = torch.Generator().manual_seed(2)
    x, g = torch.randn(4, 5, 3, 3, generator=gen), torch.randn(4, 5, 3, 3, generator=gen)

    def one(weight: torch.Tensor, xi: torch.Tensor, gi: torch.Tensor) -> torch.Tensor:
        return (torch.func.functional_call(layer, {"weight": weight}, (xi[None],))[0] * gi).sum()
    want = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(layer.weight.detach(), x, g)
    torch.testing.assert_close(prelu_grad_sample(layer, [x], g)[layer.weight], want)


def _arcface_layout(model: FaceModel, prefix: str = "") -> dict[str, torch.Tensor]:
    """The backbone as arcface_torch would save it: BatchNorm keys with running statistics."""
    state = {f"{prefix}{k}": v.clone() + 0.01 for k, v in model.backbone.state_dict().items()}
    for name, module in model.backbone.named_modules():
        if isinstance(module, nn.GroupNorm):
            c = module.num_channels
            state.update({f"{prefix}{name}.running_mean": torch.zeros(c), f"{prefix}{name}.running_var": torch.ones(c),
                          f"{prefix}{name}.num_batches_tracked": torch.tensor(7)})
    return state


@pytest.mark.parametrize("fmt", ["pt", "ddp-pt", "safetensors"])
def test_an_arcface_torch_checkpoint_loads(tmp_path, fmt: str) -> None:
    donor = build_model(SPEC_32, 5)
    state = _arcface_layout(donor, "module." if fmt == "ddp-pt" else "")
    path = tmp_path / f"model.{'safetensors' if fmt == 'safetensors' else 'pt'}"
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    model = build_model(SPEC_32, 0)
    head_before = model.attribute.fc.weight.detach().clone()
    dropped = load_arcface_backbone(model, path)
    groupnorms = sum(isinstance(m, nn.GroupNorm) for m in model.backbone.modules())
    assert dropped == 3 * groupnorms
    for key, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, donor.backbone.state_dict()[key] + 0.01)
    assert torch.equal(model.attribute.fc.weight, head_before)  # only the backbone comes from the file


def test_a_config_starts_from_the_checkpoint(tmp_path) -> None:
    path = tmp_path / "backbone.pt"
    donor = build_model(SPEC_32, 5)
    torch.save(_arcface_layout(donor), path)
    cfg = load_config(None, ["model.arch=iresnet18", "model.embedding_dim=512", "data.image_size=32",
                             f"model.init_checkpoint={path}"])
    model = build_initial_model(cfg)
    torch.testing.assert_close(model.backbone.fc.weight, donor.backbone.fc.weight + 0.01)
    assert model_spec(cfg).arch == "iresnet18"
    with pytest.raises(ConfigError, match="model.init_checkpoint: an arcface_torch checkpoint fits an IResNet"):
        load_config(None, [f"model.init_checkpoint={path}"])


def _refused(tmp_path, state: dict, match: str) -> None:
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=match):
        load_arcface_backbone(build_model(SPEC_32, 0), path)


def test_a_wrong_checkpoint_is_refused_with_the_key_named(tmp_path) -> None:
    good = _arcface_layout(build_model(SPEC_32, 5))
    _refused(tmp_path, {**good, "layer5.0.conv1.weight": torch.zeros(3)}, r"key 'layer5\.0\.conv1\.weight' has no place")
    _refused(tmp_path, {**good, "fc.weight": torch.zeros(512, 7)}, r"key 'fc\.weight' has shape \(512, 7\)")
    _refused(tmp_path, {k: v for k, v in good.items() if k != "layer2.1.conv2.weight"},
             r"no tensor for 1 backbone key\(s\), first \['layer2\.1\.conv2\.weight'\]")
    # iresnet50's file into an iresnet18: its extra blocks are named
    _refused(tmp_path, {**good, "layer3.2.conv1.weight": torch.zeros(256, 256, 3, 3)}, r"key 'layer3\.2\.conv1\.weight'")


def test_pickled_code_is_never_run(tmp_path) -> None:
    class Payload:
        def __reduce__(self):
            return (print, ("unpickled!",))

    path = tmp_path / "evil.pt"
    torch.save({"conv1.weight": Payload()}, path)
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_arcface_backbone(build_model(SPEC_32, 0), path)
