"""Loaders for public face data sets (UTKFace, CelebA, FairFace, LFW) into a ``FaceDataset``.

Each loader only knows its source's layout and attribute coding; everything else is shared
through ``SourceReader``: argument checks, matching images on disk against annotation rows,
strict/lenient handling of bad samples, decoding, identity codes and ``meta``. That way every
source fails (or skips) the same way, and the same data always loads to the same arrays:
samples are ordered by sample id and identity codes follow the sorted identity keys.

Strict mode raises ``SampleError`` (a ``ValueError``) at the first bad sample, naming its path
and what was expected. Lenient mode skips bad samples, logs one warning with the count and
records them in ``meta["skipped"]`` (capped) and ``meta["skipped_count"]``. Structural problems
(missing root or annotation file, bad header, wrong field count, duplicate entries) always
raise: they make a whole annotation file suspect, not one sample.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import numpy as np
from tqdm import tqdm

from common.data.dataset import UNKNOWN, FaceDataset, age_to_bucket
from common.data.image_io import SampleError, is_image_name, read_image

logger = logging.getLogger(__name__)

T = TypeVar("T")

SKIPPED_CAP = 100
"""At most this many skipped samples are listed in ``meta["skipped"]`` (the count is exact)."""


@dataclass(frozen=True)
class Sample:
    """One image and its annotations, before decoding.

    ``identity`` is the source's identity key (a name or a number, one type per source);
    ``None`` makes the image its own identity (sources without identity annotations).
    ``labels`` follow the ``label_names`` passed to ``SourceReader.finish``.
    """

    sample_id: str
    path: Path
    identity: str | int | None = None
    gender: int = UNKNOWN
    group: int = UNKNOWN
    age: int = UNKNOWN
    labels: tuple[int, ...] = ()


class SourceReader:
    """Bookkeeping for loading one source: bad samples, image decoding, dataset assembly.

    Raises ``FileNotFoundError`` when ``root`` is not a directory and ``ValueError`` for a
    bad ``image_size`` or ``limit``. ``layout`` describes the expected layout for messages.
    """

    def __init__(self, source: str, root: str | Path, layout: str, *, image_size: int,
                 strict: bool, limit: int | None) -> None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"{source}: image_size must be a positive integer, got {image_size!r}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"{source}: limit must be a positive integer or None, got {limit!r}")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: {source} data root not found; expected {layout}")
        self.source = source
        self.layout = layout
        self.image_size = image_size
        self.strict = strict
        self.limit = limit
        self.skipped: list[dict[str, str]] = []
        self.skipped_count = 0

    def reject(self, err: SampleError) -> None:
        """Raise ``err`` (strict) or record it as skipped (lenient)."""
        if self.strict:
            raise err
        self.skipped_count += 1
        if len(self.skipped) < SKIPPED_CAP:
            self.skipped.append({"path": err.path, "reason": err.reason})

    def collect(self, keys: Iterable[str], make: Callable[[str], Sample]) -> list[Sample]:
        """``make(key)`` for every key, rejecting the keys whose annotations are unusable."""
        samples = []
        for key in keys:
            try:
                samples.append(make(key))
            except SampleError as err:
                self.reject(err)
        return samples

    def join(self, disk_ids: Iterable[str], tables: Mapping[str, Mapping[str, Any]]) -> list[str]:
        """Sorted ids that are on disk and in every annotation table; reject the others once.

        ``tables`` maps an annotation file name (for messages) to its rows keyed by sample id.
        """
        disk = set(disk_ids)
        found = []
        for key in sorted(disk.union(*tables.values())):
            lacking = [name for name, rows in tables.items() if key not in rows]
            if key not in disk:
                listed = ", ".join(name for name in tables if name not in lacking)
                self.reject(SampleError(self.root / key, f"listed in {listed} but the image file is missing"))
            elif lacking:
                self.reject(SampleError(self.root / key, f"image has no row in {', '.join(lacking)}"))
            else:
                found.append(key)
        return found

    def finish(self, samples: Sequence[Sample], *, group_names: Sequence[str] = (),
               label_names: Sequence[str] = (), named_identities: bool = False,
               **meta: Any) -> FaceDataset:
        """Decode the samples (in sample-id order, up to ``limit``) into a ``FaceDataset``.

        ``named_identities`` keeps the sorted identity keys as ``identity_names``; ``meta``
        adds source-specific, JSON-serialisable entries.
        """
        order = sorted(samples, key=lambda s: s.sample_id)
        wanted = len(order) if self.limit is None else min(self.limit, len(order))
        images = np.empty((wanted, self.image_size, self.image_size, 3), dtype=np.uint8)
        kept: list[Sample] = []
        with tqdm(total=wanted, desc=f"loading {self.source}", unit="img", disable=None, leave=False) as bar:
            for sample in order:
                if len(kept) == wanted:
                    break
                try:
                    images[len(kept)] = read_image(sample.path, self.image_size)
                except SampleError as err:
                    self.reject(err)
                    continue
                kept.append(sample)
                bar.update()
        if self.skipped_count:
            first = self.skipped[0]
            logger.warning("%s: skipped %d bad samples under %s (listed in meta['skipped']); first: %s: %s",
                           self.source, self.skipped_count, self.root, first["path"], first["reason"])
        if not kept:
            raise ValueError(f"{self.root}: no usable {self.source} images "
                             f"({self.skipped_count} skipped); expected {self.layout}")
        if len(kept) < wanted:
            images = images[: len(kept)].copy()
        keys = [s.sample_id if s.identity is None else s.identity for s in kept]
        names = sorted(set(keys))
        code = {key: i for i, key in enumerate(names)}
        return FaceDataset(
            images=images,
            identity=[code[k] for k in keys],
            gender=[s.gender for s in kept],
            group=[s.group for s in kept],
            age=[s.age for s in kept],
            labels={name: [s.labels[j] for s in kept] for j, name in enumerate(label_names)},
            sample_ids=[s.sample_id for s in kept],
            source=self.source,
            group_names=tuple(group_names),
            identity_names=tuple(str(k) for k in names) if named_identities else (),
            meta={"root": str(self.root.resolve()), "image_size": self.image_size, "strict": self.strict,
                  "limit": self.limit, "count": len(kept), "num_identities": len(names),
                  "skipped_count": self.skipped_count, "skipped": list(self.skipped), **meta},
        )


# --- shared file helpers -------------------------------------------------------------------

def clip(value: Any, limit: int = 120) -> str:
    """``repr(value)`` cut to ``limit`` characters: annotation files are untrusted, and a hostile
    5000-character cell must not turn an error message into a wall of text."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a directory; otherwise a FileNotFoundError saying what was expected there."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: {what} not found (expected a directory)")
    return path


def list_images(directory: Path, base: Path) -> list[str]:
    """Sorted posix paths, relative to ``base``, of the image files under ``directory``.

    Hidden files and folders (including temporary files) and non-image suffixes are ignored.
    """
    found = []
    for path in directory.rglob("*"):
        rel = path.relative_to(directory)
        if any(part.startswith(".") for part in rel.parts) or not is_image_name(path.name):
            continue
        if path.is_file():
            found.append(path.relative_to(base).as_posix())
    return sorted(found)


def read_text(path: Path) -> str:
    """Read a UTF-8 annotation file (a BOM is dropped), naming the file in any error."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: annotation file not found") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from None
    except OSError as exc:  # a directory, no permission
        raise ValueError(f"{path}: cannot read annotation file ({exc.strerror or exc})") from None


@dataclass(frozen=True)
class CsvTable:
    """A CSV file: leading ``#`` comment lines, the header and rows tagged ``"<path>: line N"``."""

    comments: list[str]
    columns: list[str]
    rows: list[tuple[str, dict[str, str]]]


def read_csv(path: Path, required: Sequence[str]) -> CsvTable:
    """Read a headed CSV; raise ValueError naming the file for a bad header or field count."""
    lines = read_text(path).splitlines(keepends=True)
    skip = 0
    while skip < len(lines) and lines[skip].startswith("#"):
        skip += 1
    reader = csv.reader(lines[skip:])
    try:
        columns = [c.strip() for c in next(reader)]
    except StopIteration:
        raise ValueError(f"{path}: empty CSV; expected a header with columns {list(required)}") from None
    except csv.Error as exc:
        raise ValueError(f"{path}: line {skip + 1}: malformed CSV header ({exc})") from None
    missing = [c for c in required if c not in columns]
    if missing or "" in columns or len(set(columns)) != len(columns):
        raise ValueError(f"{path}: bad CSV header {clip(columns)}; expected unique, non-empty column names "
                         f"including {list(required)}")
    rows = []
    try:
        for fields in reader:
            where = f"{path}: line {skip + reader.line_num}"
            if not any(f.strip() for f in fields):
                continue
            if len(fields) != len(columns):
                raise ValueError(f"{where}: {len(fields)} fields, expected {len(columns)} ({clip(columns)})")
            rows.append((where, {c: f.strip() for c, f in zip(columns, fields)}))
    except csv.Error as exc:
        raise ValueError(f"{path}: line {skip + reader.line_num}: malformed CSV ({exc})") from None
    return CsvTable([line.rstrip("\r\n") for line in lines[:skip]], columns, rows)


def whitespace_rows(path: Path, lines: Sequence[str], first_line: int) -> Iterable[tuple[str, str, list[str]]]:
    """``(where, first field, other fields)`` for each non-blank line (1-based ``first_line``)."""
    for number, line in enumerate(lines, start=first_line):
        fields = line.split()
        if fields:
            yield f"{path}: line {number}", fields[0], fields[1:]


def index_rows(items: Iterable[tuple[str, str, T]]) -> dict[str, tuple[str, T]]:
    """Key -> (where, row); a key listed twice is a ValueError naming both places."""
    table: dict[str, tuple[str, T]] = {}
    for where, key, row in items:
        if key in table:
            raise ValueError(f"{where}: {clip(key)} is listed twice (first at {table[key][0]})")
        table[key] = (where, row)
    return table


def relative_key(value: str) -> str:
    """Normalise an annotated file path (``./a/b.jpg`` -> ``a/b.jpg``) so it matches a sample id."""
    return PurePosixPath(value.strip()).as_posix()


def parse_code(path: Path, where: str, what: str, value: str, codes: Mapping[str, int]) -> int:
    """``codes[value]``, or a SampleError for ``path`` saying which values were expected."""
    try:
        return codes[value]
    except KeyError:
        expected = ", ".join(repr(k) for k in codes)
        raise SampleError(path, f"{where}: unknown {what} {clip(value)}; expected one of {expected}") from None


# --- UTKFace -------------------------------------------------------------------------------

UTKFACE_RACES: tuple[str, ...] = ("White", "Black", "Asian", "Indian", "Others")
_UTKFACE_LAYOUT = "a folder of <age>_<gender 0|1>_<race 0-4>_<datetime>.jpg images (UTKFace)"
_UTKFACE_NAME = re.compile(r"(\d{1,3})_([01])_([0-4])_\d+", re.ASCII)


def load_utkface(root: str | Path, *, image_size: int = 64, strict: bool = True,
                 limit: int | None = None) -> FaceDataset:
    """UTKFace: attributes come from file names; no identities (each image is its own).

    UTKFace codes gender 0 = male, 1 = female; it is flipped to the project's coding. Images
    may sit in sub-folders (the in-the-wild parts); ``.jpg.chip.jpg`` names are accepted.
    """
    reader = SourceReader("utkface", root, _UTKFACE_LAYOUT, image_size=image_size, strict=strict, limit=limit)

    def make(sample_id: str) -> Sample:
        path = reader.root / sample_id
        match = _UTKFACE_NAME.fullmatch(path.name.split(".", 1)[0])
        if match is None:
            raise SampleError(path, f"file name does not encode the attributes; expected {_UTKFACE_LAYOUT}")
        age, gender, race = (int(g) for g in match.groups())
        return Sample(sample_id, path, gender=1 - gender, group=race, age=age_to_bucket(age))

    samples = reader.collect(list_images(reader.root, reader.root), make)
    return reader.finish(samples, group_names=UTKFACE_RACES)


# --- CelebA --------------------------------------------------------------------------------

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
                split: str | None = None) -> FaceDataset:
    """CelebA (aligned): identities from ``identity_CelebA.txt``, the 40 attributes as labels.

    Labels are the attribute names lower-cased (``smiling``, ``male``, ...) with -1/1 mapped to
    0/1; gender is ``Male``. ``split`` ("train", "val" or "test") keeps one official partition
    (``list_eval_partition.txt`` is then required); by default all images are loaded and the
    partition file is not read: facefl's split manifest assigns its own roles.
    """
    reader = SourceReader("celeba", root, _CELEBA_LAYOUT, image_size=image_size, strict=strict, limit=limit)
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


# --- FairFace ------------------------------------------------------------------------------

FAIRFACE_RACES: tuple[str, ...] = ("White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian",
                                   "Indian", "Middle Eastern")
FAIRFACE_SPLITS: tuple[str, ...] = ("train", "val")
FAIRFACE_GENDERS: dict[str, int] = {"Female": 0, "Male": 1}
_FAIRFACE_LAYOUT = "train/, val/, fairface_label_train.csv and fairface_label_val.csv (FairFace)"
_FAIRFACE_AGE = re.compile(r"(\d{1,3})-\d{1,3}|more than (\d{1,3})", re.ASCII)


def load_fairface(root: str | Path, *, image_size: int = 64, strict: bool = True, limit: int | None = None,
                  split: str | None = None) -> FaceDataset:
    """FairFace: gender, 7 race groups and age ranges from the label CSVs; no identities.

    An age range maps to the bucket of its lower bound ("20-29" -> 20, "more than 70" -> 70).
    ``split`` ("train" or "val") loads one half; by default both (both CSVs required). The
    ``service_test`` column is ignored.
    """
    reader = SourceReader("fairface", root, _FAIRFACE_LAYOUT, image_size=image_size, strict=strict, limit=limit)
    if split is not None and split not in FAIRFACE_SPLITS:
        raise ValueError(f"fairface: unknown split {split!r}; expected one of {list(FAIRFACE_SPLITS)} or None")
    splits = FAIRFACE_SPLITS if split is None else (split,)
    disk: list[str] = []
    items: list[tuple[str, str, dict[str, str]]] = []
    for part in splits:
        csv_path = reader.root / f"fairface_label_{part}.csv"
        table = read_csv(csv_path, ("file", "age", "gender", "race"))
        items.extend((where, relative_key(row["file"]), row) for where, row in table.rows)
        disk.extend(list_images(require_dir(reader.root / part, f"FairFace {part} folder"), reader.root))
    rows = index_rows(items)
    races = {name: i for i, name in enumerate(FAIRFACE_RACES)}

    def make(sample_id: str) -> Sample:
        path = reader.root / sample_id
        where, row = rows[sample_id]
        age = _FAIRFACE_AGE.fullmatch(row["age"])
        if age is None:
            raise SampleError(path, f"{where}: unknown age {clip(row['age'])}; expected a range like "
                                    f"'20-29' or 'more than 70'")
        return Sample(sample_id, path,
                      gender=parse_code(path, where, "gender", row["gender"], FAIRFACE_GENDERS),
                      group=parse_code(path, where, "race", row["race"], races),
                      age=age_to_bucket(int(age.group(1) or age.group(2))))

    label_files = " or ".join(f"fairface_label_{part}.csv" for part in splits)
    ids = reader.join(disk, {label_files: rows})
    return reader.finish(reader.collect(ids, make), group_names=FAIRFACE_RACES, split=split)


# --- LFW -----------------------------------------------------------------------------------

LFW_FOLDERS: tuple[str, ...] = ("lfw", "lfw-deepfunneled", "lfw_funneled")
LFW_GENDERS: dict[str, int] = {"female": 0, "f": 0, "male": 1, "m": 1, "": UNKNOWN}
_LFW_LAYOUT = "lfw/<Person_Name>/<Person_Name>_0001.jpg (the folder holding lfw/, or lfw/ itself)"


def _lfw_genders(path: Path) -> dict[str, tuple[str, str]]:
    """Person name (spaces as underscores) -> (where, lower-cased gender) from a name,gender CSV."""
    table = read_csv(path, ("name", "gender"))
    return index_rows((where, row["name"].replace(" ", "_"), row["gender"].lower()) for where, row in table.rows)


def load_lfw(root: str | Path, *, image_size: int = 64, strict: bool = True, limit: int | None = None,
             gender_csv: str | Path | None = None) -> FaceDataset:
    """LFW: one identity per person folder; gender from an optional ``name,gender`` CSV.

    Sample ids are relative to the folder holding ``lfw/`` (``lfw/<Person>/<file>``), whichever
    of the two roots is given, so manifests do not depend on how the path was typed. People
    missing from the gender CSV get gender -1; CSV rows for people not on disk are ignored
    (the CSV may cover all of LFW while a subset is loaded).
    """
    reader = SourceReader("lfw", root, _LFW_LAYOUT, image_size=image_size, strict=strict, limit=limit)
    images_dir = next((reader.root / name for name in LFW_FOLDERS if (reader.root / name).is_dir()), reader.root)
    base = images_dir.parent
    genders = {} if gender_csv is None else _lfw_genders(Path(gender_csv).expanduser())

    def make(sample_id: str) -> Sample:
        path = base / sample_id
        parts = sample_id.split("/")
        if len(parts) != 3:
            raise SampleError(path, f"image is not directly inside a person folder; expected {_LFW_LAYOUT}")
        person = parts[1]
        gender = UNKNOWN
        if person in genders:
            where, value = genders[person]
            gender = parse_code(path, where, "gender", value, LFW_GENDERS)
        return Sample(sample_id, path, identity=person, gender=gender)

    samples = reader.collect(list_images(images_dir, base), make)
    return reader.finish(samples, named_identities=True, images_dir=str(images_dir.resolve()),
                         gender_csv=None if gender_csv is None else str(Path(gender_csv).expanduser().resolve()))
