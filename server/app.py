"""Flower ServerApp. ``app`` serves ``flwr run`` (configuration from the run config);
``make_app`` builds one around an already resolved configuration (``facefl run``)."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import Config, from_flat, load_config
from common.report.tables import round_table, self_audit_table
from common.runs.io import read_json
from common.runs.rundir import ResumeError, RunDir
from server.federation import run_federation
from server.preflight import check_inputs

OUTPUT_KEY = "output-dir"
RESUME_KEY = "resume-dir"


def config_from_run_config(run_config: dict) -> tuple[Config, Path]:
    """Flower's run config: every facefl key (flat, dotted) plus ``output-dir`` (and, to resume
    a run, ``resume-dir``: see ``resume_dir_of``)."""
    flat = dict(run_config)
    out = Path(str(flat.pop(OUTPUT_KEY, "runs")))
    flat.pop(RESUME_KEY, None)
    return from_flat(flat), out


def resume_dir_of(run_config: dict, cfg: Config) -> RunDir | None:
    """The run to resume (run config ``resume-dir``, a path on the ServerApp's machine), or None.

    A resumed run must have exactly the configuration it started with: every key of the run
    config is compared with the run's config.toml, and the differing keys are named."""
    path = str(run_config.get(RESUME_KEY, "") or "")
    if not path:
        return None
    run = RunDir(path)
    run.check_resumable()
    stored = load_config(run.config_path)
    if stored != cfg:
        theirs, ours = stored.to_flat(), cfg.to_flat()
        diff = ", ".join(f"{k} ({ours[k]!r}, run has {theirs.get(k)!r})" for k in sorted(ours) if ours[k] != theirs.get(k))
        raise ResumeError(f"{RESUME_KEY}={path}: the run config differs from the run's config.toml in {diff}; a run "
                          "resumes with the configuration it started with")
    return run


def make_app(cfg: Config | None = None, run_dir: Path | None = None, progress: bool = False,
             resume: bool = False) -> ServerApp:
    """``resume``: continue ``run_dir`` after its last committed round instead of starting it."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        if cfg is not None:
            run = RunDir(run_dir) if run_dir is not None else RunDir.create("runs", "run", cfg)
            run_federation(grid, cfg, run, progress=progress, resume=resume)
            return
        config, out = config_from_run_config(context.run_config)
        resumed = resume_dir_of(context.run_config, config)
        if resumed is None:
            check_inputs(config)  # before a run directory exists and before any node is awaited
        run = resumed if resumed is not None else RunDir.create(out, "run", config)
        run_federation(grid, config, run, progress=progress, resume=resumed is not None)
        # `flwr run --stream` shows the ServerApp's output: end with what `facefl run` prints.
        audited = f"{self_audit_table(read_json(run.self_audit_path))}\n" if run.self_audit_path.is_file() else ""
        print(f"{round_table(run.read_metrics(), config.dp.unit)}\n{audited}run directory: {run.path}", flush=True)

    return server_app


app = make_app()
