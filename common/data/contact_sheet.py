"""A labelled contact sheet PNG: the quickest way for a person to check a face data set.

One row per identity, one cell per image, each cell captioned with identity, gender, smiling and
group, so that a reader can see at a glance whether identities are recognisable across a row and
whether the labels match the faces. ``sheet_layout`` decides what is drawn and says how that
falls short of what was asked (fewer identities or images in the data set), so that a caller can
tell the reader instead of leaving them to wonder about a short sheet.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class SheetLayout:
    """The positions drawn, one array per row (identity), and what was asked for."""

    rows: list[np.ndarray]
    identities_asked: int
    per_identity_asked: int
    identities_in_data: int

    @property
    def columns(self) -> int:
        return max(len(r) for r in self.rows)

    def shortfall(self) -> list[str]:
        """One sentence per way the sheet draws less than was asked (empty when it draws it all)."""
        notes = []
        if len(self.rows) < self.identities_asked:
            notes.append(f"drew {len(self.rows)} of the {self.identities_asked} identities asked for: "
                         f"the data set has {self.identities_in_data}")
        short = sorted(len(r) for r in self.rows if len(r) < self.per_identity_asked)
        if short:
            have = f"{short[0]}" if short[0] == short[-1] else f"{short[0]} to {short[-1]}"
            noun = "image" if short[-1] == 1 else "images"
            notes.append(f"drew fewer than the {self.per_identity_asked} images per identity asked for in "
                         f"{len(short)} of the {len(self.rows)} rows: those identities have only {have} {noun}")
        return notes


def sheet_layout(ds: FaceDataset, max_identities: int = 12, per_identity: int = 6) -> SheetLayout:
    """The first ``per_identity`` images of the first ``max_identities`` identities, in sample order."""
    if max_identities < 1 or per_identity < 1:
        raise ValueError(f"contact_sheet: max_identities and per_identity must be >= 1, "
                         f"got {max_identities}, {per_identity}")
    if len(ds) == 0:
        raise ValueError(f"contact_sheet: data set {ds.source!r} is empty")
    ids = list(dict.fromkeys(ds.identity.tolist()))
    rows = [np.flatnonzero(ds.identity == k)[:per_identity] for k in ids[:max_identities]]
    return SheetLayout(rows, max_identities, per_identity, len(ids))


def _identity_label(ds: FaceDataset, i: int) -> str:
    """The identity's name (a folder or person name) when the data set has one, else its code."""
    code = int(ds.identity[i])
    return ds.identity_names[code] if code < len(ds.identity_names) else str(code)


def _caption(ds: FaceDataset, i: int) -> tuple[str, str]:
    gender = _GENDER_CODE.get(int(ds.gender[i]), "?")
    smiling = _SMILE.get(int(ds.labels["smiling"][i]), "?") if "smiling" in ds.labels else "?"
    g = int(ds.group[i])
    group = ds.group_names[g] if 0 <= g < len(ds.group_names) else "?"
    return f"id {_identity_label(ds, i)} {gender}", f"smile:{smiling} {group}"


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int,
         font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> str:
    """``text`` cut (with an ellipsis) to ``width`` pixels, so a long name cannot run into the next cell."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def draw_sheet(ds: FaceDataset, layout: SheetLayout, out_png: str | Path) -> Path:
    """Write the grid of ``layout``, as wide as its longest row; return the PNG path."""
    face = ds.image_size * max(1, -(-MIN_FACE // ds.image_size))
    cell_w, cell_h = face + PAD, face + CAPTION_HEIGHT + PAD
    sheet = Image.new("RGB", (PAD + cell_w * layout.columns, PAD + cell_h * len(layout.rows)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for r, positions in enumerate(layout.rows):
        for c, i in enumerate(positions.tolist()):
            x, y = PAD + c * cell_w, PAD + r * cell_h
            sheet.paste(Image.fromarray(ds.images[i]).resize((face, face), Image.Resampling.NEAREST), (x, y))
            for line_no, text in enumerate(_caption(ds, i)):
                draw.text((x + 1, y + face + 1 + 11 * line_no), _fit(draw, text, face - 1, font),
                          fill=(0, 0, 0), font=font)
    return atomic_write(out_png, lambda fh: sheet.save(fh, format="PNG"))


def contact_sheet(ds: FaceDataset, out_png: str | Path, max_identities: int = 12, per_identity: int = 6) -> Path:
    """Write a grid of faces, one row per identity with captioned cells; return the PNG path."""
    return draw_sheet(ds, sheet_layout(ds, max_identities, per_identity), out_png)
