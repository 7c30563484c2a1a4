"""Face images that stay on disk: a raw uint8 array file, read a batch at a time.

A member with tens of thousands of faces, or CelebA's 200k crops at 112 px (7.5 GB), cannot be
held in memory. Real data sources are therefore cached as one C-ordered uint8 array of shape
(n, H, W, 3) in a plain file (what ``np.memmap`` would map) next to an index of the annotations
(``common.data.cache``). ``DiskImages`` stands in for the in-memory image array of a
``FaceDataset``: indexing reads just the rows asked for, with one ``pread`` per run of
consecutive rows, and a subset is a list of row numbers, not a copy. Nothing maps the whole
file, so a process reading a data set many times its memory limit keeps a resident footprint of
one batch (measured in ``bench/large_data.py``; tested under ``RLIMIT_AS``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

CHUNK_ROWS = 512
"""Rows read or written at once when streaming a whole array (~19 MB at 112 px)."""


class DiskImages:
    """Rows ``rows`` (default: all) of the (count, size, size, 3) uint8 array stored at ``path``.

    Supports what the project does with an image array: ``len``, ``shape``, integer, slice,
    integer-array and boolean-mask indexing (each returns an in-memory ``np.ndarray``),
    iteration, ``take`` (a lazy subset) and ``np.asarray`` (loads everything: small sets only).
    """

    ndim = 4
    dtype = np.dtype(np.uint8)

    def __init__(self, path: str | os.PathLike[str], count: int, size: int,
                 rows: np.ndarray | None = None) -> None:
        self.path = Path(path)
        self.count = int(count)
        self.size = int(size)
        expected = self.count * self.row_bytes
        actual = self.path.stat().st_size
        if actual != expected:
            raise ValueError(f"{self.path}: image cache holds {actual} bytes, expected {expected} "
                             f"({self.count} images of {self.size}x{self.size}x3)")
        self.rows = np.arange(self.count, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        if self.rows.size and (self.rows.min() < 0 or self.rows.max() >= self.count):
            raise IndexError(f"{self.path}: row numbers outside 0..{self.count - 1}")

    @property
    def row_bytes(self) -> int:
        return self.size * self.size * 3

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.rows), self.size, self.size, 3)

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, index: np.ndarray | list[int]) -> DiskImages:
        """The rows at ``index`` (positions of this view), without reading them."""
        return DiskImages(self.path, self.count, self.size, self.rows[np.asarray(index, dtype=np.int64)])

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self._read(self.rows[[key]])[0]
        return self._read(self.rows[key])

    def __iter__(self) -> Iterator[np.ndarray]:
        for block in image_chunks(self):
            yield from block

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self._read(self.rows)
        return out if dtype is None else out.astype(dtype, copy=False)

    def _read(self, rows: np.ndarray) -> np.ndarray:
        """Read ``rows`` (file row numbers, any order, repeats allowed) with one pread per run."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        unique, inverse = np.unique(rows, return_inverse=True)
        buf = np.empty((len(unique), self.size, self.size, 3), dtype=np.uint8)
        flat = buf.reshape(len(unique), -1)
        breaks = np.flatnonzero(np.diff(unique) != 1) + 1
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(unique)], strict=True):
                want = (hi - lo) * self.row_bytes
                data = os.pread(fd, want, int(unique[lo]) * self.row_bytes)
                if len(data) != want:
                    raise OSError(f"{self.path}: short read ({len(data)} of {want} bytes): the cache changed on disk")
                flat[lo:hi] = np.frombuffer(data, dtype=np.uint8).reshape(hi - lo, -1)
        finally:
            os.close(fd)
        return buf if np.array_equal(unique, rows) else buf[inverse]


class DiskImageWriter:
    """Appends images to a new array file, so a loader never holds more than one chunk.

    Writes go to ``<path>.<pid>.tmp``; ``close`` moves the finished file to ``path`` (a crash leaves no
    array that looks complete) and returns it as ``DiskImages``.
    """

    def __init__(self, path: str | os.PathLike[str], size: int) -> None:
        self.path = Path(path)
        self.size = size
        self.count = 0
        self._tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        self._tmp.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self._tmp, "wb")
        self._pending: list[np.ndarray] = []

    def append(self, image: np.ndarray) -> None:
        if image.shape != (self.size, self.size, 3) or image.dtype != np.uint8:
            raise ValueError(f"{self.path}: expected a ({self.size}, {self.size}, 3) uint8 image, "
                             f"got {image.shape} {image.dtype}")
        self._pending.append(image)
        if len(self._pending) >= CHUNK_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._file.write(np.ascontiguousarray(np.stack(self._pending)).tobytes())
            self.count += len(self._pending)
            self._pending = []

    def close(self) -> DiskImages:
        self._flush()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)
        return DiskImages(self.path, self.count, self.size)

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


def take_rows(images: np.ndarray | DiskImages, index: np.ndarray) -> np.ndarray | DiskImages:
    """``images[index]`` that stays lazy for on-disk images (``FaceDataset.subset``)."""
    return images.take(index) if isinstance(images, DiskImages) else images[index]


def image_chunks(images: np.ndarray | DiskImages, rows: int = CHUNK_ROWS) -> Iterator[np.ndarray]:
    """The images ``rows`` at a time, in order, in memory or on disk alike."""
    for start in range(0, len(images), rows):
        yield images[start:start + rows]
