"""SynthFaces: determinism, per-identity stability, validation, label control, contact sheet."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from sklearn.metrics import roc_auc_score

from common.data.contact_sheet import CAPTION_HEIGHT, MIN_FACE, PAD, contact_sheet
from common.data.dataset import FaceDataset
from common.data.sources.synthfaces.generator import (
    GROUP_NAMES,
    SynthConfig,
    SynthIdentity,
    generate,
    sample_identity,
    sample_nuisance,
)
from common.data.sources.synthfaces.render import render_face

SMALL = SynthConfig(num_identities=6, images_per_identity=3, image_size=32, seed=7)


@pytest.fixture(scope="module")
def small() -> FaceDataset:
    return generate(SMALL)


def raw_pixel_verification_auc(ds: FaceDataset, seed: int = 0) -> float:
    """ROC AUC of cosine similarity between mean-centred raw pixel vectors.

    All genuine pairs against as many random impostor pairs: how far pixel matching gets, the
    baseline a learned embedding must clearly beat.
    """
    x = ds.images.reshape(len(ds), -1).astype(np.float64)
    x -= x.mean(axis=1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    genuine = []
    for k in np.unique(ds.identity):
        idx = np.flatnonzero(ds.identity == k)
        i, j = np.triu_indices(idx.size, 1)
        genuine.append(np.stack([idx[i], idx[j]], axis=1))
    gen = np.concatenate(genuine)
    pairs = np.random.default_rng(seed).integers(0, len(ds), size=(4 * len(gen), 2))
    imp = pairs[ds.identity[pairs[:, 0]] != ds.identity[pairs[:, 1]]][: len(gen)]

    def score(p: np.ndarray) -> np.ndarray:
        return np.einsum("ij,ij->i", x[p[:, 0]], x[p[:, 1]])

    y = np.r_[np.ones(len(gen)), np.zeros(len(imp))]
    return float(roc_auc_score(y, np.r_[score(gen), score(imp)]))


def test_images_ids_and_annotations_have_the_dataset_contract(small: FaceDataset) -> None:
    assert small.images.shape == (18, 32, 32, 3) and small.images.dtype == np.uint8
    assert small.source == "synthfaces" and small.group_names == GROUP_NAMES
    assert small.sample_ids[0] == "synth/00000/000" and small.sample_ids[-1] == "synth/00005/002"
    assert np.array_equal(small.identity, np.repeat(np.arange(6), 3))
    assert set(small.labels) == {"smiling"} and set(np.unique(small.labels["smiling"])) <= {0, 1}
    for col in (small.gender, small.group, small.age):
        assert (col >= 0).all()
        # demographics belong to the identity, not the image
        assert all(np.unique(col[small.identity == k]).size == 1 for k in range(6))
    meta = json.loads(json.dumps(small.meta))
    assert meta["config"]["seed"] == 7 and meta["config"]["group_proportions"] == [0.25] * 4
    assert small.images.std() > 20  # actual pictures, not a flat fill


def test_same_config_gives_identical_bytes_and_fingerprint(small: FaceDataset, tmp_path: Path) -> None:
    again = generate(SMALL)
    assert np.array_equal(small.images, again.images)
    assert np.array_equal(small.labels["smiling"], again.labels["smiling"])
    assert small.fingerprint() == again.fingerprint()
    a, b = small.save_npz(tmp_path / "a.npz"), again.save_npz(tmp_path / "b.npz")
    assert a.read_bytes() == b.read_bytes()
    assert FaceDataset.load_npz(a).fingerprint() == small.fingerprint()


def test_different_seed_gives_different_faces(small: FaceDataset) -> None:
    other = generate(dataclasses.replace(SMALL, seed=8))
    assert other.fingerprint() != small.fingerprint()
    assert np.abs(other.images.astype(int) - small.images.astype(int)).mean() > 10


def test_identity_renders_the_same_whatever_the_data_set_size(small: FaceDataset) -> None:
    fewer = generate(dataclasses.replace(SMALL, num_identities=3, images_per_identity=2))
    for sid, img in zip(fewer.sample_ids, fewer.images):
        assert np.array_equal(img, small.images[small.positions([sid])[0]])
    assert np.array_equal(fewer.gender, small.gender[small.positions(fewer.sample_ids)])


def test_image_count_range_is_inclusive_and_varies() -> None:
    cfg = SynthConfig(num_identities=200, images_per_identity=(2, 5))
    counts = np.array([sample_identity(cfg, k).num_images for k in range(200)])
    assert counts.min() == 2 and counts.max() == 5


@pytest.mark.parametrize(("field", "value"), [
    ("num_identities", 0),
    ("images_per_identity", 0),
    ("images_per_identity", (5, 2)),
    ("images_per_identity", (1, 2, 3)),
    ("image_size", 16),
    ("image_size", 129),
    ("male_fraction", 1.5),
    ("group_proportions", (0.5, 0.5)),
    ("group_proportions", (0.7, 0.1, 0.1, 0.2)),
    ("age_proportions", (0.5, 0.6, -0.1)),
    ("smiling_rate", (0.5,)),
    ("smiling_rate", (0.5, 2.0)),
    ("smile_visibility", 1.5),
    ("seed", -1),
    ("seed", 1.5),
])
def test_invalid_config_names_the_field(field: str, value: object) -> None:
    cfg = dataclasses.replace(SynthConfig(), **{field: value})
    with pytest.raises(ValueError, match=rf"SynthConfig\.{field}"):
        cfg.validate()
    with pytest.raises(ValueError, match=field):
        generate(cfg)


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=-10, max_value=300))
def test_image_size_accepted_exactly_in_32_to_128(size: int) -> None:
    cfg = SynthConfig(image_size=size)
    if 32 <= size <= 128:
        cfg.validate()
    else:
        with pytest.raises(ValueError, match="image_size"):
            cfg.validate()


def test_demographics_follow_the_configured_proportions() -> None:
    cfg = SynthConfig(num_identities=3000, male_fraction=0.77, group_proportions=(0.55, 0.25, 0.15, 0.05),
                      age_proportions=(0.2, 0.3, 0.5))
    ids = [sample_identity(cfg, k) for k in range(cfg.num_identities)]
    gender = np.array([i.gender for i in ids])
    group = np.bincount([i.group for i in ids], minlength=4) / len(ids)
    age = np.bincount([i.age for i in ids], minlength=3) / len(ids)
    assert abs(gender.mean() - 0.77) < 0.03
    np.testing.assert_allclose(group, cfg.group_proportions, atol=0.03)
    np.testing.assert_allclose(age, cfg.age_proportions, atol=0.03)


def test_smiling_rate_correlates_the_task_label_with_gender() -> None:
    ds = generate(SynthConfig(num_identities=60, images_per_identity=5, image_size=32,
                              smiling_rate=(0.9, 0.1), seed=3))
    smiling = ds.labels["smiling"]
    p_female, p_male = smiling[ds.gender == 0].mean(), smiling[ds.gender == 1].mean()
    assert p_female > 0.75 and p_male < 0.25
    assert np.corrcoef(smiling, ds.gender)[0, 1] < -0.6


def test_hidden_smiles_keep_their_labels_and_every_other_photo() -> None:
    """smile_visibility: a smiling face shows its smile with this probability; the label stays, and
    the photo is the same but for a neutral mouth. Nothing else changes (its own random stream)."""
    cfg = SynthConfig(num_identities=30, images_per_identity=6, image_size=32, smiling_rate=(0.9, 0.1), seed=2)
    shown, half = generate(cfg), generate(dataclasses.replace(cfg, smile_visibility=0.5))
    assert np.array_equal(shown.labels["smiling"], half.labels["smiling"]) and shown.fingerprint != half.fingerprint
    changed = (shown.images != half.images).reshape(len(shown), -1).any(axis=1)
    smiling = shown.labels["smiling"] == 1
    assert not changed[~smiling].any()  # neutral faces are untouched
    assert 0.35 < changed[smiling].mean() < 0.65  # about half the smiles are hidden
    upper_differs = (shown.images != half.images)[changed][:, : 32 // 2].any()
    assert not upper_differs  # the upper half of every changed face is the same: only the mouth differs
    neutral = generate(dataclasses.replace(cfg, smiling_rate=(0.0, 0.0)))
    hidden = changed & smiling
    assert np.array_equal(half.images[hidden], neutral.images[hidden])  # a hidden smile is a neutral mouth


def test_gender_shifts_features_in_distribution_with_overlap() -> None:
    cfg = SynthConfig(num_identities=600)
    ids = [sample_identity(cfg, k) for k in range(cfg.num_identities)]
    male = np.array([i.gender == 1 for i in ids])
    brows = np.array([i.face.brow_thickness for i in ids])
    jaw = np.array([i.face.jaw for i in ids])
    long_hair = np.array([i.face.hair_style >= 3 for i in ids])
    facial_hair = np.array([i.face.facial_hair > 0 for i in ids])
    assert brows[male].mean() > brows[~male].mean() and brows[~male].max() > brows[male].min()
    assert jaw[male].mean() > jaw[~male].mean() and jaw[~male].max() > jaw[male].min()
    assert long_hair[~male].mean() > 0.8 and 0.0 < long_hair[male].mean() < 0.2
    assert facial_hair[male].mean() > 0.5 and not facial_hair[~male].any()


def test_age_adds_wrinkles_and_grey_hair() -> None:
    cfg = SynthConfig(num_identities=400)
    ids = [sample_identity(cfg, k) for k in range(cfg.num_identities)]
    old = [i for i in ids if i.age == 2]
    young = [i for i in ids if i.age == 0]
    assert all(i.face.wrinkles == 2 for i in old) and all(i.face.wrinkles == 0 for i in young)

    def greyness(i: SynthIdentity) -> float:  # low saturation = grey
        c = np.array(i.face.hair_colour, dtype=float)
        return float(c.max() - c.min())

    assert np.mean([greyness(i) for i in old]) < 0.6 * np.mean([greyness(i) for i in young])


def test_smile_changes_only_the_lower_face() -> None:
    cfg = SynthConfig(image_size=64)
    ident = sample_identity(cfg, 0)
    nz, _ = sample_nuisance(cfg, ident, 0)
    calm = dataclasses.replace(nz, angle=0.0, shift=(0.0, 0.0), scale=1.0, yaw=0.0, clutter=(), blur=0.0)
    smile = render_face(ident.face, dataclasses.replace(calm, smiling=True), 64).astype(int)
    neutral = render_face(ident.face, dataclasses.replace(calm, smiling=False), 64).astype(int)
    changed = np.abs(smile - neutral).sum(axis=2) > 30
    rows, cols = np.nonzero(changed)
    assert changed.sum() >= 15  # clearly visible at 64 px
    assert rows.min() > 32 and 16 < cols.mean() < 48  # below the eyes, around the centre line


def test_raw_pixels_carry_some_identity_signal_but_are_unreliable() -> None:
    ds = generate(SynthConfig(num_identities=40, images_per_identity=6, seed=0))
    auc = raw_pixel_verification_auc(ds)
    assert 0.55 < auc < 0.8


def test_contact_sheet_writes_a_labelled_grid(small: FaceDataset, tmp_path: Path) -> None:
    out = contact_sheet(small, tmp_path / "sheet" / "faces.png", max_identities=4, per_identity=2)
    factor = -(-MIN_FACE // 32)
    face = 32 * factor
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.size == (PAD + 2 * (face + PAD), PAD + 4 * (face + CAPTION_HEIGHT + PAD))
        pixels = np.asarray(im.convert("RGB"))
    caption = pixels[PAD + face: PAD + face + CAPTION_HEIGHT, PAD: PAD + face]
    assert (caption < 100).any()  # text was drawn under the first face
    top_left = pixels[PAD: PAD + face, PAD: PAD + face]
    assert np.array_equal(top_left[::factor, ::factor], small.images[0])  # upscaled by an integer factor
    with pytest.raises(ValueError, match="max_identities"):
        contact_sheet(small, tmp_path / "bad.png", max_identities=0)


def test_the_run_configuration_reaches_the_generator() -> None:
    """data.condition and data.smile_visibility change the members' SynthFaces (and its cache key)."""
    from common.config import load_config
    from common.data.cache import synth_config

    synth = synth_config(load_config(None, ["data.condition=studio", "data.smile_visibility=0.25"]))
    assert (synth.condition, synth.smile_visibility) == ("studio", 0.25)
    assert synth.to_meta() != synth_config(load_config(None)).to_meta()
