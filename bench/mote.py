"""MOTE model templates: enrollment speed (batched vs one at a time), storage and decision time.

Data: synthetic Gaussian embeddings, not face images: identity centres on the unit sphere, shifted
along one direction by gender, plus per-image noise, every embedding L2-normalised like the
project's backbone output. A population of ``--population`` identities x 5 embeddings fits the
gender KDEs (the full default bandwidth grid, 54 values, 5 folds) and is the impostor pool; the
``--identities`` enrolled identities are disjoint from it and enroll from one reference each.

* Enrollment with the default ``MoteConfig`` (100 synthetic genuine, 400 + 100 impostors, batch
  128, up to 100 epochs, early stopping): all identities in one batch, then one at a time; the
  two must give the same models (largest weight difference printed). A 2-identity, 1-epoch
  enrollment runs first, untimed, so that first-call costs are not counted.
* Storage: parameter bytes per identity (KB = 1000 bytes) in float32 and float16, the same at
  d = 512 (the paper's embedding size, 297 KB), and the safetensors file size per identity.
* Decision time: ``--probes`` probes against a gallery of ``--gallery`` models (the enrolled
  models repeated to that size: the cost does not depend on the weights), best of 3 runs, per
  (probe, identity) pair; and one probe against one claimed identity (median of 200 calls).

Usage:  .venv/bin/python bench/mote.py [--identities 64] [--dim 128] [--probes 1000] [--gallery 200] [--threads 1]
Targets: >= 20 identities/s batched enrollment, <= 10 microseconds per (probe, identity) pair.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from common.config import MoteConfig
from common.evaluation.verification_fairness import verification_report
from common.mote.gallery import MoteGallery, enroll
from common.mote.kde import GenderKDE
from common.mote.networks import parameter_count
from common.report.tables import format_table

TARGET_IDS_PER_S = 20.0
TARGET_US_PER_PAIR = 10.0
PAPER_KB = 297
PAPER_DECISION_US = 310


def embeddings(n_ids: int, per: int, dim: int, noise: float,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings, identity, gender) of ``n_ids`` synthetic identities with ``per`` embeddings each.

    ``noise`` is the norm of the per-image deviation relative to the unit centre: 0.8 gives a
    genuine cosine around 0.6, in the range of ArcFace-like embeddings of real faces.
    """
    centres = rng.normal(size=(n_ids, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    gender = rng.integers(0, 2, n_ids)
    centres[:, 0] += 0.3 * (2 * gender - 1)
    x = np.repeat(centres, per, axis=0) + rng.normal(scale=noise / np.sqrt(dim), size=(n_ids * per, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), np.repeat(np.arange(n_ids), per), np.repeat(gender, per)


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def timed_enroll(args: tuple, seed: int, settings: MoteConfig) -> tuple[MoteGallery, float]:
    start = time.perf_counter()
    gallery = enroll(*args, seed=seed, settings=settings)
    return gallery, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--identities", type=int, default=64, help="identities to enroll (default 64)")
    parser.add_argument("--dim", type=int, default=128, help="embedding dimension (default 128)")
    parser.add_argument("--population", type=int, default=300, help="KDE / impostor-pool identities (default 300)")
    parser.add_argument("--probes", type=int, default=1000, help="probes scored against the gallery (default 1000)")
    parser.add_argument("--gallery", type=int, default=200, help="models in the scored gallery (default 200)")
    parser.add_argument("--noise", type=float, default=0.8, help="per-image noise norm (default 0.8)")
    parser.add_argument("--balancing", type=float, default=0.5, help="balancing factor b (default 0.5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    load = os.getloadavg()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(np.random.SeedSequence([args.seed, 0xBE7C]))
    pop_x, pop_id, pop_g = embeddings(args.population, 5, args.dim, args.noise, rng)
    enr_x, enr_id, _ = embeddings(args.identities, 6, args.dim, args.noise, rng)
    enr_id = enr_id + args.population  # disjoint from the pool's ids
    ref = np.arange(enr_id.size) % 6 == 0

    start = time.perf_counter()
    kde = GenderKDE.fit(pop_x, pop_id, pop_g, seed=args.seed)
    kde_s = time.perf_counter() - start
    print(f"torch {torch.__version__}, python {platform.python_version()}, {args.threads} torch thread(s) "
          f"(cpu_count {os.cpu_count()}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})")
    print(f"data: synthetic Gaussian embeddings, d={args.dim}, noise {args.noise}; KDE/impostor population {args.population} identities "
          f"x 5 (KDE fit {kde_s:.1f} s, bandwidth male {kde.male.bandwidth_:.3g} female {kde.female.bandwidth_:.3g}); "
          f"{args.identities} enrolled identities, 1 reference each, b = {args.balancing}\n")

    enroll_args = (enr_x[ref], enr_id[ref], kde, pop_x, pop_id, args.balancing)
    enroll(enr_x[ref][:2], enr_id[ref][:2], *enroll_args[2:], seed=args.seed, settings=MoteConfig(epochs=1))
    batched, batched_s = timed_enroll(enroll_args, args.seed, MoteConfig(enroll_batch=args.identities))
    single, single_s = timed_enroll(enroll_args, args.seed, MoteConfig(enroll_batch=1))
    diff = max(float((batched.params[n] - single.params[n]).abs().max()) for n in batched.params)
    epochs = np.asarray(batched.info["epochs"])

    scores = batched.scores(enr_x[~ref])
    own = enr_id[~ref][:, None] == batched.identity_ids[None, :]
    quality = verification_report(scores[own], np.zeros(own.sum()), scores[~own], np.zeros((~own).sum()), [0])

    with tempfile.TemporaryDirectory() as tmp:
        sizes = {}
        for fp16 in (False, True):
            path = Path(tmp) / f"gallery{int(fp16)}.safetensors"
            batched.save(path, fp16=fp16)
            sizes[fp16] = path.stat().st_size / len(batched) / 1000

    reps = -(-args.gallery // len(batched))
    big = MoteGallery(np.arange(reps * len(batched))[: args.gallery],
                      {n: t.repeat(reps, *[1] * (t.dim() - 1))[: args.gallery] for n, t in batched.params.items()},
                      np.full(args.gallery, args.balancing), args.seed)
    probes = rng.normal(size=(args.probes, args.dim)).astype(np.float32)
    big.scores(probes[:8])
    best = min(_time(lambda: big.scores(probes)) for _ in range(3))
    per_pair_us = best / (args.probes * args.gallery) * 1e6
    one = batched.subset(batched.identity_ids[:1])
    one.scores(probes[:1])
    single_us = statistics.median(_time(lambda: one.scores(probes[:1])) for _ in range(200)) * 1e6

    n = args.identities
    rows = [
        (f"enrollment, batched ({n} at once)", f"{n / batched_s:.1f} identities/s ({batched_s:.2f} s)",
         f">= {TARGET_IDS_PER_S:.0f} identities/s"),
        ("enrollment, one at a time", f"{n / single_s:.1f} identities/s ({single_s:.2f} s)",
         "paper: 4-6.6 s per identity (GPU)"),
        ("batched speed-up", f"{single_s / batched_s:.2f}x", ""),
        ("epochs per identity (early stopping)", f"mean {epochs.mean():.1f}, min {epochs.min()}, max {epochs.max()}",
         "max 100"),
        ("max |weight| batched vs one at a time", f"{diff:.1e}", "<= 1e-5"),
        ("verification AUC / FNMR at FMR 1e-3", f"{quality['auc']:.4f} / {quality['fnmr']:.4f}", ""),
        (f"storage per identity, fp32 (d={args.dim})",
         f"{batched.storage_kb_per_identity():.1f} KB (file {sizes[False]:.1f} KB)", f"paper: {PAPER_KB} KB at d=512"),
        (f"storage per identity, fp16 (d={args.dim})",
         f"{batched.storage_kb_per_identity(fp16=True):.1f} KB (file {sizes[True]:.1f} KB)", ""),
        ("storage per identity at d=512, fp32 / fp16",
         f"{parameter_count(512) * 4 / 1000:.1f} / {parameter_count(512) * 2 / 1000:.1f} KB", f"paper: {PAPER_KB} KB"),
        (f"decision time per pair ({args.probes} probes x {args.gallery} models)",
         f"{per_pair_us:.2f} us ({best * 1e3:.0f} ms)", f"<= {TARGET_US_PER_PAIR:.0f} us"),
        ("one probe vs one claimed identity", f"{single_us:.0f} us", f"paper: {PAPER_DECISION_US} us per decision"),
    ]
    print(format_table(("measure", "value", "target / paper"), rows))
    ok_enrol = n / batched_s >= TARGET_IDS_PER_S
    ok_pair = per_pair_us <= TARGET_US_PER_PAIR
    print(f"\nbatched enrollment {'meets' if ok_enrol else 'MISSES'} the target of >= {TARGET_IDS_PER_S:.0f} "
          f"identities/s; decision time {'meets' if ok_pair else 'MISSES'} the target of <= "
          f"{TARGET_US_PER_PAIR:.0f} us per pair")
    return 0


if __name__ == "__main__":
    sys.exit(main())
