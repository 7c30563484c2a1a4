"""The stages of one run from configuration to report, shared by ``facefl demo``, ``facefl sweep``
and ``facefl evaluate``.

train (Flower simulation) -> decrypt the final model (HE runs; the key holder's step) -> MOTE
evaluation with the template thief's gender inference (runs with galleries) -> membership audit
-> report.html. Like ``workflow.cli``, this module orchestrates every layer, so it imports
``attacks`` (lazily, inside the functions); the library modules below it do not.

Each post-training stage is skipped when its output already exists (final.safetensors,
mote/evaluation.json, audit/report.json), all written atomically: a sweep interrupted in the
middle of an audit resumes with the audit, not with training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.config import Config, load_config
from common.config.loader import preset
from common.runs.layout import FINAL_MODEL
from common.runs.records import AuditReport, MoteEvaluation
from common.runs.rundir import RunDir

if TYPE_CHECKING:
    from attacks.audit import AuditSettings

log = logging.getLogger(__name__)

QUICK_OVERRIDES = tuple(preset("quick"))  # `--quick` (demo and sweep): common/config/presets/quick.toml
QUICK_REFERENCES = 4
QUICK_MAX_PER_CLASS = 100


class StageFailed(RuntimeError):
    """A stage of the pipeline raised; ``stage`` names it and the cause is chained."""

    def __init__(self, stage: str, cause: BaseException) -> None:
        super().__init__(f"{stage}: {type(cause).__name__}: {cause}")
        self.stage = stage


@dataclass
class Stages:
    """Runs named stages with timings, logged and (with ``progress``) shown live on stderr."""

    progress: bool = True
    timings: dict[str, float] = field(default_factory=dict)

    def say(self, text: str) -> None:
        """One line on stderr (above any live bar): with or without bars, each stage says when it
        starts and ends."""
        log.info(text)
        if self.progress:
            from tqdm.auto import tqdm

            tqdm.write(f"[facefl] {text}", file=sys.stderr)
        else:
            print(f"[facefl] {text}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.say(f"{name} ...")
        start = time.perf_counter()
        try:
            yield
        except Exception as exc:
            self.say(f"{name}: FAILED after {time.perf_counter() - start:.1f} s ({type(exc).__name__}: {exc})")
            raise StageFailed(name, exc) from exc
        self.timings[name] = time.perf_counter() - start
        self.say(f"{name}: done in {self.timings[name]:.1f} s")

    def split(self, name: str, part: str, seconds: float) -> None:
        """Report ``seconds`` of stage ``name`` as a stage of their own, ``part``, listed before it
        (e.g. the server's public pretraining inside the federated training stage)."""
        if seconds <= 0 or name not in self.timings:
            return
        total = self.timings.pop(name)  # the stage just ended: it is last, and ``part`` goes before it
        self.timings[part] = seconds
        self.timings[name] = total - seconds


def evaluate_run(run_dir: Path) -> tuple[MoteEvaluation, list[str], list[tuple]]:
    """``facefl evaluate``: MOTE vs templates plus the gender-inference attack on both galleries;
    writes mote/evaluation.json and mote/roc.png; returns (report, table header, table rows)."""
    from attacks.gender_inference import template_leakage
    from common.evaluation.mote import evaluate_mote, save_evaluation

    report, stolen = evaluate_mote(run_dir)
    thresholds = {name: float(r["tau"]) for name, r in report.methods.items()}
    report = dataclasses.replace(report, gender_inference=template_leakage(stolen, thresholds))
    header, rows = save_evaluation(run_dir, report)
    return report, header, rows


def has_galleries(run: RunDir, cfg: Config) -> bool:
    return (cfg.mote.enabled and cfg.train.task in ("identity", "both")
            and all(run.gallery(b).is_file() for b in cfg.mote.balancing_factors))


def complete_run(run_dir: Path, settings: AuditSettings, stages: Stages, he_secret: Path | None = None,
                 fair_dir: Path | None = None) -> Path:
    """Decrypt (HE), evaluate (MOTE), audit and report a finished run; each done stage is skipped.
    Returns the report's path.

    With ``fair_dir`` the audit is redone with the fair twin (FD-MIA on the pair): its report is a
    superset of the plain one (the same seeded attacks on this model, plus the fair model and the pair).
    """
    from attacks.audit import run_audit
    from common.report.html import write_report

    run = RunDir(run_dir)
    cfg = load_config(run.config_path)
    if cfg.he.enabled and not (run.path / FINAL_MODEL).exists():
        if he_secret is None:
            raise StageFailed("decrypt", ValueError(f"{run.path}: an HE run needs the secret context to decrypt its "
                                                    "final model (--he-keys)"))
        from workflow.decryption import decrypt_run

        with stages.stage("decrypt the final model (key holder)"):
            decrypt_run(run.path, he_secret)
    if not run.lift_path.exists():
        from workflow.lift import federation_lift

        with stages.stage("federation lift (pretrained vs final vs central non-DP)"):
            federation_lift(run.path)
    if has_galleries(run, cfg) and not run.mote_evaluation_path.exists():
        with stages.stage("MOTE vs templates evaluation"):
            evaluate_run(run.path)
    report_json = run.audit_report_path
    if not report_json.exists() or (fair_dir is not None and AuditReport.load(report_json).fair_run != str(fair_dir)):
        with stages.stage("membership audit" + (" with the fair twin (FD-MIA)" if fair_dir else "")):
            run_audit(run.path, settings, fair_dir=fair_dir)
    with stages.stage("report"):
        return write_report(run.path)


@dataclass
class PipelineResult:
    run: RunDir
    status: dict[str, Any]
    report: Path | None  # None when training did not finish (the run directory still has a report.html)


def run_pipeline(cfg: Config, runs_root: Path, prefix: str, settings: AuditSettings, stages: Stages,
                 he_secret: Path | None = None, on_trained: Callable[[RunDir], None] | None = None) -> PipelineResult:
    """Train one configuration, then every post-training stage; a run that fails to train still
    gets its report (what it has, and "not run" for the rest). ``on_trained`` is called with the
    run directory as soon as training ends (a sweep records it, so that it can resume there)."""
    from common.report.html import write_report
    from workflow.simulation import simulate

    name = f"federated training ({cfg.federation.rounds} rounds, {cfg.split.num_clients} clients)"
    with stages.stage(name):
        run, status = simulate(cfg, runs_root, prefix=prefix, progress=stages.progress, he_secret=he_secret)
    stages.split(name, "public pretraining (server, public data only)",
                 sum(e.get("seconds", 0.0) for e in run.read_metrics() if e.get("event") == "pretrain"))
    if on_trained is not None:
        on_trained(run)
    if status["status"] != "finished":
        write_report(run.path)
        return PipelineResult(run, status, None)
    try:
        return PipelineResult(run, status, complete_run(run.path, settings, stages, he_secret))
    except StageFailed:
        write_report(run.path)  # what the run has so far, and "not run" for the rest
        raise
