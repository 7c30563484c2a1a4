"""Turn a ``Config`` into the objects it describes: data set, manifest, models.

Client, server, baseline and attacks all build their components here, so that one
configuration gives the same data, split and architecture wherever it is read.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from common.config import Config, load_config
from common.data.dataset import FaceDataset
from common.data.sources import load_source
from common.data.splits import Manifest, SplitConfig, make_manifest
from common.data.synthetic import SynthConfig, generate
from common.models.checkpoint import check_state, load_checkpoint
from common.models.face_model import FaceModel, ModelSpec
from common.models.heads import CosineClassifier
from common.rundir import RunDir

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
    import common.data.face_render as render
    from common.data import synthetic

    return hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (synthetic, render))).hexdigest()


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


def split_config(cfg: Config) -> SplitConfig:
    s = cfg.split
    return SplitConfig(identity_fractions=(s.member, s.nonmember, s.aux, s.probe),
                       member_nonmember_fraction=s.member_nonmember_fraction,
                       member_probe_fraction=s.member_probe_fraction, num_clients=s.num_clients,
                       partition=s.partition, alpha=s.alpha, partition_attribute=s.partition_attribute,
                       seed=cfg.seed)


def build_manifest(cfg: Config, ds: FaceDataset) -> Manifest:
    return make_manifest(ds, split_config(cfg))


def model_spec(cfg: Config, attribute_head: bool | None = None) -> ModelSpec:
    """Architecture of the shared model; the attribute head exists when the task has one."""
    if attribute_head is None:
        attribute_head = cfg.train.task != "identity"
    m = cfg.model
    return ModelSpec(width=m.width, blocks=m.blocks, embedding_dim=m.embedding_dim,
                     image_size=cfg.data.image_size, dropout=m.dropout, attribute_head=attribute_head)


def build_model(spec: ModelSpec, seed: int) -> FaceModel:
    """A freshly initialised model; the same seed gives the same weights (global RNG untouched)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return FaceModel(spec)


def load_model(path: str | os.PathLike[str], spec: ModelSpec | None = None) -> tuple[FaceModel, dict]:
    """A model from a checkpoint (architecture from its metadata unless ``spec`` is given), in eval mode."""
    state, meta = load_checkpoint(path)
    if spec is None:
        try:
            spec = ModelSpec.from_dict(meta["spec"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: metadata has no valid model spec ({type(exc).__name__}: {exc})") from None
    model = build_model(spec, 0)
    check_state(path, state, model.state_dict())
    model.load_state_dict(state)
    return model.eval(), meta


def load_run(run: RunDir) -> tuple[Config, FaceDataset, Manifest]:
    """A run's configuration, its data set (rebuilt from that configuration) and its manifest,
    checked to belong together: what every phase after training starts from."""
    cfg = load_config(run.config_path)
    ds = build_dataset(cfg)
    return cfg, ds, Manifest.load(run.manifest_path, expect_fingerprint=ds.fingerprint())


def build_identity_head(spec: ModelSpec, num_classes: int, seed: int) -> CosineClassifier:
    """A private identity head over ``num_classes`` local identities, seeded like the model."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return CosineClassifier(spec.embedding_dim, num_classes)
