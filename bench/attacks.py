"""Reference models trained per minute, vectorised (stacked weights, one vmap) vs one at a time.

The models are the default attribute model (``model_spec`` of the default configuration with the
attribute task: width 32, blocks (1, 1, 1), 128-d embedding, 64x64 SynthFaces), trained with the
audit's recipe (``attacks.reference_models.train_references``: Adam, one-cycle schedule,
augmentation, batch 64) on random halves of ``--samples`` images, for ``--steps`` steps each.
Both paths train the same ``--models`` models with the same seeds; the largest weight difference
between them is printed.

Usage:  .venv/bin/python bench/attacks.py [--models 8] [--samples 512] [--steps 10] [--threads 2]
Target: vectorised >= 4x the sequential rate on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from attacks.reference_models import train_references
from common.builders import build_dataset, model_spec
from common.config import load_config
from common.table import format_table

TARGET = 4.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10, help="optimisation steps per model")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(None, ["train.task=attribute"])
    spec = model_spec(cfg)
    ds = build_dataset(cfg)
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(ds), args.samples, replace=False))
    images, labels = ds.images[pick], ds.labels["smiling"][pick]
    in_mask = np.argsort(rng.random((args.models, args.samples)), axis=0) < args.models // 2
    # epochs such that each model takes about --steps steps of batch 64 on its half
    epochs = max(1, round(args.steps * cfg.train.batch_size / (args.samples / 2)))
    seeds = list(range(args.models))
    print(f"python {platform.python_version()}, torch {torch.__version__}, {args.threads} thread(s), "
          f"load average {os.getloadavg()[0]:.2f}; {args.models} models, {args.samples} images of "
          f"{spec.image_size}px, {epochs} epoch(s) of batch {cfg.train.batch_size}")
    train_references(spec, images[:64], labels[:64], in_mask[:2, :64], cfg.train, 1, seeds[:2])  # warm-up
    rows, rates, models = [], {}, {}
    for label, vectorised in (("one at a time", False), ("vectorised (vmap)", True)):
        start = time.perf_counter()
        models[label] = train_references(spec, images, labels, in_mask, cfg.train, epochs, seeds, vectorised=vectorised)
        seconds = time.perf_counter() - start
        rates[label] = args.models / seconds * 60
        rows.append((label, f"{seconds:.1f}", f"{rates[label]:.1f}"))
    diff = max(float((a - b).abs().max()) for ma, mb in zip(*models.values(), strict=True)
               for a, b in zip(ma.state_dict().values(), mb.state_dict().values(), strict=True))
    speedup = rates["vectorised (vmap)"] / rates["one at a time"]
    rows.append(("speed-up", "", f"{speedup:.2f}x"))
    print(format_table(("training", "seconds", "models per minute"), rows))
    print(f"max |weight| difference vectorised vs one at a time: {diff:.1e}")
    print(f"target: vectorised >= {TARGET}x: {'met' if speedup >= TARGET else 'MISSED'}")


if __name__ == "__main__":
    main()
