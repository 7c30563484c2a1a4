"""Every file and folder name of a run directory, defined once (see docs/architecture.md).

Paths are relative to the run directory and use ``/`` (``run.path / AUDIT_REPORT`` works on every
platform: pathlib splits them); functions give the names that vary (a round, a client, a
balancing factor). ``common.runs.rundir.RunDir`` turns them into paths; use its properties rather
than joining names by hand. The names are the on-disk contract that tests and older runs rely on:
change one only together with a migration.

    runs/<run-id>/
      config.toml            the resolved configuration (written first)
      manifest.json          the split: who holds which sample, in which role
      canaries.json          the one-run audit's canaries (audit.canaries > 0), for the auditor only
      metrics.jsonl          one JSON event per line (start, pretrain, round, enroll, decrypted, ...)
      status.json            running / finished / failed, and the last commit (records.RunStatus)
      privacy.json           the privacy ledger (DP runs)
      he.json                what an HE server could and could not see (HE runs)
      .lock                  flock'ed while a process works on the run
      models/                initial, round-NNN and final global models; .he.safetensors when encrypted
        clients/             each client's latest post-round model (plaintext, save_client_models)
      mote/                  galleries (gallery-b<b>.safetensors), enrollment.json, evaluation.json, roc.png;
                             members-evaluation.json (per-member runs: MOTE vs templates at each member)
      evaluation/            lift.json and lift.npz: verification before / after the federation and the central
                             non-DP upper bound, with the pair scores behind them (workflow.lift)
      audit/                 report.json (records.AuditReport), scores.npz, one ROC figure per target family;
                             self-audit.json (per-member runs: each member's audit of its own data, numbers only)
                             (roc-global.png, roc-clients.png, roc-mote.png), reference-model caches
      report.html, utility.png

A client's node-local state lives outside the run directory, under
``<state root>/<run key>/client-<partition>/round-NNN.safetensors`` (client.local.StateStore).
"""

from __future__ import annotations

import re


def _in(folder: str, name: str) -> str:
    """``folder/name``: a path relative to the run directory."""
    return f"{folder}/{name}"


# ------------------------------------------------------------------ top level
CONFIG = "config.toml"
MANIFEST = "manifest.json"
CANARIES = "canaries.json"  # common.split.canaries.CanaryPlan; only the auditor reads it
METRICS = "metrics.jsonl"
STATUS = "status.json"
PRIVACY = "privacy.json"
HE = "he.json"
LOCK = ".lock"
REPORT = "report.html"
UTILITY_PLOT = "utility.png"

# ------------------------------------------------------------------ models/
MODELS = "models"
CHECKPOINT_SUFFIX = ".safetensors"
ENCRYPTED_SUFFIX = ".he.safetensors"  # an HE server's encrypted aggregate (common.he.checkpoints)
INITIAL = "initial"  # checkpoint names inside models/: the public initial global model (round 0) ...
FINAL = "final"  # ... and the final one
BASELINE_IDENTITY = "identity"  # ``facefl baseline``'s central identity backbone


def checkpoint_file(name: str, encrypted: bool = False) -> str:
    """The file name (inside models/) of the checkpoint ``name``, plaintext or encrypted."""
    return name + (ENCRYPTED_SUFFIX if encrypted else CHECKPOINT_SUFFIX)


def round_name(server_round: int) -> str:
    """The checkpoint name of the global model after ``server_round``: ``round-001``."""
    return f"round-{server_round:03d}"


def baseline_attribute(attribute: str) -> str:
    """The checkpoint name of ``facefl baseline``'s central classifier of ``attribute``."""
    return f"attribute-{attribute}"


INITIAL_MODEL = _in(MODELS, checkpoint_file(INITIAL))
FINAL_MODEL = _in(MODELS, checkpoint_file(FINAL))
FINAL_ENCRYPTED = _in(MODELS, checkpoint_file(FINAL, encrypted=True))
CLIENT_MODELS = _in(MODELS, "clients")
CLIENT_MODEL_GLOB = f"client-*{CHECKPOINT_SUFFIX}"


def client_model_file(partition: int) -> str:
    """The file name (inside models/clients/) of one client's latest post-round model."""
    return f"client-{partition}{CHECKPOINT_SUFFIX}"


# ------------------------------------------------------------------ mote/
MOTE = "mote"
MOTE_ENROLLMENT = _in(MOTE, "enrollment.json")
MOTE_EVALUATION = _in(MOTE, "evaluation.json")  # records.MoteEvaluation
MOTE_MEMBERS_EVALUATION = _in(MOTE, "members-evaluation.json")  # per-member runs: each member's MoteEvaluation
MOTE_ROC = _in(MOTE, "roc.png")


def gallery_file(balancing_factor: float) -> str:
    """The MOTE gallery of one balancing factor: ``mote/gallery-b0.50.safetensors``."""
    return _in(MOTE, f"gallery-b{balancing_factor:.2f}{CHECKPOINT_SUFFIX}")


# ------------------------------------------------------------------ evaluation/
EVALUATION = "evaluation"
LIFT = _in(EVALUATION, "lift.json")  # workflow.lift: AUC after pretraining, after the federation, central upper bound
LIFT_PAIRS = _in(EVALUATION, "lift.npz")  # its verification pairs and each model's pair scores


# ------------------------------------------------------------------ audit/
AUDIT = "audit"
AUDIT_REPORT = _in(AUDIT, "report.json")  # records.AuditReport
AUDIT_SCORES = _in(AUDIT, "scores.npz")
AUDIT_RAW = _in(AUDIT, "raw.npz")  # per-target statistics of the target and every reference, IN masks (docs/audit.md)
SELF_AUDIT = _in(AUDIT, "self-audit.json")  # data.layout = per-member: each member's numbers (attacks/self_audit.py)
REFERENCES = _in(AUDIT, "references")  # the reference (shadow) models' cache
REFERENCES_FAIR = _in(AUDIT, "references-fair")  # their fairness-reweighted twins (FD-MIA)
REFERENCE_INDEX = "index.json"  # inside a reference cache: what the cached models were trained for


def audit_roc(family: str) -> str:
    """The ROC figure of one target family (``records.FAMILY_TITLES``): ``audit/roc-global.png``."""
    return _in(AUDIT, f"roc-{family}.png")


def reference_model_file(index: int) -> str:
    """The file name (inside a reference cache) of reference model ``index``."""
    return f"ref-{index:03d}{CHECKPOINT_SUFFIX}"


# ------------------------------------------------------------------ node-local client state
CLIENT_STATE_DEFAULT = "client-state"  # the simulation's state root, under the data cache
CLIENT_STATE_FILE = re.compile(r"round-(\d+)" + re.escape(CHECKPOINT_SUFFIX))
CLIENT_MOTE_FILE = "mote.json"  # a client's MOTE DP noise seed and the digests of its releases


def client_state_dir(partition: int) -> str:
    """A client's folder under ``<state root>/<run key>/``."""
    return f"client-{partition}"


def client_state_file(server_round: int) -> str:
    """A client's state after ``server_round``, inside its folder (matches CLIENT_STATE_FILE)."""
    return round_name(server_round) + CHECKPOINT_SUFFIX


# ------------------------------------------------------------------ a sweep directory (workflow.sweep)
SWEEP_INDEX = "sweep.json"
SWEEP_CSV = "sweep.csv"
SWEEP_PLOTS = "plots"
SWEEP_RUNS = "runs"
SWEEP_UTILITY_PLOT = "utility_vs_epsilon.png"
SWEEP_FAIRNESS_PLOT = "fairness_vs_epsilon.png"
SWEEP_PRIVACY_PLOT = "empirical_vs_accounted_epsilon.png"


def sweep_attack_plot(slug: str) -> str:
    """The plot (inside plots/) of one attack against epsilon."""
    return f"attack-{slug}.png"
