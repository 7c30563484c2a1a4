"""Run one federation on Flower's simulation engine, in this process.

The ServerApp (built for this run by ``server.app.make_app``) and the ClientApp of ``client.app``
run in Flower's engine here; only ``workflow`` composes server and client. Success is read from the run directory's status.json, which the
ServerApp writes, not inferred from the engine returning.

The simulated clients persist their private state (identity head, DP history) after every
round under $FACEFL_CLIENT_STATE (default ``<data cache>/client-state``, i.e. under
$FACEFL_CACHE, never in the run directory: on a real deployment it lives on each member's
node), in ``<run-id>/client-<partition>/``. ``resume`` continues an interrupted run from it;
a run that finishes deletes its ``<run-id>/`` there, since a finished run cannot be resumed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from flwr.clientapp import ClientApp

from client.app import app as client_app
from client.he_client import SECRET_KEY_ENV
from client.local import ALLOW_REPRODUCIBLE_NOISE_ENV
from common.config import Config
from common.data.cache import cache_dir
from common.runs.layout import CLIENT_STATE_DEFAULT
from common.runs.rundir import CLIENT_STATE_ENV, RunDir
from common.train.device import resolve_device
from server.app import make_app
from server.preflight import check_inputs

log = logging.getLogger(__name__)

CLIENT_APP: ClientApp = client_app
"""The ClientApp every simulated node runs (a test swaps in one that fails on purpose)."""


def client_state_root() -> Path:
    """Where simulated clients keep their state: $FACEFL_CLIENT_STATE, else under the data cache."""
    return Path(os.environ.get(CLIENT_STATE_ENV) or cache_dir() / CLIENT_STATE_DEFAULT)


def simulate(cfg: Config, runs_root: str | Path, prefix: str = "run", progress: bool = True,
             he_secret: Path | None = None) -> tuple[RunDir, dict[str, Any]]:
    """Create the run directory, run every round, and return it with its final status.

    ``he_secret``: the clients' secret context for HE runs. The engine gives simulated nodes no
    configuration of their own, so it reaches them through ``FACEFL_HE_SECRET_CONTEXT``.
    """
    check_inputs(cfg)  # data and split problems fail here, in seconds, before a run directory or Ray exists
    backend = backend_config(cfg)
    run = RunDir.create(runs_root, prefix, cfg)
    return run, _simulate(cfg, run, backend, progress, he_secret, resume=False)


def resume(cfg: Config, run: RunDir, progress: bool = True, he_secret: Path | None = None) -> dict[str, Any]:
    """Continue ``run`` (configured by ``cfg``, its own config.toml) after its last committed
    round; the simulated clients restore their state from ``client_state_root()``. Returns the
    final status. The caller checks first that the run is resumable (``RunDir.check_resumable``)."""
    return _simulate(cfg, run, backend_config(cfg), progress, he_secret, resume=True)


def backend_config(cfg: Config) -> dict[str, Any]:
    """Flower's simulation backend: each client's Ray resources (``federation.client_cpus``, and
    ``federation.client_gpus`` as Ray's num_gpus) and Ray's own settings.

    The simulated clients train on this machine, so their device is checked here, before a run
    directory or Ray exists: ``train.device = cuda`` or a GPU share without CUDA would otherwise
    fail in every client (a GPU share would even leave Ray waiting for a GPU that never comes).
    """
    resolve_device(cfg.train.device)
    gpus = cfg.federation.client_gpus
    if gpus > 0 and not torch.cuda.is_available():
        raise ValueError(f"federation.client_gpus: {gpus} reserves a GPU share per simulated client, but CUDA is not "
                         "available on this machine; set federation.client_gpus = 0")
    return {"client_resources": {"num_cpus": cfg.federation.client_cpus, "num_gpus": gpus},
            "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}}


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the simulated nodes (Ray workers inherit them), then restore."""
    previous = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _simulate(cfg: Config, run: RunDir, backend: dict[str, Any], progress: bool, he_secret: Path | None,
              resume: bool) -> dict[str, Any]:
    # The engine behind both `flwr run` (flwr.simulation.app) and the deprecated Python wrapper
    # run_simulation, which only adds a deprecation warning; flwr is pinned (requirements.lock).
    from flwr.common.logger import update_console_handler
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    update_console_handler(colored=sys.stderr.isatty())  # Flower's log lines carry ANSI colours by default

    server_app = make_app(cfg, run.path, progress, resume)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    state_root = client_state_root()
    # The simulation engine is the researcher's: its clients accept dp.reproducible_noise when a run asks.
    env = {CLIENT_STATE_ENV: str(state_root.resolve()), ALLOW_REPRODUCIBLE_NOISE_ENV: "1",
           # A client with no GPU share must not see the GPUs (train.device = auto would put it on one
           # that Ray does not schedule): Ray hides them from such actors while this is 1.
           "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0" if cfg.federation.client_gpus > 0 else "1",
           **({} if sys.stderr.isatty() else {"RAY_COLOR_PREFIX": "0"})}  # no ANSI codes in a log file
    if he_secret is not None:
        env[SECRET_KEY_ENV] = str(Path(he_secret).resolve())
    error = None
    with warnings.catch_warnings(), _environment(env):
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", "Tip: In future versions of Ray", FutureWarning)  # about the 1 above
        try:
            _run_simulation(num_supernodes=cfg.split.num_clients, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                            server_app=server_app, client_app=CLIENT_APP, backend_config=backend)
        except Exception as exc:  # the reason is in status.json; the traceback goes to the log
            log.debug("simulation raised", exc_info=True)
            error = exc
    status = run.read_status()
    if status["status"] == "finished":
        shutil.rmtree(state_root / run.path.name, ignore_errors=True)
    if status["status"] != "finished" and "error" not in status and error is not None:
        status["error"] = f"{type(error).__name__}: {error}"
    return status
