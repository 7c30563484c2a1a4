"""The one in-memory face data type every source is loaded into.

A ``FaceDataset`` holds uint8 RGB images and, per sample, an identity, the sensitive
attributes (gender, group, age bucket) and binary task labels. Unknown values are -1 so that
sources with partial annotations (UTKFace has no identities, LFW no skin tone) fit the same
type. Sample ids are stable strings (a relative path, or ``synth/<index>``): the split
manifest refers to samples by id, never by position, so that a manifest stays valid when a
data set is re-read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.data.disk_images import DiskImages, image_chunks, take_rows
from common.runs.io import atomic_save_npz, load_npz

GENDER_NAMES: tuple[str, ...] = ("female", "male")
"""Gender codes: 0 female, 1 male (-1 unknown). Loaders map each source's own coding onto this."""

AGE_BUCKET_EDGES: tuple[int, ...] = (30, 60)
"""Age buckets: 0 = under 30, 1 = 30..59, 2 = 60 and over (-1 unknown)."""
AGE_BUCKET_NAMES: tuple[str, ...] = ("<30", "30-59", "60+")

UNKNOWN = -1


def age_to_bucket(age: float) -> int:
    """Map an age in years to its bucket index."""
    return int(np.searchsorted(np.asarray(AGE_BUCKET_EDGES), age, side="right"))


@dataclass
class FaceDataset:
    """Images plus per-sample identity, sensitive attributes and task labels.

    Attributes:
        images: (n, H, W, 3) uint8, in memory or (a cached real source) ``DiskImages`` read a
            batch at a time: index it with positions, never assume an ``np.ndarray``.
        identity: (n,) int64 identity index (>= 0; sources without identities give each
            image its own).
        gender: (n,) int8, see ``GENDER_NAMES``; -1 unknown.
        group: (n,) int8 index into ``group_names`` (skin tone / race bucket); -1 unknown.
        age: (n,) int8 age bucket, see ``AGE_BUCKET_NAMES``; -1 unknown.
        labels: task name -> (n,) int8 binary label (0/1; -1 unknown).
        sample_ids: (n,) unicode stable ids, unique.
        source: short name of the data source (``synthfaces``, ``celeba``, ...).
        group_names: names of the group codes.
        identity_names: optional names of the identity codes (LFW person names, ...).
        meta: JSON-serialisable description of how the data was made or read.
    """

    images: np.ndarray | DiskImages
    identity: np.ndarray
    gender: np.ndarray
    group: np.ndarray
    age: np.ndarray
    labels: dict[str, np.ndarray]
    sample_ids: np.ndarray
    source: str
    group_names: tuple[str, ...] = ()
    identity_names: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)
    _fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.images, DiskImages):
            self.images = np.ascontiguousarray(self.images, dtype=np.uint8)
        self.identity = np.asarray(self.identity, dtype=np.int64)
        self.gender = np.asarray(self.gender, dtype=np.int8)
        self.group = np.asarray(self.group, dtype=np.int8)
        self.age = np.asarray(self.age, dtype=np.int8)
        self.labels = {k: np.asarray(v, dtype=np.int8) for k, v in self.labels.items()}
        self.sample_ids = np.asarray(self.sample_ids, dtype=np.str_)
        self.group_names = tuple(self.group_names)
        self.identity_names = tuple(self.identity_names)
        self.validate()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    @property
    def num_identities(self) -> int:
        return int(np.unique(self.identity).size)

    def validate(self) -> None:
        """Check shapes, codes and id uniqueness; raise ValueError naming the field."""
        n = self.images.shape[0] if self.images.ndim else 0
        if self.images.ndim != 4 or self.images.shape[3] != 3:
            raise ValueError(f"FaceDataset({self.source}): images must be (n, H, W, 3) uint8, got {self.images.shape}")
        columns = {"identity": self.identity, "gender": self.gender, "group": self.group,
                   "age": self.age, "sample_ids": self.sample_ids}
        columns.update({f"labels[{k}]": v for k, v in self.labels.items()})
        for name, col in columns.items():
            if col.shape != (n,):
                raise ValueError(f"FaceDataset({self.source}): {name} must have shape ({n},), got {col.shape}")
        if n and self.identity.min() < 0:
            raise ValueError(f"FaceDataset({self.source}): identity must be >= 0")
        checks = (("gender", self.gender, len(GENDER_NAMES)), ("age", self.age, len(AGE_BUCKET_NAMES)),
                  ("group", self.group, max(len(self.group_names), 1)))
        for name, col, k in checks:
            bad = (col < UNKNOWN) | (col >= k)
            if bad.any():
                raise ValueError(f"FaceDataset({self.source}): {name} codes must be in -1..{k - 1}, "
                                 f"got {sorted(set(col[bad].tolist()))[:5]}")
        for name, col in self.labels.items():
            if not np.isin(col, (UNKNOWN, 0, 1)).all():
                raise ValueError(f"FaceDataset({self.source}): label {name!r} must be 0/1/-1")
        if np.unique(self.sample_ids).size != n:
            raise ValueError(f"FaceDataset({self.source}): sample_ids must be unique")

    def subset(self, index: np.ndarray | list[int]) -> FaceDataset:
        """A new data set holding the given positions (or boolean mask), in that order."""
        idx = np.asarray(index)
        idx = np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.int64, copy=False)
        return FaceDataset(
            images=take_rows(self.images, idx), identity=self.identity[idx], gender=self.gender[idx],
            group=self.group[idx], age=self.age[idx],
            labels={k: v[idx] for k, v in self.labels.items()}, sample_ids=self.sample_ids[idx],
            source=self.source, group_names=self.group_names, identity_names=self.identity_names,
            meta=dict(self.meta),
        )

    def with_flipped(self, attribute: str, positions: np.ndarray | list[int]) -> FaceDataset:
        """A copy whose binary ``attribute`` (a task label or ``gender``, as ``train.attribute``
        names it) is flipped at ``positions``: the mislabelled canaries of the one-run audit
        (``common.split.canaries``). Images are shared, not copied; an unknown (-1) value has no
        opposite and is refused."""
        if attribute != "gender" and attribute not in self.labels:
            raise KeyError(f"{attribute!r} is not a label of data set {self.source!r} "
                           f"(labels: {sorted(self.labels)} or 'gender')")
        column = (self.gender if attribute == "gender" else self.labels[attribute]).copy()
        pos = np.asarray(positions, dtype=np.int64)
        if (column[pos] == UNKNOWN).any():
            raise ValueError(f"FaceDataset({self.source}): cannot flip an unknown {attribute!r} value")
        column[pos] = 1 - column[pos]
        if attribute == "gender":
            return dataclasses.replace(self, gender=column, meta=dict(self.meta))
        return dataclasses.replace(self, labels={**self.labels, attribute: column}, meta=dict(self.meta))

    def positions(self, sample_ids: np.ndarray | list[str]) -> np.ndarray:
        """Positions of the given sample ids; raise KeyError naming the first unknown id."""
        lookup = {sid: i for i, sid in enumerate(self.sample_ids.tolist())}
        try:
            return np.asarray([lookup[s] for s in sample_ids], dtype=np.int64)
        except KeyError as exc:
            raise KeyError(f"sample id {exc.args[0]!r} is not in data set {self.source!r}") from None

    def fingerprint(self) -> str:
        """SHA-256 over ids, annotations and pixels: a manifest is only valid for this data.

        Computed once per object (every role lookup checks it): data sets are never modified in
        place; ``subset`` and the loaders build new ones.
        """
        if self._fingerprint is None:
            self._fingerprint = self._hash()
        return self._fingerprint

    def _hash(self) -> str:
        h = hashlib.sha256()
        h.update(self.source.encode())
        for arr in (self.sample_ids, self.identity, self.gender, self.group, self.age):
            h.update(np.ascontiguousarray(arr).tobytes())
        for name in sorted(self.labels):
            h.update(name.encode())
            h.update(self.labels[name].tobytes())
        h.update(str(tuple(self.images.shape)).encode())
        for chunk in image_chunks(self.images):
            h.update(chunk.tobytes())
        return h.hexdigest()

    # --- npz cache -------------------------------------------------------------------------

    def save_npz(self, path: str | os.PathLike[str]) -> Path:
        """Save as a compressed, pickle-free npz (written atomically), pixels included: for small
        data sets (the images are loaded into memory); see ``save_index`` for large ones."""
        return self._save(path, {"images": np.asarray(self.images)}, {})

    def save_index(self, path: str | os.PathLike[str]) -> Path:
        """Save the annotations as an npz that refers to the images' array file, which must sit in
        the same folder (the disk cache of a real source, ``common.data.cache``). The fingerprint
        is stored too, so that reopening a 7 GB cache does not hash it again."""
        images = self.images
        if not isinstance(images, DiskImages) or not np.array_equal(images.rows, np.arange(images.count)):
            raise ValueError(f"{path}: only a whole on-disk data set has an index (use save_npz)")
        if images.path.parent.resolve() != Path(path).parent.resolve():
            raise ValueError(f"{path}: the image array {images.path} must be in the same folder")
        disk = {"file": images.path.name, "count": images.count, "size": images.size,
                "fingerprint": self.fingerprint()}
        return self._save(path, {}, {"disk_images": disk})

    def _save(self, path: str | os.PathLike[str], images: dict[str, np.ndarray], extra: dict[str, Any]) -> Path:
        header = {"source": self.source, "group_names": list(self.group_names),
                  "identity_names": list(self.identity_names), "meta": self.meta,
                  "labels": sorted(self.labels), **extra}
        arrays = {**images, "identity": self.identity, "gender": self.gender,
                  "group": self.group, "age": self.age, "sample_ids": self.sample_ids,
                  "header": np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8)}
        arrays.update({f"label__{k}": v for k, v in self.labels.items()})
        return atomic_save_npz(path, **arrays)

    @classmethod
    def load_npz(cls, path: str | os.PathLike[str]) -> FaceDataset:
        """Load a data set saved by ``save_npz`` or ``save_index``; errors name the file and the
        missing key."""
        z = load_npz(path)
        required = ("identity", "gender", "group", "age", "sample_ids", "header")
        missing = [k for k in required if k not in z]
        if missing:
            raise ValueError(f"{path}: not a FaceDataset archive (missing arrays {missing})")
        try:
            header = json.loads(z["header"].tobytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ValueError(f"{path}: corrupt header ({type(exc).__name__}: {str(exc)[:200]})") from None
        _check_header(path, header)
        disk = header.get("disk_images")
        if disk is None and "images" not in z:
            raise ValueError(f"{path}: not a FaceDataset archive (missing arrays ['images'])")
        try:
            images = z["images"] if disk is None else DiskImages(Path(path).parent / disk["file"], disk["count"],
                                                                 disk["size"])
            labels = {k: z[f"label__{k}"] for k in header.get("labels", [])}
            ds = cls(images=images, identity=z["identity"], gender=z["gender"], group=z["group"],
                       age=z["age"], labels=labels, sample_ids=z["sample_ids"], source=header["source"],
                       group_names=tuple(header.get("group_names", ())),
                       identity_names=tuple(header.get("identity_names", ())), meta=header.get("meta", {}))
        except (KeyError, TypeError, ValueError, OSError) as exc:
            raise ValueError(f"{path}: invalid FaceDataset archive ({exc})") from None
        if disk is not None:
            ds._fingerprint = disk["fingerprint"]
        return ds


def _check_header(path: str | os.PathLike[str], header: Any) -> None:
    """The archive's JSON header: an object with a string ``source``, lists of strings for
    ``labels``, ``group_names`` and ``identity_names``, and an object ``meta``."""
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    if not isinstance(header.get("source"), str):
        raise ValueError(f"{path}: header key 'source' must be a string")
    for key in ("labels", "group_names", "identity_names"):
        value = header.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{path}: header key {key!r} must be a list of strings")
    if not isinstance(header.get("meta", {}), dict):
        raise ValueError(f"{path}: header key 'meta' must be an object")
    disk = header.get("disk_images")
    if disk is not None:
        kinds = {"file": str, "count": int, "size": int, "fingerprint": str}
        if not isinstance(disk, dict) or any(not isinstance(disk.get(k), t) for k, t in kinds.items()):
            raise ValueError(f"{path}: header key 'disk_images' must be an object with {sorted(kinds)}")
        if Path(disk["file"]).name != disk["file"] or disk["file"] in ("", ".", ".."):
            raise ValueError(f"{path}: disk_images.file must be a file name in the same folder, got {disk['file']!r}")
