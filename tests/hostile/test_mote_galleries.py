"""Hostile MOTE galleries: a stolen-and-returned or corrupted gallery file.

See the package docstring for the properties every test checks.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from .conftest import Scratch, damaged_gallery, fuzz

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")]


@fuzz(100)
@given(data=st.data())
def test_damaged_gallery_loads_and_scores_or_names_the_file(gallery_parts, data: st.DataObject,
                                                            scratch: Scratch) -> None:
    """A stolen-and-returned or corrupted gallery file: it loads and scores every probe against
    every identity, or raises ValueError naming the file (never an error deep inside torch)."""
    from common.mote.gallery import MoteGallery
    from common.nn.checkpoint import save_checkpoint

    state, meta = data.draw(damaged_gallery(gallery_parts), label="gallery")
    path = save_checkpoint(scratch.new() / "gallery.safetensors", state, meta)
    try:
        gallery = MoteGallery.load(path)
    except ValueError as exc:
        event("rejected: " + str(exc)[len(str(path)) + 2:][:20])
        assert str(exc).startswith(f"{path}: "), str(exc)[:300]
    else:
        event("loaded")
        scores = gallery.scores(np.ones((2, gallery.dim), dtype=np.float32))
        assert scores.shape == (2, len(gallery)) and np.isfinite(scores).all()
