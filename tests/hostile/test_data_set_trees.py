"""Hostile data set trees: UTKFace, CelebA, FairFace, LFW, ImageFolder + attributes.csv.

See the package docstring for the properties every test checks.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fixtures_faces import (
    make_celeba,
    make_fairface,
    make_imagefolder,
    make_lfw,
    make_utkface,
)
from hypothesis import event, given
from hypothesis import strategies as st

from .conftest import Scratch, fuzz, listing

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")]


TREES: dict[str, Callable[[Path], Any]] = {"utkface": make_utkface, "celeba": make_celeba, "fairface": make_fairface,
                                          "lfw": make_lfw, "imagefolder": make_imagefolder}
IMAGE_SUFFIXES = (".jpg", ".png")


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("trees")
    for name, make in TREES.items():
        make(base / name)
    return {name: base / name for name in TREES}


CELL_TOKENS = st.sampled_from(["\x00", "\ufeff", '"', '"unclosed', ",", "\n", "\r", "9" * 5000, "-1", "#", "é",
                               " ", "\t", "Male", "female", "more than 99999", "20-9999", "0" * 30,
                               "# group_names: " + "[" * 5000, "# group_names: [1]", '# group_names: ["a","a"]',
                               "# group_names: " + "9" * 5000, "x" * 200000])


BIG_NUMBERS = st.sampled_from(["9" * 5000, "9" * 5000 + "-9", "more than " + "9" * 5000, "9" * 19])


@st.composite
def damaged_tree(draw: st.DrawFn, root: Path) -> None:
    """In place: an annotation file with a hostile field, text inserted, lines cut, repeated or swapped,
    or bytes that are not UTF-8; or an image bit-flipped, truncated, emptied or replaced by a
    directory."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    texts = [p for p in files if p.suffix not in IMAGE_SUFFIXES]
    target = draw(st.sampled_from(texts if texts and draw(st.integers(0, 3)) else files))  # mostly annotations
    if target.suffix in IMAGE_SUFFIXES:
        how = draw(st.sampled_from(["flip", "truncate", "empty", "directory"]))
        raw = bytearray(target.read_bytes())
        if how == "flip":
            for pos, mask in draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(1, 255)), min_size=1,
                                           max_size=8)):
                raw[pos] ^= mask
        elif how == "truncate":
            raw = raw[: draw(st.integers(0, len(raw) - 1))]
        elif how == "empty":
            raw = bytearray()
        target.unlink()
        if how == "directory":
            target.mkdir()
        else:
            target.write_bytes(bytes(raw))
        return
    lines = target.read_text(encoding="utf-8").splitlines(keepends=True) or [""]
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        how = draw(st.sampled_from(["cell", "insert", "cut", "repeat", "swap", "replace"]))
        if how == "cell":  # one CSV field or whitespace-separated value
            sep = "," if "," in lines[i] else " "
            cells = lines[i].rstrip("\n").split(sep)
            cells[draw(st.integers(0, len(cells) - 1))] = draw(st.one_of(CELL_TOKENS, BIG_NUMBERS, st.text(max_size=8)))
            lines[i] = sep.join(cells) + "\n"
        elif how == "insert":
            at = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:at] + draw(st.one_of(CELL_TOKENS, st.text(max_size=8))) + lines[i][at:]
        elif how == "cut" and len(lines) > 1:
            del lines[i]
        elif how == "repeat":
            lines.insert(i, lines[i])
        elif how == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        else:
            lines[i] = draw(CELL_TOKENS) + "\n"
    tail = draw(st.sampled_from([b"", b"\xff", b"\x80\n"]))  # not UTF-8
    target.write_bytes("".join(lines).encode("utf-8", "surrogatepass") + tail)


@fuzz(120)
@given(data=st.data())
def test_damaged_data_set_loads_or_names_the_path(trees: dict[str, Path], data: st.DataObject,
                                                  scratch: Scratch) -> None:
    """Every loader, strict or lenient, returns a data set or raises ValueError (SampleError is
    one) / FileNotFoundError naming a path in the tree, and writes nothing into it."""
    from common.data.sources import load_source

    name = data.draw(st.sampled_from(sorted(TREES)), label="source")
    root = scratch.new() / name
    shutil.copytree(trees[name], root)
    data.draw(damaged_tree(root), label="damage")
    options = {"gender_csv": root / "genders.csv"} if name == "lfw" else {}
    before = listing(root)
    try:
        ds = load_source(name, root, image_size=16, strict=data.draw(st.booleans(), label="strict"), **options)
    except (ValueError, FileNotFoundError) as exc:
        event(f"{name}: refused")
        assert str(root) in str(exc), str(exc)[:300]
    else:
        event(f"{name}: loaded")
        assert len(ds) > 0 and ds.images.shape[1:] == (16, 16, 3)
    assert listing(root) == before


@pytest.mark.parametrize(("source", "file", "row", "problem"), [
    ("imagefolder", "attributes.csv", "anna/a1.png,female,light," + "9" * 5000 + ",1,0\n", "unknown age"),
    ("imagefolder", "attributes.csv", "# group_names: " + "[" * 5000 + "\n", "bad group_names comment"),
    ("fairface", "fairface_label_train.csv", "train/1.jpg," + "9" * 5000 + "-1,Male,White,True\n", "unknown age"),
    ("celeba", "identity_CelebA.txt", "000001.jpg " + "9" * 5000 + "\n", "at most 18 digits"),
])
def test_oversized_numbers_in_annotations_name_the_file(trees: dict[str, Path], tmp_path: Path, source: str,
                                                        file: str, row: str, problem: str) -> None:
    """Numbers beyond Python's 4300-digit int() limit used to raise a ValueError naming nothing
    (and deep JSON a RecursionError); the hostile value is echoed cut short."""
    from common.data.sources import load_source

    root = tmp_path / source
    shutil.copytree(trees[source], root)
    path = root / file
    key = re.split(r"[ ,]", row)[0]  # the image's file name, or '#' for a comment line
    lines = [line for line in path.read_text().splitlines(keepends=True) if not line.startswith(key + row[len(key)])]
    lines.insert(0 if key == "#" else 1, row)  # a comment first, a row in place of the image's own row
    path.write_text("".join(lines))
    with pytest.raises(ValueError, match=problem) as info:
        load_source(source, root, image_size=16)
    assert str(root) in str(info.value) and len(str(info.value)) < 1000


def test_annotation_file_that_is_a_directory_is_named(trees: dict[str, Path], tmp_path: Path) -> None:
    from common.data.sources import load_source

    root = tmp_path / "fairface"
    shutil.copytree(trees["fairface"], root)
    (root / "fairface_label_val.csv").unlink()
    (root / "fairface_label_val.csv").mkdir()
    with pytest.raises(ValueError, match=re.escape(f"{root / 'fairface_label_val.csv'}: cannot read")):
        load_source("fairface", root, image_size=16)
