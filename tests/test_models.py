"""Models: Opacus compatibility, embedding geometry and shapes, margin logits, checkpoints."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest
import torch
from opacus.validators import ModuleValidator
from safetensors.torch import save_file
from torch import nn

import common.runs.io
from common.nn.backbone import ResNetBackbone
from common.nn.build import build_identity_head, build_model
from common.nn.checkpoint import load_checkpoint, save_checkpoint
from common.nn.face_model import FaceModel, ModelSpec
from common.nn.heads import AttributeHead, CosineClassifier, margin_logits

torch.set_num_threads(1)

SPECS = {
    "default": ModelSpec(),
    "512-d embedding": ModelSpec(embedding_dim=512),
    "no attribute head": ModelSpec(attribute_head=False),
    "deeper, 128 px": ModelSpec(width=16, blocks=(2, 1, 1, 1), image_size=128, dropout=0.2),
}


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- Opacus compatibility -------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SPECS))
def test_face_models_pass_the_opacus_validator(name: str) -> None:
    model = FaceModel(SPECS[name])
    assert ModuleValidator.validate(model, strict=False) == []
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_heads_pass_the_opacus_validator() -> None:
    assert ModuleValidator.validate(CosineClassifier(128, 37), strict=False) == []
    assert ModuleValidator.validate(AttributeHead(512), strict=False) == []


def test_validator_does_reject_batchnorm() -> None:
    # The check above is meaningful: the same validator flags what DP-SGD cannot train.
    bad = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert ModuleValidator.validate(bad, strict=False) != []


# --- shapes and geometry --------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SPECS))
def test_output_shapes_and_unit_norm_embedding(name: str) -> None:
    spec = SPECS[name]
    model = FaceModel(spec).eval()
    x = _images(3, spec.image_size)
    with torch.no_grad():
        feats, attr = model(x)
        emb = model.embed(x)
    assert feats.shape == (3, spec.embedding_dim)
    assert emb.shape == (3, spec.embedding_dim)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    # The embedding is the direction of the features.
    torch.testing.assert_close(emb, feats / feats.norm(dim=1, keepdim=True))
    if spec.attribute_head:
        assert attr is not None and attr.shape == (3,)
    else:
        assert attr is None and model.attribute is None


@pytest.mark.parametrize("name", list(SPECS))
def test_blocks_are_the_stem_and_one_map_per_stage(name: str) -> None:
    spec = SPECS[name]
    backbone = FaceModel(spec).backbone.eval()
    with torch.no_grad():
        maps = backbone.blocks(_images(2, spec.image_size))
    assert len(maps) == 1 + len(spec.blocks)
    expected = [(2, spec.width, spec.image_size // 2, spec.image_size // 2)]
    expected += [(2, spec.width * 2**i, spec.image_size // 2 ** (i + 2), spec.image_size // 2 ** (i + 2))
                 for i in range(len(spec.blocks))]
    assert [tuple(m.shape) for m in maps] == expected
    assert backbone.feature_dim == spec.width * 2 ** (len(spec.blocks) - 1)


def test_embedding_depends_on_spatial_layout() -> None:
    # The embedding uses a linear layer over the flattened final map (not global pooling), so a
    # mirrored face is not the same face to the model.
    model = FaceModel(ModelSpec(width=8, image_size=32, blocks=(1, 1))).eval()
    x = _images(2, 32)
    with torch.no_grad():
        assert not torch.allclose(model.embed(x), model.embed(x.flip(3)), atol=1e-3)


def test_image_size_must_fit_the_stages() -> None:
    with pytest.raises(ValueError, match="multiple of 16 for 3 stages, got 40"):
        ResNetBackbone(image_size=40)


def test_build_model_is_seeded_and_leaves_global_rng_alone() -> None:
    spec = ModelSpec(width=8, blocks=(1,), image_size=32)
    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    a, b, c = build_model(spec, 5), build_model(spec, 5), build_model(spec, 6)
    assert torch.equal(torch.random.get_rng_state(), before)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.backbone.embed.weight, c.backbone.embed.weight)
    h1, h2 = build_identity_head(spec, 7, 3), build_identity_head(spec, 7, 3)
    assert h1.weight.shape == (7, spec.embedding_dim) and torch.equal(h1.weight, h2.weight)


def test_model_spec_dict_round_trip() -> None:
    for spec in SPECS.values():
        assert ModelSpec.from_dict(spec.to_dict()) == spec


# --- cosine classifier and margins ----------------------------------------------------------

def test_cosine_classifier_outputs_cosines() -> None:
    head = CosineClassifier(4, 3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2.0, 0, 0, 0], [0, 3.0, 0, 0], [1.0, 1.0, 0, 0]]))
    emb = torch.tensor([[5.0, 0, 0, 0], [0.5, 0.5, 0, 0]])
    expected = torch.tensor([[1.0, 0.0, 1 / math.sqrt(2)], [1 / math.sqrt(2), 1 / math.sqrt(2), 1.0]])
    torch.testing.assert_close(head(emb), expected)


def test_arcface_hand_case() -> None:
    cosine = torch.tensor([[0.6, 0.8, -0.2], [0.1, 0.3, 0.9]])
    labels = torch.tensor([0, 2])
    out = margin_logits(cosine, labels, "arcface", scale=30.0)  # m = 0.5
    theta0, theta1 = math.acos(0.6), math.acos(0.9)
    expected = 30.0 * torch.tensor([[math.cos(theta0 + 0.5), 0.8, -0.2], [0.1, 0.3, math.cos(theta1 + 0.5)]])
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-5)
    # Explicit margin and scale.
    out = margin_logits(cosine[:1], labels[:1], "arcface", scale=10.0, margin=0.2)
    torch.testing.assert_close(out[0, 0], torch.tensor(10.0 * math.cos(theta0 + 0.2)), atol=1e-4, rtol=1e-5)


def test_arcface_past_pi_minus_m_falls_back_to_cosface_like_penalty() -> None:
    m = 0.5
    cos = -0.95  # theta = 2.82 > pi - m = 2.64
    out = margin_logits(torch.tensor([[cos, 0.0]]), torch.tensor([0]), "arcface", scale=1.0)
    torch.testing.assert_close(out[0, 0], torch.tensor(cos - m * math.sin(m)), atol=1e-5, rtol=1e-5)


def test_arcface_target_logit_is_monotonic_and_below_the_plain_cosine() -> None:
    cos = torch.linspace(-1.0, 1.0, 2001)
    logits = margin_logits(torch.stack([cos, torch.zeros_like(cos)], 1), torch.zeros(cos.numel(), dtype=torch.long),
                           "arcface", scale=1.0)[:, 0]
    assert (logits[1:] - logits[:-1] >= -1e-6).all()
    assert (logits < cos).all()  # the margin always penalises the true class


def test_cosface_hand_case() -> None:
    cosine = torch.tensor([[0.6, 0.8, -0.2]])
    out = margin_logits(cosine, torch.tensor([1]), "cosface", scale=30.0)  # m = 0.35
    torch.testing.assert_close(out, 30.0 * torch.tensor([[0.6, 0.8 - 0.35, -0.2]]))
    out = margin_logits(cosine, torch.tensor([2]), "cosface", scale=2.0, margin=0.1)
    torch.testing.assert_close(out, 2.0 * torch.tensor([[0.6, 0.8, -0.3]]))


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
def test_margin_gradients_stay_finite_at_the_extremes(kind: str) -> None:
    cosine = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], requires_grad=True)
    out = margin_logits(cosine, torch.tensor([0, 0]), kind)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(cosine.grad).all()


def test_invalid_margin_kind_raises() -> None:
    with pytest.raises(ValueError, match="margin kind must be one of .*'sphereface'"):
        margin_logits(torch.zeros(1, 2), torch.tensor([0]), "sphereface")


# --- checkpoints ----------------------------------------------------------------------------

SPEC_SMALL = ModelSpec(width=8, blocks=(1, 1), embedding_dim=16, image_size=32)


def _state() -> dict[str, torch.Tensor]:
    return build_model(SPEC_SMALL, 3).state_dict()


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    state = _state()
    state["steps"] = torch.tensor([3, 4], dtype=torch.int64)
    state["transposed"] = torch.arange(6.0).reshape(2, 3).t()  # non-contiguous input is fine
    meta = {"task": "identity", "round": 3, "spec": SPEC_SMALL.to_dict(), "eps": 1.25, "note": "ünïcode"}
    path = save_checkpoint(tmp_path / "sub" / "model.safetensors", state, meta)
    assert path == tmp_path / "sub" / "model.safetensors"
    loaded, loaded_meta = load_checkpoint(path)
    assert loaded_meta == meta
    assert set(loaded) == set(state)
    for k, v in state.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    # The metadata rebuilds the architecture and the weights load strictly into it.
    model = FaceModel(ModelSpec.from_dict(loaded_meta["spec"]))
    model.load_state_dict({k: v for k, v in loaded.items() if k not in ("steps", "transposed")}, strict=True)
    ref = build_model(SPEC_SMALL, 3).eval()
    x = _images(2, 32)
    with torch.no_grad():
        assert torch.equal(model.eval().embed(x), ref.embed(x))


def test_checkpoint_is_byte_deterministic(tmp_path: Path) -> None:
    a = save_checkpoint(tmp_path / "a.safetensors", _state(), {"b": 1, "a": [1, 2]})
    b = save_checkpoint(tmp_path / "b.safetensors", _state(), {"a": [1, 2], "b": 1})
    assert a.read_bytes() == b.read_bytes()


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp") or p.name.startswith("."))


def test_checkpoint_write_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    for step in range(3):
        save_checkpoint(path, _state(), {"round": step})
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    assert load_checkpoint(path)[1] == {"round": 2}


def test_failed_serialisation_keeps_the_old_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, _state(), {"round": 1})
    before = path.read_bytes()

    def broken_save(*args, **kwargs):
        raise RuntimeError("serializer exploded")

    monkeypatch.setattr("common.nn.checkpoint.save", broken_save)
    with pytest.raises(RuntimeError, match="serializer exploded"):
        save_checkpoint(path, _state(), {"round": 2})
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_failure_after_writing_the_temp_file_keeps_the_old_checkpoint(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, _state(), {"round": 1})
    before = path.read_bytes()

    def crash_on_rename(src, dst):
        assert Path(src).stat().st_size > 0  # the new bytes were written to the temp file ...
        raise OSError("disk pulled out")  # ... but the rename never happens

    monkeypatch.setattr(common.runs.io.os, "replace", crash_on_rename)
    with pytest.raises(OSError, match="disk pulled out"):
        save_checkpoint(path, _state(), {"round": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)[1] == {"round": 1}
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_loading_a_torch_save_file_refuses_to_unpickle(tmp_path: Path, legacy: bool) -> None:
    path = tmp_path / "model.pt"
    torch.save(_state(), path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "pickle" in str(info.value)


def test_garbage_bytes_raise_value_error_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"this is definitely not a checkpoint" * 10)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": not a valid safetensors checkpoint"):
        load_checkpoint(path)


def test_truncated_checkpoint_raises_value_error_naming_the_path(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "model.safetensors", _state(), {"round": 1})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_checkpoint(path)


def test_safetensors_without_facefl_metadata_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"other": "x"})
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": safetensors file has no 'facefl' metadata"):
        load_checkpoint(path)
    save_file({"w": torch.zeros(2)}, str(path), metadata={"facefl": "{not json"})
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": corrupt 'facefl' metadata"):
        load_checkpoint(path)


def test_missing_checkpoint_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "none.safetensors"))):
        load_checkpoint(tmp_path / "none.safetensors")
    with pytest.raises(FileNotFoundError):  # a directory is not a checkpoint either
        load_checkpoint(tmp_path)



# --- regressions of bugs found in review ---

def test_valid_checkpoint_whose_header_length_starts_with_0x80_loads(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    for pad in range(300):  # find metadata that makes the header length 128 mod 256
        save_checkpoint(path, {"w": torch.zeros(3)}, {"note": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    state, meta = load_checkpoint(path)
    assert meta["note"] == "x" * pad and torch.equal(state["w"], torch.zeros(3))
