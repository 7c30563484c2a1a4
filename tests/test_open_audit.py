"""The test-only audit hook (``tests/open_audit/sitecustomize.py``) that the deployment test relies
on to show the server never opened the HE secret key: it must see every way Python code opens a
file, in child processes too, and stay inert without its variable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.processes import OPEN_AUDIT_VAR, open_audit_env, read_open_audit

SCRIPT = """
import os, pathlib, subprocess, sys
pathlib.Path("relative.txt").read_text()                     # pathlib, relative path
os.close(os.open(sys.argv[1], os.O_RDONLY))                  # os.open
open(sys.argv[1].encode(), "rb").close()                     # bytes path
subprocess.run([sys.executable, "-c", "open('child.txt').close()"], check=True)  # a child process
"""


@pytest.mark.timeout(60)
def test_logs_every_open_and_exec_of_the_process_and_its_children(tmp_path: Path) -> None:
    (tmp_path / "relative.txt").write_text("x")
    (tmp_path / "child.txt").write_text("x")
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"k")
    log = tmp_path / "audit.log"
    env = {**os.environ, **open_audit_env(log, os.environ)}
    subprocess.run([sys.executable, "-c", SCRIPT, str(secret)], cwd=tmp_path, env=env, check=True, timeout=50)

    entries = read_open_audit(log)
    opens = {(e.pid, e.detail) for e in entries if e.kind == "open"}
    parent = {pid for pid, path in opens if path == str(tmp_path / "relative.txt")}
    child = {pid for pid, path in opens if path == str(tmp_path / "child.txt")}
    assert len(parent) == 1 and len(child) == 1 and parent != child, entries[-10:]
    assert (parent.pop(), str(secret)) in opens
    assert any(e.kind == "exec" and "child.txt" in e.detail for e in entries)
    # one line per distinct path and process, however often it is opened
    assert len(entries) == len({(e.pid, e.kind, e.detail) for e in entries})


@pytest.mark.timeout(60)
def test_inert_without_the_variable(tmp_path: Path) -> None:
    env = {**os.environ, **open_audit_env(tmp_path / "audit.log", os.environ)}
    del env[OPEN_AUDIT_VAR]
    subprocess.run([sys.executable, "-c", "open(__import__('sys').executable, 'rb').close()"], env=env,
                   check=True, timeout=50)
    assert not (tmp_path / "audit.log").exists()
    assert read_open_audit(tmp_path / "audit.log") == []
