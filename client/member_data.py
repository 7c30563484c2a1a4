"""A member's own images (``data.layout = per-member``): where they are, and its split of them.

On the deployment engine each SuperNode names its folder in its node config (``data-path``,
and ``data-source`` when its format differs from ``data.source``); on the simulation engine
``data.path`` holds one sub-directory per member, and partition id K takes the K-th in sorted
order, so that a consortium can rehearse on its real folders on one machine. The folder is read
on this node only; the split (``common.split.member``) is kept in the node's state directory,
beside its DP state, so that it stays the same across rounds, processes and resumes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

from common.config import Config
from common.data.cache import build_dataset
from common.data.dataset import FaceDataset
from common.data.sources import SOURCES
from common.split.member import MemberSplit, split_member
from common.train.dp import fresh_noise_seed
from common.train.local_round import derived_seed

DATA_PATH_NODE_CONFIG = "data-path"
DATA_SOURCE_NODE_CONFIG = "data-source"
SPLIT_FILE = "member-split.json"


def member_folder(cfg: Config, node_config: Mapping[str, object], partition: int) -> tuple[Path, str]:
    """(folder, format) of this member's images; errors name the client and what to set."""
    source = str(node_config.get(DATA_SOURCE_NODE_CONFIG) or cfg.data.source)
    if source not in SOURCES or source == "synthfaces":
        raise ValueError(f"client {partition}: node config {DATA_SOURCE_NODE_CONFIG}={source!r}: expected a folder "
                         f"format, one of {[s for s in SOURCES if s != 'synthfaces']}")
    if node_config.get(DATA_PATH_NODE_CONFIG):
        folder = Path(str(node_config[DATA_PATH_NODE_CONFIG])).expanduser()
        if not folder.is_dir():
            raise ValueError(f"client {partition}: node config {DATA_PATH_NODE_CONFIG}={str(folder)!r} is not a "
                             "readable directory")
        return folder, source
    root = Path(cfg.data.path).expanduser()
    if not cfg.data.path or not root.is_dir():
        raise ValueError(f"client {partition}: data.layout = 'per-member' needs this node's folder: node config "
                         f"{DATA_PATH_NODE_CONFIG}='/path/to/images' (deployment), or data.path = a directory with "
                         f"one sub-directory per member (simulation; got {cfg.data.path!r})")
    members = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(members) != cfg.split.num_clients:
        raise ValueError(f"data.path {str(root)!r}: {len(members)} member sub-directories, split.num_clients = "
                         f"{cfg.split.num_clients}; one sub-directory per member (sorted names -> partition ids)")
    return members[partition], source


def member_dataset(cfg: Config, folder: Path, source: str, partition: int) -> FaceDataset:
    """This member's images, decoded once into this node's data cache; errors name the client."""
    own = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(folder), source=source,
                                                            layout="manifest"))
    try:
        return build_dataset(own)
    except (OSError, ValueError) as exc:
        raise ValueError(f"client {partition}: cannot read its data at {folder} as {source!r}: {exc}") from None


def member_split(cfg: Config, ds: FaceDataset, directory: Path, partition: int, reproducible: bool) -> MemberSplit:
    """The member's split kept in ``directory`` (its state folder of this run), made on first use:
    from fresh entropy, or from the run seed when ``reproducible`` (research runs the node allowed)."""
    path = directory / SPLIT_FILE
    if path.is_file():
        split = MemberSplit.load(path)
        split.check(ds)
        return split
    seed = derived_seed(cfg.seed, 0x5B, partition) if reproducible else fresh_noise_seed()
    split = split_member(ds, cfg.split.probe, cfg.split.member_nonmember_fraction, seed, where=f"client {partition}")
    directory.mkdir(parents=True, exist_ok=True)
    split.save(path)
    return split
