"""The run directory: the contract between training, evaluation and the audit.

``runs/<run-id>/`` holds config.toml, manifest.json, metrics.jsonl, models/ and the rest (every
name: ``common.runs.layout``; status.json: ``common.runs.records.RunStatus``). Every file is written atomically; metrics are appended one JSON object
per line and each line is flushed and fsynced, so a crash loses at most the line being written.

Resuming (``facefl run --resume``): the server *commits* a round by writing status.json last,
with ``rounds_completed`` and ``metrics_lines`` (how many lines of metrics.jsonl belong to
committed work); the round's checkpoint, privacy.json and metrics line are written before it.
Whatever was written after the last commit is the trace of an interrupted round: on resume its
metrics lines are kept but renamed to ``"event": "interrupted"`` (so that every consumer that
reads ``round`` events sees each round once) and its files are overwritten by the re-run.
A lock (``flock`` on ``.lock``) marks a run a live process is working on; the kernel drops it
when that process dies, however it dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import Config, dump_toml
from common.runs import layout
from common.runs.io import atomic_write_text
from common.runs.records import FAILED, FINISHED, MISSING, RUNNING, RunStatus

# A client's private state (identity head, DP accountant history) is persisted node-locally, never
# in the run directory: under ``<root>/<run key>/client-<partition>/``, where the root is the node
# config ``state-dir`` (deployment engine) or $FACEFL_CLIENT_STATE (simulation, set by
# workflow.simulation), and the run key is the run directory's name, sent by the server in the
# ``run`` record of every train message together with the last round the client trained in.
CLIENT_STATE_NODE_CONFIG = "state-dir"
CLIENT_STATE_ENV = "FACEFL_CLIENT_STATE"
INTERRUPTED = "interrupted"


class ResumeError(ValueError):
    """The directory cannot be resumed; the message names it and says why."""


class RunNotFinished(ValueError):
    """The directory is not a finished run (not a run, failed, still running or killed); the
    message names it and says why."""


@dataclass(frozen=True)
class ResumePoint:
    """Where a run resumes: after ``rounds_completed`` (None: not even the start phase, i.e.
    manifest, public pretraining and the initial model, was committed)."""

    rounds_completed: int | None
    previous_status: str
    interrupted: list[dict[str, Any]]


def new_run_id(prefix: str, cfg: Config) -> str:
    """``<prefix>-<UTC time>-<config hash>``: sortable, and two configs never share an id."""
    digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{digest}"


class RunDir:
    """Paths and writers of one run directory."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, root: str | os.PathLike[str], prefix: str, cfg: Config) -> RunDir:
        base = Path(root) / new_run_id(prefix, cfg)
        Path(root).mkdir(parents=True, exist_ok=True)
        for n in range(1, 1000):  # two runs of one config in the same second get -2, -3, ...
            path = base if n == 1 else base.with_name(f"{base.name}-{n}")
            try:
                path.mkdir()
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError(f"{base}: too many runs with this id")
        run = cls(path)
        atomic_write_text(run.config_path, dump_toml(cfg))
        return run

    # Paths of the run directory's files (names: common.runs.layout).
    @property
    def config_path(self) -> Path:
        return self.path / layout.CONFIG

    @property
    def manifest_path(self) -> Path:
        return self.path / layout.MANIFEST

    @property
    def canaries_path(self) -> Path:
        """The one-run audit's canaries (``common.split.canaries``); absent without audit.canaries."""
        return self.path / layout.CANARIES

    @property
    def metrics_path(self) -> Path:
        return self.path / layout.METRICS

    @property
    def status_path(self) -> Path:
        return self.path / layout.STATUS

    @property
    def privacy_path(self) -> Path:
        return self.path / layout.PRIVACY

    @property
    def he_path(self) -> Path:
        return self.path / layout.HE

    @property
    def lock_path(self) -> Path:
        return self.path / layout.LOCK

    @property
    def report_path(self) -> Path:
        return self.path / layout.REPORT

    @property
    def utility_plot_path(self) -> Path:
        return self.path / layout.UTILITY_PLOT

    @property
    def models(self) -> Path:
        """The models/ folder (created on first use)."""
        d = self.path / layout.MODELS
        d.mkdir(exist_ok=True)
        return d

    def checkpoint(self, name: str, encrypted: bool = False) -> Path:
        """A global-model checkpoint in models/ (``layout.INITIAL``, ``layout.FINAL``, a round name)."""
        return self.models / layout.checkpoint_file(name, encrypted)

    def round_checkpoint(self, server_round: int, encrypted: bool = False) -> Path:
        return self.checkpoint(layout.round_name(server_round), encrypted)

    @property
    def initial_model(self) -> Path:
        return self.checkpoint(layout.INITIAL)

    @property
    def final_model(self) -> Path:
        return self.checkpoint(layout.FINAL)

    @property
    def final_encrypted(self) -> Path:
        return self.checkpoint(layout.FINAL, encrypted=True)

    @property
    def client_models(self) -> Path:
        """models/clients/: each client's latest post-round model (plaintext runs)."""
        return self.path / layout.CLIENT_MODELS

    def client_model(self, partition: int) -> Path:
        return self.client_models / layout.client_model_file(partition)

    @property
    def mote(self) -> Path:
        return self.path / layout.MOTE

    @property
    def mote_members_evaluation_path(self) -> Path:
        return self.path / layout.MOTE_MEMBERS_EVALUATION

    def gallery(self, balancing_factor: float) -> Path:
        return self.path / layout.gallery_file(balancing_factor)

    @property
    def mote_enrollment_path(self) -> Path:
        return self.path / layout.MOTE_ENROLLMENT

    @property
    def mote_evaluation_path(self) -> Path:
        return self.path / layout.MOTE_EVALUATION

    @property
    def mote_roc_path(self) -> Path:
        return self.path / layout.MOTE_ROC

    @property
    def evaluation(self) -> Path:
        return self.path / layout.EVALUATION

    @property
    def lift_path(self) -> Path:
        return self.path / layout.LIFT

    @property
    def lift_pairs_path(self) -> Path:
        return self.path / layout.LIFT_PAIRS

    @property
    def audit(self) -> Path:
        return self.path / layout.AUDIT

    @property
    def audit_report_path(self) -> Path:
        return self.path / layout.AUDIT_REPORT

    @property
    def self_audit_path(self) -> Path:
        return self.path / layout.SELF_AUDIT

    @property
    def audit_scores_path(self) -> Path:
        return self.path / layout.AUDIT_SCORES

    @property
    def audit_raw_path(self) -> Path:
        return self.path / layout.AUDIT_RAW

    def audit_roc(self, family: str) -> Path:
        """The ROC figure of one target family (``records.FAMILY_TITLES``)."""
        return self.path / layout.audit_roc(family)

    def reference_cache(self, fair: bool = False) -> Path:
        """The audit's cache of reference models (of their fairness-reweighted twins with ``fair``)."""
        return self.path / (layout.REFERENCES_FAIR if fair else layout.REFERENCES)

    def write_status(self, status: str, **info: Any) -> None:
        """Record the run's state (running / finished / failed): the CLI's source of truth."""
        RunStatus.now(status, **info).save(self.status_path)

    def commit(self, rounds_completed: int) -> None:
        """The commit point of the start phase (0) or of a round: everything written so far
        belongs to ``rounds_completed`` complete rounds (see the module docstring)."""
        lines = self.metrics_path.read_bytes().count(b"\n") if self.metrics_path.exists() else 0
        self.write_status("running", rounds_completed=rounds_completed, metrics_lines=lines)

    def last_commit(self) -> dict[str, int]:
        """``rounds_completed`` and ``metrics_lines`` of the last commit ({} if none), to carry
        into a ``failed`` status so that a failed run stays resumable."""
        return self.load_status().last_commit()

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run's lock while working on it; ResumeError if another process holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a+b") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ResumeError(f"{self.path}: another process is working on this run (it holds "
                                  f"{self.lock_path.name}); wait for it or stop it first") from None
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def check_finished(self) -> RunStatus:
        """The status of a finished run, for the phases that read its results (evaluate, audit);
        RunNotFinished naming the directory and the reason otherwise."""
        if not self.config_path.is_file():
            raise RunNotFinished(f"{self.path}: not a facefl run directory (no {layout.CONFIG})")
        try:
            status = self.load_status()
        except ValueError as exc:
            raise RunNotFinished(f"{self.status_path}: unreadable ({exc}): the run directory is damaged") from None
        if status.status == FAILED:
            raise RunNotFinished(f"{self.path}: the run failed: {status.error or 'no reason recorded'}; fix the cause "
                                 f"and resume it with `facefl run --resume {self.path}`")
        if status.status == MISSING:
            raise RunNotFinished(f"{self.path}: the run never started ({layout.STATUS} was never written)")
        if not status.finished:
            raise RunNotFinished(f"{self.path}: the run has not finished ({layout.STATUS}: {status.status}); it is "
                                 f"still running, or was killed (then resume it with `facefl run --resume {self.path}`)")
        return status

    def check_resumable(self) -> RunStatus:
        """The status of a run that ``--resume`` may continue; ResumeError naming the directory
        and the reason otherwise (not a run, never started, finished). Whether another process
        is still working on it is ``lock``'s to tell."""
        if not self.config_path.is_file():
            raise ResumeError(f"{self.path}: not a facefl run directory (no config.toml)")
        status = self.load_status()
        state = status.status
        if state == MISSING:
            raise ResumeError(f"{self.status_path}: missing, the run never started; start a new run instead")
        if state == FINISHED:
            raise ResumeError(f"{self.path}: the run already finished ({self.status_path.name}: finished, "
                              f"{status.rounds_completed} rounds); there is nothing to resume")
        if state not in (RUNNING, FAILED):
            raise ResumeError(f"{self.status_path}: status {state!r}, expected running or failed")
        if not status.committed and int(status.rounds_completed or 0) > 0:
            raise ResumeError(f"{self.status_path}: no commit record (metrics_lines); the run was written by a "
                              "facefl without resume support and cannot be resumed")
        return status

    def rollback(self) -> ResumePoint:
        """Prepare a resume (the caller holds ``lock``): check the run, mark the metrics lines
        written after the last commit as interrupted (one atomic rewrite of metrics.jsonl), and
        return the resume point."""
        status = self.check_resumable()
        committed = status.metrics_lines
        lines = self.metrics_path.read_bytes().splitlines(keepends=True) if self.metrics_path.exists() else []
        keep = int(committed or 0)
        if len(lines) < keep or any(not ln.endswith(b"\n") for ln in lines[:keep]):
            raise ResumeError(f"{self.metrics_path}: {len(lines)} lines, but status.json committed {keep}: "
                              "the file was truncated or edited")
        interrupted = []
        for line in lines[keep:]:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the crash: nothing in it can be trusted
            interrupted.append({"event": INTERRUPTED, "interrupted_event": record.pop("event", None), **record})
        if len(lines) > keep:
            atomic_write_text(self.metrics_path, b"".join(lines[:keep]).decode("utf-8") + "".join(
                json.dumps(r, sort_keys=True) + "\n" for r in interrupted))
        return ResumePoint(status.rounds_completed if committed is not None else None, status.status, interrupted)

    def load_status(self) -> RunStatus:
        """status.json as a record; status "missing" when it was never written."""
        if not self.status_path.exists():
            return RunStatus.missing(self.status_path)
        return RunStatus.load(self.status_path)

    def read_status(self) -> dict[str, Any]:
        """status.json as written (``load_status().to_dict()``)."""
        return self.load_status().to_dict()

    def log_metrics(self, event: str, **values: Any) -> dict[str, Any]:
        """Append one event to metrics.jsonl (durably) and return it."""
        record = {"event": event, "time": round(time.time(), 3), **values}
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return record

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        records = []
        for n, line in enumerate(self.metrics_path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{self.metrics_path}:{n}: not valid JSON ({exc})") from None
        return records
