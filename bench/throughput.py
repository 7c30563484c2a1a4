"""Training throughput and peak memory: the default backbone and an ArcFace-class IResNet-50.

For each model (the default ``resnet_gn`` at 64 px, batch 64; ``iresnet50`` at 112 px with a
512-d embedding, batch ``--iresnet-batch``) and each DP setting (none; DP-SGD with the default
book-keeping mode), the project's training loop (``common.train.loop.train``, identity task,
ArcFace head, SynthFaces rendered at that size) runs ``--warmup`` untimed steps and then
``--steps`` timed ones. Reported: samples per second of the timed steps, and the peak resident
memory the training added (the kernel's high-water mark, reset through ``/proc/self/clear_refs``
before each run, minus the resident memory before it). It trains where ``train.device = auto``
puts it (``--device`` to choose): on a GPU machine the same command gives the GPU rows, and peak
memory is then the host's, not the GPU's.

Usage:  .venv/bin/python bench/throughput.py [--steps 5] [--iresnet-steps 2] [--threads N]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench.memory import reset_peak, status_kb
from common.config import DPConfig, load_config
from common.data.cache import build_dataset
from common.nn.build import build_identity_head, build_model, model_spec
from common.report.tables import format_table
from common.train.device import DEVICES, resolve_device
from common.train.loop import identity_classes, train


def run(arch: str, image_size: int, batch: int, steps: int, warmup: int, dp_mode: str | None,
        seed: int, device: str) -> tuple[float, float]:
    """(samples per second, peak MB added) of ``steps`` timed training steps."""
    overrides = [f"model.arch={arch}", f"data.image_size={image_size}", "train.task=identity",
                 f"train.batch_size={batch}", f"data.identities={-(-(steps + warmup) * batch // 8)}",
                 "data.images_per_identity=8", f"seed={seed}", f"train.device={device}"]
    if arch != "resnet_gn":
        overrides.append("model.embedding_dim=512")
    cfg = load_config(None, overrides)
    ds = build_dataset(cfg)
    spec = model_spec(cfg)
    dp = DPConfig(mode="off") if dp_mode is None else DPConfig(mode="sample", grad_sample_mode=dp_mode,
                                                               max_grad_norm=1.0)
    rate = peak = 0.0
    for n_steps, timed in ((warmup, False), (steps, True)):
        part = ds.subset(np.arange(n_steps * batch))
        model = build_model(spec, seed)
        head = build_identity_head(spec, identity_classes(part.identity)[0].size, seed)
        reset_peak()
        before = status_kb("VmRSS")
        out = train(model, part, cfg.train, dp, seed=seed, epochs=1, head=head,
                    noise_multiplier=0.0 if dp_mode is None else 1.0, dp_history=[])
        if timed:
            rate, peak = out.samples / out.seconds, (status_kb("VmHWM") - before) / 1024
    return rate, peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps of the default backbone")
    parser.add_argument("--iresnet-steps", type=int, default=2, help="timed steps of iresnet50")
    parser.add_argument("--iresnet-batch", type=int, default=16, help="iresnet50's batch size")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=DEVICES, default="auto", help="train.device")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"torch {torch.__version__}, python {platform.python_version()}, {args.threads} torch thread(s), "
          f"cpu_count {os.cpu_count()}, load average {load[0]:.2f}; training on {resolve_device(args.device)}\n")
    configs = [("resnet_gn", 64, 64, args.steps), ("iresnet50", 112, args.iresnet_batch, args.iresnet_steps)]
    rows = []
    for arch, size, batch, steps in configs:
        plain = None
        for label, mode in (("no DP", None), ("DP bk", "bk")):
            start = time.perf_counter()
            rate, peak = run(arch, size, batch, steps, args.warmup, mode, args.seed, args.device)
            plain = rate if mode is None else plain
            print(f"  {arch} {size} px batch {batch}, {label}: {rate:.1f} samples/s, peak +{peak:.0f} MB "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
            rows.append((arch, f"{size} px", batch, label, f"{rate:.1f}", f"{plain / rate:.2f}x", f"{peak:.0f}"))
    print()
    print(format_table(("model", "input", "batch", "DP", "samples/s", "vs no DP", "peak MB added"), rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
