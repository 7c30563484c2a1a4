"""Hostile npz archives (data cache, `facefl data synth` output, audit arrays) and the no-pickle rule.

See the package docstring for the properties every test checks.
"""

from __future__ import annotations

import io
import json
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from .conftest import NPY_MEMBERS, ROOT, Scratch, _npy, fuzz, listing

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def npz_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    from common.data.dataset import FaceDataset

    ds = FaceDataset(images=np.arange(4 * 8 * 8 * 3, dtype=np.uint8).reshape(4, 8, 8, 3), identity=[0, 0, 1, 1],
                     gender=[0, 0, 1, 1], group=[0, 1, 0, -1], age=[0, 1, 2, -1], labels={"smiling": [0, 1, 1, -1]},
                     sample_ids=["a", "b", "c", "d"], source="test", group_names=("g0", "g1"))
    return ds.save_npz(tmp_path_factory.mktemp("npz") / "data.npz").read_bytes()


@st.composite
def damaged_npz(draw: st.DrawFn, raw: bytes) -> bytes:
    """Bytes flipped or cut, or the archive rebuilt with a member replaced by a crafted .npy
    (a header declaring terabytes, pickled objects, bad versions), dropped, or stored with an
    unknown compression method."""
    how = draw(st.sampled_from(["flip", "truncate", "member", "drop", "method"]))
    if how in ("flip", "truncate"):
        out = bytearray(raw)
        if how == "truncate":
            return bytes(out[: draw(st.integers(0, len(out) - 1))])
        for pos, mask in draw(st.lists(st.tuples(st.integers(0, len(out) - 1), st.integers(1, 255)), min_size=1,
                                       max_size=6)):
            out[pos] ^= mask
        return bytes(out)
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        members = {info.filename: zf.read(info) for info in zf.infolist()}
    # header.npy's JSON: test_npz_header_of_the_wrong_shape_names_the_file
    name = draw(st.sampled_from(sorted(n for n in members if n != "header.npy")))
    if how == "drop":
        del members[name]
    elif how == "member":
        members[name] = draw(NPY_MEMBERS)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for member, data in members.items():
            zf.writestr(member, data)
    out = bytearray(buffer.getvalue())
    if how == "method":  # the local header's compression method of the first member
        out[8:10] = struct.pack("<H", draw(st.sampled_from([1, 12, 14, 99, 0xFFFF])))
    return bytes(out)


@fuzz(120)
@given(data=st.data())
def test_damaged_npz_loads_or_names_the_file(npz_bytes: bytes, data: st.DataObject, scratch: Scratch) -> None:
    """``load_npz`` and ``FaceDataset.load_npz`` return arrays / a data set or raise ValueError
    naming the file; a header declaring more bytes than the member holds is refused before
    numpy allocates it (a 60-byte member used to ask for 7 TiB: MemoryError)."""
    from common.data.dataset import FaceDataset
    from common.runs.io import load_npz

    path = scratch.new() / "data.npz"
    path.write_bytes(data.draw(damaged_npz(npz_bytes), label="file"))
    before = listing(path.parent)
    try:
        arrays = load_npz(path)
    except ValueError as exc:
        event("refused: " + str(exc)[len(str(path)) + 2:][:24])
        assert str(exc).startswith(f"{path}: "), str(exc)[:300]
    else:
        event("loaded")
        assert all(isinstance(a, np.ndarray) and a.dtype != object for a in arrays.values())
        assert sum(a.nbytes for a in arrays.values()) < 10**6
        try:
            FaceDataset.load_npz(path).fingerprint()
        except ValueError as exc:
            assert str(exc).startswith(f"{path}: "), str(exc)[:300]
    assert listing(path.parent) == before


def test_array_header_declaring_terabytes_is_refused_before_allocation(tmp_path: Path) -> None:
    """A few bytes whose .npy header declares 10^12 float64 (8 TB): numpy would allocate first
    and fail with MemoryError (or succeed and swap); the size check refuses it, naming the place,
    also when the zip directory claims the member is that large."""
    from flwr.app import Array, ArrayRecord

    from common.runs.io import load_npz
    from common.wire import record_to_numpy

    bomb = _npy((10**12,), "<f8", b"\0" * 16)
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w") as zf:
        zf.writestr("images.npy", bomb)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'bomb.npz'}: member 'images.npy'") + ".*declares"):
        load_npz(tmp_path / "bomb.npz")
    record = ArrayRecord({"fc.weight": Array(dtype="float64", shape=(3,), stype="numpy.ndarray", data=bomb)})
    with pytest.raises(ValueError, match="array 'fc.weight'.*declares"):
        record_to_numpy(record)
    # The zip directory's sizes are claims too: 4 GB claimed for a 100-byte member.
    raw = bytearray((tmp_path / "bomb.npz").read_bytes())
    central = raw.rfind(b"PK\x01\x02")
    raw[22:26] = raw[central + 24:central + 28] = struct.pack("<I", 0xFFFFFFF0)
    (tmp_path / "bomb.npz").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'bomb.npz'}: member 'images.npy'") + ".*declares"):
        load_npz(tmp_path / "bomb.npz")


class _Touch:
    """Unpickling this creates a file: proof that something was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return open, (str(self.marker), "w")


def test_pickled_arrays_are_never_unpickled(tmp_path: Path) -> None:
    """Every ``np.load`` in facefl (and Flower's Array.numpy) passes allow_pickle=False: an npz
    or wire payload holding a pickle is refused, and the pickle never runs."""
    from flwr.app import Array, ArrayRecord

    from common.runs.io import load_npz
    from common.wire import record_to_numpy

    marker = tmp_path / "unpickled"
    payload = np.array([_Touch(marker)], dtype=object)
    np.savez(tmp_path / "evil.npz", x=payload)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'evil.npz'}: ")):
        load_npz(tmp_path / "evil.npz")
    buffer = io.BytesIO()
    np.save(buffer, payload, allow_pickle=True)
    record = ArrayRecord({"weights": Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=buffer.getvalue())})
    with pytest.raises(ValueError, match="array 'weights'"):
        record_to_numpy(record)
    assert not marker.exists()


def test_no_code_path_unpickles() -> None:
    """Source check: no pickle / torch.load / np.load(allow_pickle=True) in facefl's packages."""
    offenders = []
    for path in sorted(p for pkg in ("common", "client", "server", "attacks") for p in (ROOT / pkg).rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for pattern in (r"\bimport pickle\b|\bpickle\.load", r"allow_pickle\s*=\s*True",
                        r"torch\.load\((?![^)]*weights_only=True)", r"np\.load\((?![^)]*allow_pickle=False)"):
            offenders += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert offenders == []


@pytest.mark.parametrize("change", [[1], 3, {"source": 3}, {"source": ["a"]}, {"group_names": 5}, {"labels": 5},
                                    {"identity_names": 7}],
                         ids=["list", "number", "source-int", "source-list", "group-names-int", "labels-int",
                              "identity-names-int"])
def test_npz_header_of_the_wrong_shape_names_the_file(npz_bytes: bytes, tmp_path: Path, change: Any) -> None:
    """The archive's JSON header replaced (list, number) or one of its fields given another type."""
    from common.data.dataset import FaceDataset
    from common.runs.io import atomic_save_npz, load_npz

    path = tmp_path / "data.npz"
    path.write_bytes(npz_bytes)
    arrays = load_npz(path)
    header = json.loads(arrays["header"].tobytes())
    header = {**header, **change} if isinstance(change, dict) else change
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    atomic_save_npz(path, **arrays)
    with pytest.raises(ValueError, match=re.escape(f"{path}: ")):
        FaceDataset.load_npz(path).fingerprint()
