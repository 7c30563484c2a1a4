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
from common.runs.io import atomic_write_json, read_json

NPZ_NAME = "synthfaces.npz"
CONFIG_NAME = "synthfaces.json"
IMAGES_DIR = "images"
DEFAULT_IMAGE_SIZE = 64


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


def open_data_dir(path: str | Path, image_size: int | None = None) -> FaceDataset:
    """Read a data directory: its npz cache, an ImageFolder export inside it, or an ImageFolder root.

    ``image_size`` applies to ImageFolders (an npz keeps its own). By default it is the size in
    the synthfaces.json beside a ``data synth`` export, so that the export is shown as written
    rather than resampled, and ``DEFAULT_IMAGE_SIZE`` for any other ImageFolder.
    """
    p = Path(path)
    if p.is_file():
        return FaceDataset.load_npz(p)
    if (p / NPZ_NAME).is_file():
        return FaceDataset.load_npz(p / NPZ_NAME)
    folder = p / IMAGES_DIR if (p / IMAGES_DIR).is_dir() else p
    if not folder.is_dir():
        raise FileNotFoundError(f"{p}: no data directory, npz file or ImageFolder here")
    if image_size is None:
        image_size = _export_image_size(folder) or DEFAULT_IMAGE_SIZE
    return load_imagefolder(folder, image_size=image_size)


def _export_image_size(folder: Path) -> int | None:
    """The SynthFaces image size of ``<data dir>/images`` from its synthfaces.json, if it is one."""
    config = folder.parent / CONFIG_NAME
    if folder.name != IMAGES_DIR or not config.is_file():
        return None
    meta = read_json(config)
    size = meta.get("image_size") if isinstance(meta, dict) else None
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{config}: image_size must be a positive integer, got {size!r}")
    return size
