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
    if cfg.data.layout == "per-member":
        raise ValueError(f"{run.path}: its members kept their data (data.layout = per-member), so it has no data "
                         "set or manifest to evaluate or audit it with; the members evaluated every round "
                         "(metrics.jsonl) and audited the final model themselves (audit/self-audit.json)")
    ds = build_dataset(cfg)
    return cfg, ds, Manifest.load(run.manifest_path, expect_fingerprint=ds.fingerprint())


