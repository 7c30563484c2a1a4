"""The run's split manifest from its configuration: the one place server, clients, baseline and
MOTE enrollment make it, so that they all hold the same roles and partition."""

from __future__ import annotations

from common.config import Config
from common.data.dataset import FaceDataset
from common.split.manifest import Manifest, make_manifest


def build_manifest(cfg: Config, ds: FaceDataset) -> Manifest:
    return make_manifest(ds, cfg.split, cfg.seed)
