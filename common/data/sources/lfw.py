"""LFW: one folder per person, optional gender lists."""

from __future__ import annotations

from pathlib import Path

from common.data.dataset import UNKNOWN, FaceDataset
from common.data.image_io import SampleError
from common.data.sources.reader import (
    Sample,
    SourceReader,
    index_rows,
    list_images,
    parse_code,
    read_csv,
)

LFW_FOLDERS: tuple[str, ...] = ("lfw", "lfw-deepfunneled", "lfw_funneled")
LFW_GENDERS: dict[str, int] = {"female": 0, "f": 0, "male": 1, "m": 1, "": UNKNOWN}
_LFW_LAYOUT = "lfw/<Person_Name>/<Person_Name>_0001.jpg (the folder holding lfw/, or lfw/ itself)"


def _lfw_genders(path: Path) -> dict[str, tuple[str, str]]:
    """Person name (spaces as underscores) -> (where, lower-cased gender) from a name,gender CSV."""
    table = read_csv(path, ("name", "gender"))
    return index_rows((where, row["name"].replace(" ", "_"), row["gender"].lower()) for where, row in table.rows)


def load_lfw(root: str | Path, *, image_size: int = 64, strict: bool = True, limit: int | None = None,
             cache: Path | None = None, gender_csv: str | Path | None = None) -> FaceDataset:
    """LFW: one identity per person folder; gender from an optional ``name,gender`` CSV.

    Sample ids are relative to the folder holding ``lfw/`` (``lfw/<Person>/<file>``), whichever
    of the two roots is given, so manifests do not depend on how the path was typed. People
    missing from the gender CSV get gender -1; CSV rows for people not on disk are ignored
    (the CSV may cover all of LFW while a subset is loaded).
    """
    reader = SourceReader("lfw", root, _LFW_LAYOUT, image_size=image_size, strict=strict, limit=limit,
                          cache=cache)
    images_dir = next((reader.root / name for name in LFW_FOLDERS if (reader.root / name).is_dir()), reader.root)
    base = images_dir.parent
    genders = {} if gender_csv is None else _lfw_genders(Path(gender_csv).expanduser())

    def make(sample_id: str) -> Sample:
        path = base / sample_id
        parts = sample_id.split("/")
        if len(parts) != 3:
            raise SampleError(path, f"image is not directly inside a person folder; expected {_LFW_LAYOUT}")
        person = parts[1]
        gender = UNKNOWN
        if person in genders:
            where, value = genders[person]
            gender = parse_code(path, where, "gender", value, LFW_GENDERS)
        return Sample(sample_id, path, identity=person, gender=gender)

    samples = reader.collect(list_images(images_dir, base), make)
    return reader.finish(samples, named_identities=True, images_dir=str(images_dir.resolve()),
                         gender_csv=None if gender_csv is None else str(Path(gender_csv).expanduser().resolve()))
