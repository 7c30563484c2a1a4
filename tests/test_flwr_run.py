"""`flwr run .` through Flower's own CLI on its local simulation: the app runs to a finished run
directory and prints the round table and the run directory, as `facefl run` does.

Flower 1.42 keeps the simulation's size in the SuperLink connection (`--federation-config
"num-supernodes=N"` or `flwr federation simulation-config`), not in the app's pyproject.toml (a
legacy `[tool.flwr.federations]` block is migrated out and commented out by `flwr run`), so the
command names as many SuperNodes as `split.num_clients`. The local SuperLink it starts is detached
and keeps running: this test finds it (and its SuperExec) by a tag in their environment and stops
them by PID.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.processes import TAG_VAR, cmdline, free_ports, tagged, terminate

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ("split.num_clients=2 federation.min_train_clients=2 federation.min_available_clients=2 "
             "federation.rounds=1 federation.local_epochs=1 data.identities=24 data.images_per_identity=6 "
             "data.image_size=32 model.width=8 model.blocks='1,1' model.embedding_dim=16 train.batch_size=8 "
             "pretrain.identities=0 mote.enabled=false")


@pytest.mark.timeout(600)
def test_flwr_run_local_simulation_finishes_and_prints_the_round_table(tmp_path: Path) -> None:
    http, control = free_ports(2)
    tag = f"flwr-run-{os.getpid()}"
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http), "FLWR_LOCAL_CONTROL_API_PORT": str(control),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", TAG_VAR: tag}
    runs = tmp_path / "runs"
    pyproject = (ROOT / "pyproject.toml").read_bytes()
    try:
        done = subprocess.run(["flwr", "run", ".", "--stream", "--federation-config", "num-supernodes=2",
                               "-c", f"{OVERRIDES} output-dir='{runs}'"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=540, check=False)
    finally:
        started = tagged(tag)
        names = [cmdline(p) for p in started]
        stuck = terminate(started)
    assert any("flower-superlink" in n for n in names), f"the local SuperLink was not found: {names}"
    assert not stuck, f"still alive after SIGKILL: {sorted(stuck)}"
    out = done.stdout + done.stderr
    (run,) = runs.glob("run-*")
    assert '"status": "finished"' in (run / "status.json").read_text(), out[-3000:]
    assert f"run directory: {run}" in out and "max eps (per image)" in out
    assert (ROOT / "pyproject.toml").read_bytes() == pyproject  # flwr run did not rewrite the app's config
