"""A folder of 200k face crops at 112 px (7.5 GB decoded) loads and trains with bounded memory.

Builds an ImageFolder of ``--images`` PNGs (``--per-identity`` per identity folder; the files are
hard links to a pool of distinct SynthFaces renders, so the folder costs inodes, not gigabytes),
then, each in a fresh process so that the kernel's peak-RSS counter belongs to that step alone:

1. ``load``: ``build_dataset`` decodes the folder into the disk cache (``common.data.cache``);
2. ``reopen``: a second process opens the cache (index only) and reads every image once, a chunk
   at a time, as an evaluation pass over the whole set would;
3. ``train``: one DP-SGD epoch of the default backbone on a ``--train-images`` subset of it.

Reported per step: wall time and peak resident memory, beside the decoded data's size. The folder
and the cache live under ``--work`` (default: a temporary folder, removed at the end).

Usage:  .venv/bin/python bench/large_data.py [--images 200000] [--size 112] [--work DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]


def make_folder(root: Path, images: int, per_identity: int, size: int, pool: int) -> None:
    """``images`` files in identity folders, hard-linked to ``pool`` rendered faces."""
    from common.data.sources.imagefolder import write_imagefolder
    from common.data.sources.synthfaces.generator import SynthConfig, generate

    rendered = write_imagefolder(generate(SynthConfig(num_identities=max(pool // 10, 1), images_per_identity=10,
                                                      image_size=size, seed=0)), root / "pool")
    sources = sorted(rendered.glob("*/*.png"))
    faces = root / "faces"
    for i in range(images):
        folder = faces / f"id{i // per_identity:06d}"
        if i % per_identity == 0:
            folder.mkdir(parents=True)
        os.link(sources[i % len(sources)], folder / f"{i % per_identity:03d}.png")


STEP = """
import json, sys, time
import numpy as np
from bench.memory import status_kb
from common.config import load_config
from common.data.cache import build_dataset
from common.data.disk_images import image_chunks
step, faces, size, train_images = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cfg = load_config(None, ["data.source=imagefolder", f"data.path={faces}", f"data.image_size={size}",
                         "train.task=identity", "train.batch_size=64"])
start = time.perf_counter()
ds = build_dataset(cfg)
extra = {}
if step == "reopen":
    total = sum(int(chunk.sum(dtype=np.int64)) for chunk in image_chunks(ds.images))
    extra["pixel_sum"] = total
elif step == "train":
    from common.config import DPConfig
    from common.nn.build import build_identity_head, build_model, model_spec
    from common.train.loop import identity_classes, train
    part = ds.subset(np.arange(min(train_images, len(ds))))
    spec = model_spec(cfg)
    head = build_identity_head(spec, identity_classes(part.identity)[0].size, 0)
    out = train(build_model(spec, 0), part, cfg.train, DPConfig(mode="sample", max_grad_norm=1.0), seed=0, epochs=1,
                head=head, noise_multiplier=1.0)
    extra["samples_per_second"] = round(out.samples_per_second, 1)
print(json.dumps({"images": len(ds), "seconds": round(time.perf_counter() - start, 1),
                  "peak_rss_mb": round(status_kb("VmHWM") / 1024), **extra}))
"""


def run_step(step: str, faces: Path, size: int, train_images: int, cache: Path, threads: int) -> dict:
    env = {**os.environ, "FACEFL_CACHE": str(cache), "PYTHONPATH": str(ROOT), "FACEFL_THREADS": str(threads),
           "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", STEP, step, str(faces), str(size), str(train_images)],
                         capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if out.returncode:
        sys.exit(f"step {step} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200_000)
    ap.add_argument("--per-identity", type=int, default=20)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--pool", type=int, default=500, help="distinct rendered faces behind the hard links")
    ap.add_argument("--train-images", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the folder and the cache")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="facefl-large-"))
    try:
        start = time.perf_counter()
        make_folder(work, args.images, args.per_identity, args.size, args.pool)
        print(f"folder of {args.images} images ({args.images // args.per_identity} identities, {args.size} px) "
              f"made in {time.perf_counter() - start:.0f} s under {work}", flush=True)
        decoded_mb = args.images * args.size * args.size * 3 / 2**20
        rows = []
        for step in ("load", "reopen", "train"):
            r = run_step(step, work / "faces", args.size, args.train_images, work / "cache", args.threads)
            rows.append(r)
            extra = {k: v for k, v in r.items() if k not in ("images", "seconds", "peak_rss_mb")}
            print(f"{step:7s} {r['images']:>8d} images  {r['seconds']:>7.1f} s  peak RSS {r['peak_rss_mb']:>6d} MB "
                  f"(decoded data {decoded_mb:,.0f} MB)  {extra or ''}", flush=True)
        worst = max(r["peak_rss_mb"] for r in rows)
        print(f"largest peak RSS {worst} MB = {worst / decoded_mb:.3f} x the decoded data")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
