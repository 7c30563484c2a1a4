"""CUDA against the CPU: the same short federation trained with ``train.device = cuda`` and ``cpu``.

For whoever has a GPU (the development machines have none). On the ``--quick`` preset's data and
split, grown a little (100 SynthFaces identities x 10 images of 32 px, a 16-channel backbone,
both tasks with the attribute gender, 3 rounds x 3 local epochs, 2 clients: ``OVERRIDES``), it
replays a federation without Flower, as the tests do: every round each client runs its local
round (``client.local.local_train``, the ClientApp's recipe, DP noise derived from the run seed by
``dp.reproducible_noise``) and the updates are averaged (``common.train.fedavg``). It does this
without DP and with DP-SGD (book-keeping, noise multiplier 0.3), once per device from the same
seed, and scores each final model as the server does (``GlobalEvaluator``: open-set verification
AUC on the probe identities, attribute accuracy on held-out samples), with the clients' median
samples/s (the first CUDA round includes CUDA's start-up).

What it checks: every metric of the CUDA run within the run's tolerance of the CPU run's. Bit
equality is not expected: CUDA's kernels sum in other orders than the CPU's, and under DP the same
noise seed draws other noise from CUDA's generator than from the CPU's
(``common.train.dp.dp_generators``), so the two DP runs are two draws of one mechanism. The
tolerances come from this configuration on the CPU (2 cores, 2026-12-07): without DP, 1 against 2
torch threads (another summation order) moved the AUC by 0.003 and the accuracy by 0.008, so 0.03;
with DP, 16 fresh noise draws spread with standard deviations 0.024 (AUC) and 0.013 (accuracy),
so two draws differ by more than 0.10 with a chance well under 1%: 0.10. A device path that lost
the noise would move the DP metrics to the no-DP ones, 0.14-0.20 higher. Then it runs the
CUDA-only tests by name (``CUDA_TESTS``). Exits 1 when a metric or a test fails, 0 otherwise;
without a CUDA device it prints "no CUDA device: skipped" and exits 0.

Usage:  .venv/bin/python bench/gpu_check.py
"""

from __future__ import annotations

import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

from client.local import local_train
from common.config import Config, load_config
from common.config.loader import preset
from common.data.cache import build_dataset
from common.evaluation.global_model import GlobalEvaluator
from common.nn.build import build_model, model_spec
from common.report.tables import format_table
from common.split.build import build_manifest
from common.train.fedavg import weighted_average
from common.train.local_round import ClientState

OVERRIDES = ("train.task=both", "train.attribute=gender", "train.attribute_weight=10", "train.batch_size=32",
             "train.lr=0.005", "train.augment=false", "model.width=16", "model.embedding_dim=32",
             "data.identities=100", "data.images_per_identity=10", "federation.rounds=3",
             "federation.local_epochs=3", "dp.reproducible_noise=true", "dp.target_epsilon=0",
             "dp.noise_multiplier=0.3")
RUNS = {"no DP": ("dp.mode=off", 0.03), "DP bk": ("dp.mode=sample", 0.10)}
"""Label -> (override, largest |CUDA - CPU| accepted for each metric; see the module docstring)."""
METRICS = ("verification_auc", "attribute_accuracy")
CUDA_TESTS = ("tests/test_device.py::test_cuda_dp_training_returns_a_cpu_model_with_noise_drawn_on_cuda",
              "tests/test_device.py::test_cuda_references_mint_and_mote_come_back_on_the_cpu")


def config(device: str, dp_mode: str) -> Config:
    """The ``--quick`` preset with ``OVERRIDES`` and ``dp_mode``, training on ``device``."""
    return load_config(None, [*preset("quick"), *OVERRIDES, dp_mode, f"train.device={device}"])


def federate(cfg: Config) -> dict[str, float]:
    """Every client trains every round; the final global model's metrics and the clients' median
    samples/s. The updates come back as CPU tensors (``.numpy()`` would fail on CUDA ones)."""
    ds = build_dataset(cfg)
    model = build_model(model_spec(cfg), cfg.seed)
    global_state = model.state_dict()
    states = {p: ClientState() for p in range(cfg.split.num_clients)}
    rates = []
    for server_round in range(1, cfg.federation.rounds + 1):
        updates = []
        for p in sorted(states):
            weights, states[p], report = local_train(cfg, p, server_round, global_state, states[p],
                                                     allow_reproducible_noise=True)
            updates.append((int(report["num-examples"]), {k: v.numpy() for k, v in weights.items()}))
            rates.append(float(report["samples-per-second"]))
        global_state = {k: torch.from_numpy(v) for k, v in weighted_average(updates).items()}
    model.load_state_dict(global_state)
    metrics = GlobalEvaluator.from_manifest(cfg, ds, build_manifest(cfg, ds)).evaluate(model)
    return {**{m: float(metrics[m]) for m in METRICS}, "samples/s": statistics.median(rates)}


def main() -> int:
    if not torch.cuda.is_available():
        print(f"no CUDA device: skipped (torch {torch.__version__} sees none); nothing was compared")
        return 0
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.get_device_name()}, python "
          f"{platform.python_version()}, {torch.get_num_threads()} CPU thread(s)")
    rows, failed = [], []
    for label, (dp_mode, tolerance) in RUNS.items():
        cpu, cuda = (federate(config(device, dp_mode)) for device in ("cpu", "cuda"))
        for metric in METRICS:
            diff = abs(cuda[metric] - cpu[metric])
            ok = diff <= tolerance  # NaN fails too
            failed += [] if ok else [f"{label} {metric}"]
            rows.append((label, metric, f"{cpu[metric]:.4f}", f"{cuda[metric]:.4f}", f"{diff:.4f}", tolerance,
                         "ok" if ok else "FAIL"))
        rows.append((label, "samples/s (median client)", f"{cpu['samples/s']:.0f}", f"{cuda['samples/s']:.0f}", "", "",
                     ""))
    print(format_table(("run", "metric", "cpu", "cuda", "|diff|", "tolerance", "check"), rows))
    print(f"\nCUDA-only tests: {' '.join(CUDA_TESTS)}")
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *CUDA_TESTS],
                           cwd=ROOT, capture_output=True, text=True, check=False)
    print(tests.stdout[-4000:], tests.stderr[-2000:], sep="")
    if tests.returncode != 0 or "skipped" in tests.stdout:  # a skipped CUDA test did not check anything
        failed.append("CUDA-only tests")
    print("FAILED: " + ", ".join(failed) if failed else "all checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
