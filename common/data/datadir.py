"""A SynthFaces data directory on disk: the npz cache, the generator config and an ImageFolder export.

``facefl data synth --out DIR`` writes DIR/synthfaces.npz (the exact arrays, for fast reuse),
DIR/synthfaces.json (the generator configuration) and DIR/images/ (ImageFolder +
attributes.csv, the real-loader layout, so people can look at the faces and so the export path
is exercised). Every file is written atomically; the same configuration gives the same bytes.

With ``--members N`` the export is split instead: DIR/member-00, DIR/member-01, ... each hold the
ImageFolder of one consortium member's identities (disjoint, dealt by a seeded shuffle), so that
each SuperNode can be given its own folder and nothing else; DIR/members.json has their counts
(no file names). No images/ or other member-* folder is left beside them: a per-member
simulation reads every sub-directory of ``data.path`` as one member, in sorted order.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from common.data.dataset import FaceDataset
from common.data.sources.imagefolder import load_imagefolder, write_imagefolder
from common.data.sources.synthfaces.generator import SynthConfig, generate
from common.runs.io import atomic_write_json, read_json

NPZ_NAME = "synthfaces.npz"
CONFIG_NAME = "synthfaces.json"
IMAGES_DIR = "images"
MEMBER_PREFIX = "member-"
MEMBERS_NAME = "members.json"
DEFAULT_IMAGE_SIZE = 64
_MEMBERS_STREAM = 0x3E3B
"""Seeds the member shuffle apart from the generator's streams (those carry a spawn key)."""


def write_synth_dir(cfg: SynthConfig, out: str | Path, export_images: bool = True, overwrite: bool = False,
                    progress: bool = False, members: int | None = None) -> FaceDataset:
    """Generate SynthFaces and write the data directory; refuse to clobber an export unless asked.

    ``members``: write that many member exports instead of DIR/images (see the module docstring).
    Every argument is checked, and every clash with an earlier export found, before any work.
    """
    out = Path(out)
    if members is None:
        targets = [out / IMAGES_DIR] if export_images else []
    else:
        if not export_images:
            raise ValueError("--members writes one ImageFolder export per member; it cannot be combined with "
                             "--no-export")
        if not 1 <= members <= cfg.num_identities:
            raise ValueError(f"--members: expected 1 to {cfg.num_identities} (one identity per member at least; "
                             f"--identities is {cfg.num_identities}), got {members}")
        targets = [out / name for name in member_dir_names(members)]
    _clear_exports(out, targets, stale=members is not None, overwrite=overwrite)
    ds = generate(cfg, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / CONFIG_NAME, cfg.to_meta())
    ds.save_npz(out / NPZ_NAME)
    if members is None:
        if export_images:
            write_imagefolder(ds, targets[0])
        return ds
    (out / MEMBERS_NAME).unlink(missing_ok=True)  # an earlier split's counts must not outlive it
    counts = {}
    for target, identities in zip(targets, member_identities(ds.identity, members, cfg.seed)):
        part = ds.subset(np.isin(ds.identity, identities))
        write_imagefolder(part, target)
        counts[target.name] = {"images": len(part), "identities": len(identities)}
    atomic_write_json(out / MEMBERS_NAME, counts)  # last: its presence marks a complete split
    return ds


def member_dir_names(members: int) -> list[str]:
    """``member-00``, ``member-01``, ...: zero-padded so that sorted names are in partition order."""
    digits = max(2, len(str(members - 1)))
    return [f"{MEMBER_PREFIX}{k:0{digits}d}" for k in range(members)]


def member_identities(identity: np.ndarray, members: int, seed: int) -> list[np.ndarray]:
    """Each member's identity codes (sorted): all identities, shuffled with ``seed``, dealt into
    ``members`` parts whose sizes differ by at most one."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _MEMBERS_STREAM]))
    return [np.sort(part) for part in np.array_split(rng.permutation(np.unique(identity)), members)]


def _clear_exports(out: Path, targets: list[Path], stale: bool, overwrite: bool) -> None:
    """Make room for the exports ``targets``: a non-empty one is an earlier export, and with ``stale``
    so is every other ``images``/``member-*`` folder of ``out`` (it would read as one more member).
    Without ``overwrite`` they are refused; with it a target is emptied in place (it may be a mount
    point, e.g. a Docker volume) and any other is removed."""
    found = [t for t in targets if t.is_dir() and any(t.iterdir())]
    if stale and out.is_dir():
        found += sorted(p for p in out.iterdir() if p.is_dir() and p not in targets
                        and (p.name == IMAGES_DIR or p.name.startswith(MEMBER_PREFIX)))
    if not found:
        return
    if not overwrite:
        names = ", ".join(map(str, found))
        raise FileExistsError(f"{names}: already holds an export (use --overwrite to replace it)" if len(found) == 1
                              else f"{names}: already hold exports (use --overwrite to replace them)")
    for folder in found:
        if folder not in targets:
            shutil.rmtree(folder)
            continue
        for child in folder.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()


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
    """The SynthFaces image size of ``<data dir>/images`` or ``<data dir>/member-NN`` from its
    synthfaces.json, if it is one."""
    config = folder.parent / CONFIG_NAME
    if not (folder.name == IMAGES_DIR or folder.name.startswith(MEMBER_PREFIX)) or not config.is_file():
        return None
    meta = read_json(config)
    size = meta.get("image_size") if isinstance(meta, dict) else None
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{config}: image_size must be a positive integer, got {size!r}")
    return size
