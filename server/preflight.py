"""The server's checks of a run's inputs before any engine starts or any node is awaited.

A data path that does not exist, a data set that does not parse, a split that cannot give every
client data, or an enrollment that cannot fit its gender KDEs would otherwise surface after Ray
started (15 s), after the server waited for nodes (up to ``federation.round_timeout``), or, for
MOTE, after every round had trained. Here they fail in seconds, naming the problem, before a run
directory exists.
"""

from __future__ import annotations

import numpy as np

from common.config import Config
from common.data.cache import build_dataset
from common.data.dataset import FaceDataset
from common.evaluation.global_model import public_evaluator
from common.mote.enrollment import client_references, enrolling_client, kde_population
from common.mote.kde import GenderKDE
from common.split.build import build_manifest
from common.split.canaries import canary_plan
from common.split.manifest import Manifest
from common.train.pretraining import public_labels


def check_inputs(cfg: Config) -> Manifest | None:
    """Build the data set and the split manifest the run will use (errors name the file or key);
    check that the data hold ``audit.canaries`` canaries and that MOTE can enroll every client.
    Returns the manifest; None with ``data.layout = per-member``, where the server reads no
    member's data (each member checks its own when the run describes it), only its public
    evaluation set if it has one."""
    if cfg.data.layout == "per-member":
        public_evaluator(cfg)  # the only data the server reads: a bad evaluation.public fails here
        return None
    ds = build_dataset(cfg)
    manifest = build_manifest(cfg, ds)
    empty = [c for c in range(manifest.num_clients) if not manifest.clients[c]]
    if empty:
        raise ValueError(f"split: clients {empty} get no member image ({len(ds)} images, "
                         f"{manifest.counts()['identities']['member']} member identities for "
                         f"{manifest.num_clients} clients); lower split.num_clients or use more data")
    canary_plan(cfg, ds, manifest)  # enough nonmember samples for audit.canaries
    if cfg.mote.enabled and cfg.train.task in ("identity", "both"):
        _check_enrollment(cfg, ds, manifest)
    return manifest


def _check_enrollment(cfg: Config, ds: FaceDataset, manifest: Manifest) -> None:
    owner = enrolling_client(manifest, ds)
    source = cfg.mote.kde_source()
    if source == "public":
        GenderKDE.check_population(*public_labels(cfg))
    for client in range(manifest.num_clients):
        refs = client_references(manifest, ds, cfg, client, owner)
        if not refs:
            raise ValueError(f"MOTE: client {client} holds no identity to enroll (each identity is enrolled by the "
                             "client holding most of its images); set mote.enabled = false or change the split")
        if source != "public":
            pos = kde_population(manifest, ds, cfg, client)
            try:
                GenderKDE.check_population(ds.identity[pos], ds.gender[pos])
            except ValueError as exc:
                raise ValueError(f"MOTE: client {client}'s mote.kde_population = {cfg.mote.kde_population!r}: {exc}; "
                                 "use 'aux' or 'public', or more data") from None
        if cfg.mote.dp_enabled():
            own = manifest.client_indices(ds, client)
            if np.isin(own, np.concatenate(list(refs.values()))).all():
                raise ValueError(f"MOTE DP: client {client} holds no impostor record (every member image is a "
                                 "reference); lower mote.references")
