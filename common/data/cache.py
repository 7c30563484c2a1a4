"""The configured data set, built once per process and cached on disk.

SynthFaces is generated in memory and cached as one npz. A real source is decoded once into a
disk cache (``DiskImages``: the images as a raw uint8 array file, plus an npz index of the
annotations) and read a batch at a time from then on, so a data set larger than memory trains
with bounded memory. The real cache's key covers the loader settings and every file under
``data.path`` (name, size, modification time): editing the folder builds a new cache.
"""

from __future__ import annotations

import dataclasses
import fcntl
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
                       smiling_rate=(d.smiling_rate_female, d.smiling_rate_male),
                       smile_visibility=d.smile_visibility, condition=d.condition, seed=cfg.seed)


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


def folder_signature(root: str | os.PathLike[str]) -> str:
    """Digest of every file's relative path, size and modification time under ``root``."""
    h = hashlib.sha256()
    base = Path(root)
    for path in sorted(p for p in base.rglob("*") if p.is_file()):
        st = path.stat()
        h.update(f"{path.relative_to(base).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def load_cached_source(cfg: Config) -> FaceDataset:
    """The real source ``data.source`` at ``data.path``, decoded once into a disk cache.

    A damaged or partial cache is rebuilt, never trusted; processes that want the same cache at
    once take turns (``flock``), so that it is decoded once; a cache folder that cannot be written
    falls back to reading the images into memory (logged).
    """
    d = cfg.data
    root = Path(d.path).expanduser()
    read = functools.partial(load_source, d.source, root, image_size=d.image_size, strict=d.strict,
                             limit=d.limit or None)
    if not root.is_dir():  # the loader names the expected layout
        return read()
    settings = {"source": d.source, "root": str(root.resolve()), "image_size": d.image_size, "strict": d.strict,
                "limit": d.limit, "files": folder_signature(root)}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    index, array = cache_dir() / f"{d.source}-{key}.npz", cache_dir() / f"{d.source}-{key}.u8"
    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        lock = open(cache_dir() / f"{d.source}-{key}.lock", "a")
    except OSError as exc:
        log.warning("cannot write the data cache folder %s (%s); reading %s into memory", cache_dir(), exc, root)
        return read()
    with lock:  # one process decodes; the others (SuperNodes of one machine) wait, then read its cache
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if index.is_file():
            try:
                return FaceDataset.load_npz(index)
            except ValueError as exc:
                log.warning("ignoring damaged data cache %s (%s)", index, exc)
        ds = read(cache=array)
        ds.save_index(index)
        return ds


def _load_dataset(cfg: Config, key: str, progress: bool) -> FaceDataset:
    d = cfg.data
    if d.source != "synthfaces":
        return load_cached_source(cfg)
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


