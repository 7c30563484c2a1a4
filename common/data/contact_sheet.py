"""A labelled contact sheet PNG: the quickest way for a person to check a face data set.

One row per identity, one cell per image, each cell captioned with identity, gender, smiling and
group, so that a reader can see at a glance whether identities are recognisable across a row and
whether the labels match the faces.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from common.data.dataset import FaceDataset
from common.runs.io import atomic_write

MIN_FACE = 96        # faces are upscaled by an integer factor to at least this many pixels
CAPTION_HEIGHT = 24  # two lines of Pillow's default font
PAD = 4
_GENDER_CODE = {0: "F", 1: "M"}
_SMILE = {0: "no", 1: "yes"}


def _caption(ds: FaceDataset, i: int) -> tuple[str, str]:
    gender = _GENDER_CODE.get(int(ds.gender[i]), "?")
    smiling = _SMILE.get(int(ds.labels["smiling"][i]), "?") if "smiling" in ds.labels else "?"
    g = int(ds.group[i])
    group = ds.group_names[g] if 0 <= g < len(ds.group_names) else "?"
    return f"id {int(ds.identity[i])} {gender}", f"smile:{smiling} {group}"


def _rows(ds: FaceDataset, max_identities: int, per_identity: int) -> list[np.ndarray]:
    """Positions of the first ``per_identity`` images of the first ``max_identities`` identities."""
    ids = list(dict.fromkeys(ds.identity.tolist()))[:max_identities]
    return [np.flatnonzero(ds.identity == k)[:per_identity] for k in ids]


def contact_sheet(ds: FaceDataset, out_png: str | Path, max_identities: int = 12, per_identity: int = 6) -> Path:
    """Write a grid of faces, one row per identity with captioned cells; return the PNG path."""
    if max_identities < 1 or per_identity < 1:
        raise ValueError(f"contact_sheet: max_identities and per_identity must be >= 1, "
                         f"got {max_identities}, {per_identity}")
    if len(ds) == 0:
        raise ValueError(f"contact_sheet: data set {ds.source!r} is empty")
    rows = _rows(ds, max_identities, per_identity)
    face = ds.image_size * max(1, -(-MIN_FACE // ds.image_size))
    cell_w, cell_h = face + PAD, face + CAPTION_HEIGHT + PAD
    sheet = Image.new("RGB", (PAD + cell_w * per_identity, PAD + cell_h * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for r, positions in enumerate(rows):
        for c, i in enumerate(positions.tolist()):
            x, y = PAD + c * cell_w, PAD + r * cell_h
            sheet.paste(Image.fromarray(ds.images[i]).resize((face, face), Image.Resampling.NEAREST), (x, y))
            for line_no, text in enumerate(_caption(ds, i)):
                draw.text((x + 1, y + face + 1 + 11 * line_no), text, fill=(0, 0, 0), font=font)
    return atomic_write(out_png, lambda fh: sheet.save(fh, format="PNG"))
