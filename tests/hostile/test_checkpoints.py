"""Hostile safetensors checkpoints: damaged files, tensors that do not fit the model, a checkpoint of
another model.

See the package docstring for the properties every test checks.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

from .conftest import Scratch, fuzz, listing

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")]


SPEC_KW = {"width": 4, "blocks": (1,), "embedding_dim": 8, "image_size": 32, "attribute_head": False}


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, dict[str, torch.Tensor]]:
    from common.nn.build import build_model
    from common.nn.checkpoint import save_checkpoint
    from common.nn.face_model import ModelSpec

    state = build_model(ModelSpec(**SPEC_KW), 0).state_dict()
    path = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.safetensors", state,
                           {"round": 3, "spec": ModelSpec(**SPEC_KW).to_dict()})
    return path.read_bytes(), state


def _split_safetensors(raw: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


ST_DTYPES = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "C64", "F8_E4M3", "XYZ"])
FACEFL_META = st.one_of(st.text(max_size=10), st.sampled_from(["[1]", "3", "null", "[" * 5000, "9" * 5000, "{}",
                                                               '{"spec": 1}', "\udcff"]))


@st.composite
def damaged_checkpoint(draw: st.DrawFn, raw: bytes) -> bytes:
    """Truncated, bit-flipped, a header length that lies, or a header whose tensor entries
    (dtype, shape, offsets) or metadata are changed while the data stay as they were."""
    how = draw(st.sampled_from(["truncate", "flip", "length", "tensor", "metadata"]))
    if how == "truncate":
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if how == "flip":
        out = bytearray(raw)
        for pos, mask in draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(1, 255)), min_size=1,
                                       max_size=6)):
            out[pos] ^= mask
        return bytes(out)
    if how == "length":
        (n,) = struct.unpack("<Q", raw[:8])
        lie = draw(st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, n - 1, n + 1, 2**63, 2**64 - 1])))
        return struct.pack("<Q", lie) + raw[8:]
    header, data = _split_safetensors(raw)
    if how == "tensor":
        name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "rename"]))
        if field == "dtype":
            header[name]["dtype"] = draw(ST_DTYPES)
        elif field == "shape":
            header[name]["shape"] = draw(st.lists(st.integers(-1, 2**40), max_size=4))
        elif field == "data_offsets":
            header[name]["data_offsets"] = draw(st.lists(st.integers(-1, len(data) + 8), min_size=2, max_size=2))
        elif field == "drop":
            del header[name]
        else:
            header[draw(st.text(max_size=8))] = header.pop(name)
    else:
        meta = header.setdefault("__metadata__", {})
        if draw(st.booleans()):
            meta["facefl"] = draw(FACEFL_META)
        else:
            meta.pop("facefl", None)
    blob = json.dumps(header).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(blob)) + blob + data


@fuzz(150)
@given(data=st.data())
def test_damaged_checkpoint_loads_or_names_the_file(checkpoint_bytes, data: st.DataObject, scratch: Scratch) -> None:
    """A checkpoint either loads into the model it claims to be (same tensors, shapes, dtypes:
    ``check_state``) or raises ValueError naming the file; the directory is left as it was."""
    from common.nn.build import build_model
    from common.nn.checkpoint import check_state, load_checkpoint
    from common.nn.face_model import ModelSpec

    raw, reference = checkpoint_bytes
    path = scratch.new() / "model.safetensors"
    path.write_bytes(data.draw(damaged_checkpoint(raw), label="file"))
    before = listing(path.parent)
    try:
        state, meta = load_checkpoint(path)
        check_state(path, state, reference)
    except ValueError as exc:
        event("rejected: " + str(exc)[len(str(path)) + 2:][:20])
        assert str(exc).startswith(f"{path}: "), str(exc)[:300]
    else:
        event("loaded")
        assert isinstance(meta, dict)
        build_model(ModelSpec(**SPEC_KW), 0).load_state_dict(state, strict=True)
    assert listing(path.parent) == before


def test_check_state_names_the_tensor(checkpoint_bytes, tmp_path: Path) -> None:
    """What ``load_state_dict`` would turn into a RuntimeError (shape) or silently cast (dtype)."""
    from common.nn.checkpoint import check_state

    _, reference = checkpoint_bytes
    name = next(k for k, v in reference.items() if v.is_floating_point())
    for bad, problem in (({**reference, name: reference[name].double()}, "torch.float64"),
                         ({**reference, name: reference[name].flatten()[:1]}, r"\(1,\)"),
                         ({k: v for k, v in reference.items() if k != name}, "missing")):
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path}: ") + f".*{problem}"):
            check_state(tmp_path, bad, reference)


def test_load_model_names_the_file_for_a_checkpoint_of_another_model(tmp_path: Path) -> None:
    """A checkpoint whose tensors or spec do not fit: ValueError naming the file, not torch's RuntimeError."""
    from common.nn.build import build_model, load_model
    from common.nn.checkpoint import save_checkpoint
    from common.nn.face_model import ModelSpec

    small, wide = ModelSpec(width=8, blocks=(1, 1), embedding_dim=16, image_size=32), \
        ModelSpec(width=16, blocks=(1, 1), embedding_dim=16, image_size=32)
    path = save_checkpoint(tmp_path / "m.safetensors", build_model(small, 0).state_dict(), {"spec": small.to_dict()})
    assert load_model(path)[0].spec == small
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_model(path, wide)
    bad = save_checkpoint(tmp_path / "nospec.safetensors", build_model(small, 0).state_dict(), {"spec": [1, 2]})
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        load_model(bad)
