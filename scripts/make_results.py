"""Write docs/RESULTS.md from sweep directories: does each finding of the papers hold here?

    .venv/bin/python scripts/make_results.py SWEEP_DIR [SWEEP_DIR ...] --out docs/RESULTS.md [--assets docs/results]

Reads each sweep's sweep.json (the commands that made it) and every finished run's files
(``common.runs.results``), and checks:

1. FD-MIA beats single-model attacks on fair models (Tian et al. 2024): each FD-MIA attack on a
   biased + fair pair against the single-model attack of its family on the fair model (the audit's
   paired differences on the same samples), for attribute pairs (sweeps with ``fairness.method`` in
   the grid) that meet the paper's premise (biased DEO >= 0.2, the fair twin at most a third of it);
   MOTE gallery pairs (b = 0.5 is the fair one) are reported on their own, outside the paper's
   setting, against the best single-model attack.
2. DP-SGD lowers attack success as epsilon falls: each attack's AUC at the smallest and at the
   largest epsilon of a series (the other grid values and the seed; inf = DP off), and the rank
   correlation over all epsilons. The verdict counts the attacks that beat chance at the largest
   epsilon (nothing to lower otherwise); attacks on models trained without DP-SGD (MOTE) are controls.
3. MINT (white-box) beats black-box MIA on the same global model.
4. MOTE's gender inference is near 50% while templates leak (MOTE paper).
5. MOTE's verification fairness (FDR, iGARBE) is at least the templates'.

A comparison "A beats B" is counted per run: a win when A's AUC is higher, a clear win when the
paired interval of the difference lies above 0 (or, for two models without a paired interval,
A's bootstrap 95% interval lies entirely above B's). Verdicts: "reproduced" (every run a win, at
least half of them clear), "direction only, within noise" (most runs wins), "not reproduced", or
"not measured" (no run had the inputs); "not reproduced" becomes "inconclusive (underpowered)"
where a comparison could not have detected the paper's effect (80% power at the 5% level: 2.8
standard errors). Numbers are never averaged across different configurations. Each finding
states the paper's premise and how many runs meet it (``Finding.premise``), and its test, the
smallest effect it could detect and the paper's effect (``Finding.test``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attacks.registry import for_target
from common.report.html import fmt, with_ci
from common.runs import layout
from common.runs.io import atomic_write_bytes, atomic_write_text, read_json
from common.runs.records import BALANCED_GALLERY, TEMPLATES, AttackEntry, TargetKind, tpr_label, tpr_text
from common.runs.results import RunResults
from workflow.mint_study import MIN_TRAINING_SAMPLES, STUDY_FILE

EPSILON_KEY = "dp.target_epsilon"


@dataclass
class Run:
    sweep: Path
    entry: str
    combination: dict[str, str]
    seed: int
    results: RunResults

    @property
    def label(self) -> str:
        return f"{self.sweep.name}: {self.entry}"


@dataclass
class Finding:
    title: str
    verdict: str
    headline: str
    body: list[str]
    premise: str = ""  # the paper's premise and whether these runs meet it, printed beside the verdict
    test: str = ""  # the statistical test, the smallest effect it could detect and the paper's effect


def _relative(path: str | None) -> str | None:
    """A path inside the working directory (the repository) as a relative one, so that RESULTS.md
    names the committed config file rather than where this machine keeps it."""
    if not path:
        return path
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path


def _resolve(base: Path, recorded: str) -> Path:
    """A recorded run directory: relative to ``base`` in a bundle (``bundle_sweep``), else as the
    sweep recorded it (absolute, or relative to where it ran)."""
    inside = base / recorded
    return inside if inside.exists() else Path(recorded)


def load_sweeps(dirs: Sequence[Path]) -> tuple[list[Run], list[str]]:
    """Every finished run of the sweeps, and a markdown description of each sweep."""
    runs: list[Run] = []
    described: list[str] = []
    for d in dirs:
        index = read_json(d / layout.SWEEP_INDEX)
        entries = index.get("runs", {})
        finished = [(k, e) for k, e in entries.items() if e["state"] == "finished" and e.get("run_dir")]
        failed = [(k, e) for k, e in entries.items() if e["state"] != "finished"]
        base = index.get("base", {})
        lines = [f"### `{d}`", "", f"{len(finished)} finished runs, {len(failed)} failed or unfinished; base "
                 f"configuration `{_relative(base.get('config')) or 'defaults'}`"
                 + (" with `--quick` (test-sized federations: a smoke test, not evidence)" if base.get("quick") else "")
                 + f", {base.get('references')} reference models per audit.", "", "Commands:", "", "```bash"]
        lines += index.get("commands", []) or ["(none recorded)"]
        lines += ["```", ""]
        lines += [f"- failed: `{k}`: {e.get('error')}" if e["state"] == "failed" else
                  f"- unfinished (still running, or stopped: the same command resumes it): `{k}`" for k, e in failed]
        described.append("\n".join(lines))
        for k, e in finished:  # a bundle (``bundle_sweep``) records run directories relative to itself
            runs.append(Run(d, k, e["combination"], e["seed"], RunResults.load(_resolve(d, e["run_dir"]))))
    return runs, described


RESULT_FILES = (layout.CONFIG, layout.STATUS, layout.PRIVACY, layout.METRICS, layout.AUDIT_REPORT, layout.AUDIT_SCORES,
                layout.MOTE_EVALUATION, layout.LIFT)
"""What a finding reads from a run directory, and the raw scores behind it (no model, no image)."""


def bundle_sweep(sweep: Path, target: Path) -> int:
    """Copy each finished run's ``RESULT_FILES`` to ``target/runs/<run>/`` and the sweep's index to
    ``target/sweep.json`` with run directories (and each audit's fair twin) relative to the copy, so
    that this script re-reads the bundle as it read the sweep (``make_results.py target ...``) and
    every AUC can be re-scored from the copied scores. Returns the number of runs copied."""
    index = read_json(sweep / layout.SWEEP_INDEX)
    if sweep.resolve() == target.resolve():
        return 0  # already a bundle
    names: dict[Path, str] = {}
    for e in index.get("runs", {}).values():
        if e["state"] == "finished" and e.get("run_dir"):
            names[_resolve(sweep, e["run_dir"]).resolve()] = Path(e["run_dir"]).name
    for source, name in names.items():
        for f in RESULT_FILES:
            if (source / f).is_file():
                data = (source / f).read_bytes()
                if f == layout.AUDIT_REPORT and (report := json.loads(data)).get("fair_run"):
                    twin = names.get(_resolve(source, report["fair_run"]).resolve())
                    report["fair_run"] = f"../{twin}" if twin else None  # relative to the copied run directory
                    data = json.dumps(report, indent=1).encode()
                atomic_write_bytes(target / layout.SWEEP_RUNS / name / f, data)
    for e in index.get("runs", {}).values():
        if e.get("run_dir") and _resolve(sweep, e["run_dir"]).resolve() in names:
            e["run_dir"] = f"{layout.SWEEP_RUNS}/{Path(e['run_dir']).name}"
    atomic_write_text(target / layout.SWEEP_INDEX, json.dumps(index, indent=1))
    return len(names)


def _copy(files: Sequence[Path], target: Path) -> None:
    """Copy ``files`` into the folder ``target`` (nothing when they are already there: a bundle)."""
    for f in files:
        if f.parent.resolve() != target.resolve():
            atomic_write_bytes(target / f.name, f.read_bytes())


def copy_assets(sweep: Path, assets: Path, out: Path) -> list[str]:
    """Copy the sweep's sweep.csv and plots into ``assets/<sweep name>/``, with its runs' result
    files (``bundle_sweep``), and return markdown that shows them, with paths relative to ``out``."""
    target = assets / sweep.name
    if not (sweep / layout.SWEEP_CSV).is_file():
        return [f"No {layout.SWEEP_CSV} in `{sweep}` yet (written when a `facefl sweep` invocation ends).", ""]
    files = [sweep / layout.SWEEP_CSV, *sorted((sweep / layout.SWEEP_PLOTS).glob("*.png"))]
    _copy(files, target)
    copied = bundle_sweep(sweep, target)
    rel = Path(os.path.relpath(target, out.parent))
    table = rel / layout.SWEEP_CSV
    lines = [f"Per-run table: [`{table}`]({table}); each run's result files and raw attack scores: "
             f"[`{rel / layout.SWEEP_RUNS}`]({rel / layout.SWEEP_RUNS})" + (f" ({copied} runs)" if copied else "")
             + f"; `scripts/make_results.py {target}` re-reads them. Plots (mean over seeds, band min to max):", ""]
    return lines + [f"![{f.stem}]({rel / f.name})" for f in files[1:]] + [""]


MINT_STUDY_FILES = (STUDY_FILE, "mint_study.npz", "mint_study_roc.png", layout.CONFIG)
"""A study's result, raw scores, ROC and configuration (its audited model stays behind)."""


def copy_mint_studies(studies: list[tuple[Path, dict[str, Any]]], assets: Path, out: Path) -> list[str]:
    """Copy each MINT study's ``MINT_STUDY_FILES`` to ``assets/mint/<study>/``; markdown naming them."""
    for path, _ in studies:
        _copy([path / f for f in MINT_STUDY_FILES if (path / f).is_file()], assets / "mint" / path.name)
    rel = Path(os.path.relpath(assets / "mint", out.parent))
    return [f"Each study's result, raw scores (npz), ROC and configuration: [`{rel}`]({rel}); "
            f"`facefl mint-study {assets / 'mint'}/<study>/config.toml` runs one again.", ""] if studies else []


def _attack(r: Run, kind: TargetKind, fair: bool | None = None, exclude: tuple[str, ...] = ()) -> AttackEntry | None:
    """The strongest (highest AUC) of the registry's attacks on a target of ``kind`` (with ``fair``:
    only the fair gallery of a MOTE pair, or only the skewed one), leaving out ``exclude``."""
    names = [n for n in for_target(kind) if n not in exclude]
    found = [a for a in r.results.attacks(include_updates=False) if a.kind == kind and a.name in names
             and (fair is None or a.fair == fair)]
    return max(found, key=lambda a: a.auc, default=None)


def _headline_fpr(a: AttackEntry) -> str:
    """The lowest target FPR its nonmembers resolve (else the lowest): the key of its headline TPR."""
    return min([k for k in a.tpr_at_fpr if a.resolves(k)] or a.tpr_at_fpr, key=float)


def _auc_ci(a: AttackEntry) -> str:
    return with_ci(a.auc, a.ci("auc"))


def _auc(a: AttackEntry) -> str:
    return f"{a.name} {_auc_ci(a)}"


def _tpr(a: AttackEntry) -> str:
    fpr = _headline_fpr(a)
    return with_ci(a.tpr_at_fpr[fpr], a.tpr_ci(fpr)) if a.resolves(fpr) else tpr_text(a, fpr)


def _clear(a: AttackEntry, b: AttackEntry) -> bool:
    ca, cb = a.ci("auc"), b.ci("auc")
    return bool(ca and cb and ca[0] > cb[1])


def _verdict(wins: int, clear: int, n: int) -> str:
    if n == 0:
        return "not measured"
    if wins == n and clear * 2 >= n:
        return "reproduced"
    if wins * 2 > n:
        return "direction only, within noise"
    return "not reproduced"


def _powered(verdict: str, powered: int, n: int) -> str:
    """"not reproduced" only where every comparison could have detected the paper's effect."""
    return "inconclusive (underpowered)" if verdict == "not reproduced" and powered < n else verdict


def _se(ci: Sequence[float]) -> float:
    """The standard error read off a 95% interval's width."""
    return (ci[1] - ci[0]) / (2 * 1.96)


POWER_Z = 1.96 + 0.8416
"""A difference of this many standard errors is detected with 80% power by a two-sided 5% test."""
DETECTABLE = "the smallest detectable difference is 2.8 standard errors of the difference (80% power, 5% level)"


def detectable(ci: Sequence[float]) -> float:
    """The smallest true difference a paired comparison detects with 80% power at the 5% level:
    (1.96 + 0.84) standard errors, the standard error read off its 95% interval's width."""
    return POWER_Z * _se(ci)


def detectable_apart(a: AttackEntry, b: AttackEntry) -> float:
    """The same for two AUCs of different models (independent bootstrap intervals): the standard
    error of their difference is the root of the sum of both squared. NaN without intervals."""
    ca, cb = a.ci("auc"), b.ci("auc")
    return POWER_Z * math.hypot(_se(ca), _se(cb)) if ca and cb else math.nan


def _all_or_some(ok: int, n: int) -> str:
    """Verdict of a finding that is checked per run without intervals to compare."""
    if n == 0:
        return "not measured"
    return "reproduced" if ok == n else "partly (see table)" if ok else "not reproduced"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return out + [""]


def _compare(title: str, pairs: list[tuple[Run, str, AttackEntry, AttackEntry]], a_name: str, b_name: str,
             missing: str, paper_effect: float, paper: str) -> Finding:
    """A beats B, per run: pairs of (run, what, A's strongest attack, B's strongest attack), each
    with the smallest difference its two intervals could resolve against the paper's effect."""
    wins = sum(a.auc > b.auc for _, _, a, b in pairs)
    clear = sum(_clear(a, b) for _, _, a, b in pairs)
    powered = sum(detectable_apart(a, b) <= paper_effect for _, _, a, b in pairs)
    rows = [(r.label, what, _auc(a), _tpr(a), _auc(b), _tpr(b), "yes" if a.auc > b.auc else "no",
             "yes" if _clear(a, b) else "no", fmt(detectable_apart(a, b))) for r, what, a, b in pairs]
    tpr = tpr_label(_headline_fpr(pairs[0][2])) if pairs else ""
    body = _table(("run", "models", f"{a_name}: AUC [95% CI]", tpr, f"{b_name}: AUC [95% CI]",
                   tpr, "A higher", "intervals apart", "smallest detectable difference"), rows) if pairs else [
        f"Not measured: {missing}", ""]
    return Finding(title, _powered(_verdict(wins, clear, len(pairs)), powered, len(pairs)),
                   f"{a_name} higher in {wins} of {len(pairs)} runs, intervals apart in {clear}; {powered} of "
                   f"{len(pairs)} could detect the paper's {paper_effect}", body,
                   test=(f"per run, A's and B's bootstrap 95% intervals apart (different attacks picked as each side's "
                         f"strongest: no paired interval); {DETECTABLE}; the paper's effect: {paper}."))


FAIRNESS_GAP = 0.2
"""FD-MIA's premise (Tian et al. 2024): the biased model's DEO at least this (theirs: 0.22) ..."""
FAIRER_BY = 3.0
"""... and the fair twin's at most 1/FAIRER_BY of it (theirs: 0.22 -> 0.06)."""

FD_MIA_PAPER_EFFECT = 0.11
FD_MIA_PAPER = ("score-based FD-MIA's AUC 0.658 against 0.548 for the single-model score attack on the fair model "
                "(CelebA, smiling / gender), +0.11")
"""FD-MIA's margin in the paper, as an AUC difference."""

DP_PAPER_EFFECT = 0.10
DP_PAPER = "FD-MIA's AUC 0.658 without DP, 0.558 with DP-SGD at epsilon 0.85 (the FD-MIA paper), -0.10"
"""How much DP-SGD lowered an attack's AUC in the seed papers."""


def _deo(results: RunResults | None) -> float:
    return float((results.final_metrics() if results is not None else {}).get("attribute_deo_sum", math.nan))


NOT_CONSTANT = 0.1
"""A fair twin must be a classifier, not a constant (which is trivially 'fair'): in each group it
predicts each class for at least this share of the faces."""


def _positive_rates(results: RunResults | None) -> tuple[float, float]:
    m = results.final_metrics() if results is not None else {}
    return (float(m.get("attribute_positive_rate_s0", math.nan)), float(m.get("attribute_positive_rate_s1", math.nan)))


def _not_constant(rates: tuple[float, float]) -> bool:
    return all(NOT_CONSTANT <= r <= 1 - NOT_CONSTANT for r in rates)


def _fair_twin(r: Run) -> RunResults | None:
    fair = r.results.audit.fair_run if r.results.audit is not None else None
    try:
        return RunResults.load(_resolve(r.results.path, fair)) if fair else None
    except (FileNotFoundError, ValueError):
        return None


def fd_mia(runs: list[Run]) -> Finding:
    """The paper's setting only: an attribute model and its fair twin, counted where the pair meets the
    premise (the biased model unfair, the fair one clearly fairer). FD-MIA is compared within its family
    (the audit's paired differences: an attack model, LiRA online, LiRA offline on the fair model alone),
    not with the best of every attack picked afterwards."""
    premise_rows, rows, wins, clear, powered = [], [], 0, 0, 0
    for r in runs:
        audit = r.results.audit
        if audit is None or not audit.fair_run:
            continue
        twin = _fair_twin(r)
        biased, fair, rates = _deo(r.results), _deo(twin), _positive_rates(twin)
        met = biased >= FAIRNESS_GAP and fair <= biased / FAIRER_BY and _not_constant(rates)
        premise_rows.append((r.label, fmt(biased), fmt(fair), " / ".join(fmt(x) for x in rates), "yes" if met else "no"))
        for c in audit.comparisons if met else []:  # FD-MIA against its single-model kin on the fair model
            if not c["a"].startswith("fd-mia") or c["b"].startswith("fd-mia") or not c.get("ci95"):
                continue
            lo, hi = c["ci95"]
            wins += c["difference"] > 0
            clear += lo > 0
            powered += detectable(c["ci95"]) <= FD_MIA_PAPER_EFFECT
            rows.append((r.label, c["a"], fmt(c["value_a"]), c["b"], fmt(c["value_b"]),
                         f"{c['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}]", fmt(detectable(c["ci95"]))))
    body = _table(("run", "biased model DEO", "fair twin DEO", "fair twin's positive rate, women / men",
                   "premise met"), premise_rows) if premise_rows else []
    body += (_table(("run", "FD-MIA attack", "AUC", "its kin on the fair model", "AUC",
                     "difference [paired 95% CI]", "smallest detectable difference"), rows) if rows else
             ["Not measured: " + ("no pair met the premise." if premise_rows else
                                  "no run had a biased + fair pair (sweep `fairness.method=none,reweight`)."), ""])
    return Finding("FD-MIA beats single-model attacks on fair models",
                   _powered(_verdict(wins, clear, len(rows)), powered, len(rows)),
                   f"FD-MIA higher than its family's single-model attack in {wins} of {len(rows)} paired comparisons, "
                   f"the paired interval above 0 in {clear}; {powered} of {len(rows)} could detect the paper's "
                   f"+{FD_MIA_PAPER_EFFECT}", body,
                   premise=(f"the biased model's DEO >= {FAIRNESS_GAP} and its fair twin's <= 1/{FAIRER_BY:g} of it "
                            f"(the paper: 0.22 -> 0.06), the twin no near-constant classifier (each class predicted "
                            f"for >= {NOT_CONSTANT:.0%} of each group); met by "
                            f"{sum(r[-1] == 'yes' for r in premise_rows)} of {len(premise_rows)} pairs, and only "
                            "those count."),
                   test=("the audit's paired bootstrap of the AUC difference on the same audited samples (FD-MIA on "
                         "the pair minus its single-model kin on the fair model: score-based vs shadow model, LiRA vs "
                         f"LiRA); {DETECTABLE}; the paper's effect: {FD_MIA_PAPER}."))


def fd_mia_mote(runs: list[Run]) -> Finding:
    """MOTE galleries b = 0.5 + a skewed b: outside the paper's setting, so reported on their own."""
    pairs = []
    for r in runs:
        fd, single = _attack(r, TargetKind.MOTE_PAIR), _attack(r, TargetKind.MOTE_GALLERY, fair=True)
        if fd and single:
            pairs.append((r, "MOTE galleries b=0.5 + skewed", fd, single))
    finding = _compare("FD-MIA on MOTE gallery pairs (outside the paper's setting)", pairs, "FD-MIA (pair)",
                       "best single-model attack on the b = 0.5 gallery",
                       "no run had MOTE galleries with b = 0.5 and a skewed b.", FD_MIA_PAPER_EFFECT, FD_MIA_PAPER)
    finding.premise = ("none from the paper: it attacks a biased and a fairness-trained classifier, not two "
                       "galleries that differ in their balancing factor.")
    return finding


def mint(runs: list[Run]) -> Finding:
    """MINT in the federated audit, outside the paper's terms (see ``mint_paper_terms``)."""
    pairs = [(r, "final global model", m, b) for r in runs  # MINT proper, not its embedding-only baseline
             if (m := _attack(r, TargetKind.WHITE_BOX, exclude=("mint-embedding",)))
             and (b := _attack(r, TargetKind.GLOBAL))]
    finding = _compare("MINT (white-box) beats black-box MIA in the federated audit", pairs, "MINT", "best black-box attack",
                       "no audited run had both MINT and a black-box attack.", MINT_PAPER_EFFECT, MINT_PAPER)
    # MINT trains on one identity-disjoint half of the audited samples and is tested on the other:
    # its training set is about as large as its test set.
    sizes = [m.n_members + m.n_nonmembers for _, _, m, _ in pairs]
    enough = sum(n >= MIN_TRAINING_SAMPLES for n in sizes)
    finding.premise = (f"MINT trained on >= {MIN_TRAINING_SAMPLES:,} samples with identity-disjoint train and test "
                       f"halves (the paper: 1K-100K samples of models trained on millions); here the halves are "
                       f"identity-disjoint and MINT trained on about {min(sizes, default=0):,}-{max(sizes, default=0):,} "
                       f"samples: met in {enough} of {len(sizes)} runs"
                       + ("" if enough == len(sizes) else ", so a \"not reproduced\" here does not contradict the paper")
                       + ".")
    return finding


MEMORISATION_GAP = 0.05
"""MINT's other premise, something to find: the audited model identifies the people of D at least
this much better on its own training photos than on their held-out ones (top-1)."""

MINT_PAPER_EFFECT = 0.06
MINT_PAPER = "accuracy 0.84-0.90 with the activations against 0.75-0.78 from the embedding alone, at least +0.06"
"""The paper's smallest margin of MINT over the embedding-only baseline (accuracy 0.84 against 0.78;
its range is 0.84-0.90 against 0.75-0.78), read here as an AUC difference."""


def load_mint_studies(dirs: Sequence[Path]) -> list[tuple[Path, dict[str, Any]]]:
    """Every ``facefl mint-study`` result under ``dirs`` (a study's run directory or a folder of them)."""
    found = sorted({p for d in dirs for p in ([d / STUDY_FILE] if (d / STUDY_FILE).is_file() else d.glob(f"*/{STUDY_FILE}"))})
    return [(p.parent, read_json(p)) for p in found]


def _study_label(path: Path, study: dict[str, Any]) -> str:
    a = study["audited_model"]
    dp = f"DP-SGD epsilon {a['epsilon']:.2f} {a['unit']}" if a["dp"] != "off" else "no DP"
    return f"{path.name}: {a['epochs']} epochs, {dp}, seed {study['design']['seed']}"


def mint_paper_terms(studies: list[tuple[Path, dict[str, Any]]]) -> Finding:
    """MINT against the same MLP on the embedding alone, in studies at the paper's terms (never-seen
    identities as E, >= 5,000 training samples, identity-disjoint halves): the paired differences on
    the same test samples, counted where the premise holds, each with the smallest effect it could
    have detected."""
    premise_rows, rows, wins, clear, n, powered = [], [], 0, 0, 0, 0
    for path, study in studies:
        p = study["premise"]
        learnt = p["memorisation_gap"] >= MEMORISATION_GAP
        met = learnt and p["enough_samples"] and p["external_identities_never_seen"] and p["mint_halves_identity_disjoint"]
        label = _study_label(path, study)
        premise_rows.append((label, f"{p['mint_training_samples']:,} ({p['mint_training_used']:,} D, "
                             f"{p['mint_training_external']:,} E)", "yes", "yes",
                             f"{fmt(p['audited_train_top1'])} / {fmt(p['audited_held_out_top1'])}",
                             "yes" if met else "no"))
        for c in study["comparisons"] if met else []:
            lo, hi = c["ci95"]
            n += 1
            wins += c["difference"] > 0
            clear += lo > 0
            powered += detectable(c["ci95"]) <= MINT_PAPER_EFFECT
            rows.append((label, c["a"], fmt(c["value_a"]), fmt(c["value_b"]),
                         f"{c['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}]", fmt(detectable(c["ci95"]))))
    verdict = _powered(_verdict(wins, clear, n), powered, n)
    body = _table(("study", "MINT training samples", "E never seen", "halves identity-disjoint",
                   "audited top-1: training / held-out photos", "premise met"), premise_rows) if premise_rows else []
    body += (_table(("study", "MINT", "AUC", "mint-embedding AUC", "difference [paired 95% CI]",
                     "smallest detectable difference"), rows)
             + ["Each study: `facefl mint-study` (workflow/mint_study.py).", ""]
             if rows else ["Not measured: " + ("no study met the premise." if premise_rows else
                                               "no `facefl mint-study` result was given (--mint-studies)."), ""])
    return Finding("MINT beats the embedding-only attack (the paper's terms)", verdict,
                   f"MINT higher than mint-embedding in {wins} of {n} paired comparisons, the paired interval above 0 "
                   f"in {clear}; {powered} of {n} could detect the paper's margin of {MINT_PAPER_EFFECT}", body,
                   premise=(f"MINT trained on >= {MIN_TRAINING_SAMPLES:,} samples of D (the audited model's training "
                            f"photos) and E (identities it never saw), tested on other identities, on an audited model "
                            f"with something to find (top-1 on its training photos >= {MEMORISATION_GAP} above "
                            f"held-out photos of the same people); met by "
                            f"{sum(r[-1] == 'yes' for r in premise_rows)} of {len(premise_rows)} studies."),
                   test=("a paired bootstrap over people (identity_bootstrap: the same test samples, resampled by "
                         f"identity) of each MINT variant's AUC minus mint-embedding's; {DETECTABLE}; the paper's "
                         f"effect: {MINT_PAPER} (accuracy, read as AUC)."))


def _rank(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Rank correlation (ties get mean ranks; inf ranks last); NaN when either side is constant."""
    rx, ry = _rank(x), _rank(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    if sx == 0 or sy == 0:
        return math.nan
    return sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True)) / (sx * sy)


def _not_dp_trained(kind: TargetKind) -> bool:
    """MOTE galleries are trained after the federation without DP-SGD (mote.dp_* off by default):
    the backbone's epsilon does not bound them, so they are controls, not evidence."""
    return kind.mote


def dp_trend(runs: list[Run]) -> Finding:
    """Per series (the other grid values and the seed) and attack: AUC at the smallest vs the
    largest epsilon, and the rank correlation over every epsilon of the series."""
    series: dict[tuple[Path, str], list[Run]] = {}
    for r in runs:
        if math.isnan(r.results.epsilon()):
            continue
        others = " ".join(f"{k}={v}" for k, v in sorted(r.combination.items()) if k != EPSILON_KEY)
        series.setdefault((r.sweep, f"{others} seed={r.seed}".strip()), []).append(r)
    rows, controls, wins, clear, n = [], [], 0, 0, 0
    # An attack at chance without DP has nothing for DP to remove: the verdict counts the pairs whose
    # attack beats chance (interval above 0.5) at the largest epsilon; the table shows every pair.
    signal = signal_wins = signal_clear = signal_powered = 0
    for (sweep, others), members in series.items():
        if len({r.results.epsilon() for r in members}) < 2:
            continue
        labels = {(a.name, a.target): a.kind for r in members for a in r.results.attacks(False)}
        for (name, target), kind in labels.items():
            pts = sorted(((r.results.epsilon(), a) for r in members for a in r.results.attacks(False)
                          if (a.name, a.target) == (name, target)), key=lambda p: p[0])
            if len({e for e, _ in pts}) < 2:
                continue
            (e_lo, lo), (e_hi, hi) = pts[0], pts[-1]
            rho = spearman([e for e, _ in pts], [a.auc for _, a in pts])
            row = (f"{sweep.name}: {others}", f"{name} @ {target}", fmt(e_lo), _auc_ci(lo), fmt(e_hi), _auc_ci(hi),
                   fmt(rho, 2), len(pts), fmt(detectable_apart(hi, lo)))
            if _not_dp_trained(kind):
                controls.append(row)
                continue
            n += 1
            wins += hi.auc > lo.auc
            clear += _clear(hi, lo)
            if (hi.ci("auc") or [0.0])[0] > 0.5:
                signal += 1
                signal_wins += hi.auc > lo.auc
                signal_clear += _clear(hi, lo)
                signal_powered += detectable_apart(hi, lo) <= DP_PAPER_EFFECT
                row = (row[0], f"**{row[1]}**", *row[2:])
            rows.append(row)
    headers = ("series", "attack @ model", "smallest epsilon", "AUC [95% CI]", "largest epsilon", "AUC [95% CI]",
               "Spearman rho (epsilon, AUC)", "epsilons", "smallest detectable difference")
    body = (_table(headers, rows) if rows else
            [("Not measured: no sweep had two or more epsilons with the same other settings "
             "(sweep `dp.target_epsilon=...`)."), ""])
    if controls:
        body += [("Controls, not counted: attacks on models trained without DP-SGD (the MOTE galleries are trained "
                 "after the federation, from the DP backbone's embeddings; only post-processing of the backbone is "
                 "covered by its epsilon, not the enrollment photos)."), "", *_table(headers, controls)]
    if rows:
        body.append("In bold: the attack beats chance (interval above 0.5) at the largest epsilon; the verdict counts "
                    "these pairs, since DP cannot lower an attack that fails without it.")
        body.append("")
    verdict = (_powered(_verdict(signal_wins, signal_clear, signal), signal_powered, signal) if signal or not n else
               "not testable here (no attack beats chance at the largest epsilon)")
    return Finding("DP-SGD lowers attack success as epsilon falls", verdict,
                   f"of the {signal} (series, attack) pairs whose attack beats chance at the largest epsilon, AUC is "
                   f"higher there than at the smallest epsilon in {signal_wins}, intervals apart in {signal_clear}, "
                   f"{signal_powered} could detect the paper's {DP_PAPER_EFFECT} (all {n} pairs: {wins} higher, "
                   f"{clear} apart)", body,
                   test=("per (series, attack), the two models' bootstrap 95% intervals apart (different models, "
                         f"independent intervals), and the sign of the difference; {DETECTABLE}; the paper's effect: "
                         f"{DP_PAPER}."))


def _ba_ci(leak: dict[str, Any]) -> tuple[float, list[float]] | None:
    """Balanced accuracy with a normal-approximation 95% interval from the per-class accuracies."""
    try:
        pm, pf, nm, nf = leak["male_accuracy"], leak["female_accuracy"], leak["n_male"], leak["n_female"]
    except KeyError:
        return None
    ba = (pm + pf) / 2
    half = 1.96 * math.sqrt(pm * (1 - pm) / nm + pf * (1 - pf) / nf) / 2
    return ba, [max(0.0, ba - half), min(1.0, ba + half)]


GENDER_PAPER_EFFECT = 0.30
GENDER_PAPER = ("MOTE 0.500-0.503 against 0.80-0.93 for template-based systems (Table 3): a leak of at least 0.30 "
                "above chance that MOTE removes")

BACKBONE_FNMR = 0.1
"""The gender-inference premise: the backbone verifies at FNMR <= 0.1 at FMR 1e-3 (the paper's ArcFace-class one)."""


def gender_inference(runs: list[Run]) -> Finding:
    rows, ok, n, accurate, powered = [], 0, 0, 0, 0
    near_half: dict[str, list[tuple[bool, float]]] = {}  # per way: (CI contains 0.5, share of ties) per run
    for r in runs:
        ev = r.results.evaluation
        if ev is None:
            continue
        t, m = _ba_ci(ev.leakage(TEMPLATES)), _ba_ci(ev.leakage(BALANCED_GALLERY))
        if t is None or m is None:
            continue
        n += 1
        fnmr = float(ev.method(TEMPLATES).get("fnmr", math.nan))
        met = fnmr <= BACKBONE_FNMR
        accurate += met
        mote_near, templates_leak = m[1][0] <= 0.5 <= m[1][1], t[1][0] > 0.5
        ok += met and mote_near and templates_leak  # only runs that meet the premise count
        powered += met and detectable(m[1]) <= GENDER_PAPER_EFFECT
        variants = ev.leakage(BALANCED_GALLERY).get("variants", {})
        for name, v in variants.items():
            ci = _ba_ci(v)
            near_half.setdefault(name, []).append((bool(ci and ci[1][0] <= 0.5 <= ci[1][1]),
                                                   float(v.get("tie_share", math.nan))))
        ways = "; ".join(f"{name} {fmt(v.get('balanced_accuracy'))} (majority {fmt(v.get('majority_share'))}, "
                         f"ties {fmt(v.get('tie_share'))})" for name, v in variants.items()) or "not measured"
        rows.append((r.label, fmt(fnmr), fmt(ev.method(BALANCED_GALLERY).get("fnmr", math.nan)),
                     "yes" if met else "no", with_ci(*t), "yes" if templates_leak else "no", with_ci(*m),
                     "yes" if mote_near else "no", fmt(detectable(m[1])), ways))
    verdict = _powered(_all_or_some(ok, accurate), powered, accurate)
    body = (_table(("run", "templates FNMR@FMR=1e-3", f"{BALANCED_GALLERY} FNMR", "premise met",
                    "templates: BA [95% CI]", "templates leak (CI above 0.5)",
                    f"{BALANCED_GALLERY}: BA [95% CI]", "MOTE near 50% (CI contains 0.5)",
                    "smallest detectable leak", "MOTE four ways: BA (share guessed as majority class, share of ties)"),
                   rows)
            + ["Intervals: normal approximation from the per-gender accuracies and counts. The four ways "
               "(attacks/gender_inference.py): mean sigmoid score (the paper's description, the verdict's), mean "
               "logit, per-model calibrated logit difference, accept/reject at the operating threshold; a collapse "
               "to one class with many ties is the scores' inability to separate, not the models' privacy.", "",
               "Which way gives the paper's 50%: " + ("; ".join(
                   f"{name} in {sum(h for h, _ in v)} of {len(v)} runs (mean share of ties "
                   f"{fmt(sum(t for _, t in v) / len(v))})" for name, v in near_half.items()) or "not measured")
               + " (near 50%: its interval contains 0.5).", ""]
            if rows else [f"Not measured: no run had {layout.MOTE_EVALUATION} with the gender-inference attack.", ""])
    finding = Finding("MOTE's gender inference is near 50% while templates leak", verdict,
                      f"both hold in {ok} of the {accurate} runs that meet the premise; {powered} of them could "
                      f"detect a leak of {GENDER_PAPER_EFFECT}",
                      body, test=("per run, the normal-approximation 95% interval of each balanced accuracy: MOTE 'near "
                                  "50%' when its interval contains 0.5, the templates 'leak' when theirs lies above "
                                  "it; the smallest detectable leak is 2.8 standard errors of MOTE's balanced accuracy "
                                  f"(80% power, 5% level); the paper's effect: {GENDER_PAPER}."))
    finding.premise = (f"a backbone accurate at FMR 1e-3 (FNMR <= {BACKBONE_FNMR}, as the paper's ArcFace-class "
                       f"one): met in {accurate} of {n} runs, and only those count.")
    return finding


def mean_interval(values: Sequence[float]) -> tuple[float, list[float], float]:
    """The mean of per-seed differences, its Student-t 95% interval and the smallest mean it could
    detect with 80% power (t quantiles at n - 1 degrees of freedom); NaN interval below 2 values."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, [math.nan, math.nan], math.nan
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
    t95, t80 = stats.t.ppf(0.975, n - 1), stats.t.ppf(0.8, n - 1)
    return mean, [mean - t95 * se, mean + t95 * se], (t95 + t80) * se


MOTE_FAIRNESS_PAPER = ("at b = 0.5, MOTE minus the templates' FDR -0.004 to +0.004 and iGARBE -0.043 to +0.254 over "
                       "two backbones and three data sets (Table 4): MOTE at least as fair in most")


def mote_fairness(runs: list[Run]) -> Finding:
    rows, ok, n, vacuous = [], 0, 0, 0
    per_setting: dict[str, list[tuple[float, float]]] = {}  # (FDR, iGARBE) of MOTE minus templates per seed
    for r in runs:
        ev = r.results.evaluation
        if ev is None:
            continue
        t, m = ev.method(TEMPLATES), ev.method(BALANCED_GALLERY)
        if not t or not m:
            continue
        # A threshold that rejects every genuine pair (FNMR 1) has equal error rates for everybody: no evidence.
        degenerate = t["fnmr"] >= 1.0 and m["fnmr"] >= 1.0
        at_least = m["fdr"] >= t["fdr"] and m["igarbe"] >= t["igarbe"]
        vacuous += degenerate
        n += not degenerate
        ok += at_least and not degenerate
        if not degenerate:
            setting = f"{r.sweep.name}: " + " ".join(f"{k}={v}" for k, v in sorted(r.combination.items()))
            per_setting.setdefault(setting, []).append((m["fdr"] - t["fdr"], m["igarbe"] - t["igarbe"]))
        rows.append((r.label, fmt(t["fdr"]), fmt(m["fdr"]), fmt(t["igarbe"]), fmt(m["igarbe"]), fmt(t["fnmr"]),
                     fmt(m["fnmr"]), "vacuous (FNMR 1)" if degenerate else "yes" if at_least else "no"))
    body = (_table(("run", "FDR templates", f"FDR {BALANCED_GALLERY}", "iGARBE templates", f"iGARBE {BALANCED_GALLERY}",
                    "FNMR templates", f"FNMR {BALANCED_GALLERY}", "MOTE >= templates (both)"), rows)
            + [("FDR and iGARBE (gender, one global threshold at FMR 1e-3): higher is fairer. No intervals: the "
                "evaluation reports point values; compare seeds for the spread. Runs whose threshold rejects every "
                "genuine pair of both galleries (FNMR 1) are equally 'fair' by construction and are not counted."), ""]
            if rows else [f"Not measured: no run had {layout.MOTE_EVALUATION}.", ""])
    paired, worse, level = [], 0, 0  # per setting over its seeds: MOTE minus templates
    for setting, diffs in per_setting.items():
        cells = []
        for j in (0, 1):
            mean, ci, mde = mean_interval([d[j] for d in diffs])
            worse += ci[1] < 0
            level += mean >= 0
            cells += [f"{mean:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]" if len(diffs) > 1 else f"{mean:+.4f}", fmt(mde)]
        paired.append((setting, len(diffs), *cells))
    if paired:
        body += _table(("setting", "seeds", "FDR: MOTE minus templates, mean [t 95% CI]", "smallest detectable",
                        "iGARBE: MOTE minus templates, mean [t 95% CI]", "smallest detectable"), paired)
    verdict = ("not measured" if not n else "not reproduced" if worse else
               "reproduced" if level == 2 * len(per_setting) else "inconclusive (within noise)")
    return Finding("MOTE's fairness is at least the templates'", verdict,
                   f"MOTE b=0.5 at least as fair (FDR and iGARBE) in {ok} of {n} runs ({vacuous} vacuous runs left "
                   f"out); over seeds, MOTE clearly less fair (interval below 0) in {worse} of {2 * len(per_setting)} "
                   f"(setting, measure) pairs", body,
                   test=("per setting, the paired differences MOTE minus templates over its seeds (the same probes and "
                         "threshold), their mean with a Student-t 95% interval; 'not reproduced' only where an "
                         "interval lies below 0; the smallest detectable mean difference is (t_0.975 + t_0.8) standard "
                         f"errors; the paper's effect: {MOTE_FAIRNESS_PAPER}."))


def render(findings: list[Finding], sweeps: list[str], command: str) -> str:
    lines = ["# Results: do the papers' findings hold on SynthFaces?", "",
             (f"Generated by `{command}` from the sweeps below; every number comes from a run directory's "
              f"{layout.AUDIT_REPORT} or {layout.MOTE_EVALUATION}. Intervals are the audit's stratified bootstrap 95% "
              "intervals unless stated otherwise. Every sweep and study below, and then this file, are made "
              "again by `scripts/regenerate_results.sh` (about 1.5 hours on 2 cores, two halves side by side; the "
              "sweep configurations are in `docs/sweeps/`); `docs/results/` holds each run's result files and raw "
              "scores, from which this script alone re-derives every table."), "",
             "| finding | verdict | evidence |", "|---|---|---|"]
    lines += [f"| {f.title} | **{f.verdict}** | {f.headline} |" for f in findings]
    lines.append("")
    for i, f in enumerate(findings, 1):
        lines += [f"## {i}. {f.title}", "", f"Verdict: **{f.verdict}** ({f.headline}).", ""]
        lines += [f"Premise: {f.premise}", ""] if f.premise else []
        lines += [f"Test: {f.test}", ""] if f.test else []
        lines += f.body
    lines += ["## Sweeps", "", *sweeps]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", nargs="+", type=Path, help="sweep directories (with sweep.json)")
    parser.add_argument("--out", type=Path, default=Path("docs/RESULTS.md"))
    parser.add_argument("--assets", type=Path, help="copy each sweep's sweep.csv and plots here and show them")
    parser.add_argument("--mint-studies", type=Path, nargs="*", default=[], metavar="DIR",
                        help="`facefl mint-study` run directories, or folders of them")
    args = parser.parse_args(argv)
    runs, sweeps = load_sweeps(args.sweeps)
    if args.assets:
        sweeps = [text + "\n" + "\n".join(copy_assets(d, args.assets, args.out)) for d, text in zip(args.sweeps, sweeps, strict=True)]
    studies = load_mint_studies(args.mint_studies)
    mint_study = mint_paper_terms(studies)
    if args.assets:
        mint_study.body += copy_mint_studies(studies, args.assets, args.out)
    findings = [fd_mia(runs), fd_mia_mote(runs), dp_trend(runs), mint_study, mint(runs), gender_inference(runs),
                mote_fairness(runs)]
    command = shlex.join(["scripts/make_results.py", *map(str, args.sweeps), "--out", str(args.out),
                          *(["--assets", str(args.assets)] if args.assets else []),
                          *(["--mint-studies", *map(str, args.mint_studies)] if args.mint_studies else [])])
    atomic_write_text(args.out, render(findings, sweeps, command))
    print(f"wrote {args.out}: " + "; ".join(f"{f.title}: {f.verdict}" for f in findings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
