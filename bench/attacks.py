"""Reference models trained per minute, vectorised (stacked weights, one vmap) vs one at a time.

The models are the default attribute model (``model_spec`` of the default configuration with the
attribute task: width 32, blocks (1, 1, 1), 128-d embedding, 64x64 SynthFaces), trained with the
audit's recipe (``attacks.reference_models.train_references``: Adam, one-cycle schedule,
augmentation, batch 64) on random halves of ``--samples`` images, for ``--steps`` steps each.
Both paths train the same ``--models`` models with the same seeds; the largest weight difference
between them is printed.

It also prints why vectorising cannot win much on a CPU: the floating-point work of one training
step (counted by ``torch.utils.flop_counter``), the rate the one-at-a-time path achieves, and this
machine's dense float32 matrix-multiply rate. Stacking models removes per-call overhead, not
arithmetic, so no vectorisation can beat one-at-a-time training by more than peak / achieved.

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

from attacks.reference_models import train_references, training_steps
from common.config import load_config
from common.data.cache import build_dataset
from common.nn.build import model_spec
from common.report.tables import format_table
from common.train.loop import to_tensor

TARGET = 4.0


def step_flops(spec, images: np.ndarray, batch: int) -> float:
    """Floating-point operations of one forward + backward pass of the attribute model on a batch."""
    from torch.utils.flop_counter import FlopCounterMode

    from common.nn.build import build_model

    model = build_model(spec, 0)
    with FlopCounterMode(display=False) as counter:
        _, logit = model(to_tensor(images[:batch]))
        logit.sum().backward()
    return float(counter.get_total_flops())


def matmul_rate(n: int = 1024, repeats: int = 20) -> float:
    """This machine's dense float32 GEMM rate in FLOP/s: a practical compute ceiling."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)


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
    steps = args.models * training_steps(in_mask, cfg.train.batch_size, epochs)
    achieved = steps * step_flops(spec, images, cfg.train.batch_size) / (args.models / rates["one at a time"] * 60)
    peak = matmul_rate()
    print(f"one at a time: {achieved / 1e9:.1f} GFLOP/s of training arithmetic; float32 GEMM on this machine: "
          f"{peak / 1e9:.1f} GFLOP/s; so no vectorisation can exceed about {peak / achieved:.1f}x")
    print(f"target: vectorised >= {TARGET}x: {'met' if speedup >= TARGET else 'MISSED'}")


if __name__ == "__main__":
    main()
