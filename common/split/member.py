"""A member's own split of its own images (``data.layout = per-member``).

When members keep their images, no party sees the whole data set, so there is no server manifest:
each member divides its folder itself, once, and keeps the division on its own disk for the
whole run (resumes included). A share of its identities (``split.probe``) is held out entirely,
for open-set verification of the global model; of the others, a share of each identity's
images (``split.member_nonmember_fraction``) is held out as well, the nonmembers of the member's
self-audit and the samples its attribute evaluation scores. The rest trains.

Which images trained is what a membership attack tries to find out, so the division is drawn
from fresh operating-system entropy unless the node allows reproducible research runs (the
switch that also lets ``dp.reproducible_noise`` derive its DP noise from the run seed). Only
counts ever leave the member (``counts``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.data.dataset import GENDER_NAMES, FaceDataset
from common.runs.io import atomic_write_json, read_json

LAYOUTS = ("manifest", "per-member")
ROLES = ("train", "held_out", "probe")


@dataclass(frozen=True)
class MemberSplit:
    """Sample ids of each role within one member's data set, and that data set's fingerprint
    (a different folder later is an error, not a silently different split)."""

    fingerprint: str
    train: tuple[str, ...]
    held_out: tuple[str, ...]
    probe: tuple[str, ...]

    def check(self, ds: FaceDataset) -> None:
        """Refuse a data set other than the one the split was made on."""
        if ds.fingerprint() != self.fingerprint:
            raise ValueError("the member's data changed since its split was made (fingerprint "
                             f"{ds.fingerprint()[:16]}..., split made on {self.fingerprint[:16]}...); a run keeps "
                             "its data: restore the folder or start a new run")

    def positions(self, ds: FaceDataset, *roles: str) -> np.ndarray:
        """Positions in ``ds`` of the member's samples of ``roles`` (of ``ROLES``), in that order."""
        self.check(ds)
        return ds.positions(np.asarray([s for role in roles for s in getattr(self, role)], dtype=np.str_))

    def subset(self, ds: FaceDataset, *roles: str) -> FaceDataset:
        """The member's samples of ``roles``."""
        return ds.subset(self.positions(ds, *roles))

    def save(self, path: Path) -> None:
        atomic_write_json(path, {"fingerprint": self.fingerprint, **{r: list(getattr(self, r)) for r in ROLES}})

    @classmethod
    def load(cls, path: Path) -> MemberSplit:
        raw = read_json(path)
        try:
            return cls(str(raw["fingerprint"]), *(tuple(str(s) for s in raw[r]) for r in ROLES))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path}: malformed member split ({type(exc).__name__}: {exc})") from None


def split_member(ds: FaceDataset, probe_fraction: float, held_out_fraction: float, seed: int,
                 where: str = "member") -> MemberSplit:
    """Hold out ``probe_fraction`` of the identities (at least two: a verification pair needs an
    impostor) and ``held_out_fraction`` of each remaining identity's images (rounded to the
    nearest count); ``where`` names the member in errors."""
    rng = np.random.default_rng(seed)
    identities = np.unique(ds.identity)
    if identities.size < 3:
        raise ValueError(f"{where}: {identities.size} identities in its data; at least three are needed (two held "
                         "out for open-set verification, one to train)")
    n_probe = min(max(2, round(probe_fraction * identities.size)), identities.size - 1)
    probe_ids = rng.permutation(identities)[:n_probe]
    role = np.full(len(ds), "train", dtype=object)
    role[np.isin(ds.identity, probe_ids)] = "probe"
    for ident in np.setdiff1d(identities, probe_ids):
        own = rng.permutation(np.flatnonzero(ds.identity == ident))
        role[own[:round(held_out_fraction * own.size)]] = "held_out"
    ids = {r: tuple(str(s) for s in np.sort(ds.sample_ids[role == r])) for r in ROLES}
    if not ids["train"]:
        raise ValueError(f"{where}: no image left to train on after holding out split.probe = {probe_fraction} of "
                         f"the identities and split.member_nonmember_fraction = {held_out_fraction} of the images")
    return MemberSplit(ds.fingerprint(), ids["train"], ids["held_out"], ids["probe"])


def counts(split: MemberSplit, ds: FaceDataset) -> dict[str, int]:
    """What a member may tell the server about its data: images and identities per role, and
    training images per gender and per group code where known. Never names or content
    fingerprints."""
    out: dict[str, int] = {}
    for role in ROLES:
        pos = split.positions(ds, role)
        name = role.replace("_", "-")
        out[f"{name}-images"] = len(pos)
        out[f"{name}-identities"] = int(np.unique(ds.identity[pos]).size)
    train = split.positions(ds, "train")
    for code, name in enumerate(GENDER_NAMES):
        out[f"train-images-{name}"] = int((ds.gender[train] == code).sum())
    for code in range(len(ds.group_names)):  # by code: a group's name is the member's own string
        out[f"train-images-group-{code}"] = int((ds.group[train] == code).sum())
    return out
