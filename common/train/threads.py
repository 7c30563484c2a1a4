"""Torch threads shared fairly between the facefl processes of one machine.

torch gives every process one intra-op thread per core, and idle OpenMP threads spin. Two facefl
processes at once (a run and an audit, two sweeps) then run twice the cores' worth of spinning
threads and starve each other: on 2 cores each ran at 0.20-0.26x of its speed alone
(``bench/threads.py``, bench/README.md). Spinning less, or fewer threads, cost a process alone
13-50%. So the count follows the load instead: every ``facefl`` command registers its process in
a per-user directory of this machine, and ``balance`` (called at every training epoch) gives each
live registered process cores // processes threads. A process that did not register (a test, a
Ray worker: the simulation gives those one thread each) is left alone, and so is a count the user
set (``FACEFL_THREADS=N``, or OMP_NUM_THREADS) or the program set itself since the last balance.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

THREADS_ENV = "FACEFL_THREADS"
_registered: Path | None = None
_assigned: int | None = None  # the count ``balance`` set last
_single = 0  # depth of ``single`` blocks: while > 0, ``balance`` changes nothing


def registry() -> Path:
    """Where the live facefl processes of this user on this machine are listed (one file each)."""
    return Path(tempfile.gettempdir()) / f"facefl-{os.getuid()}" / "processes"


def register() -> None:
    """List this process in ``registry`` until it exits."""
    global _registered
    if _registered is not None:
        return
    folder = registry()
    folder.mkdir(parents=True, exist_ok=True)
    _registered = folder / str(os.getpid())
    _registered.touch()
    atexit.register(_registered.unlink, missing_ok=True)


def process_exists(pid: int) -> bool:
    """Whether a process with this id exists (possibly another user's, possibly a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def live_processes() -> int:
    """Registered processes still running (files of dead ones are removed)."""
    count = 0
    for entry in registry().glob("*"):
        if entry.name.isdigit() and process_exists(int(entry.name)):
            count += 1
        else:
            entry.unlink(missing_ok=True)
    return count


def wanted_threads() -> int | None:
    """The thread count this process should use now; None to leave torch's as it is."""
    fixed = os.environ.get(THREADS_ENV, "").strip()
    if fixed:
        if not fixed.isdigit() or int(fixed) < 1:
            raise ValueError(f"{THREADS_ENV}={fixed!r}: expected a positive integer (torch threads per process)")
        return int(fixed)
    if _registered is None or os.environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, (os.cpu_count() or 1) // max(1, live_processes()))


def balance() -> None:
    """Set torch's intra-op threads to ``wanted_threads`` (cheap: a directory listing), unless
    the program set its own count since the last balance (``torch.set_num_threads``): that wins."""
    global _assigned
    threads = wanted_threads()
    if threads is None or _single:
        return
    import torch

    current = torch.get_num_threads()
    if _assigned is not None and current != _assigned:
        return
    if current != threads:
        torch.set_num_threads(threads)
    _assigned = threads


@contextlib.contextmanager
def single() -> Iterator[None]:
    """One intra-op thread inside the block, whatever the load, then the count before it.

    Why: float sums are ordered by the thread count, and over tens of epochs different orders end
    in different models. Public pretraining makes the run's initial model, from which everything
    after it follows; with the count following the load (``balance``), the same command gave
    another initial model when another facefl process happened to run, or under FACEFL_THREADS
    (demo seed 0: verification AUC 0.724 pretrained with two threads, 0.736 with one). ``balance``
    changes nothing inside the block."""
    global _single
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    _single += 1
    try:
        yield
    finally:
        _single -= 1
        torch.set_num_threads(before)
