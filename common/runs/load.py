"""What every phase after training starts from: a run's config, data and manifest."""

from __future__ import annotations

from common.config import Config, load_config
from common.data.cache import build_dataset
from common.data.dataset import FaceDataset
from common.runs.rundir import RunDir
from common.split.manifest import Manifest


def load_run(run: RunDir) -> tuple[Config, FaceDataset, Manifest]:
    """A run's configuration, its data set (rebuilt from that configuration) and its manifest,
    checked to belong together: what every phase after training starts from."""
    cfg = load_config(run.config_path)
    ds = build_dataset(cfg)
    return cfg, ds, Manifest.load(run.manifest_path, expect_fingerprint=ds.fingerprint())


