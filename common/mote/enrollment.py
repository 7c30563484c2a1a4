"""Who enrolls whom, with which reference images and KDE population: shared by the clients that
enroll and by ``facefl evaluate``, which must pick exactly the same reference images.

MOTE (Groß, Heindorf & Terhörst) enrolls each person from few reference images. Here every member
identity is enrolled by one client: the one holding most of its member images (the lowest
partition id on ties), which under the default identity-disjoint partition is simply its only
client. Its references are its first ``mote.references`` member images in the data set's sample
order; its probe-role images (never trained on, never enrolled) are the genuine probes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from common.config import Config
from common.data.dataset import FaceDataset
from common.data.disk_images import take_rows
from common.mote.gallery import MoteGallery, enroll
from common.mote.kde import GenderKDE
from common.mote.private import ImpostorRecords, PrivateRun, plan
from common.split.build import build_manifest
from common.split.manifest import Manifest
from common.train.device import resolve_device
from common.train.dp import dp_generators
from common.train.loop import embed
from common.train.pretraining import public_population


def enrolling_client(manifest: Manifest, ds: FaceDataset) -> dict[int, int]:
    """Identity -> the partition id that enrolls it (most member images; lowest id on ties)."""
    counts: dict[int, np.ndarray] = {}
    for client in range(manifest.num_clients):
        ids, n = np.unique(ds.identity[manifest.client_indices(ds, client)], return_counts=True)
        for ident, c in zip(ids.tolist(), n.tolist(), strict=True):
            counts.setdefault(ident, np.zeros(manifest.num_clients, dtype=np.int64))[client] = c
    return {ident: int(np.argmax(c)) for ident, c in counts.items()}


def client_references(manifest: Manifest, ds: FaceDataset, cfg: Config, client: int,
                      owner: dict[int, int] | None = None) -> dict[int, np.ndarray]:
    """Identity -> positions in ``ds`` of its reference images, for the identities ``client`` enrolls
    (its first ``mote.references`` images of each, from the client's own images)."""
    owner = owner if owner is not None else enrolling_client(manifest, ds)
    pos = manifest.client_indices(ds, client)
    return {ident: pos[ds.identity[pos] == ident][: cfg.mote.references]
            for ident in np.unique(ds.identity[pos]).tolist() if owner[ident] == client}


def references(manifest: Manifest, ds: FaceDataset, cfg: Config) -> dict[int, np.ndarray]:
    """Every enrolled identity's reference positions, over all clients (sorted by identity)."""
    owner = enrolling_client(manifest, ds)
    out: dict[int, np.ndarray] = {}
    for client in range(manifest.num_clients):
        out.update(client_references(manifest, ds, cfg, client, owner))
    return dict(sorted(out.items()))


def kde_population(manifest: Manifest, ds: FaceDataset, cfg: Config, client: int) -> np.ndarray:
    """Positions of the images the gender KDEs are fitted on: the client's members or ``aux``
    (the ``public`` population is not in ``ds``: see ``public_embeddings``)."""
    if cfg.mote.kde_source() == "aux":
        return np.flatnonzero(manifest.role_mask(ds, "aux"))
    return manifest.client_indices(ds, client)


def public_embeddings(cfg: Config, model) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings, identities, genders) of the public population (``pretrain``). Its identity
    codes are made negative so that they never collide with an enrolled identity's."""
    public = public_population(cfg)
    return embed(model, public.images), -1 - public.identity.astype(np.int64), public.gender


def enroll_client(cfg: Config, ds: FaceDataset, model, client: int, seed: int,
                  noise_seed: int | None = None) -> tuple[list[MoteGallery], dict[str, Any]]:
    """Enroll this client's identities (``client_references`` of the server's manifest) with the
    global backbone, one gallery per balancing factor (``enroll_own``); the enrollment info names
    each identity's reference images by sample id, which ``facefl evaluate`` checks."""
    manifest = build_manifest(cfg, ds)
    refs = client_references(manifest, ds, cfg, client)
    galleries, info = enroll_own(cfg, ds, model, refs, manifest.client_indices(ds, client),
                                 kde_population(manifest, ds, cfg, client), seed, noise_seed, f"client {client}")
    info = {"client": client, **info,
            "references": {str(i): ds.sample_ids[p].tolist() for i, p in refs.items()}}
    return galleries, info


def member_references(cfg: Config, ds: FaceDataset) -> dict[int, np.ndarray]:
    """``data.layout = per-member``: every identity of the member's training images is enrolled by
    the member, from its first ``mote.references`` of them in sample order."""
    return {ident: np.flatnonzero(ds.identity == ident)[: cfg.mote.references]
            for ident in np.unique(ds.identity).tolist()}


def enroll_own(cfg: Config, ds: FaceDataset, model, refs: dict[int, np.ndarray], own: np.ndarray,
               kde_pos: np.ndarray, seed: int, noise_seed: int | None, who: str
               ) -> tuple[list[MoteGallery], dict[str, Any]]:
    """Enroll the identities of ``refs`` (identity -> positions of its references in ``ds``) with
    the global backbone, one gallery per balancing factor; ``own``: positions of every image the
    enrolling party holds; ``kde_pos``: those the gender KDEs are fitted on, unless they are fitted
    on the public population (``mote.kde_source()``).

    Without MOTE DP, impostors are the party's other identities (real embeddings and synthetic
    samples around them): it trains on nothing it does not hold, except the ``aux`` KDE option.
    With ``mote.impostor_population = public`` the impostors are the public population's, and
    (with the default KDE population) the galleries are a function of the references and public
    data only. With MOTE DP (``common.mote.private``) its images other than the references are
    the protected impostor records; the KDEs, the synthetic samples, part of each batch's
    impostors and the validation impostors come from the public population; ``noise_seed`` seeds
    the noise and the record sampling (None: fresh OS entropy).
    """
    settings = cfg.mote
    if not refs:
        raise ValueError(f"{who}: no identity to enroll")
    ref_pos = np.concatenate(list(refs.values()))
    source = cfg.mote.kde_source()
    if source == "public":
        kde_pos = np.zeros(0, dtype=np.int64)
    needed = np.unique(np.concatenate([ref_pos, own, kde_pos]))
    emb = dict(zip(needed.tolist(), embed(model, take_rows(ds.images, needed)), strict=True))

    def rows(pos: np.ndarray) -> np.ndarray:
        return np.stack([emb[p] for p in pos.tolist()])

    public = public_embeddings(cfg, model) if "public" in (source, settings.impostor_population) else None
    kde_data = public if source == "public" else (rows(kde_pos), ds.identity[kde_pos], ds.gender[kde_pos])
    kde = GenderKDE.fit(*kde_data, seed=seed)
    factors = settings.balancing_factors
    private, extra = None, {}
    if settings.dp_enabled():
        record_pos = own[~np.isin(own, ref_pos)]  # sample order; the references are the templates' subjects
        records = ImpostorRecords.build(rows(record_pos), ds.identity[record_pos], cfg.dp.unit,
                                        cfg.dp.max_images_per_identity)
        private = PrivateRun(records, plan(records, settings, cfg.dp, len(factors)),
                             *dp_generators(noise_seed, resolve_device(cfg.train.device)))
    if private is not None or settings.impostor_population == "public":
        assert public is not None  # computed for public impostors, and MOTE DP fits its KDEs on public data
        pool = public[:2]
    else:
        pool = rows(own), ds.identity[own]
    galleries = [enroll(rows(ref_pos), ds.identity[ref_pos], kde, *pool, b, seed, settings, private, cfg.train.device)
                 for b in factors]
    if private is not None:
        extra["privacy"] = private.mechanism.ledger(cfg.dp.reproducible_noise, [g.info["steps"] for g in galleries])
    info = {"identities": sorted(refs), "impostors": settings.impostor_population,
            "kde": {"population": source, "samples": int(kde_data[0].shape[0]),
                    "bandwidth_male": float(kde.male.bandwidth_), "bandwidth_female": float(kde.female.bandwidth_)},
            "settings": dataclasses.asdict(settings),
            "epochs": {str(b): float(np.mean(g.info["epochs"])) for b, g in zip(factors, galleries, strict=True)},
            **extra}
    return galleries, info
