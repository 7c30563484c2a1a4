"""What every real-data loader shares (``SourceReader``): argument checks, matching images on
disk against annotation rows, strict/lenient handling of bad samples, decoding, identity codes
and ``meta``, plus the annotation-file helpers. That way every source fails (or skips) the same
way, and the same data always loads to the same arrays: samples are ordered by sample id and
identity codes follow the sorted identity keys.

Strict mode raises ``SampleError`` (a ``ValueError``) at the first bad sample, naming its path
and what was expected. Lenient mode skips bad samples, logs one warning with the count and
records them in ``meta["skipped"]`` (capped) and ``meta["skipped_count"]``. Structural problems
(missing root or annotation file, bad header, wrong field count, duplicate entries) always
raise: they make a whole annotation file suspect, not one sample.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import numpy as np
from tqdm import tqdm

from common.data.dataset import UNKNOWN, FaceDataset
from common.data.disk_images import DiskImages, DiskImageWriter
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
    ``cache``: decode the images into this array file (``DiskImages``) instead of memory.
    """

    def __init__(self, source: str, root: str | Path, layout: str, *, image_size: int,
                 strict: bool, limit: int | None, cache: Path | None = None) -> None:
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
        self.cache = cache
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
        sink = _ImageSink(wanted, self.image_size, self.cache)
        kept: list[Sample] = []
        try:
            with tqdm(total=wanted, desc=f"loading {self.source}", unit="img", disable=None, leave=False) as bar:
                for sample in order:
                    if len(kept) == wanted:
                        break
                    try:
                        sink.append(read_image(sample.path, self.image_size))
                    except SampleError as err:
                        self.reject(err)
                        continue
                    kept.append(sample)
                    bar.update()
        except BaseException:
            sink.abort()
            raise
        if self.skipped_count:
            first = self.skipped[0]
            logger.warning("%s: skipped %d bad samples under %s (listed in meta['skipped']); first: %s: %s",
                           self.source, self.skipped_count, self.root, first["path"], first["reason"])
        if not kept:
            sink.abort()
            raise ValueError(f"{self.root}: no usable {self.source} images "
                             f"({self.skipped_count} skipped); expected {self.layout}")
        images = sink.close()
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


class _ImageSink:
    """Decoded images, collected in memory (an array sized for ``wanted``) or streamed to disk."""

    def __init__(self, wanted: int, size: int, cache: Path | None) -> None:
        self.writer = DiskImageWriter(cache, size) if cache is not None else None
        self.array = None if self.writer else np.empty((wanted, size, size, 3), dtype=np.uint8)
        self.count = 0

    def append(self, image: np.ndarray) -> None:
        if self.writer is not None:
            self.writer.append(image)
        else:
            self.array[self.count] = image
        self.count += 1

    def close(self) -> np.ndarray | DiskImages:
        if self.writer is not None:
            return self.writer.close()
        return self.array if self.count == len(self.array) else self.array[: self.count].copy()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


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


