"""``facefl demo``: the whole system on SynthFaces in one command, ending in report.html.

SynthFaces -> federated training with DP-SGD and CKKS encryption on -> MOTE enrollment -> the key
holder decrypts the final model -> MOTE vs templates evaluation -> membership audit (every attack
that applies to a ``train.task = both`` model: loss, shadow, LiRA, RMIA, MINT and the MOTE
gallery attacks with FD-MIA on the fair / skewed gallery pair) -> report.

Layout: ``OUT/demo-<UTC time>/`` holds ``keys/`` (the CKKS keys), the run directory
``run-<...>/`` and a copy of its ``report.html``. The keys are demo-only: in a real deployment
the clients hold the secret context and the server only the public one (docs/he.md); here every
party runs in this one process on one machine, so one directory holds both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from common.config import load_config
from common.config.loader import preset
from common.runs.io import atomic_write_bytes
from common.runs.layout import REPORT
from workflow.pipeline import (
    QUICK_MAX_PER_CLASS,
    QUICK_OVERRIDES,
    QUICK_REFERENCES,
    PipelineResult,
    Stages,
    run_pipeline,
)

if TYPE_CHECKING:
    from common.runs.results import RunResults

# Both heads, so that every attack family applies; DP-SGD at the default target epsilon.
DEMO_TASK = ("train.task=both", "dp.mode=sample", "dp.target_epsilon=8")
FULL_OVERRIDES = tuple(preset("demo"))  # the full demo's sizes: common/config/presets/demo.toml
# The audit's reference models dominate the demo's time: each replays the federation (rounds x local_epochs
# epochs with DP-SGD) on half of the audited + aux samples; the full demo audits every member and as many
# nonmembers (AuditSettings' default), enough to resolve TPR at 1% FPR.
FULL_REFERENCES = 8


@dataclass
class DemoResult:
    directory: Path  # OUT/demo-<id>
    report: Path  # OUT/demo-<id>/report.html
    pipeline: PipelineResult
    timings: dict[str, float]


def _demo_dir(out: Path) -> Path:
    """``OUT/demo-<UTC time>``, with -2, -3, ... when two demos start in the same second."""
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"demo-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    for n in range(1, 1000):
        path = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{base}: too many demos started this second")


def run_demo(out: Path, quick: bool = False, progress: bool = True) -> DemoResult:
    """Run every stage; raises ``StageFailed`` naming the stage if one fails (the report is still
    written for a run that failed to train)."""
    from attacks.audit import AuditSettings
    from common.he.keys import SECRET_FILE, KeyParams, he_overrides, write_keys

    directory = _demo_dir(out)
    stages = Stages(progress)
    keys = directory / "keys"
    with stages.stage("CKKS keys (demo only: every party shares this machine)"):
        write_keys(keys, KeyParams())
    sizes = QUICK_OVERRIDES if quick else FULL_OVERRIDES
    cfg = load_config(None, [*sizes, *DEMO_TASK, *he_overrides(keys)])
    settings = AuditSettings(references=QUICK_REFERENCES if quick else FULL_REFERENCES, seed=cfg.seed,
                             progress=progress)
    if quick:
        settings.max_per_class = QUICK_MAX_PER_CLASS
    try:
        result = run_pipeline(cfg, directory, "run", settings, stages, he_secret=keys / SECRET_FILE)
    finally:  # also after a failed stage: the report says how far the run got
        for run_report in directory.glob(f"run-*/{REPORT}"):
            atomic_write_bytes(directory / REPORT, run_report.read_bytes())
    return DemoResult(directory, directory / REPORT, result, stages.timings)


def demo_summary(r: RunResults) -> list[tuple[str, str]]:
    """The printed summary: (what, value) rows of the headline numbers, read from the run's files.
    Intervals are 95% bootstrap intervals; a TPR is shown only at an FPR the nonmembers resolve."""
    from common.report.html import fmt, with_ci
    from common.report.tables import per_unit
    from common.runs.records import BALANCED_GALLERY, TEMPLATES, tpr_label
    from workflow.lift import lift_line

    final, he = r.final_metrics(), r.he or {}
    rows = [("verification AUC (decrypted final model)", fmt(final.get("verification_auc"))),
            ("verification AUC: pretrained -> federated (lift [95% CI]); upper bound",
             lift_line(r.lift) if r.lift is not None else "not computed"),
            (f"{r.cfg('train.attribute')} accuracy / DEO / bias amplification",
             " / ".join(fmt(final.get(f"attribute_{k}")) for k in ("accuracy", "deo_sum", "bias_amplification"))),
            (f"epsilon spent (largest client, {per_unit(r.cfg('dp.unit'))}, delta {r.cfg('dp.delta')})",
             fmt(r.epsilon())),
            ("empirical epsilon, 95% lower bound (per image; best proof from the audit)", _best_bound(r)),
            ("what the server saw", f"{he.get('encrypted', 'n/a')} of {he.get('values', 'n/a')} values only as an "
                                    "encrypted sum" if r.cfg("he.enabled") else "plaintext updates")]
    ev = r.evaluation
    for name in (TEMPLATES, BALANCED_GALLERY):
        auc, ba = (ev.method(name).get("auc"), ev.leakage(name).get("balanced_accuracy")) if ev else (None, None)
        rows.append((f"{name}: verification AUC / gender-inference BA", f"{fmt(auc)} / {fmt(ba)}"))
    for a in r.attacks(include_updates=False):
        shown = [k for k in r.audit.fpr_keys if a.resolves(k)]
        tpr = (f"{tpr_label(shown[0])} {with_ci(a.tpr_at_fpr[shown[0]], a.tpr_ci(shown[0]))}" if shown else
               f"TPR at low FPR: not resolvable with {a.n_nonmembers} nonmembers")
        rows.append((f"MIA {a.label}: AUC [95% CI]", f"{with_ci(a.auc, a.ci('auc'))}; {tpr}"))
    return rows


def _best_bound(r: RunResults) -> str:
    """The largest empirical lower bound on the global model's epsilon and what proves it."""
    from common.report.html import fmt

    found = r.best_empirical_bound()
    return f"{fmt(found[0], 2)} ({found[1]})" if found is not None else "n/a (no audit)"


def demo_headline(r: RunResults) -> str:
    """One sentence: which audited target leaks most (by the lower end of its AUC interval) and
    whether that is distinguishable from chance, next to the run's privacy budget."""
    from common.report.html import fmt, with_ci
    from common.report.tables import per_unit

    attacks = [a for a in r.attacks(include_updates=False) if a.ci("auc")]
    budget = (f"DP-SGD spent epsilon {fmt(r.epsilon())} {per_unit(r.cfg('dp.unit'))} on the backbone" if r.dp_on()
              else "the backbone was trained without DP")
    if not attacks:
        return f"No audit to summarise; {budget}."
    top = max(attacks, key=lambda a: a.ci("auc")[0])
    verdict = ("clearly above chance (AUC 0.5)" if top.ci("auc")[0] > 0.5
               else "not distinguishable from chance (its interval covers AUC 0.5)")
    subject = (" (a template's references are its subject: no DP in facefl protects them)" if top.kind.mote else "")
    return (f"Headline: the strongest membership signal is {top.label}, AUC {with_ci(top.auc, top.ci('auc'))}, "
            f"{verdict}{subject}; {budget}.")
