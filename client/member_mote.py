"""MOTE at the member (``data.layout = per-member``): templates stay at the site.

The point of MOTE (Groß, Heindorf & Terhörst) is that a site enrolls its people without a
central template store. Here each member enrolls every identity of its training images from its
first ``mote.references`` of them, keeps its galleries in its own state directory, and compares
MOTE with plain templates on its own held-out images: the held-out images of its enrolled
identities are the genuine probes, the images of its held-out identities impostors only. Only the
verification numbers leave the member, and its galleries only when ``mote.share_gallery`` (the
research default, which lets the server merge them as with the manifest layout).

Identity codes are local to a member's folder, so a member's enrolled codes are offset by its
partition id times ``IDENTITY_STRIDE``: galleries of different members never share a code.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from common.config import Config
from common.data.dataset import FaceDataset
from common.evaluation.mote import compare_methods, templates_of
from common.mote.enrollment import enroll_own, member_references
from common.mote.gallery import MoteGallery
from common.nn.face_model import FaceModel
from common.runs.layout import gallery_file
from common.runs.records import mote_method
from common.split.member import MemberSplit
from common.train.loop import embed

IDENTITY_STRIDE = 1_000_000


def _offset(ds: FaceDataset, partition: int) -> FaceDataset:
    """``ds`` with its identity codes moved to this member's range (names dropped: they index the
    local codes)."""
    if len(ds) and int(ds.identity.max()) >= IDENTITY_STRIDE:
        raise ValueError(f"client {partition}: identity codes up to {int(ds.identity.max())}; at most "
                         f"{IDENTITY_STRIDE} identities per member")
    return dataclasses.replace(ds, identity=ds.identity + partition * IDENTITY_STRIDE, identity_names=())


def enroll_member(cfg: Config, ds: FaceDataset, split: MemberSplit, model: FaceModel, partition: int, seed: int,
                  noise_seed: int | None) -> tuple[list[MoteGallery], dict[str, Any], dict[str, Any]]:
    """(galleries, enrollment info, MOTE-vs-templates evaluation) of this member; the info names
    no image (counts only), the evaluation holds verification numbers only."""
    train = _offset(split.subset(ds, "train"), partition)
    refs = member_references(cfg, train)
    own = np.arange(len(train))  # the KDEs too are fitted on the member's own images (or public ones)
    galleries, info = enroll_own(cfg, train, model, refs, own, own, seed, noise_seed, f"client {partition}")
    info = {"client": partition, **info, "references": {str(i): int(p.size) for i, p in refs.items()}}
    probes = _offset(split.subset(ds, "held_out", "probe"), partition)
    enrolled = galleries[0].identity_ids
    ref_pos = np.concatenate([refs[i] for i in enrolled.tolist()])
    templates = templates_of(embed(model, train.subset(ref_pos).images), train.identity[ref_pos], enrolled)
    methods = {mote_method(b): g for b, g in zip(cfg.mote.balancing_factors, galleries, strict=True)}
    report, _, _ = compare_methods(embed(model, probes.images), probes, enrolled, templates, methods)
    return galleries, info, report.to_dict()


def keep_galleries(cfg: Config, galleries: list[MoteGallery], directory: Path) -> None:
    """Store the member's galleries in its state directory, one file per balancing factor."""
    for b, gallery in zip(cfg.mote.balancing_factors, galleries, strict=True):
        path = directory / gallery_file(b)
        path.parent.mkdir(parents=True, exist_ok=True)
        gallery.save(path, fp16=cfg.mote.fp16)
