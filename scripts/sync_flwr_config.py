"""Rewrite pyproject.toml's [tool.flwr.app.config] from the Config defaults (common/config/schema.py).

`flwr run .` reads its run configuration from pyproject.toml, and it must hold every facefl key
with its default; `--check` (and tests/test_flwr_config.py) fails when the two drift apart. Run:
    .venv/bin/python scripts/sync_flwr_config.py [--check]
"""

from __future__ import annotations

import sys
from pathlib import Path

import tomli_w

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.config import Config

HEADER = "[tool.flwr.app.config]"


def render() -> str:
    lines = [HEADER, 'output-dir = "runs"', 'resume-dir = ""']
    lines += [f'"{key}" = {tomli_w.dumps({"v": value}).strip()[4:]}' for key, value in Config().to_flat().items()]
    return "\n".join(lines) + "\n"


def synced(text: str) -> str:
    """``text`` (pyproject.toml) with its run-config section rendered from the defaults."""
    start = text.index(HEADER)
    end = text.find("\n[", start + len(HEADER))
    return text[:start] + render() + ("" if end < 0 else text[end + 1:])


def main(argv: list[str]) -> int:
    path = Path(__file__).resolve().parents[1] / "pyproject.toml"
    text = path.read_text(encoding="utf-8")
    if "--check" in argv:
        if synced(text) != text:
            print(f"{path}: [tool.flwr.app.config] differs from the Config defaults; run {Path(__file__).name}",
                  file=sys.stderr)
            return 1
        return 0
    path.write_text(synced(text), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
