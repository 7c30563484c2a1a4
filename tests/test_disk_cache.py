"""The disk cache of real sources: the same images as the in-memory path, rebuilt when the folder
or the cache changes, and a data set several times a process's memory cap still trains."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import DPConfig, TrainConfig
from common.config.loader import load_config
from common.data import cache
from common.data.disk_images import DiskImages, DiskImageWriter
from common.data.sources import load_source
from common.data.sources.imagefolder import write_imagefolder
from common.nn.build import build_identity_head, build_model
from common.train.loop import train

ROOT = Path(__file__).resolve().parents[1]


def _disk(images: np.ndarray, path: Path) -> DiskImages:
    writer = DiskImageWriter(path, images.shape[1])
    for image in images:
        writer.append(image)
    return writer.close()


def test_disk_images_index_like_the_array(synth_small, tmp_path: Path) -> None:
    ref = synth_small.images
    disk = _disk(ref, tmp_path / "a.u8")
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(ref), 300)  # repeats, any order
    mask = rng.random(len(ref)) < 0.3
    assert disk.shape == ref.shape and len(disk) == len(ref)
    assert np.array_equal(disk[7], ref[7])
    assert np.array_equal(disk[np.int64(-1)], ref[-1])
    assert np.array_equal(disk[10:90:3], ref[10:90:3])
    assert np.array_equal(disk[picks], ref[picks])
    assert np.array_equal(disk[mask], ref[mask])
    sub = disk.take(picks[:50]).take(np.arange(49, -1, -2))  # views of views read no pixels
    assert np.array_equal(np.asarray(sub), ref[picks[:50]][np.arange(49, -1, -2)])
    assert np.array_equal(np.stack(list(disk)), ref)


def test_disk_writer_leaves_nothing_on_abort_and_reopen_checks_the_size(synth_small, tmp_path: Path) -> None:
    writer = DiskImageWriter(tmp_path / "b.u8", synth_small.image_size)
    writer.append(synth_small.images[0])
    with pytest.raises(ValueError, match=r"expected a \(32, 32, 3\) uint8 image"):
        writer.append(synth_small.images[0, :16])
    writer.abort()
    assert list(tmp_path.iterdir()) == []
    disk = _disk(synth_small.images[:5], tmp_path / "c.u8")
    with pytest.raises(ValueError, match=r"c\.u8: image cache holds 15360 bytes, expected 18432"):
        DiskImages(disk.path, 6, synth_small.image_size)


def _folder_config(root: Path, size: int):
    return load_config(None, ["data.source=imagefolder", f"data.path={root}", f"data.image_size={size}"])


def test_a_real_source_is_cached_on_disk_with_the_same_images(synth_small, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FACEFL_CACHE", str(tmp_path / "cache"))
    root = write_imagefolder(synth_small, tmp_path / "faces")
    in_memory = load_source("imagefolder", root, image_size=32)
    cfg = _folder_config(root, 32)
    ds = cache.load_cached_source(cfg)
    assert isinstance(ds.images, DiskImages) and not isinstance(in_memory.images, DiskImages)
    assert np.array_equal(np.asarray(ds.images), in_memory.images)
    assert ds.fingerprint() == in_memory.fingerprint()
    assert list(ds.sample_ids) == list(in_memory.sample_ids)
    part = np.array([5, 3, 150, 77])
    assert np.array_equal(ds.subset(part).images[np.arange(4)], in_memory.subset(part).images)
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert [Path(f).suffix for f in files] == [".lock", ".npz", ".u8"]

    # Reopened (another process): from the index, fingerprint stored, pixels not re-hashed.
    again = cache.load_cached_source(cfg)
    assert again.fingerprint() == in_memory.fingerprint() and again.images.path == ds.images.path

    # A changed folder is a new cache; a damaged index or a truncated array is rebuilt.
    some = next(root.glob("*/*.png"))
    os.utime(some, ns=(1, 1))
    changed = cache.load_cached_source(cfg)
    assert changed.images.path != ds.images.path
    changed.images.path.write_bytes(changed.images.path.read_bytes()[:-10])
    rebuilt = cache.load_cached_source(cfg)
    assert np.array_equal(np.asarray(rebuilt.images), in_memory.images)
    index = next(p for p in (tmp_path / "cache").glob("*.npz") if p.stem == ds.images.path.stem)
    index.write_bytes(b"not an npz")
    assert cache.load_cached_source(cfg).fingerprint() == in_memory.fingerprint()


def _build_in_child(root: str, cache_root: str, out: str) -> None:
    os.environ["FACEFL_CACHE"] = cache_root
    ds = cache.load_cached_source(_folder_config(Path(root), 32))
    Path(out).write_text(ds.fingerprint())


def test_processes_that_build_the_same_cache_at_once_decode_it_once(synth_small, tmp_path: Path) -> None:
    import multiprocessing

    root = write_imagefolder(synth_small, tmp_path / "faces")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_build_in_child, args=(str(root), str(tmp_path / "cache"), str(tmp_path / f"fp{i}")))
             for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    prints = {(tmp_path / f"fp{i}").read_text() for i in range(3)}
    assert prints == {load_source("imagefolder", root, image_size=32).fingerprint()}
    assert len(list((tmp_path / "cache").glob("*.u8"))) == 1 and not list((tmp_path / "cache").glob("*.tmp"))


def test_training_on_disk_images_gives_the_same_weights(synth_small, tiny_spec, tmp_path: Path) -> None:
    disk = dataclasses.replace(synth_small, images=_disk(synth_small.images, tmp_path / "d.u8"))
    cfg = TrainConfig(task="both", attribute="gender", batch_size=32, augment=True)
    weights = []
    for ds in (synth_small, disk):
        model = build_model(tiny_spec, 0)
        head = build_identity_head(tiny_spec, ds.num_identities, 1)
        train(model, ds, cfg, DPConfig(mode="sample", grad_sample_mode="bk"), seed=3, epochs=1, head=head,
              noise_multiplier=1.0, noise_seed=5)
        weights.append(torch.cat([p.detach().flatten() for p in [*model.parameters(), *head.parameters()]]))
    assert torch.equal(*weights)


MEMORY_CAP_SCRIPT = textwrap.dedent("""
    import resource, sys
    import numpy as np, torch
    from common.config import DPConfig, TrainConfig
    from common.data.dataset import FaceDataset
    from common.data.disk_images import DiskImages
    from common.nn.build import build_identity_head, build_model
    from common.nn.face_model import ModelSpec
    from common.train.loop import train

    torch.set_num_threads(1)
    path, count, headroom = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    images = DiskImages(path, count, 32)
    ids = np.arange(count) % 64
    ds = FaceDataset(images=images, identity=ids, gender=ids % 2, group=np.full(count, -1), age=np.full(count, -1),
                     labels={}, sample_ids=np.char.add("s", np.arange(count).astype(str)), source="capped")
    spec = ModelSpec(width=4, blocks=(1,), embedding_dim=8, image_size=32, attribute_head=False)
    cfg = TrainConfig(task="identity", batch_size=256, augment=False)
    model, head = build_model(spec, 0), build_identity_head(spec, 64, 1)
    train(model, ds.subset(np.arange(512)), cfg, DPConfig(mode="off"), seed=0, epochs=1, head=head)  # warm up
    used = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (used + headroom, used + headroom))
    try:
        np.asarray(images)
        sys.exit("the cap did not stop loading every image")
    except MemoryError:
        pass
    out = train(model, ds, cfg, DPConfig(mode="off"), seed=0, epochs=1, head=head)
    print("trained", out.samples, "of", count, "images under a cap of", headroom, "bytes above", used)
""")


def test_a_data_set_four_times_the_memory_cap_trains_an_epoch(tmp_path: Path) -> None:
    headroom = 48 << 20
    count = 4 * headroom // (32 * 32 * 3) + 1
    writer = DiskImageWriter(tmp_path / "big.u8", 32)
    rng = np.random.default_rng(0)
    block = rng.integers(0, 256, (512, 32, 32, 3), dtype=np.uint8)
    for i in range(count):
        writer.append(block[i % 512])
    writer.close()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", MEMORY_CAP_SCRIPT, str(tmp_path / "big.u8"), str(count),
                           str(headroom)], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"trained {count} of {count} images" in proc.stdout
