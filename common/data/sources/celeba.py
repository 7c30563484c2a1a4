"""CelebA: aligned images, 40 binary attributes, identity and partition files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from common.data.dataset import FaceDataset
from common.data.image_io import SampleError
from common.data.sources.reader import (
    Sample,
    SourceReader,
    clip,
    index_rows,
    list_images,
    read_text,
    require_dir,
    whitespace_rows,
)

CELEBA_IMAGES = "img_align_celeba"
CELEBA_ATTRS = "list_attr_celeba.txt"
CELEBA_IDENTITIES = "identity_CelebA.txt"
CELEBA_PARTITION = "list_eval_partition.txt"
CELEBA_SPLITS: dict[str, str] = {"train": "0", "val": "1", "test": "2"}
_CELEBA_LAYOUT = (f"{CELEBA_IMAGES}/, {CELEBA_ATTRS} and {CELEBA_IDENTITIES} "
                  f"(annotation files in the root or in Anno/ and Eval/)")


def _celeba_file(root: Path, name: str) -> Path:
    """An annotation file in the root or in the official archive's ``Anno/`` / ``Eval/``."""
    for folder in (root, root / "Anno", root / "Eval"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{root / name}: CelebA annotation file not found (also looked in Anno/ and Eval/)")


def _celeba_attr_table(path: Path) -> tuple[list[str], dict[str, tuple[str, list[str]]]]:
    """Attribute names and rows of ``list_attr_celeba.txt`` (count line, names line, rows)."""
    lines = read_text(path).splitlines()
    if len(lines) < 2 or not lines[0].strip().isdigit() or not lines[1].split():
        raise ValueError(f"{path}: not a CelebA attribute file; expected an image count on line 1 "
                         f"and the attribute names on line 2")
    names = lines[1].split()
    if "Male" not in names or len(set(names)) != len(names):
        raise ValueError(f"{path}: line 2: expected unique attribute names including 'Male', got {clip(names)}")
    return names, _celeba_rows(path, lines[2:], 3)


def _celeba_table(path: Path) -> dict[str, tuple[str, list[str]]]:
    """Rows of a ``<file> <value>`` CelebA annotation file, keyed by sample id."""
    return _celeba_rows(path, read_text(path).splitlines(), 1)


def _celeba_rows(path: Path, lines: Sequence[str], first_line: int) -> dict[str, tuple[str, list[str]]]:
    """``<file> <values...>`` lines keyed by sample id (``img_align_celeba/<file>``)."""
    return index_rows((where, f"{CELEBA_IMAGES}/{key}", values)
                      for where, key, values in whitespace_rows(path, lines, first_line))


def load_celeba(root: str | Path, *, image_size: int = 64, strict: bool = True, limit: int | None = None,
                cache: Path | None = None, split: str | None = None) -> FaceDataset:
    """CelebA (aligned): identities from ``identity_CelebA.txt``, the 40 attributes as labels.

    Labels are the attribute names lower-cased (``smiling``, ``male``, ...) with -1/1 mapped to
    0/1; gender is ``Male``. ``split`` ("train", "val" or "test") keeps one official partition
    (``list_eval_partition.txt`` is then required); by default all images are loaded and the
    partition file is not read: facefl's split manifest assigns its own roles.
    """
    reader = SourceReader("celeba", root, _CELEBA_LAYOUT, image_size=image_size, strict=strict, limit=limit,
                          cache=cache)
    if split is not None and split not in CELEBA_SPLITS:
        raise ValueError(f"celeba: unknown split {split!r}; expected one of {list(CELEBA_SPLITS)} or None")
    images_dir = require_dir(reader.root / CELEBA_IMAGES, "CelebA image folder")
    attr_path = _celeba_file(reader.root, CELEBA_ATTRS)
    id_path = _celeba_file(reader.root, CELEBA_IDENTITIES)
    names, attrs = _celeba_attr_table(attr_path)
    identities = _celeba_table(id_path)
    disk = list_images(images_dir, reader.root)
    if split is not None:
        partition = _celeba_table(_celeba_file(reader.root, CELEBA_PARTITION))
        chosen = {key for key, (_, values) in partition.items() if values == [CELEBA_SPLITS[split]]}
        disk = [key for key in disk if key in chosen]
        attrs = {key: row for key, row in attrs.items() if key in chosen}
        identities = {key: row for key, row in identities.items() if key in chosen}
    male = names.index("Male")

    def make(sample_id: str) -> Sample:
        path = reader.root / sample_id
        where, values = attrs[sample_id]
        if len(values) != len(names) or any(v not in ("-1", "1") for v in values):
            raise SampleError(path, f"{where}: expected {len(names)} attribute values of -1/1, got {clip(values)}")
        id_where, id_values = identities[sample_id]
        ident = id_values[0] if len(id_values) == 1 else ""
        if not (ident.isascii() and ident.isdigit() and len(ident) <= 18):
            raise SampleError(path, f"{id_where}: expected one non-negative integer identity (at most 18 digits), "
                                    f"got {clip(id_values)}")
        flags = tuple(int(v == "1") for v in values)
        return Sample(sample_id, path, identity=int(ident), gender=flags[male], labels=flags)

    ids = reader.join(disk, {attr_path.name: attrs, id_path.name: identities})
    return reader.finish(reader.collect(ids, make), label_names=[n.lower() for n in names],
                         named_identities=True, split=split)


