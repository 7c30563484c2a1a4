"""Cost of CKKS-encrypted aggregation against plaintext FedAvg, in one run.

Part 1, the primitives on ``--params`` values (default 1,000,000) and ``--clients`` clients
(default 10), with the project's own code (``common.he.ckks``: encrypt ``n * update`` plus the
canary, parse with the public context, add client by client, decrypt and divide):

* bytes per client vs float32, for full and selective encryption (``--fractions``);
* client encrypt + serialise time, server aggregation time, key holder's decrypt time, against
  the plaintext float64 weighted mean (``common.train.fedavg.weighted_average``);
* server peak memory of the aggregation for 2, 5 and 10 clients: each count runs in a fresh
  process that first loads the clients' serialised payloads (which Flower has delivered anyway),
  resets the kernel's peak-RSS counter (``/proc/self/clear_refs``), aggregates, and reports the
  new peak minus the resident size before aggregating.

Part 2 (skip with ``--no-round``): the wall time of federated rounds of the default configuration
(``--rounds``, default 2) on Flower's simulation engine, with and without HE, read from each run's
metrics.jsonl (``federated_seconds``: send, decryption, local training, encryption, aggregation;
the server's per-round evaluation, which an HE server cannot do, is excluded from both).

Usage:  .venv/bin/python bench/he_overhead.py [--params 1000000] [--clients 10] [--no-round]
Targets: <= 8.5x the float32 bytes with full encryption; server peak memory flat in the number
of clients; a default round at most 1.5x slower with HE than without.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.memory import reset_peak, status_kb
from common.he.ckks import Ciphertexts, EncryptedSum, decrypt_mean, encrypt_weighted, parse
from common.he.keys import PUBLIC_FILE, SECRET_FILE, KeyParams, load_public_context, load_secret_context, write_keys
from common.report.tables import format_table
from common.train.fedavg import weighted_average

TARGET_BYTES = 8.5
TARGET_ROUND = 1.5
MEMORY_CLIENTS = (2, 5, 10)


def memory_child(payload_dir: Path, key_dir: Path, clients: int, mode: str, n_values: int) -> dict[str, float]:
    """In a fresh process: load ``clients`` payloads, then aggregate them; peak extra RSS in MB."""
    if mode == "he":
        ctx, _ = load_public_context(key_dir / PUBLIC_FILE)
        inputs = [np.load(payload_dir / f"client-{c}.npz") for c in range(clients)]
        inputs = [(int(z["n"]), Ciphertexts(z["blob"], z["lengths"])) for z in inputs]
    else:
        inputs = [np.load(payload_dir / f"plain-{c}.npz") for c in range(clients)]
        inputs = [(int(z["n"]), {"w": z["w"]}) for z in inputs]
    before = status_kb("VmRSS")
    reset_peak()
    start = time.perf_counter()
    if mode == "he":
        acc = EncryptedSum(ctx, n_values)
        for n, ct in inputs:
            acc.add(parse(ctx, ct, n_values, "bench"), n)
        acc.serialize()
    else:
        weighted_average(inputs)
    seconds = time.perf_counter() - start
    return {"peak_mb": (status_kb("VmHWM") - before) / 1024, "seconds": seconds}


def primitives(args: argparse.Namespace, work: Path) -> list[tuple]:
    key_dir = work / "keys"
    write_keys(key_dir, KeyParams())
    secret = load_secret_context(key_dir / SECRET_FILE)
    public, _ = load_public_context(key_dir / PUBLIC_FILE)
    rng = np.random.default_rng(0)
    updates = [(int(rng.integers(100, 1000)), rng.normal(scale=0.05, size=args.params).astype(np.float32))
               for _ in range(args.clients)]
    float32_bytes = 4 * args.params
    rows = []

    start = time.perf_counter()
    plain_mean = weighted_average([(n, {"w": w}) for n, w in updates])["w"]
    plain_agg = time.perf_counter() - start

    enc_times, payloads = [], []
    for c, (n, w) in enumerate(updates):
        start = time.perf_counter()
        ct = encrypt_weighted(secret, w, n)
        enc_times.append(time.perf_counter() - start)
        np.savez(work / f"client-{c}.npz", n=n, blob=ct.blob, lengths=ct.lengths)
        np.savez(work / f"plain-{c}.npz", n=n, w=w)
        payloads.append((n, ct))
    start = time.perf_counter()
    acc = EncryptedSum(public, args.params)
    for n, ct in payloads:
        acc.add(parse(public, ct, args.params, "bench"), n)
    summed = acc.serialize()
    he_agg = time.perf_counter() - start
    start = time.perf_counter()
    mean = decrypt_mean(secret, summed, args.params, acc.total_weight, "bench")
    dec = time.perf_counter() - start
    err = float(np.max(np.abs(mean - plain_mean.astype(np.float64))))
    rows.append(("full (1.0)", f"{payloads[0][1].nbytes / float32_bytes:.2f}x", f"{np.mean(enc_times):.2f}",
                 f"{he_agg:.2f} ({he_agg / max(plain_agg, 1e-9):.0f}x plain {plain_agg:.3f})", f"{dec:.2f}", f"{err:.1e}"))
    for fraction in args.fractions:
        k = int(np.ceil(fraction * args.params))
        n, w = updates[0]
        start = time.perf_counter()
        ct = encrypt_weighted(secret, w[:k], n)
        enc = time.perf_counter() - start
        total_bytes = ct.nbytes + 4 * (args.params - k)  # the rest travels as float32
        rows.append((f"selective ({fraction})", f"{total_bytes / float32_bytes:.2f}x", f"{enc:.2f}", "-", "-", "-"))
    return rows, key_dir


def memory_rows(args: argparse.Namespace, work: Path, key_dir: Path) -> list[tuple]:
    rows = []
    for clients in MEMORY_CLIENTS:
        if clients > args.clients:
            continue
        row = [clients]
        for mode in ("he", "plain"):
            out = subprocess.run([sys.executable, __file__, "--memory-child", str(work), str(key_dir), str(clients),
                                  mode, str(args.params)], capture_output=True, text=True, check=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            row += [f"{res['peak_mb']:.0f}", f"{res['seconds']:.2f}"]
        rows.append(tuple(row))
    return rows


def round_rows(args: argparse.Namespace, work: Path, key_dir: Path) -> list[tuple]:
    from common.config import load_config
    from workflow.simulation import simulate

    rows = []
    seconds = {}
    for label in ("plaintext", "HE (full)"):
        overrides = [f"federation.rounds={args.rounds}"]
        secret = None
        if label != "plaintext":
            overrides += ["he.enabled=true", f"he.public_context={key_dir / PUBLIC_FILE}"]
            secret = key_dir / SECRET_FILE
        run, status = simulate(load_config(None, overrides), work / "runs", progress=False, he_secret=secret)
        if status["status"] != "finished":
            raise SystemExit(f"{label} run failed: {status}")
        rounds = [r["federated_seconds"] for r in run.read_metrics() if r["event"] == "round"]
        seconds[label] = float(np.mean(rounds))
        rows.append((label, " / ".join(f"{s:.1f}" for s in rounds), f"{seconds[label]:.1f}",
                     f"{seconds[label] / seconds['plaintext']:.2f}x"))
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        work, key_dir, clients, mode, n_values = sys.argv[2:7]
        print(json.dumps(memory_child(Path(work), Path(key_dir), int(clients), mode, int(n_values))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--fractions", type=float, nargs="*", default=[0.5, 0.1])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-round", action="store_true", help="skip the simulated rounds (part 2)")
    args = parser.parse_args()
    import logging
    import warnings

    import tenseal
    import torch

    logging.getLogger("flwr").setLevel(logging.WARNING)
    logging.getLogger("flwr").propagate = False
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    warnings.filterwarnings("ignore")

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print(f"python {platform.python_version()}, torch {torch.__version__}, tenseal {tenseal.__version__}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; CKKS N=4096 [60,49] scale 2^40")
    with tempfile.TemporaryDirectory(prefix="facefl-he-bench-") as tmp:
        work = Path(tmp)
        rows, key_dir = primitives(args, work)
        print(f"\n{args.params:,} parameters, {args.clients} clients")
        print(format_table(("encryption", "bytes / float32", "client encrypt+serialise s",
                            f"server sum of {args.clients} s", "decrypt s", "max abs error"), rows))
        print(f"target: <= {TARGET_BYTES}x the float32 bytes with full encryption")
        print("\nserver peak memory of the aggregation (MB above the delivered payloads)")
        print(format_table(("clients", "HE peak MB", "HE s", "plaintext peak MB", "plaintext s"),
                           memory_rows(args, work, key_dir)))
        print("target: flat in the number of clients")
        if not args.no_round:
            print(f"\nsimulated rounds of the default configuration ({args.rounds} rounds; seconds per round)")
            print(format_table(("aggregation", "round seconds", "mean", "vs plaintext"), round_rows(args, work, key_dir)))
            print(f"target: HE at most {TARGET_ROUND}x the plaintext round")


if __name__ == "__main__":
    main()
