"""Tiny on-disk trees in the real layouts of UTKFace, CelebA, FairFace, LFW and ImageFolder.

Images are seeded random pixels saved with Pillow, so the loader tests do not depend on the
SynthFaces generator. Each builder returns what the tree encodes, for the tests to check.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CELEBA_ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin",
    "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open",
    "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)


def save_image(path: Path, seed: int, size: tuple[int, int] = (24, 20)) -> np.ndarray:
    """Save a seeded random RGB image of (width, height) ``size``; the format follows the suffix."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def truncate(path: Path) -> None:
    """Cut an image file in half, as an interrupted download would."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garble(path: Path) -> None:
    """Replace a file's content with bytes that are no image at all."""
    path.write_bytes(b"this is not an image\n" * 8)


# --- UTKFace: (age, gender 0 male / 1 female, race 0..4) in the file name --------------------

UTKFACE_FACES: dict[str, tuple[int, int, int]] = {
    "1_0_0_20161219140623097.jpg.chip.jpg": (1, 0, 0),
    "25_1_1_20170116184028385.jpg": (25, 1, 1),
    "30_0_2_20170104201443273.jpg": (30, 0, 2),
    "45_1_3_20170109134106264.jpg": (45, 1, 3),
    "59_0_4_20170117174624426.jpg": (59, 0, 4),
    "60_1_0_20170109141853364.jpg": (60, 1, 0),
    "85_0_1_20170110160643106.jpg": (85, 0, 1),
    "part2/29_1_2_20170116174525125.jpg": (29, 1, 2),
}


def make_utkface(root: Path) -> dict[str, tuple[int, int, int]]:
    """A UTKFace folder (one image in a sub-folder, like the in-the-wild parts) and a stray text file."""
    for seed, name in enumerate(UTKFACE_FACES):
        save_image(root / name, seed)
    (root / "README.txt").write_text("not an image, must be ignored\n")
    return dict(UTKFACE_FACES)


# --- CelebA ---------------------------------------------------------------------------------

CELEBA_IDENTITIES: tuple[int, ...] = (10, 2, 10, 7, 2, 7, 10, 2)
CELEBA_PARTITION: tuple[int, ...] = (0, 0, 0, 1, 1, 2, 2, 0)


def make_celeba(root: Path) -> dict[str, object]:
    """img_align_celeba/ with 8 JPEGs, the attribute, identity and partition files.

    Identities 2, 7 and 10 check numeric (not lexicographic) ordering of identity codes.
    """
    files = [f"{i:06d}.jpg" for i in range(1, len(CELEBA_IDENTITIES) + 1)]
    rng = np.random.default_rng(7)
    attrs = rng.choice(np.array([-1, 1]), size=(len(files), len(CELEBA_ATTRIBUTES)))
    for seed, name in enumerate(files):
        save_image(root / "img_align_celeba" / name, 100 + seed, size=(18, 22))
    lines = [str(len(files)), " ".join(CELEBA_ATTRIBUTES)]
    lines += [f"{name} " + " ".join(f"{v:2d}" for v in row) for name, row in zip(files, attrs)]
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "identity_CelebA.txt").write_text("".join(f"{f} {i}\n" for f, i in zip(files, CELEBA_IDENTITIES)))
    (root / "list_eval_partition.txt").write_text("".join(f"{f} {p}\n" for f, p in zip(files, CELEBA_PARTITION)))
    return {"files": files, "attrs": attrs}


# --- FairFace -------------------------------------------------------------------------------

FAIRFACE_ROWS: dict[str, tuple[str, str, str]] = {
    "train/1.jpg": ("0-2", "Male", "White"),
    "train/2.jpg": ("20-29", "Female", "Black"),
    "train/3.jpg": ("30-39", "Male", "Latino_Hispanic"),
    "train/4.jpg": ("50-59", "Female", "East Asian"),
    "train/5.jpg": ("60-69", "Male", "Southeast Asian"),
    "val/1.jpg": ("more than 70", "Female", "Indian"),
    "val/2.jpg": ("10-19", "Male", "Middle Eastern"),
}


def make_fairface(root: Path) -> dict[str, tuple[str, str, str]]:
    """train/, val/ and fairface_label_{train,val}.csv (file, age, gender, race, service_test)."""
    for seed, name in enumerate(FAIRFACE_ROWS):
        save_image(root / name, 200 + seed)
    for part in ("train", "val"):
        rows = [f"{f},{a},{g},{r},True" for f, (a, g, r) in FAIRFACE_ROWS.items() if f.startswith(part)]
        (root / f"fairface_label_{part}.csv").write_text("file,age,gender,race,service_test\n" + "\n".join(rows) + "\n")
    return dict(FAIRFACE_ROWS)


# --- LFW ------------------------------------------------------------------------------------

LFW_PEOPLE: dict[str, int] = {"Alice_Able": 2, "Bob_Baker": 1, "Carol_Chen": 3}


def make_lfw(root: Path, gender_csv: bool = True) -> dict[str, int]:
    """lfw/<Person>/<Person>_000N.jpg; optionally a name,gender CSV beside lfw/ (Carol is not in it)."""
    seed = 300
    for person, count in LFW_PEOPLE.items():
        for k in range(1, count + 1):
            save_image(root / "lfw" / person / f"{person}_{k:04d}.jpg", seed)
            seed += 1
    if gender_csv:
        (root / "genders.csv").write_text("name,gender\nAlice Able,female\nBob_Baker,M\n")
    return dict(LFW_PEOPLE)


# --- ImageFolder ----------------------------------------------------------------------------

IMAGEFOLDER_CSV = """\
file,gender,group,age,smiling,eyeglasses
anna/a1.png,female,light,25,1,0
anna/a2.jpg,female,light,30-59,0,
ben/b1.png,male,dark,60+,1,1
ben/sub/b2.png,Male,,,,1
carl/c1.png,,dark,61,0,0
"""


def make_imagefolder(root: Path) -> None:
    """Three identity folders (one nested image) and an attributes.csv with mixed age notation."""
    for seed, name in enumerate(("anna/a1.png", "anna/a2.jpg", "ben/b1.png", "ben/sub/b2.png", "carl/c1.png")):
        save_image(root / name, 400 + seed)
    (root / "attributes.csv").write_text(IMAGEFOLDER_CSV)
