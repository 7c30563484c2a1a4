"""A SynthFaces data directory on disk: the npz cache, the generator config and an ImageFolder export.

``facefl data synth --out DIR`` writes DIR/synthfaces.npz (the exact arrays, for fast reuse),
DIR/synthfaces.json (the generator configuration) and DIR/images/ (ImageFolder +
attributes.csv, the real-loader layout, so people can look at the faces and so the export path
is exercised). Every file is written atomically; the same configuration gives the same bytes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from common.data.dataset import FaceDataset
from common.data.sources.imagefolder import load_imagefolder, write_imagefolder
from common.data.sources.synthfaces.generator import SynthConfig, generate
from common.runs.io import atomic_write_json

NPZ_NAME = "synthfaces.npz"
CONFIG_NAME = "synthfaces.json"
IMAGES_DIR = "images"


def write_synth_dir(cfg: SynthConfig, out: str | Path, export_images: bool = True, overwrite: bool = False,
                    progress: bool = False) -> FaceDataset:
    """Generate SynthFaces and write the data directory; refuse to clobber an export unless asked."""
    out = Path(out)
    images = out / IMAGES_DIR
    if export_images and images.exists() and any(images.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{images}: already holds an export (use --overwrite to replace it)")
        shutil.rmtree(images)
    ds = generate(cfg, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / CONFIG_NAME, cfg.to_meta())
    ds.save_npz(out / NPZ_NAME)
    if export_images:
        write_imagefolder(ds, images)
    return ds


def open_data_dir(path: str | Path, image_size: int = 64) -> FaceDataset:
    """Read a data directory: its npz cache, an ImageFolder export inside it, or an ImageFolder root."""
    p = Path(path)
    if p.is_file():
        return FaceDataset.load_npz(p)
    if (p / NPZ_NAME).is_file():
        return FaceDataset.load_npz(p / NPZ_NAME)
    if (p / IMAGES_DIR).is_dir():
        return load_imagefolder(p / IMAGES_DIR, image_size=image_size)
    if p.is_dir():
        return load_imagefolder(p, image_size=image_size)
    raise FileNotFoundError(f"{p}: no data directory, npz file or ImageFolder here")
