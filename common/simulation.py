"""Run one federation on Flower's simulation engine, in this process.

The ServerApp and ClientApp are loaded by reference (as Flower does), so ``common`` never imports
``server`` or ``client``. Success is read from the run directory's status.json, which the
ServerApp writes, not inferred from the engine returning.
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any

from common.config import Config
from common.rundir import RunDir

log = logging.getLogger(__name__)

SERVER_APP_FACTORY = "server.app:make_app"
CLIENT_APP = "client.app:app"
SECRET_ENV = "FACEFL_HE_SECRET_CONTEXT"  # read by client.he_client (common never imports client)


def load_ref(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def simulate(cfg: Config, runs_root: str | Path, prefix: str = "run", progress: bool = True,
             he_secret: Path | None = None) -> tuple[RunDir, dict[str, Any]]:
    """Create the run directory, run every round, and return it with its final status.

    ``he_secret``: the clients' secret context for HE runs. The engine gives simulated nodes no
    configuration of their own, so it reaches them through ``FACEFL_HE_SECRET_CONTEXT``.
    """
    from flwr.simulation import run_simulation

    run = RunDir.create(runs_root, prefix, cfg)
    server_app = load_ref(SERVER_APP_FACTORY)(cfg, run.path, progress)
    backend = {"client_resources": {"num_cpus": cfg.federation.client_cpus, "num_gpus": 0.0},
               "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}}
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    error = None
    previous = os.environ.get(SECRET_ENV)
    if he_secret is not None:
        os.environ[SECRET_ENV] = str(Path(he_secret).resolve())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            run_simulation(server_app=server_app, client_app=load_ref(CLIENT_APP),
                           num_supernodes=cfg.split.num_clients, backend_config=backend)
        except Exception as exc:  # the reason is in status.json; the traceback goes to the log
            log.debug("simulation raised", exc_info=True)
            error = exc
        finally:
            if previous is None:
                os.environ.pop(SECRET_ENV, None)
            else:
                os.environ[SECRET_ENV] = previous
    status = run.read_status()
    if status["status"] != "finished" and "error" not in status and error is not None:
        status["error"] = f"{type(error).__name__}: {error}"
    return run, status
