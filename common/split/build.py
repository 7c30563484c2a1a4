"""The run's split manifest from its configuration."""

from __future__ import annotations

from common.config import Config
from common.data.dataset import FaceDataset
from common.split.manifest import Manifest, SplitConfig, make_manifest


def split_config(cfg: Config) -> SplitConfig:
    s = cfg.split
    return SplitConfig(identity_fractions=(s.member, s.nonmember, s.aux, s.probe),
                       member_nonmember_fraction=s.member_nonmember_fraction,
                       member_probe_fraction=s.member_probe_fraction, num_clients=s.num_clients,
                       partition=s.partition, alpha=s.alpha, partition_attribute=s.partition_attribute,
                       seed=cfg.seed)


def build_manifest(cfg: Config, ds: FaceDataset) -> Manifest:
    return make_manifest(ds, split_config(cfg))


