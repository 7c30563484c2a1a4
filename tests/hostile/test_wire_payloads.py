"""Hostile Flower payloads decoded by common/wire.py (a client's reply, a node's configuration).

See the package docstring for the properties every test checks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from .conftest import NPY_MEMBERS, damaged_gallery, fuzz

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")]


@fuzz(80)
@given(payload=st.one_of(NPY_MEMBERS, st.binary(max_size=80)), declared=st.sampled_from([(3,), (10**9,), ()]))
def test_hostile_array_payload_is_refused_naming_the_key(payload: bytes, declared: tuple[int, ...]) -> None:
    """An ArrayRecord entry is decoded to an array no larger than the bytes received, or refused
    with a ValueError naming the entry (never MemoryError, EOFError, BadZipFile or an NpzFile)."""
    from flwr.app import Array, ArrayRecord

    from common.wire import record_to_numpy

    record = ArrayRecord({"conv.weight": Array(dtype="float64", shape=declared, stype="numpy.ndarray", data=payload)})
    try:
        arrays = record_to_numpy(record)
    except ValueError as exc:
        assert str(exc).startswith("array 'conv.weight': "), str(exc)[:300]
    else:
        assert arrays["conv.weight"].nbytes <= len(payload)


@fuzz(80)
@given(data=st.data())
def test_hostile_gallery_reply_is_refused_naming_the_client(gallery_parts, data: st.DataObject) -> None:
    """A client's MOTE gallery reply is a gallery the server can merge and score, or a ValueError
    naming the client (a misshapen second layer used to pass and fail inside torch.cat)."""
    from common import wire
    from common.mote.gallery import MoteGallery

    state, meta = data.draw(damaged_gallery(gallery_parts), label="gallery")
    arrays = {k: v.numpy() for k, v in state.items()}
    for key in ("identity_ids", "balancing_factor"):
        try:
            arrays[key] = np.asarray(meta.get(key))
        except (ValueError, OverflowError):
            arrays[key] = np.zeros(0)
        if arrays[key].dtype == object:
            arrays[key] = arrays[key].astype(str)
    try:
        gallery = wire.record_to_gallery(wire.numpy_to_record(arrays), seed=0, who="client 2")
    except ValueError as exc:
        event("refused")
        assert str(exc).startswith("client 2: "), str(exc)[:300]
    else:
        event("accepted")
        state, meta = gallery_parts
        honest = MoteGallery(np.array(meta["identity_ids"]) + 10**6, state, np.array(meta["balancing_factor"]), 0)
        merged = MoteGallery.concat([gallery, honest], seed=0) if gallery.dim == honest.dim else gallery
        assert np.isfinite(merged.scores(np.ones((2, merged.dim), dtype=np.float32))).all()


@pytest.mark.parametrize("node_config", [{}, {"partition-id": "zero"}, {"partition-id": 1.5}, {"partition-id": True},
                                         {"partition-id": 5}, {"partition-id": 0, "num-partitions": "2"},
                                         {"partition-id": -1}])
def test_bad_node_config_names_the_keys(node_config: dict[str, Any]) -> None:
    from common.wire import partition_of

    with pytest.raises(ValueError, match=r"^node config: .*partition-id"):
        partition_of(node_config, 2)
