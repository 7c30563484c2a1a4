"""Flower ServerApp. ``app`` serves ``flwr run`` (configuration from the run config);
``make_app`` builds one around an already resolved configuration (``facefl run``)."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import Config, from_flat
from common.rundir import RunDir
from server.federation import run_federation

OUTPUT_KEY = "output-dir"


def config_from_run_config(run_config: dict) -> tuple[Config, Path]:
    """Flower's run config: every facefl key (flat, dotted) plus ``output-dir``."""
    flat = dict(run_config)
    out = Path(str(flat.pop(OUTPUT_KEY, "runs")))
    return from_flat(flat), out


def make_app(cfg: Config | None = None, run_dir: Path | None = None, progress: bool = False) -> ServerApp:
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        config, out = (cfg, Path("runs")) if cfg is not None else config_from_run_config(context.run_config)
        run = RunDir(run_dir) if run_dir is not None else RunDir.create(out, "run", config)
        run_federation(grid, config, run, progress=progress)

    return server_app


app = make_app()
