"""Loaders for the real face data sets, on tiny fixture trees in each source's real layout."""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from fixtures_faces import (
    CELEBA_ATTRIBUTES,
    CELEBA_IDENTITIES,
    CELEBA_PARTITION,
    LFW_PEOPLE,
    UTKFACE_FACES,
    garble,
    make_celeba,
    make_fairface,
    make_imagefolder,
    make_lfw,
    make_utkface,
    save_image,
    truncate,
)
from PIL import Image

from common.data.dataset import FaceDataset, age_to_bucket
from common.data.image_io import MIN_SIDE, SampleError, read_image
from common.data.sources import SOURCES, load_source, source_options
from common.data.sources.celeba import load_celeba
from common.data.sources.fairface import FAIRFACE_RACES, load_fairface
from common.data.sources.imagefolder import (
    ATTRIBUTES_CSV,
    GROUPS_JSON,
    imagefolder_files,
    load_imagefolder,
    write_imagefolder,
)
from common.data.sources.lfw import load_lfw
from common.data.sources.reader import SKIPPED_CAP
from common.data.sources.utkface import UTKFACE_RACES, load_utkface

SIZE = 16


# --- image_io ------------------------------------------------------------------------------

def test_read_image_centre_crops_before_resizing(tmp_path: Path) -> None:
    # 30x10 image: red | green | blue thirds; the centre square is the green third.
    pixels = np.zeros((10, 30, 3), dtype=np.uint8)
    pixels[:, :10, 0] = pixels[:, 10:20, 1] = pixels[:, 20:, 2] = 255
    Image.fromarray(pixels).save(tmp_path / "bands.png")
    green = np.array([0, 255, 0])
    for size in (10, 5, 20):  # unchanged, downscaled, upscaled
        out = read_image(tmp_path / "bands.png", size)
        assert out.shape == (size, size, 3) and out.dtype == np.uint8
        np.testing.assert_allclose(out.reshape(-1, 3), np.broadcast_to(green, (size * size, 3)), atol=1)
    # At the image's own size the pixels are returned exactly (what makes PNG round trips lossless).
    np.testing.assert_array_equal(read_image(tmp_path / "bands.png", 10), pixels[:, 10:20])


def test_read_image_converts_grey_and_alpha_to_rgb(tmp_path: Path) -> None:
    Image.new("L", (12, 12), 77).save(tmp_path / "grey.png")
    Image.new("RGBA", (12, 12), (10, 20, 30, 0)).save(tmp_path / "alpha.png")
    assert (read_image(tmp_path / "grey.png", 12) == 77).all()
    assert (read_image(tmp_path / "alpha.png", 12) == [10, 20, 30]).all()


@pytest.mark.parametrize(("damage", "reason"), [
    (truncate, "cannot decode"),
    (garble, "cannot decode"),
    (lambda p: Image.new("RGB", (MIN_SIDE - 1, 40)).save(p, format="JPEG"), "expected at least"),
    (lambda p: Image.new("RGB", (20, 20)).save(p, format="TIFF"), "cannot decode"),  # format not allowed
    (lambda p: p.unlink(), "missing"),
])
def test_read_image_bad_files_raise_sample_error_naming_the_path(tmp_path: Path, damage, reason: str) -> None:
    path = tmp_path / "face.jpg"
    save_image(path, 0, size=(40, 40))
    damage(path)
    with pytest.raises(SampleError, match=reason) as info:
        read_image(path, SIZE)
    assert str(path) in str(info.value) and info.value.path == str(path)


@pytest.mark.parametrize("side", [12, 30])  # 144 px: bomb warning (>1x limit); 900 px: bomb error (>2x)
def test_read_image_respects_max_image_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, side: int) -> None:
    Image.new("RGB", (side, side)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(SampleError, match="MAX_IMAGE_PIXELS"):
        read_image(tmp_path / "big.png", SIZE)


# --- UTKFace -------------------------------------------------------------------------------

def test_utkface_maps_file_name_attributes(tmp_path: Path) -> None:
    faces = make_utkface(tmp_path)
    ds = load_utkface(tmp_path, image_size=SIZE)
    ids = sorted(faces)
    assert ds.sample_ids.tolist() == ids  # README.txt ignored, sub-folder image included
    assert ds.images.shape == (len(ids), SIZE, SIZE, 3) and ds.source == "utkface"
    age, utk_gender, race = (np.array([faces[i][k] for i in ids]) for k in range(3))
    np.testing.assert_array_equal(ds.gender, 1 - utk_gender)  # UTKFace 0=male -> 1
    np.testing.assert_array_equal(ds.group, race)
    np.testing.assert_array_equal(ds.age, [age_to_bucket(a) for a in age])
    assert ds.gender[ids.index("1_0_0_20161219140623097.jpg.chip.jpg")] == 1
    assert ds.age[ids.index("60_1_0_20170109141853364.jpg")] == 2
    assert ds.group_names == UTKFACE_RACES and ds.identity_names == () and ds.labels == {}
    assert ds.num_identities == len(ids)  # no identities: each image its own
    assert ds.meta["count"] == len(ids) and ds.meta["skipped_count"] == 0 and ds.meta["skipped"] == []
    assert ds.meta["root"] == str(tmp_path.resolve())


def test_loading_twice_gives_identical_data(tmp_path: Path) -> None:
    make_utkface(tmp_path)
    first, second = (load_utkface(tmp_path, image_size=SIZE) for _ in range(2))
    assert first.fingerprint() == second.fingerprint()


def test_utkface_bad_file_name_strict_raises_lenient_skips(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_utkface(tmp_path)
    bad = tmp_path / "25_2_0_20170116184028385.jpg"  # gender 2 does not exist
    save_image(bad, 99)
    with pytest.raises(ValueError, match="expected <age>_<gender 0|1>") as info:
        load_utkface(tmp_path, image_size=SIZE)
    assert str(bad) in str(info.value)
    with caplog.at_level(logging.WARNING, logger="common.data.sources.reader"):
        ds = load_utkface(tmp_path, image_size=SIZE, strict=False)
    assert len(ds) == len(UTKFACE_FACES)
    assert ds.meta["skipped_count"] == 1 and ds.meta["skipped"][0]["path"] == str(bad)
    assert "file name" in ds.meta["skipped"][0]["reason"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 1 bad samples" in warnings[0].getMessage()


@pytest.mark.parametrize("damage", [truncate, garble])
def test_corrupt_image_strict_raises_lenient_skips(tmp_path: Path, damage) -> None:
    make_utkface(tmp_path)
    victim = tmp_path / "30_0_2_20170104201443273.jpg"
    damage(victim)
    with pytest.raises(ValueError, match="cannot decode image") as info:
        load_utkface(tmp_path, image_size=SIZE)
    assert str(victim) in str(info.value)
    ds = load_utkface(tmp_path, image_size=SIZE, strict=False)
    assert victim.name not in ds.sample_ids.tolist() and len(ds) == len(UTKFACE_FACES) - 1
    assert ds.meta["skipped"] == [{"path": str(victim), "reason": ds.meta["skipped"][0]["reason"]}]
    assert "cannot decode image" in ds.meta["skipped"][0]["reason"]


def test_skipped_list_is_capped_but_the_count_is_exact(tmp_path: Path) -> None:
    make_utkface(tmp_path)
    for k in range(SKIPPED_CAP + 5):
        (tmp_path / f"junk_{k:03d}.jpg").write_bytes(b"x")
    ds = load_utkface(tmp_path, image_size=SIZE, strict=False)
    assert len(ds) == len(UTKFACE_FACES)
    assert ds.meta["skipped_count"] == SKIPPED_CAP + 5 and len(ds.meta["skipped"]) == SKIPPED_CAP
    json.dumps(ds.meta)  # meta stays JSON-serialisable


def test_limit_keeps_the_first_usable_samples_in_id_order(tmp_path: Path) -> None:
    make_utkface(tmp_path)
    ids = sorted(UTKFACE_FACES)
    garble(tmp_path / ids[1])
    ds = load_utkface(tmp_path, image_size=SIZE, strict=False, limit=3)
    assert ds.sample_ids.tolist() == [ids[0], ids[2], ids[3]]
    assert ds.meta["limit"] == 3 and ds.meta["skipped_count"] == 1
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="limit"):
            load_utkface(tmp_path, image_size=SIZE, limit=bad)


def test_empty_root_is_an_error_not_an_empty_data_set(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no usable utkface images"):
        load_utkface(tmp_path, image_size=SIZE)


@pytest.mark.parametrize("name", [s for s in SOURCES if s != "synthfaces"])
def test_missing_root_raises_file_not_found_naming_it(tmp_path: Path, name: str) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_source(name, missing)


# --- CelebA --------------------------------------------------------------------------------

def test_celeba_identities_gender_and_all_40_labels(tmp_path: Path) -> None:
    fixture = make_celeba(tmp_path)
    attrs = fixture["attrs"]
    ds = load_celeba(tmp_path, image_size=SIZE)
    assert ds.sample_ids.tolist() == [f"img_align_celeba/{f}" for f in fixture["files"]]
    assert ds.images.shape == (8, SIZE, SIZE, 3)
    assert list(ds.labels) == [a.lower() for a in CELEBA_ATTRIBUTES] and len(ds.labels) == 40
    for k, name in enumerate(CELEBA_ATTRIBUTES):
        np.testing.assert_array_equal(ds.labels[name.lower()], attrs[:, k] == 1)
    np.testing.assert_array_equal(ds.gender, attrs[:, CELEBA_ATTRIBUTES.index("Male")] == 1)
    assert ds.identity_names == ("2", "7", "10")  # numeric order of CelebA ids
    assert [int(ds.identity_names[c]) for c in ds.identity] == list(CELEBA_IDENTITIES)
    assert (ds.group == -1).all() and (ds.age == -1).all() and ds.group_names == ()


def test_celeba_split_keeps_one_official_partition(tmp_path: Path) -> None:
    fixture = make_celeba(tmp_path)
    ds = load_source("celeba", tmp_path, image_size=SIZE, split="val")
    expected = [f"img_align_celeba/{f}" for f, p in zip(fixture["files"], CELEBA_PARTITION) if p == 1]
    assert ds.sample_ids.tolist() == expected and ds.meta["split"] == "val"
    with pytest.raises(ValueError, match="unknown split"):
        load_celeba(tmp_path, split="holdout")


def test_celeba_image_without_attribute_row(tmp_path: Path) -> None:
    make_celeba(tmp_path)
    attr = tmp_path / "list_attr_celeba.txt"
    attr.write_text("".join(line for line in attr.read_text().splitlines(keepends=True)
                            if not line.startswith("000003.jpg")))
    with pytest.raises(ValueError, match="no row in list_attr_celeba.txt") as info:
        load_celeba(tmp_path, image_size=SIZE)
    assert str(tmp_path / "img_align_celeba" / "000003.jpg") in str(info.value)
    ds = load_celeba(tmp_path, image_size=SIZE, strict=False)
    assert len(ds) == 7 and "img_align_celeba/000003.jpg" not in ds.sample_ids.tolist()
    assert ds.meta["skipped_count"] == 1


def test_celeba_malformed_attribute_row_names_line_and_file(tmp_path: Path) -> None:
    make_celeba(tmp_path)
    attr = tmp_path / "list_attr_celeba.txt"
    lines = attr.read_text().splitlines()
    lines[4] = lines[4].replace("-1", " 0", 1)  # row of 000003.jpg, a 0 instead of -1/1
    attr.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"line 5: expected 40 attribute values of -1/1") as info:
        load_celeba(tmp_path, image_size=SIZE)
    assert "000003.jpg" in str(info.value) and str(attr) in str(info.value)


def test_celeba_listed_image_missing_on_disk(tmp_path: Path) -> None:
    make_celeba(tmp_path)
    missing = tmp_path / "img_align_celeba" / "000005.jpg"
    missing.unlink()
    with pytest.raises(ValueError, match="image file is missing") as info:
        load_celeba(tmp_path, image_size=SIZE)
    assert str(missing) in str(info.value)
    assert len(load_celeba(tmp_path, image_size=SIZE, strict=False)) == 7


def test_celeba_missing_annotation_files_raise_file_not_found(tmp_path: Path) -> None:
    make_celeba(tmp_path)
    (tmp_path / "list_eval_partition.txt").unlink()
    with pytest.raises(FileNotFoundError, match="list_eval_partition.txt"):
        load_celeba(tmp_path, split="test")
    (tmp_path / "identity_CelebA.txt").unlink()
    with pytest.raises(FileNotFoundError, match="identity_CelebA.txt"):
        load_celeba(tmp_path)


def test_celeba_annotations_may_sit_in_anno_folder(tmp_path: Path) -> None:
    make_celeba(tmp_path)
    (tmp_path / "Anno").mkdir()
    for name in ("list_attr_celeba.txt", "identity_CelebA.txt"):
        (tmp_path / name).rename(tmp_path / "Anno" / name)
    assert len(load_celeba(tmp_path, image_size=SIZE)) == 8


# --- FairFace ------------------------------------------------------------------------------

def test_fairface_gender_race_and_age_ranges(tmp_path: Path) -> None:
    rows = make_fairface(tmp_path)
    ds = load_fairface(tmp_path, image_size=SIZE)
    ids = sorted(rows)
    assert ds.sample_ids.tolist() == ids and ds.images.shape == (7, SIZE, SIZE, 3)
    assert ds.group_names == FAIRFACE_RACES
    np.testing.assert_array_equal(ds.gender, [rows[i][1] == "Male" for i in ids])
    np.testing.assert_array_equal(ds.group, [FAIRFACE_RACES.index(rows[i][2]) for i in ids])
    buckets = {"0-2": 0, "10-19": 0, "20-29": 0, "30-39": 1, "50-59": 1, "60-69": 2, "more than 70": 2}
    np.testing.assert_array_equal(ds.age, [buckets[rows[i][0]] for i in ids])
    assert ds.num_identities == 7 and ds.labels == {}
    assert load_fairface(tmp_path, image_size=SIZE, split="val").sample_ids.tolist() == ["val/1.jpg", "val/2.jpg"]


def test_fairface_unknown_gender_string(tmp_path: Path) -> None:
    make_fairface(tmp_path)
    csv_path = tmp_path / "fairface_label_train.csv"
    csv_path.write_text(csv_path.read_text().replace("train/2.jpg,20-29,Female", "train/2.jpg,20-29,Woman"))
    with pytest.raises(ValueError, match="unknown gender 'Woman'") as info:
        load_fairface(tmp_path, image_size=SIZE)
    assert str(tmp_path / "train" / "2.jpg") in str(info.value) and f"{csv_path}: line 3" in str(info.value)
    ds = load_fairface(tmp_path, image_size=SIZE, strict=False)
    assert "train/2.jpg" not in ds.sample_ids.tolist() and ds.meta["skipped_count"] == 1


def test_fairface_structural_errors_always_raise(tmp_path: Path) -> None:
    make_fairface(tmp_path)
    (tmp_path / "fairface_label_val.csv").unlink()
    with pytest.raises(FileNotFoundError, match="fairface_label_val.csv"):
        load_fairface(tmp_path, strict=False)
    assert len(load_fairface(tmp_path, image_size=SIZE, split="train")) == 5
    (tmp_path / "fairface_label_train.csv").write_text("file,gender\ntrain/1.jpg,Male\n")
    with pytest.raises(ValueError, match="bad CSV header"):
        load_fairface(tmp_path, split="train", strict=False)


# --- LFW -----------------------------------------------------------------------------------

def test_lfw_identities_from_folders_and_optional_genders(tmp_path: Path) -> None:
    make_lfw(tmp_path)
    ds = load_lfw(tmp_path, image_size=SIZE, gender_csv=tmp_path / "genders.csv")
    assert len(ds) == sum(LFW_PEOPLE.values()) and ds.images.shape[1:] == (SIZE, SIZE, 3)
    assert ds.identity_names == tuple(sorted(LFW_PEOPLE))
    people = [sid.split("/")[1] for sid in ds.sample_ids]
    assert [ds.identity_names[c] for c in ds.identity] == people
    assert all(sid.startswith(f"lfw/{p}/{p}_") for sid, p in zip(ds.sample_ids, people))
    genders = {"Alice_Able": 0, "Bob_Baker": 1, "Carol_Chen": -1}  # Carol is not in the CSV
    assert ds.gender.tolist() == [genders[p] for p in people]
    # Pointing at lfw/ itself gives the same ids and pixels.
    inner = load_source("lfw", tmp_path / "lfw", image_size=SIZE, gender_csv=tmp_path / "genders.csv")
    assert inner.fingerprint() == ds.fingerprint()
    assert (load_lfw(tmp_path, image_size=SIZE).gender == -1).all()


def test_lfw_gender_csv_errors(tmp_path: Path) -> None:
    make_lfw(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_lfw(tmp_path, gender_csv=tmp_path / "nope.csv")
    (tmp_path / "genders.csv").write_text("name,gender\nBob_Baker,unknown-value\n")
    with pytest.raises(ValueError, match="unknown gender 'unknown-value'") as info:
        load_lfw(tmp_path, image_size=SIZE, gender_csv=tmp_path / "genders.csv")
    assert "Bob_Baker_0001.jpg" in str(info.value)


# --- ImageFolder ---------------------------------------------------------------------------

def test_imagefolder_reads_attributes_csv(tmp_path: Path) -> None:
    make_imagefolder(tmp_path)
    ds = load_imagefolder(tmp_path, image_size=SIZE)
    assert ds.sample_ids.tolist() == ["anna/a1.png", "anna/a2.jpg", "ben/b1.png", "ben/sub/b2.png", "carl/c1.png"]
    assert ds.identity_names == ("anna", "ben", "carl") and ds.identity.tolist() == [0, 0, 1, 1, 2]
    assert ds.gender.tolist() == [0, 0, 1, 1, -1]
    assert ds.group_names == ("dark", "light") and ds.group.tolist() == [1, 1, 0, -1, 0]
    assert ds.age.tolist() == [0, 1, 2, -1, 2]  # 25 years, "30-59", "60+", empty, 61 years
    assert list(ds.labels) == ["smiling", "eyeglasses"]
    assert ds.labels["smiling"].tolist() == [1, 0, 1, -1, 0]
    assert ds.labels["eyeglasses"].tolist() == [0, -1, 1, 1, 0]


def test_imagefolder_without_csv_has_identities_only(tmp_path: Path) -> None:
    make_imagefolder(tmp_path)
    (tmp_path / "attributes.csv").unlink()
    ds = load_imagefolder(tmp_path, image_size=SIZE)
    assert ds.identity.tolist() == [0, 0, 1, 1, 2] and ds.labels == {}
    assert (ds.gender == -1).all() and (ds.group == -1).all() and (ds.age == -1).all()


@pytest.mark.parametrize(("edit", "culprit", "message"), [
    (lambda root: save_image(root / "carl" / "c2.png", 9), "carl/c2.png", "no row in attributes.csv"),
    (lambda root: (root / "ben" / "b1.png").unlink(), "ben/b1.png", "image file is missing"),
    (lambda root: (save_image(root / "loose.png", 9), _append(root / "attributes.csv", "loose.png,male,,,0,0\n")),
     "loose.png", "not inside an identity folder"),
    (lambda root: _replace(root / "attributes.csv", "a1.png,female,light,25,1,0", "a1.png,female,light,25,2,0"),
     "anna/a1.png", "unknown value for label 'smiling' '2'"),
    (lambda root: _replace(root / "attributes.csv", "carl/c1.png,,dark", "carl/c1.png,,purple"),
     "carl/c1.png", "unknown group 'purple'"),
])
def test_imagefolder_bad_samples(tmp_path: Path, edit, culprit: str, message: str) -> None:
    make_imagefolder(tmp_path)
    # Fix the group names so that an unlisted group is an error rather than a new group.
    _replace(tmp_path / "attributes.csv", "file,", '# group_names: ["light", "dark"]\nfile,')
    edit(tmp_path)
    with pytest.raises(ValueError, match=message) as info:
        load_imagefolder(tmp_path, image_size=SIZE)
    assert str(tmp_path / culprit) in str(info.value)
    ds = load_imagefolder(tmp_path, image_size=SIZE, strict=False)
    assert culprit not in ds.sample_ids.tolist() and ds.meta["skipped_count"] == 1
    assert ds.group_names == ("light", "dark")


@pytest.mark.parametrize("comment", ['["light", "light"]', '{"light": 0}', '["light", '])
def test_imagefolder_bad_group_names_comment_always_raises(tmp_path: Path, comment: str) -> None:
    make_imagefolder(tmp_path)
    _replace(tmp_path / "attributes.csv", "file,", f"# group_names: {comment}\nfile,")
    with pytest.raises(ValueError, match=f"{tmp_path / 'attributes.csv'}: .*group_names"):
        load_imagefolder(tmp_path, strict=False)


def test_imagefolder_groups_json_fixes_the_group_codes(tmp_path: Path) -> None:
    make_imagefolder(tmp_path)
    (tmp_path / GROUPS_JSON).write_text('{"group_names": ["light", "unused", "dark"]}')
    ds = load_imagefolder(tmp_path, image_size=SIZE)
    assert ds.group_names == ("light", "unused", "dark") and ds.group.tolist() == [0, 0, 2, -1, 2]
    _replace(tmp_path / ATTRIBUTES_CSV, "carl/c1.png,,dark", "carl/c1.png,,purple")
    with pytest.raises(ValueError, match="unknown group 'purple'"):
        load_imagefolder(tmp_path, image_size=SIZE)


@pytest.mark.parametrize(("text", "message"), [
    ('["light", "dark"]', "expected {\"group_names\""),
    ('{"group_names": ["light"], "colours": []}', "expected {\"group_names\""),
    ('{"group_names": ["light", "light"]}', "distinct"),
    ('{"group_names": [" light"]}', "unpadded"),
    ('{"group_names": [', "not valid JSON"),
])
def test_imagefolder_bad_groups_json_always_raises_naming_it(tmp_path: Path, text: str, message: str) -> None:
    make_imagefolder(tmp_path)
    (tmp_path / GROUPS_JSON).write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / GROUPS_JSON)) + ".*" + re.escape(message)):
        load_imagefolder(tmp_path, strict=False)


def test_imagefolder_groups_json_and_an_old_comment_must_agree(tmp_path: Path) -> None:
    make_imagefolder(tmp_path)
    _replace(tmp_path / ATTRIBUTES_CSV, "file,", '# group_names: ["light", "dark"]\nfile,')
    (tmp_path / GROUPS_JSON).write_text('{"group_names": ["light", "dark"]}')
    assert load_imagefolder(tmp_path, image_size=SIZE).group_names == ("light", "dark")
    (tmp_path / GROUPS_JSON).write_text('{"group_names": ["dark", "light"]}')
    with pytest.raises(ValueError, match="disagree with the '# group_names:' line"):
        load_imagefolder(tmp_path, image_size=SIZE)


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def _dataset(n: int = 9, size: int = 12) -> FaceDataset:
    """A hand-made data set with unsorted group names, an unused group, unknowns and labels."""
    rng = np.random.default_rng(5)
    return FaceDataset(
        images=rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8),
        identity=[3, 0, 3, 1, 0, 3, 1, 1, 0],
        gender=[0, 1, -1, 1, 0, 0, 1, 1, 0],
        group=[2, 0, -1, 2, 2, 0, 0, 2, -1],
        age=[0, 1, 2, -1, 0, 1, 2, 0, 1],
        labels={"smiling": [1, 0, -1, 1, 0, 0, 1, 1, 0], "young": [0, 0, 1, 1, -1, 0, 1, 0, 1]},
        sample_ids=[f"synth/{i}" for i in range(n)],
        source="synthfaces",
        group_names=("tone-3", "tone-1", "tone-2", "tone-0"),
    )


def _partition(identity: np.ndarray) -> set[frozenset[int]]:
    return {frozenset(np.flatnonzero(identity == c).tolist()) for c in np.unique(identity)}


@pytest.mark.parametrize("kind", ["handmade", "celeba"])
def test_imagefolder_round_trip_preserves_everything(tmp_path: Path, kind: str) -> None:
    if kind == "handmade":
        ds = _dataset()
    else:
        make_celeba(tmp_path / "celeba")
        ds = load_celeba(tmp_path / "celeba", image_size=SIZE)
    out = write_imagefolder(ds, tmp_path / "export")
    back = load_imagefolder(out, image_size=ds.image_size)
    order = back.positions(imagefolder_files(ds))  # loaded position of each original sample
    back = back.subset(order)
    np.testing.assert_array_equal(back.images, ds.images)
    assert _partition(back.identity) == _partition(ds.identity)
    for field in ("gender", "group", "age"):
        np.testing.assert_array_equal(getattr(back, field), getattr(ds, field))
    assert back.group_names == ds.group_names
    assert set(back.labels) == set(ds.labels)
    for name, values in ds.labels.items():
        np.testing.assert_array_equal(back.labels[name], values)
    if ds.identity_names:  # names survive (codes follow the sorted folder names)
        assert [back.identity_names[c] for c in back.identity] == [ds.identity_names[c] for c in ds.identity]
    for code in np.unique(ds.identity):  # each identity's images come back in their original order
        assert np.all(np.diff(order[ds.identity == code]) > 0)
    # Sample ids are the plain file paths, in sorted order, so a re-load is deterministic wherever it lives.
    assert back.sample_ids.tolist() == imagefolder_files(ds)
    assert all(re.fullmatch(r"[A-Za-z0-9_]+/\d{3}\.png", sid) for sid in back.sample_ids), back.sample_ids
    again = load_imagefolder(write_imagefolder(ds, tmp_path / "elsewhere"), image_size=ds.image_size)
    assert again.sample_ids.tolist() == sorted(imagefolder_files(ds))
    assert again.fingerprint() == load_imagefolder(out, image_size=ds.image_size).fingerprint()


def test_imagefolder_export_has_plain_file_names(tmp_path: Path) -> None:
    ds = _dataset()  # identities [3, 0, 3, 1, 0, 3, 1, 1, 0], sample ids "synth/<i>"
    assert imagefolder_files(ds) == ["00003/000.png", "00000/000.png", "00003/001.png", "00001/000.png",
                                     "00000/001.png", "00003/002.png", "00001/001.png", "00001/002.png",
                                     "00000/002.png"]
    root = write_imagefolder(ds, tmp_path / "export")
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    images = [f for f in files if f not in (ATTRIBUTES_CSV, GROUPS_JSON)]
    assert set(files) - set(images) == {ATTRIBUTES_CSV, GROUPS_JSON} and len(images) == len(ds)
    assert all(re.fullmatch(r"\d{5}/\d{3}\.png", f) for f in images), images


def test_imagefolder_export_index_widens_past_a_thousand_images() -> None:
    n = 1001
    ds = FaceDataset(images=np.zeros((n, 8, 8, 3), dtype=np.uint8), identity=[0] * n, gender=[-1] * n,
                     group=[-1] * n, age=[-1] * n, labels={}, sample_ids=[f"s{i}" for i in range(n)], source="x")
    files = imagefolder_files(ds)
    assert files[0] == "00000/0000.png" and files[-1] == "00000/1000.png"
    assert sorted(files) == files  # name order is still sample order


def test_attributes_csv_is_a_plain_csv(tmp_path: Path) -> None:
    ds = _dataset()
    root = write_imagefolder(ds, tmp_path / "export")
    text = (root / ATTRIBUTES_CSV).read_text(encoding="utf-8")
    assert not any(line.startswith("#") for line in text.splitlines())
    with open(root / ATTRIBUTES_CSV, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames == ["file", "gender", "group", "age", "smiling", "young"]
    assert len(rows) == len(ds) and [r["file"] for r in rows] == sorted(imagefolder_files(ds))
    assert rows[0] == {"file": "00000/000.png", "gender": "male", "group": "tone-3", "age": "30-59",
                       "smiling": "0", "young": "0"}
    assert json.loads((root / GROUPS_JSON).read_text(encoding="utf-8")) == {
        "group_names": ["tone-3", "tone-1", "tone-2", "tone-0"]}


def test_imagefolder_still_reads_the_old_group_names_comment(tmp_path: Path) -> None:
    ds = _dataset()
    new = write_imagefolder(ds, tmp_path / "new")
    old = write_imagefolder(ds, tmp_path / "old")
    (old / GROUPS_JSON).unlink()
    _replace(old / ATTRIBUTES_CSV, "file,", '# group_names: ["tone-3", "tone-1", "tone-2", "tone-0"]\nfile,')
    back_old, back_new = (load_imagefolder(r, image_size=ds.image_size) for r in (old, new))
    assert back_old.group_names == back_new.group_names == ds.group_names
    assert back_old.fingerprint() == back_new.fingerprint()


def test_write_imagefolder_refuses_identity_folders_that_would_collide(tmp_path: Path) -> None:
    ds = _dataset()
    for names, message in [(("Anna", "b", "c", "anna"), "differ only in letter case"),
                           (("a", "b", "c", GROUPS_JSON), "cannot be a folder name")]:
        named = FaceDataset(images=ds.images, identity=ds.identity, gender=ds.gender, group=ds.group, age=ds.age,
                            labels=ds.labels, sample_ids=ds.sample_ids, source="x", group_names=ds.group_names,
                            identity_names=names)
        with pytest.raises(ValueError, match=message):
            write_imagefolder(named, tmp_path / "export")
        assert not (tmp_path / "export").exists()


def test_write_imagefolder_is_byte_deterministic(tmp_path: Path) -> None:
    ds = _dataset()

    def snapshot(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    first = snapshot(write_imagefolder(ds, tmp_path / "a"))
    second = snapshot(write_imagefolder(ds, tmp_path / "b"))
    assert first == second
    assert {"attributes.csv", "groups.json", "00003/000.png"} <= set(first)
    assert first["attributes.csv"].decode().splitlines()[0] == "file,gender,group,age,smiling,young"


def test_write_imagefolder_refuses_non_empty_target_and_bad_names(tmp_path: Path) -> None:
    ds = _dataset()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "old.txt").write_text("x")
    with pytest.raises(FileExistsError, match="busy"):
        write_imagefolder(ds, tmp_path / "busy")
    clash = FaceDataset(images=ds.images, identity=ds.identity, gender=ds.gender, group=ds.group, age=ds.age,
                        labels={"group": ds.labels["smiling"]}, sample_ids=ds.sample_ids, source="x",
                        group_names=ds.group_names)
    with pytest.raises(ValueError, match="label names"):
        write_imagefolder(clash, tmp_path / "clash")
    assert not (tmp_path / "clash").exists()  # validated before writing anything


# --- dispatcher ----------------------------------------------------------------------------

def test_load_source_dispatches_and_validates(tmp_path: Path) -> None:
    make_utkface(tmp_path)
    assert load_source("utkface", tmp_path, image_size=SIZE).fingerprint() == \
        load_utkface(tmp_path, image_size=SIZE).fingerprint()
    with pytest.raises(ValueError, match="common.data.sources.synthfaces.generator.generate"):
        load_source("synthfaces", tmp_path)
    with pytest.raises(ValueError, match="unknown data source 'mnist'"):
        load_source("mnist", tmp_path)
    with pytest.raises(ValueError, match=r"no option\(s\) \['split'\].*accepted: none"):
        load_source("utkface", tmp_path, split="train")
    assert source_options("celeba") == ("split",) and source_options("lfw") == ("gender_csv",)
