#!/usr/bin/env bash
# Create .venv when missing and install facefl with its dev extra.
# torch==2.13.0 goes first: it is a CPU wheel on local disk, and any other torch version
# (e.g. one pulled in unpinned by a dependency) would download a multi-GB CUDA build.
# Every install is constrained by requirements.lock (`-c`), so a fresh .venv gets exactly the
# versions the tests passed with; regenerate the lock with scripts/lock.py after changing them.
# Re-running is cheap: nothing is installed again until pyproject.toml or requirements.lock changes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $("$PYTHON" --version)" >&2
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.facefl-installed"
want="$(cat pyproject.toml requirements.lock | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing dependencies into .venv (about a minute)" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check -c requirements.lock "torch==2.13.0"
  .venv/bin/python -m pip install -q --disable-pip-version-check -c requirements.lock -e ".[dev]"
  echo "$want" > "$stamp"
fi
