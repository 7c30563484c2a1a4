"""Atomic file writes and safe reads.

Every artefact of a run is written to a temporary file in the target directory and then
renamed over the destination, so a crash never leaves a half-written file behind: readers
see either the old file or the new one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    On failure the temporary file is removed, and so are the (still empty) parent directories
    this call created: a failed write leaves the tree as it was.
    """
    dest = Path(path)
    created = [d for d in (dest.parent, *dest.parent.parents) if not d.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    done = False
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual mode
        os.replace(tmp_path, dest)
        done = True
    finally:
        tmp_path.unlink(missing_ok=True)
        if not done:
            for d in created:  # deepest first; a directory someone else filled meanwhile stays
                with contextlib.suppress(OSError):
                    d.rmdir()


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` atomically through ``write(fileobj)``."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            write(fh)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file, naming the file in any error (ValueError; FileNotFoundError if absent)."""
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: file not found") from None
    except OSError as exc:  # a directory, no permission, an I/O error
        raise ValueError(f"{p}: cannot read ({exc.strerror or exc})") from None
    # ValueError: bad syntax, bad UTF-8, an integer of more than 4300 digits; RecursionError: nesting.
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{p}: not valid JSON ({_brief(exc)})") from None


def _brief(exc: BaseException, limit: int = 200) -> str:
    """An exception's message cut to ``limit`` characters (hostile inputs make long ones)."""
    text = str(exc) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _write_npz(fh: IO[bytes], arrays: dict[str, np.ndarray]) -> None:
    """Write a compressed npz whose bytes depend only on the arrays (fixed zip timestamps)."""
    with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(arrays[key]), allow_pickle=False)


def atomic_save_npz(path: str | os.PathLike[str], **arrays: np.ndarray) -> Path:
    """Save arrays as a compressed npz atomically and reproducibly (same arrays, same bytes).

    Object arrays are refused: an npz is only ever read back with ``allow_pickle=False``.
    """
    for key, arr in arrays.items():
        if np.asarray(arr).dtype == object:
            raise TypeError(f"{path}: array {key!r} has dtype object; refusing to pickle")
    return atomic_write(path, lambda fh: _write_npz(fh, arrays))


def check_npy_size(fh: IO[bytes], size: int) -> tuple[tuple[int, ...], np.dtype]:
    """Read the header of the .npy stream ``fh`` (``size`` bytes in all) and check that the
    array it declares fits in those bytes; ValueError otherwise.

    numpy allocates the declared array before reading its data, so a few bytes declaring
    shape (10**12,) would exhaust memory: checking first bounds memory by the input's size.
    """
    start = fh.tell()
    version = np.lib.format.read_magic(fh)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise ValueError(f"unsupported .npy format version {version}")
    shape, _, dtype = readers[version](fh)
    needed = math.prod(shape) * dtype.itemsize
    if needed > size - (fh.tell() - start):
        raise ValueError(f"the header declares shape {shape} of {dtype} ({needed} bytes) but only "
                         f"{size - (fh.tell() - start)} bytes follow")
    return shape, dtype


# What zipfile / zlib / numpy raise for damaged archives (ValueError covers numpy's header errors).
_NPZ_ERRORS = (OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError, struct.error)
# How much a member can expand, by compression method; the sizes in a zip directory are claims, the
# archive's size on disk is not (deflate expands at most about 1032-fold).
_EXPANSION = {zipfile.ZIP_STORED: 1, zipfile.ZIP_DEFLATED: 1032}


def load_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Load every array of an npz file without ever unpickling.

    Each member's declared array is checked against the bytes it can hold before numpy
    allocates it, so memory stays bounded by the file's size (stored or deflated members only).
    Raises FileNotFoundError, or ValueError naming the file (and member) for anything else.
    """
    p = Path(path)
    member = ""
    try:
        on_disk = p.stat().st_size
        with zipfile.ZipFile(p) as zf:
            for info in zf.infolist():
                member = info.filename
                if info.compress_type not in _EXPANSION:
                    raise ValueError(f"compression method {info.compress_type} (expected stored or deflated)")
                with zf.open(info) as fh:
                    check_npy_size(fh, min(info.file_size, min(info.compress_size, on_disk) *
                                           _EXPANSION[info.compress_type]))
        member = ""
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: file not found") from None
    except ValueError as exc:
        where = f"{p}: member {member!r}" if member else str(p)
        raise ValueError(f"{where}: not a pickle-free npz archive ({_brief(exc)})") from None
    except _NPZ_ERRORS as exc:
        raise ValueError(f"{p}: unreadable npz archive ({type(exc).__name__}: {_brief(exc)})") from None
