"""Test-only file-access audit: which process opened which file (used by tests/test_deployment.py).

With this directory on ``PYTHONPATH`` and ``FACEFL_OPEN_AUDIT_LOG=/abs/log`` in the environment,
every Python process started with that environment (and every child, which inherits it) registers
an audit hook (PEP 578) that appends one line per distinct event to the log:

    <pid> TAB <program> TAB open TAB <absolute path>        builtins.open, io.open_code (imports), os.open, ...
    <pid> TAB <program> TAB exec TAB <argv>                 subprocess.Popen, os.exec*, os.posix_spawn*

Why: the deployment test must show that no server-side process (SuperLink, its SuperExec, the
ServerApp) ever opened the HE secret key, and that the SuperNodes' ClientApps did. Files opened by
C/C++ code directly (not through Python) are not seen; facefl reads key files through Python.
Without the variable this module does nothing.
"""

from __future__ import annotations

import os
import sys

LOG_VAR = "FACEFL_OPEN_AUDIT_LOG"


def _install(log_path: str) -> None:
    # One O_APPEND descriptor for the process's life: os.write raises no audit event (no
    # recursion), and each line is a single write, so concurrent processes do not interleave.
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    argv = sys.orig_argv
    program = os.path.basename(argv[1] if len(argv) > 1 else argv[0])
    seen: set[tuple[str, str]] = set()

    def emit(kind: str, detail: str) -> None:
        if (kind, detail) in seen:
            return
        seen.add((kind, detail))
        line = f"{os.getpid()}\t{program}\t{kind}\t{detail}".replace("\n", "\\n")
        os.write(fd, (line + "\n").encode("utf-8", "backslashreplace"))

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path = args[0]
            if isinstance(path, int):  # open(fd): the file was opened (and logged) before
                return
            emit("open", os.path.abspath(os.fsdecode(path)))
        elif event in ("subprocess.Popen", "os.exec", "os.posix_spawn"):
            cmd = args[1]
            words = [cmd] if isinstance(cmd, (str, bytes, os.PathLike)) else list(cmd or ())
            emit("exec", " ".join(os.fsdecode(w) if isinstance(w, (str, bytes, os.PathLike)) else str(w)
                                  for w in words))

    sys.addaudithook(hook)


if os.environ.get(LOG_VAR):
    _install(os.environ[LOG_VAR])
