"""UTKFace: age, gender and race coded in each file name."""

from __future__ import annotations

import re
from pathlib import Path

from common.data.dataset import FaceDataset, age_to_bucket
from common.data.image_io import SampleError
from common.data.sources.reader import (
    Sample,
    SourceReader,
    list_images,
)

UTKFACE_RACES: tuple[str, ...] = ("White", "Black", "Asian", "Indian", "Others")
_UTKFACE_LAYOUT = "a folder of <age>_<gender 0|1>_<race 0-4>_<datetime>.jpg images (UTKFace)"
_UTKFACE_NAME = re.compile(r"(\d{1,3})_([01])_([0-4])_\d+", re.ASCII)


def load_utkface(root: str | Path, *, image_size: int = 64, strict: bool = True,
                 limit: int | None = None, cache: Path | None = None) -> FaceDataset:
    """UTKFace: attributes come from file names; no identities (each image is its own).

    UTKFace codes gender 0 = male, 1 = female; it is flipped to the project's coding. Images
    may sit in sub-folders (the in-the-wild parts); ``.jpg.chip.jpg`` names are accepted.
    """
    reader = SourceReader("utkface", root, _UTKFACE_LAYOUT, image_size=image_size, strict=strict, limit=limit,
                          cache=cache)

    def make(sample_id: str) -> Sample:
        path = reader.root / sample_id
        match = _UTKFACE_NAME.fullmatch(path.name.split(".", 1)[0])
        if match is None:
            raise SampleError(path, f"file name does not encode the attributes; expected {_UTKFACE_LAYOUT}")
        age, gender, race = (int(g) for g in match.groups())
        return Sample(sample_id, path, gender=1 - gender, group=race, age=age_to_bucket(age))

    samples = reader.collect(list_images(reader.root, reader.root), make)
    return reader.finish(samples, group_names=UTKFACE_RACES)


