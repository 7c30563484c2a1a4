"""FairFace: train/val folders with age, gender and race label CSVs."""

from __future__ import annotations

import re
from pathlib import Path

from common.data.dataset import FaceDataset, age_to_bucket
from common.data.image_io import SampleError
from common.data.sources.reader import (
    Sample,
    SourceReader,
    clip,
    index_rows,
    list_images,
    parse_code,
    read_csv,
    relative_key,
    require_dir,
)

FAIRFACE_RACES: tuple[str, ...] = ("White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian",
                                   "Indian", "Middle Eastern")
FAIRFACE_SPLITS: tuple[str, ...] = ("train", "val")
FAIRFACE_GENDERS: dict[str, int] = {"Female": 0, "Male": 1}
_FAIRFACE_LAYOUT = "train/, val/, fairface_label_train.csv and fairface_label_val.csv (FairFace)"
_FAIRFACE_AGE = re.compile(r"(\d{1,3})-\d{1,3}|more than (\d{1,3})", re.ASCII)


def load_fairface(root: str | Path, *, image_size: int = 64, strict: bool = True, limit: int | None = None,
                  cache: Path | None = None, split: str | None = None) -> FaceDataset:
    """FairFace: gender, 7 race groups and age ranges from the label CSVs; no identities.

    An age range maps to the bucket of its lower bound ("20-29" -> 20, "more than 70" -> 70).
    ``split`` ("train" or "val") loads one half; by default both (both CSVs required). The
    ``service_test`` column is ignored.
    """
    reader = SourceReader("fairface", root, _FAIRFACE_LAYOUT, image_size=image_size, strict=strict, limit=limit,
                          cache=cache)
    if split is not None and split not in FAIRFACE_SPLITS:
        raise ValueError(f"fairface: unknown split {split!r}; expected one of {list(FAIRFACE_SPLITS)} or None")
    splits = FAIRFACE_SPLITS if split is None else (split,)
    disk: list[str] = []
    items: list[tuple[str, str, dict[str, str]]] = []
    for part in splits:
        csv_path = reader.root / f"fairface_label_{part}.csv"
        table = read_csv(csv_path, ("file", "age", "gender", "race"))
        items.extend((where, relative_key(row["file"]), row) for where, row in table.rows)
        disk.extend(list_images(require_dir(reader.root / part, f"FairFace {part} folder"), reader.root))
    rows = index_rows(items)
    races = {name: i for i, name in enumerate(FAIRFACE_RACES)}

    def make(sample_id: str) -> Sample:
        path = reader.root / sample_id
        where, row = rows[sample_id]
        age = _FAIRFACE_AGE.fullmatch(row["age"])
        if age is None:
            raise SampleError(path, f"{where}: unknown age {clip(row['age'])}; expected a range like "
                                    f"'20-29' or 'more than 70'")
        return Sample(sample_id, path,
                      gender=parse_code(path, where, "gender", row["gender"], FAIRFACE_GENDERS),
                      group=parse_code(path, where, "race", row["race"], races),
                      age=age_to_bucket(int(age.group(1) or age.group(2))))

    label_files = " or ".join(f"fairface_label_{part}.csv" for part in splits)
    ids = reader.join(disk, {label_files: rows})
    return reader.finish(reader.collect(ids, make), group_names=FAIRFACE_RACES, split=split)


