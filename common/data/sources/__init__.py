"""One entry point for every face data source, so configs and the CLI only name a source."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.data.dataset import FaceDataset
from common.data.sources.celeba import load_celeba
from common.data.sources.fairface import load_fairface
from common.data.sources.imagefolder import load_imagefolder
from common.data.sources.lfw import load_lfw
from common.data.sources.utkface import load_utkface

SOURCES: tuple[str, ...] = ("synthfaces", "utkface", "celeba", "fairface", "lfw", "imagefolder")

_LOADERS: dict[str, Callable[..., FaceDataset]] = {
    "utkface": load_utkface,
    "celeba": load_celeba,
    "fairface": load_fairface,
    "lfw": load_lfw,
    "imagefolder": load_imagefolder,
}
_COMMON = ("root", "image_size", "strict", "limit", "cache")


def source_options(name: str) -> tuple[str, ...]:
    """The source-specific keyword options ``load_source`` accepts for ``name``."""
    return tuple(p for p in inspect.signature(_LOADERS[name]).parameters if p not in _COMMON)


def load_source(name: str, root: str | Path, *, image_size: int = 64, strict: bool = True,
                limit: int | None = None, cache: Path | None = None, **options: Any) -> FaceDataset:
    """Load the data source ``name`` from ``root`` (see docs/data.md for each layout).

    ``cache``: write the decoded images to this array file as they are read and return them as
    ``DiskImages`` (bounded memory; ``common.data.cache`` keeps the file), else in memory.

    ``options`` are source specific (``split`` for celeba/fairface, ``gender_csv`` for lfw);
    an option the source does not take is a ValueError naming the accepted ones.
    """
    if name == "synthfaces":
        raise ValueError("synthfaces is generated, not read from disk: use common.data.sources.synthfaces.generator.generate")
    if name not in _LOADERS:
        raise ValueError(f"unknown data source {name!r}; expected one of {list(SOURCES)}")
    unknown = sorted(set(options) - set(source_options(name)))
    if unknown:
        raise ValueError(f"data source {name!r} has no option(s) {unknown}; "
                         f"accepted: {list(source_options(name)) or 'none'}")
    return _LOADERS[name](root, image_size=image_size, strict=strict, limit=limit, cache=cache, **options)
