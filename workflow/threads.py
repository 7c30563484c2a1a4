"""CPU threading defaults for facefl processes, applied before torch loads.

torch runs one OpenMP thread per core, and idle OpenMP threads spin. Two facefl processes on one
machine (a run and an audit, two sweeps) then run twice the cores' worth of spinning threads, and
each starves the other (reported at 12x slower on 2 cores). With OpenMP's passive wait policy an
idle thread sleeps instead: ``bench/threads.py`` measures both (bench/README.md). The policy
only takes effect if set before the OpenMP runtime starts, i.e. before ``import torch``; the
``facefl`` command calls ``configure`` first thing, and the simulation's Ray workers inherit it.
``FACEFL_THREADS=N`` sets the thread count as well (OMP_NUM_THREADS and MKL_NUM_THREADS).
Settings the user made in the environment are kept.
"""

from __future__ import annotations

import os

THREADS_ENV = "FACEFL_THREADS"


def configure() -> None:
    """Set the defaults in the environment (no-op for a variable the user already set)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    threads = os.environ.get(THREADS_ENV, "").strip()
    if threads:
        if not threads.isdigit() or int(threads) < 1:
            raise ValueError(f"{THREADS_ENV}={threads!r}: expected a positive integer (torch threads per process)")
        os.environ.setdefault("OMP_NUM_THREADS", threads)
        os.environ.setdefault("MKL_NUM_THREADS", threads)
