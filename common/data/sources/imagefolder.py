"""The generic ImageFolder layout: ``<root>/<identity>/<image>`` plus an optional attributes.csv.

This is the format for bringing one's own faces (a consortium member's data) and for
exporting any ``FaceDataset`` so that it can be inspected, edited or shipped to a SuperNode.
``write_imagefolder`` followed by ``load_imagefolder`` at the same image size gives back the
same images, identity partition, gender, group names and codes, age buckets and labels.

attributes.csv is a plain CSV (no comment lines, so pandas, csv.DictReader and spreadsheets
read it): a header with ``file`` (posix path relative to the root) and optionally ``gender``
(female|male|empty), ``group`` (a group name|empty), ``age`` (a bucket name, integer years or
empty); every other column is a binary task label (0|1|empty).

groups.json (optional, next to attributes.csv): ``{"group_names": [...]}``. The list fixes the
group codes (a name's index) and may name groups no row uses, which a per-row column could not;
without it the codes follow the sorted distinct ``group`` values. Files written before groups.json
existed carry the list as a leading ``# group_names: <JSON list>`` line of attributes.csv: the
loader still accepts that, the writer no longer produces it. See docs/data.md.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from common.data.dataset import (
    AGE_BUCKET_NAMES,
    GENDER_NAMES,
    UNKNOWN,
    FaceDataset,
    age_to_bucket,
)
from common.data.image_io import SampleError
from common.data.sources.reader import (
    CsvTable,
    Sample,
    SourceReader,
    clip,
    index_rows,
    list_images,
    parse_code,
    read_csv,
    relative_key,
)
from common.runs.io import atomic_write_bytes, atomic_write_text, read_json

ATTRIBUTES_CSV = "attributes.csv"
ATTRIBUTE_COLUMNS: tuple[str, ...] = ("file", "gender", "group", "age")
"""The non-label columns of attributes.csv; any other column is a binary task label."""
GROUPS_JSON = "groups.json"
GROUP_NAMES_KEY = "group_names"
GROUP_NAMES_COMMENT = "# group_names: "
"""The pre-groups.json form of the group names: a leading attributes.csv line, still read."""
INDEX_DIGITS = 3
"""Exported file names are the image's index within its identity, zero-padded to at least this."""

_LAYOUT = f"<root>/<identity>/<image> with an optional {ATTRIBUTES_CSV}"
_GENDERS: dict[str, int] = {"": UNKNOWN, **{name: code for code, name in enumerate(GENDER_NAMES)}}
_AGES: dict[str, int] = {"": UNKNOWN, **{name: code for code, name in enumerate(AGE_BUCKET_NAMES)}}
_LABELS: dict[str, int] = {"": UNKNOWN, "0": 0, "1": 1}


def load_imagefolder(root: str | Path, *, image_size: int = 64, strict: bool = True,
                     limit: int | None = None, cache: Path | None = None) -> FaceDataset:
    """Load ``<root>/<identity>/<image>``; attributes from ``<root>/attributes.csv`` if present.

    The identity is the first folder of each image's path. Without attributes.csv every
    attribute is unknown and there are no labels; with it, every image needs a row and every
    row an image. Group names come from groups.json (or an old file's ``# group_names:``
    comment) when present, so that codes survive a round trip, otherwise from the sorted
    distinct values of the ``group`` column.
    """
    reader = SourceReader("imagefolder", root, _LAYOUT, image_size=image_size, strict=strict, limit=limit,
                          cache=cache)
    disk = list_images(reader.root, reader.root)
    csv_path = reader.root / ATTRIBUTES_CSV
    if not csv_path.is_file():
        samples = reader.collect(disk, lambda sid: Sample(sid, reader.root / sid,
                                                           identity=_identity(reader.root, sid)))
        return reader.finish(samples, named_identities=True, attributes=None)

    table = read_csv(csv_path, ("file",))
    group_names = _group_names(reader.root, table)
    groups = {"": UNKNOWN, **{name: code for code, name in enumerate(group_names)}}
    label_names = [c for c in table.columns if c not in ATTRIBUTE_COLUMNS]
    rows = index_rows((where, relative_key(row["file"]), row) for where, row in table.rows)

    def make(sample_id: str) -> Sample:
        path = reader.root / sample_id
        where, row = rows[sample_id]
        age = row.get("age", "")
        return Sample(
            sample_id, path, identity=_identity(reader.root, sample_id),
            gender=parse_code(path, where, "gender", row.get("gender", "").lower(), _GENDERS),
            group=parse_code(path, where, "group", row.get("group", ""), groups),
            age=(age_to_bucket(int(age)) if age.isascii() and age.isdigit() and len(age) <= 3
                 else parse_code(path, where, "age (integer years or bucket)", age, _AGES)),
            labels=tuple(parse_code(path, where, f"value for label {name!r}", row[name], _LABELS)
                         for name in label_names),
        )

    ids = reader.join(disk, {ATTRIBUTES_CSV: rows})
    return reader.finish(reader.collect(ids, make), group_names=group_names, label_names=label_names,
                         named_identities=True, attributes=ATTRIBUTES_CSV)


def _identity(root: Path, sample_id: str) -> str:
    """The identity folder of a sample: the first component of its relative path."""
    folder, sep, _ = sample_id.partition("/")
    if not sep:
        raise SampleError(root / sample_id, f"image is not inside an identity folder; expected {_LAYOUT}")
    return folder


def _group_names(root: Path, table: CsvTable) -> tuple[str, ...]:
    """Group names from groups.json or an old ``# group_names:`` comment, else sorted ``group`` values."""
    csv_path, sidecar = root / ATTRIBUTES_CSV, root / GROUPS_JSON
    legacy = _legacy_group_names(csv_path, table)
    if sidecar.is_file():
        doc = read_json(sidecar)
        if not isinstance(doc, dict) or set(doc) != {GROUP_NAMES_KEY}:
            raise ValueError(f'{sidecar}: expected {{"{GROUP_NAMES_KEY}": [<name>, ...]}}, got {clip(doc)}')
        names = _check_group_names(sidecar, doc[GROUP_NAMES_KEY])
        if legacy is not None and legacy != names:
            raise ValueError(f"{sidecar}: group names {clip(names)} disagree with the '{GROUP_NAMES_COMMENT.strip()}' "
                             f"line of {csv_path} ({clip(legacy)}); keep one of them")
    elif legacy is not None:
        names = legacy
    elif "group" in table.columns:
        names = sorted({row["group"] for _, row in table.rows} - {""})
    else:
        names = []
    if len(names) > np.iinfo(np.int8).max:  # group codes are int8
        raise ValueError(f"{csv_path}: {len(names)} groups; at most {np.iinfo(np.int8).max} are supported")
    return tuple(names)


def _legacy_group_names(csv_path: Path, table: CsvTable) -> list[str] | None:
    """The group names of an old attributes.csv's ``# group_names:`` line, or None without one."""
    hints = [line[len(GROUP_NAMES_COMMENT):] for line in table.comments if line.startswith(GROUP_NAMES_COMMENT)]
    if not hints:
        return None
    try:
        names = json.loads(hints[0])
    except (ValueError, RecursionError) as exc:  # bad JSON, a 4300-digit integer, deep nesting
        raise ValueError(f"{csv_path}: bad group_names comment ({str(exc)[:200]}); expected a JSON list") from None
    return _check_group_names(csv_path, names)


def _check_group_names(path: Path, names: object) -> list[str]:
    """``names`` if it is a list of distinct, non-empty, unpadded strings (they become CSV values)."""
    if (not isinstance(names, list) or not all(isinstance(n, str) and n.strip() == n != "" for n in names)
            or len(set(names)) != len(names)):
        raise ValueError(f"{path}: group_names must be a JSON list of distinct, non-empty, "
                         f"unpadded strings, got {clip(names)}")
    return names


# --- export --------------------------------------------------------------------------------

def imagefolder_files(ds: FaceDataset) -> list[str]:
    """Where ``write_imagefolder`` puts each sample: ``<identity folder>/<NNN>.png``, in sample order.

    The identity folder is the identity's name when the data set has ``identity_names``,
    otherwise the code as ``%05d``. ``NNN`` is the image's index within its identity in sample
    order, zero-padded to ``INDEX_DIGITS`` digits (more when an identity has over 10**INDEX_DIGITS
    images), so the names are plain, portable and sort (as the loader orders samples) in the
    original order.
    """
    folders = [_identity_folder(ds, int(code)) for code in ds.identity]
    by_case = Counter(folder.lower() for folder in set(folders))
    clashes = sorted(folder for folder in set(folders) if by_case[folder.lower()] > 1)
    if clashes:
        raise ValueError(f"FaceDataset({ds.source}): identity names {clashes[:6]} differ only in letter case; "
                         f"their folders would collide on case-insensitive file systems")
    digits = max(INDEX_DIGITS, len(str(max(np.bincount(ds.identity), default=1) - 1)))
    seen: Counter[str] = Counter()
    files = []
    for folder in folders:
        files.append(f"{folder}/{seen[folder]:0{digits}d}.png")
        seen[folder] += 1
    return files


def _identity_folder(ds: FaceDataset, code: int) -> str:
    if not ds.identity_names:
        return f"{code:05d}"
    if code >= len(ds.identity_names):
        raise ValueError(f"FaceDataset({ds.source}): identity {code} has no entry in identity_names "
                         f"({len(ds.identity_names)} names)")
    name = ds.identity_names[code]
    if (name in ("", ".", "..", ATTRIBUTES_CSV, GROUPS_JSON) or name.startswith(".")
            or any(c in name for c in "/\\\0")):
        raise ValueError(f"FaceDataset({ds.source}): identity name {name!r} cannot be a folder name "
                         f"(empty, hidden, {ATTRIBUTES_CSV}, {GROUPS_JSON} or containing a path separator)")
    return name


def _png_bytes(image: np.ndarray) -> bytes:
    """Lossless PNG with fixed settings and no metadata, so equal pixels give equal bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def _attributes_csv(ds: FaceDataset, files: list[str]) -> str:
    """attributes.csv for ``ds``: rows sorted by file, labels in sorted column order."""
    labels = sorted(ds.labels)
    bad = [k for k in labels if k in ATTRIBUTE_COLUMNS or not k or k.strip() != k]
    if bad:
        raise ValueError(f"FaceDataset({ds.source}): label names {bad} cannot be attributes.csv columns "
                         f"(empty, padded, or one of {list(ATTRIBUTE_COLUMNS)})")
    names = ds.group_names
    if any(not n or n.strip() != n for n in names) or len(set(names)) != len(names):
        raise ValueError(f"FaceDataset({ds.source}): group names must be distinct, non-empty and unpadded, "
                         f"got {names}")
    if not names and (ds.group >= 0).any():
        raise ValueError(f"FaceDataset({ds.source}): group codes are set but group_names is empty")

    def name(code: int, table: tuple[str, ...]) -> str:
        return "" if code == UNKNOWN else table[code]

    def flag(value: int) -> str:
        return "" if value == UNKNOWN else str(value)

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*ATTRIBUTE_COLUMNS, *labels])
    for i in sorted(range(len(files)), key=files.__getitem__):
        writer.writerow([files[i], name(int(ds.gender[i]), GENDER_NAMES), name(int(ds.group[i]), names),
                         name(int(ds.age[i]), AGE_BUCKET_NAMES), *(flag(int(ds.labels[k][i])) for k in labels)])
    return out.getvalue()


def _groups_json(names: tuple[str, ...]) -> str:
    """groups.json: the group names in code order (validated by ``_attributes_csv``)."""
    return json.dumps({GROUP_NAMES_KEY: list(names)}, ensure_ascii=False, indent=2) + "\n"


def write_imagefolder(ds: FaceDataset, root: str | Path) -> Path:
    """Export ``ds`` as PNGs in identity folders plus attributes.csv (and groups.json); returns the root.

    Output is byte-deterministic (same data set, same bytes). Each file is written atomically
    and attributes.csv last, so an interrupted export is recognisable by its missing CSV. The
    root must be empty or absent: mixing with older files would corrupt the data set.
    groups.json is written only when the data set has group names.
    """
    root = Path(root).expanduser()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root}: export target must be an empty or absent directory")
    files = imagefolder_files(ds)
    text = _attributes_csv(ds, files)  # validates names before anything is written
    for image, rel in zip(ds.images, files):
        atomic_write_bytes(root / rel, _png_bytes(image))
    if ds.group_names:
        atomic_write_text(root / GROUPS_JSON, _groups_json(ds.group_names))
    atomic_write_text(root / ATTRIBUTES_CSV, text)
    return root
