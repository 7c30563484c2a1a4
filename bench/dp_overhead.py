"""DP-SGD overhead of local training: samples/s without DP and with each DP mode, and the
arithmetic floor of the default mode (book-keeping).

Measures the project's own training loop (``common.train.loop.train``: augmentation, ArcFace
identity head, DP wrapping, per-step learning-rate schedule) on the default backbone
(``model_spec(load_config())``, identity task, 64x64 SynthFaces, batch 64), every mode in this one
process on the same data and from the same initial weights:

* each mode first trains ``--warmup`` steps (first-call costs: hooks, allocator, caches);
* then ``--steps`` timed steps (Poisson sampling at q = 1/steps under DP, so the expected batch is
  64; ``train`` times the loop only, not the DP wrapping);
* with ``--repeats R`` the modes are measured R times, interleaved, and the best rate of each is
  kept, which damps interference from other jobs on a shared machine.

The arithmetic floor: floating-point operations of one book-keeping step (forward, the backward
pass to activations, per-layer norms, clipped sums) over those of one step without DP, on one
batch of 64, counted by ``torch.utils.flop_counter`` (matrix products and convolutions; copies
and elementwise work are not FLOPs there). A measured slowdown above the floor is memory traffic
(unfolded inputs, copies) and the lower efficiency of many small products, not arithmetic.

Usage:  .venv/bin/python bench/dp_overhead.py [--steps 20] [--warmup 3] [--repeats 2] [--threads N]
The target is the default DP mode at most 1.5x slower than training without DP.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from common.config import DPConfig, load_config
from common.data.cache import build_dataset
from common.nn.build import build_identity_head, build_model, model_spec
from common.report.tables import format_table
from common.train.book_keeping import GRAD_SAMPLE_MODES, BookKeepingModule
from common.train.loop import _Joint, identity_classes, task_loss, to_tensor, train

TARGET_SLOWDOWN = 1.5
DEFAULT_MODE = DPConfig().grad_sample_mode
MODES = {  # label -> DP grad_sample_mode (None = no DP)
    "no DP": None,
    **{f"DP {mode}{' (default)' if mode == DEFAULT_MODE else ''}": mode for mode in GRAD_SAMPLE_MODES},
}


def default_threads() -> int:
    """2 threads (the machine's cores) unless other jobs already keep a core busy."""
    load = os.getloadavg()[0]
    return 1 if load > 1.0 else min(2, os.cpu_count() or 1)


def measure(mode: str | None, model_state: dict, ds, cfg, steps: int, warmup: int, seed: int) -> tuple[int, int, float]:
    """(steps, samples, seconds) of ``steps`` timed steps after ``warmup`` untimed ones."""
    spec = model_spec(cfg)
    dp = DPConfig(mode="off") if mode is None else DPConfig(mode="sample", grad_sample_mode=mode,
                                                            noise_multiplier=1.0, max_grad_norm=1.0)
    noise = 0.0 if mode is None else 1.0
    batch = cfg.train.batch_size
    out = None
    for n_steps, timed in ((warmup, False), (steps, True)):
        part = ds.subset(np.arange(n_steps * batch))
        model = build_model(spec, cfg.seed)
        model.load_state_dict(copy.deepcopy(model_state))
        head = build_identity_head(spec, identity_classes(part.identity)[0].size, seed)
        result = train(model, part, cfg.train, dp, seed=seed, epochs=1, head=head, noise_multiplier=noise,
                       dp_history=[])
        if timed:
            out = (result.steps, result.samples, result.seconds)
    assert out is not None
    return out


@dataclass
class StepCost:
    """One step on one batch of 64, without DP and with book-keeping."""

    plain_gflop: float
    bk_gflop: float
    plain_ms: float  # forward + backward without DP
    bk_pass_ms: float  # book-keeping's forward + backward (activation gradients only)
    bk_clip_ms: float  # book-keeping's per-layer norms and clipped sums

    @property
    def floor(self) -> float:
        return self.bk_gflop / self.plain_gflop


def step_cost(model_state: dict, ds, cfg, repeats: int) -> StepCost:
    """FLOPs (``torch.utils.flop_counter``) and best-of-``repeats`` times of one step on the first
    batch of ``ds``, split into book-keeping's pass and its clipping."""
    spec = model_spec(cfg)
    part = ds.subset(np.arange(cfg.train.batch_size))
    y_id = torch.from_numpy(identity_classes(part.identity)[1])
    x = to_tensor(part.images)
    model = build_model(spec, cfg.seed)
    model.load_state_dict(copy.deepcopy(model_state))
    if model.attribute is not None:  # idle in the identity task, frozen as ``train`` does
        model.attribute.requires_grad_(False)
    joint = _Joint(model, build_identity_head(spec, int(y_id.max()) + 1, cfg.seed))
    bk = BookKeepingModule(joint)

    def plain() -> None:
        joint.zero_grad(set_to_none=True)
        task_loss(joint(x)[0], None, y_id, y_id, cfg.train).mean().backward()

    def bk_pass() -> None:
        task_loss(bk(x)[0], None, y_id, y_id, cfg.train).sum().backward()

    def timed(fn, then=None) -> tuple[float, float]:
        best, best_then = math.inf, math.inf
        for _ in range(repeats + 1):  # the first call warms up
            start = time.perf_counter()
            fn()
            mid = time.perf_counter()
            if then is not None:
                then()
            best, best_then = min(best, mid - start), min(best_then, time.perf_counter() - mid)
        return best * 1e3, best_then * 1e3

    with FlopCounterMode(display=False) as counter:
        plain()
    plain_gflop = counter.get_total_flops() / 1e9
    with FlopCounterMode(display=False) as counter:
        bk_pass()
        bk.clip_and_sum(1.0)
    bk_gflop = counter.get_total_flops() / 1e9
    plain_ms, _ = timed(plain)
    pass_ms, clip_ms = timed(bk_pass, lambda: bk.clip_and_sum(1.0))
    bk._close()
    return StepCost(plain_gflop, bk_gflop, plain_ms, pass_ms, clip_ms)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per mode (default 3)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved measurements per mode; best kept")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: 2, or 1 if the machine is busy)")
    parser.add_argument("--functorch", action="store_true", help="also measure grad_sample_mode=functorch")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    load_before = os.getloadavg()
    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)

    n = (max(args.steps, args.warmup)) * 64
    ids = -(-n // 10)
    cfg = load_config(None, ["train.task=identity", "data.image_size=64", "train.batch_size=64",
                             f"data.identities={ids}", "data.images_per_identity=10", f"seed={args.seed}"])
    start = time.perf_counter()
    ds = build_dataset(cfg)
    spec = model_spec(cfg)
    data_s = time.perf_counter() - start
    model_state = build_model(spec, cfg.seed).state_dict()
    params = sum(v.numel() for v in model_state.values())
    print(f"torch {torch.__version__}, python {platform.python_version()}, {threads} torch thread(s) "
          f"(cpu_count {os.cpu_count()}, load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f})")
    print(f"model: width={spec.width} blocks={spec.blocks} embedding={spec.embedding_dim} image={spec.image_size}px, "
          f"{params / 1e6:.2f} M shared parameters; data: {len(ds)} SynthFaces images ({data_s:.1f} s to load)")
    print(f"{args.warmup} warm-up + {args.steps} timed steps per mode, batch {cfg.train.batch_size}, "
          f"best of {args.repeats} interleaved repeats\n")

    modes = {k: v for k, v in MODES.items() if v != "functorch" or args.functorch}
    best: dict[str, tuple[int, int, float]] = {}
    for rep in range(args.repeats):
        for label, mode in modes.items():
            steps, samples, seconds = measure(mode, model_state, ds, cfg, args.steps, args.warmup, args.seed + rep)
            rate = samples / seconds
            print(f"  repeat {rep + 1}: {label:<20} {samples:5d} samples in {seconds:6.2f} s = {rate:7.1f} samples/s",
                  flush=True)
            if label not in best or rate > best[label][1] / best[label][2]:
                best[label] = (steps, samples, seconds)

    cost = step_cost(model_state, ds, cfg, repeats=5 * args.repeats)
    base = best["no DP"][1] / best["no DP"][2]
    rows = []
    for label in modes:
        steps, samples, seconds = best[label]
        rate = samples / seconds
        rows.append((label, steps, samples, f"{seconds:.2f}", f"{rate:.1f}", f"{base / rate:.2f}x"))
    print()
    print(format_table(("mode", "steps", "samples", "seconds", "samples/s", "slowdown vs no DP"), rows))
    label = next(k for k, v in modes.items() if v == DEFAULT_MODE)
    slowdown = base / (best[label][1] / best[label][2])
    verdict = "meets" if slowdown <= TARGET_SLOWDOWN else "MISSES"
    print(f"\narithmetic floor of bk: {cost.bk_gflop:.2f} GFLOP per step vs {cost.plain_gflop:.2f} without DP = "
          f"{cost.floor:.2f}x (batch {cfg.train.batch_size}, torch.utils.flop_counter)")
    print(f"one batch, best of {5 * args.repeats}: no DP {cost.plain_ms:.1f} ms (forward + backward); bk "
          f"{cost.bk_pass_ms:.1f} ms forward + backward to activations + {cost.bk_clip_ms:.1f} ms norms and "
          f"clipped sums = {(cost.bk_pass_ms + cost.bk_clip_ms) / cost.plain_ms:.2f}x")
    print(f"default DP mode ({DEFAULT_MODE}) is {slowdown:.2f}x slower than no DP: {verdict} the target of "
          f"<= {TARGET_SLOWDOWN}x; {slowdown / cost.floor:.2f}x its arithmetic floor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
