"""Interrupted writes leave nothing behind.

See the package docstring for the properties every test checks.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save as safetensors_bytes

from .conftest import Scratch, fuzz, listing

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")]


def _npz_blob() -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=np.arange(100))
    return buffer.getvalue()


WRITERS: dict[str, Callable[[], bytes]] = {
    "json": lambda: (json.dumps({"round": 3, "values": list(range(50))}) + "\n").encode(),
    "safetensors": lambda: safetensors_bytes({"w": torch.arange(64.0)}, metadata={"facefl": "{}"}),
    "npz": _npz_blob,
}


@fuzz(60)
@given(kind=st.sampled_from(sorted(WRITERS)), cut=st.floats(0, 1), existed=st.booleans(),
       depth=st.integers(0, 2), error=st.sampled_from([RuntimeError, OSError, KeyboardInterrupt]))
def test_interrupted_write_leaves_no_file_and_no_temp_file(kind: str, cut: float, existed: bool, depth: int,
                                                           error: type[BaseException], scratch: Scratch) -> None:
    """A write that dies half-way inside ``atomic_path`` (an exception, Ctrl-C) leaves the tree
    as it was: the old file intact if there was one, no new file, no temporary file, and no
    directory that the write had created."""
    from common.runs.io import atomic_path

    root = scratch.new()
    dest = root.joinpath(*[f"new{i}" for i in range(depth)], f"out.{kind}")
    if existed:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(b"old contents")
    before = listing(root)
    blob = WRITERS[kind]()
    with pytest.raises(error), atomic_path(dest) as tmp:
        tmp.write_bytes(blob[: int(cut * len(blob))])
        raise error("interrupted")
    assert listing(root) == before
    if existed:
        assert dest.read_bytes() == b"old contents"


def test_failed_writers_leave_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real writers: JSON that cannot be serialised, a checkpoint whose rename fails, an npz
    of pickled objects; each raises and the directory is unchanged."""
    import common.runs.io
    from common.nn.checkpoint import save_checkpoint
    from common.runs.io import atomic_save_npz, atomic_write_json

    before = listing(tmp_path)
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "runs" / "status.json", {"status": {1, 2}})
    with pytest.raises(TypeError):
        atomic_save_npz(tmp_path / "audit" / "scores.npz", x=np.array([object()]))
    def disk_full(src: Path, dst: Path) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(common.runs.io.os, "replace", disk_full)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "models" / "round-001.safetensors", {"w": torch.zeros(3)}, {"round": 1})
    assert listing(tmp_path) == before
