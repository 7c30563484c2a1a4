"""pyproject.toml's Flower run config must be exactly the Config defaults (plus output-dir)."""

import subprocess
import sys
import tomllib
from pathlib import Path

from common.config import Config, from_flat

ROOT = Path(__file__).resolve().parents[1]


def _flwr_app() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["flwr"]["app"]


def test_run_config_holds_every_default():
    config = dict(_flwr_app()["config"])
    assert config.pop("output-dir") == "runs"
    assert config.pop("resume-dir") == ""  # empty: a new run; a run directory: resume it
    assert config == Config().to_flat(), "run: .venv/bin/python scripts/sync_flwr_config.py"
    assert from_flat(config) == Config()


def test_sync_script_check_agrees():
    """The sync script's --check passes on the committed pyproject.toml (and so would catch a stale one)."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "sync_flwr_config.py"), "--check"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr


def test_components_point_at_the_apps():
    assert _flwr_app()["components"] == {"serverapp": "server.app:app", "clientapp": "client.app:app"}
