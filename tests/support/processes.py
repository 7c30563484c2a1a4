"""Process control for deployment-engine tests: free ports, processes started in their own
sessions (log in a file) and stopped by PID (with their whole process tree, by process group
too), bounded waits, finding every process of a test by a unique tag in its environment, and
the test-only file-access audit (``tests/open_audit/sitecustomize.py``).

Only Linux (``/proc``) is supported; no psutil.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from common.train.threads import process_exists

LOOPBACK = "127.0.0.1"
TAG_VAR = "FACEFL_DEPLOY_TAG"
OPEN_AUDIT_DIR = Path(__file__).resolve().parents[1] / "open_audit"  # holds the test-only sitecustomize.py
OPEN_AUDIT_VAR = "FACEFL_OPEN_AUDIT_LOG"


# --------------------------------------------------------------------------- ports

def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """``count`` distinct ports that were free on ``host`` a moment ago (all sockets are held
    open together so that the kernel cannot hand out the same port twice)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_open(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- /proc

def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgid) of a process, None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # the command name may contain spaces and ')'
    return fields[0], int(fields[1]), int(fields[2])


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (zombies hold no resources and are
    reaped by their parent or init)."""
    if not process_exists(pid):
        return False
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def descendants(root: int) -> set[int]:
    """Every live descendant of ``root`` (by parent pid), not ``root`` itself."""
    children: dict[int, list[int]] = {}
    for pid in _pids():
        st = _stat(pid)
        if st is not None:
            children.setdefault(st[1], []).append(pid)
    out: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def tagged(tag: str) -> set[int]:
    """Live processes whose environment holds ``FACEFL_DEPLOY_TAG=tag`` (every process a
    deployment started, wherever it was reparented)."""
    needle = f"{TAG_VAR}={tag}".encode() + b"\0"
    me = os.getpid()
    found = set()
    for pid in _pids():
        if pid == me:
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if needle in env and alive(pid):
            found.add(pid)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def wait_gone(pids: Iterable[int], timeout: float) -> set[int]:
    """Wait up to ``timeout`` s for the processes to end; return those still alive."""
    pending = set(pids)
    deadline = time.monotonic() + timeout
    while True:
        pending = {p for p in pending if alive(p)}
        if not pending or time.monotonic() >= deadline:
            return pending
        time.sleep(0.1)


def _signal_groups(pids: Iterable[int], sig: int) -> None:
    """Send ``sig`` to each process and to its process group (never to our own group)."""
    own = os.getpgrp()
    groups = set()
    for pid in pids:
        st = _stat(pid)
        if st is not None and st[2] not in (0, 1, own):
            groups.add(st[2])
        with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
            os.kill(pid, sig)
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)


def terminate(pids: Iterable[int], timeout: float = 10.0) -> set[int]:
    """SIGTERM, wait up to ``timeout`` s, then SIGKILL the processes and their groups, wait
    again; return whatever is still alive (should be empty)."""
    pids = {p for p in pids if p != os.getpid()}
    _signal_groups(pids, signal.SIGTERM)
    left = wait_gone(pids, timeout)
    if left:
        _signal_groups(left, signal.SIGKILL)
        left = wait_gone(left, timeout)
    return left


# --------------------------------------------------------------------------- processes

@dataclass
class Proc:
    """A long-running process started in its own session, its log in a file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes] = field(repr=False)
    seen: set[int] = field(default_factory=set)  # descendants ever observed

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_exit(self, timeout: float) -> int:
        """Wait up to ``timeout`` s for the process to exit on its own; its exit code."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{self.name} still running after {timeout:.0f} s\n{self.log_tail()}") from None

    def remember_children(self) -> set[int]:
        self.seen |= descendants(self.pid)
        return self.seen

    def stop(self, timeout: float = 10.0) -> set[int]:
        """Stop the process and every descendant (by PID and process group): SIGTERM, wait
        ``timeout`` s, SIGKILL, wait again. Returns what could not be stopped."""
        tree = self.remember_children() | {self.pid}
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_groups([self.pid], signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):  # reported below as left over
                    self.popen.wait(timeout)
        # Flower's own children watch their parent and exit with it; whatever did not is ended here
        left = terminate({p for p in tree if p != self.pid and alive(p)}, timeout)
        if self.popen.poll() is None:
            left.add(self.pid)
        self._log.close()
        return left


def start(name: str, args: list[str], env: Mapping[str, str], cwd: Path, log_dir: Path) -> Proc:
    """Start ``args`` in a new session (own process group), stdout+stderr to ``log_dir/name.log``."""
    cwd.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed in Proc.stop
    try:
        popen = subprocess.Popen(args, env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    except BaseException:
        log.close()
        raise
    return Proc(name, popen, log_path, log)


def wait_for(predicate, timeout: float, what: str, procs: Iterable[Proc] = (), interval: float = 0.2) -> None:
    """Poll ``predicate`` until true; fail after ``timeout`` s, or at once if one of ``procs``
    exits, with the logs of ``procs`` in the message."""
    procs = list(procs)
    deadline = time.monotonic() + timeout
    while not predicate():
        dead = [p for p in procs if p.popen.poll() is not None]
        if dead or time.monotonic() >= deadline:
            why = (", ".join(f"{p.name} exited with {p.popen.returncode}" for p in dead)
                   or f"not within {timeout:.0f} s")
            raise TimeoutError(f"{what}: {why}\n" + logs_of(procs))
        time.sleep(interval)


def logs_of(procs: Iterable[Proc], chars: int = 3000) -> str:
    return "\n".join(f"----- {p.name} ({p.log_path}) -----\n{p.log_tail(chars)}" for p in procs)


# --------------------------------------------------------------------------- file audit

def open_audit_env(log: Path, env: Mapping[str, str]) -> dict[str, str]:
    """Environment additions that make every Python process (and its children) log the files it
    opens to ``log`` (``tests/open_audit/sitecustomize.py``)."""
    path = env.get("PYTHONPATH", "")
    return {"PYTHONPATH": str(OPEN_AUDIT_DIR) + (os.pathsep + path if path else ""), OPEN_AUDIT_VAR: str(log)}


@dataclass(frozen=True)
class AuditEntry:
    pid: int
    program: str
    kind: str  # "open" or "exec"
    detail: str  # the absolute path opened, or the command line


def read_open_audit(log: Path) -> list[AuditEntry]:
    """The entries of an audit log written by ``open_audit/sitecustomize.py`` (empty if none)."""
    if not log.exists():
        return []
    entries = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        pid, program, kind, detail = line.split("\t", 3)
        entries.append(AuditEntry(int(pid), program, kind, detail))
    return entries
