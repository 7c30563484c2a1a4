"""The configured data set, built once per process and (SynthFaces) cached on disk."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from pathlib import Path

from common.config import Config
from common.data.dataset import FaceDataset
from common.data.sources import load_source
from common.data.sources.synthfaces.generator import SynthConfig, generate

log = logging.getLogger(__name__)


def synth_config(cfg: Config) -> SynthConfig:
    d = cfg.data
    return SynthConfig(num_identities=d.identities, images_per_identity=d.images_per_identity,
                       image_size=d.image_size, male_fraction=d.male_fraction,
                       smiling_rate=(d.smiling_rate_female, d.smiling_rate_male), seed=cfg.seed)


def cache_dir() -> Path:
    """Where generated data sets are cached: $FACEFL_CACHE, else ~/.cache/facefl."""
    return Path(os.environ.get("FACEFL_CACHE", Path.home() / ".cache" / "facefl"))


@functools.cache
def _generator_digest() -> str:
    """Digest of the SynthFaces code, so a cached data set never outlives a generator change."""
    from common.data.sources.synthfaces import generator, render

    return hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (generator, render))).hexdigest()


def _data_key(cfg: Config) -> str:
    d = dataclasses.asdict(cfg.data)
    d["seed"] = cfg.seed
    if cfg.data.source == "synthfaces":
        d["generator"] = _generator_digest()
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _load_dataset(cfg: Config, key: str, progress: bool) -> FaceDataset:
    d = cfg.data
    if d.source != "synthfaces":
        return load_source(d.source, d.path, image_size=d.image_size, strict=d.strict, limit=d.limit or None)
    path = cache_dir() / f"synthfaces-{key}.npz"
    if path.is_file():
        try:
            return FaceDataset.load_npz(path)
        except ValueError as exc:  # a damaged cache is regenerated, never trusted
            log.warning("ignoring damaged data cache %s (%s)", path, exc)
    ds = generate(synth_config(cfg), progress=progress)
    try:
        ds.save_npz(path)
    except OSError as exc:
        log.warning("could not write data cache %s (%s)", path, exc)
    return ds


_MEMORY: dict[str, FaceDataset] = {}


def build_dataset(cfg: Config, progress: bool = False) -> FaceDataset:
    """The configured data set: SynthFaces by default, else a real loader on ``data.path``.

    Kept in memory (simulated clients in one process share it; callers must not modify it) and,
    for SynthFaces, cached on disk (each deployment message starts a fresh ClientApp process).
    """
    key = _data_key(cfg)
    if key not in _MEMORY:
        _MEMORY.clear()
        _MEMORY[key] = _load_dataset(cfg, key, progress)
    return _MEMORY[key]


