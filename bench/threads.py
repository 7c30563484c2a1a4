"""Two facefl processes on one machine: how many torch threads should each use?

torch's default is one intra-op thread per core. Two processes that both keep that default run
2x the cores' worth of OpenMP threads, whose spin-waiting starves the other process (reported at
12x slower on 2 cores). This bench trains the default backbone (no DP, identity task, 64 px,
batch 64) in separate processes, ``--steps`` timed steps after a warm-up, and compares:

* torch's default (one OpenMP thread per core; an idle thread spins before it sleeps);
* facefl's default (``common.train.threads``): each process registers and takes cores //
  (live facefl processes) threads, rebalanced every epoch (here: every step);
* a shorter spin (``GOMP_SPINCOUNT=1000``), OpenMP's passive wait and one thread per process,
  the fixed alternatives;
* each with one process alone and with two processes at once.

Usage:  .venv/bin/python bench/threads.py [--steps 15]
Run it on an otherwise idle machine: it measures contention, so any other load distorts it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.report.tables import format_table

WORKER = r"""
import json, sys, time
sys.path.insert(0, {root!r})
import torch
from common.train import threads
if {facefl}:
    threads.register()
    time.sleep(2)  # both processes of a pair are registered before either one balances
from common.config import load_config
from common.data.cache import build_dataset
from common.nn.build import build_identity_head, build_model, model_spec
from common.train.loop import identity_classes, to_tensor
cfg = load_config(None, ["data.identities=64", "data.images_per_identity=8"])
ds = build_dataset(cfg)
model = build_model(model_spec(cfg, attribute_head=False), 0)
classes, labels = identity_classes(ds.identity)
head = build_identity_head(model.spec, classes.size, 0)
opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=1e-3)
x, y = to_tensor(ds.images[:64]), torch.as_tensor(labels[:64])

def step():
    threads.balance()
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(head(model.embed(x)), y)
    loss.backward()
    opt.step()

for _ in range(3):
    step()
start = time.perf_counter()
for _ in range({steps}):
    step()
print(json.dumps({{"seconds": time.perf_counter() - start, "threads": torch.get_num_threads()}}))
"""


SETTINGS = {"torch default": {}, "facefl default": {}, "short spin": {"GOMP_SPINCOUNT": "1000"},
            "passive wait": {"OMP_WAIT_POLICY": "PASSIVE"},
            "one thread": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}}


def run(processes: int, env_extra: dict[str, str], steps: int, facefl: bool) -> list[dict]:
    """Start ``processes`` workers at once; each one's timed seconds and thread count."""
    code = WORKER.format(root=str(ROOT), steps=steps, facefl=facefl)
    clean = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "FACEFL_THREADS")
    env = {**{k: v for k, v in os.environ.items() if k not in clean}, **env_extra}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env, text=True)
             for _ in range(processes)]
    return [json.loads(p.communicate(timeout=1800)[0].strip().splitlines()[-1]) for p in procs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} before the bench", file=sys.stderr)
    rows, rate = [], {}
    for name, env in SETTINGS.items():
        for processes in (1, 2):
            start = time.perf_counter()
            results = run(processes, env, args.steps, facefl=name == "facefl default")
            rate[name, processes] = args.steps / max(r["seconds"] for r in results)
            rows.append((name, processes, results[0]["threads"], f"{rate[name, processes]:.2f}",
                         f"{rate[name, processes] / rate['torch default', 1]:.2f}x",
                         f"{time.perf_counter() - start:.0f}"))
    print(format_table(("setting", "processes", "threads each", "steps/s (slowest process)",
                        "vs one process, torch default", "wall s"), rows))


if __name__ == "__main__":
    main()
