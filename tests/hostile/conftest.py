"""Shared by the hostile-input tests: hypothesis settings (derandomised, no example database),
a fresh directory per example (``scratch``), directory listings, and the strategies and fixtures
that more than one reader's tests use (hostile JSON values, crafted .npy members, a valid MOTE
gallery and its damage)."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


def fuzz(examples: int) -> settings:
    return settings(FUZZ, max_examples=examples)


def listing(root: Path) -> list[str]:
    """Every file and directory under ``root`` with its size: what a failed read must not change."""
    return sorted(f"{p.relative_to(root)}:{p.stat().st_size if p.is_file() else 'dir'}" for p in root.rglob("*"))


class Scratch:
    """A fresh directory per example under one pytest temporary directory (hypothesis reruns a
    test body many times; function-scoped ``tmp_path`` would be shared by all of them)."""

    def __init__(self, base: Path) -> None:
        self.base, self.count = base, 0

    def new(self) -> Path:
        self.count += 1
        path = self.base / f"ex{self.count:05d}"
        path.mkdir()
        return path


@pytest.fixture
def scratch(tmp_path: Path) -> Scratch:
    return Scratch(tmp_path)


JSON_VALUES = st.one_of(st.integers(), st.sampled_from([-1, 2**63, 10**300]), st.floats(), st.booleans(), st.none(),
                        st.text(max_size=8), st.just([]), st.just({}), st.lists(st.integers(-3, 3), max_size=3))


def _npy(shape: tuple[int, ...], descr: str, payload: bytes, version: tuple[int, int] = (1, 0)) -> bytes:
    """A .npy stream whose header declares ``shape`` / ``descr`` whatever ``payload`` holds."""
    out = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    (np.lib.format.write_array_header_1_0 if version == (1, 0) else np.lib.format.write_array_header_2_0)(out, header)
    return out.getvalue() + payload


NPY_MEMBERS = st.one_of(
    st.builds(_npy, st.sampled_from([(10**12,), (2**40, 2**20), (0,), (3,), (-1,), (4, 8, 8, 3)]),
              st.sampled_from(["<f8", "|u1", "<i8", "<U5", "|O", "<c16", "|b1"]), st.binary(max_size=64),
              st.sampled_from([(1, 0), (2, 0)])),
    st.binary(max_size=64), st.just(b"\x93NUMPY\x03\x00"), st.just(b"\x93NUMPY\x01\x00\xff\xff"))


GALLERY_K, GALLERY_DIM = 3, 8


@pytest.fixture(scope="module")
def gallery_parts(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and metadata of a valid 3-identity gallery, as ``MoteGallery.save`` writes them."""
    from common.mote.gallery import MoteGallery
    from common.mote.networks import param_shapes
    from common.nn.checkpoint import load_checkpoint

    gen = torch.Generator().manual_seed(0)
    params = {n: torch.randn(GALLERY_K, *s, generator=gen) for n, s in param_shapes(GALLERY_DIM).items()}
    path = tmp_path_factory.mktemp("gallery") / "gallery.safetensors"
    MoteGallery(np.array([4, 9, 2]), params, np.array([0.0, 0.5, 1.0]), seed=5, info={"b": 0.5}).save(path)
    return load_checkpoint(path)


TENSOR_DAMAGE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "transpose": lambda t: t.T.contiguous() if t.ndim > 1 else t[:1], "extra-dim": lambda t: t.unsqueeze(-1).contiguous(),
    "trim": lambda t: t[:-1].contiguous(), "int": lambda t: t.to(torch.int32), "double": lambda t: t.double(),
    "nan": lambda t: t.index_fill(0, torch.tensor([0]), float("nan")), "scalar": lambda t: torch.tensor(1.0)}


@st.composite
def damaged_gallery(draw: st.DrawFn, parts: tuple[dict[str, torch.Tensor], dict[str, Any]]) -> tuple[dict, dict]:
    state, meta = dict(parts[0]), copy.deepcopy(parts[1])
    for _ in range(draw(st.integers(1, 2))):
        if draw(st.booleans()):
            name = draw(st.sampled_from(sorted(state)))
            how = draw(st.sampled_from(["drop", "transpose", "extra-dim", "trim", "int", "double", "nan", "scalar"]))
            t = state.pop(name)
            if how != "drop":
                state[name] = TENSOR_DAMAGE[how](t)
        else:
            key = draw(st.sampled_from(["identity_ids", "balancing_factor", "seed", "info", "format", "version",
                                        "embedding_dim"]))
            meta[key] = draw(st.one_of(JSON_VALUES, st.just([4, 4, 2]), st.just([4, 9]), st.just([0.0, 2.0, 0.5]),
                                       st.just([4.5, 9, 2]), st.just(["a", "b", "c"])))
    return state, meta
