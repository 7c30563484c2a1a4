"""``facefl sweep``: every combination of a grid of configuration values x seeds, each trained,
decrypted (HE), evaluated (MOTE), audited and reported, then tabulated and plotted against epsilon.

``DIR/sweep.json`` is the index: each (combination, seed) -> its overrides, run directory, state
(running / finished / failed) and error, plus every command that worked on the sweep. A re-run
skips finished entries, resumes a run whose training finished at its first missing stage, and
retries failed ones; a grid extended with new values only runs the new combinations. A failed
combination is recorded and the sweep goes on. Seeds are explicit: seed i of ``--seeds K`` is the
base configuration's seed + i.

``dp.target_epsilon=inf`` means "no DP": such a combination runs with ``dp.mode=off`` (the config
refuses an infinite target with DP on unless ``dp.noise_multiplier`` > 0 is given, in which case
DP-SGD runs with that noise). Its epsilon is reported as inf and drawn at a labelled end of the
epsilon axis.

With ``fairness.method`` in the grid, each finished ``none`` run is audited once more with its fair
twin (the same combination and seed with the first other method of the grid): FD-MIA on the pair.

Outputs: ``DIR/runs/`` (run directories, each with report.html), ``DIR/sweep.csv`` (one row per
entry), ``DIR/plots/*.png`` (mean over seeds with the min-max band).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import itertools
import logging
import math
import re
import shlex
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.config import ConfigError, load_config
from common.runs import layout
from common.runs.io import atomic_path, atomic_write_json, atomic_write_text, read_json
from common.runs.records import BALANCED_GALLERY, TEMPLATES
from common.runs.results import RunResults
from common.runs.rundir import RunDir
from workflow.pipeline import (
    QUICK_MAX_PER_CLASS,
    QUICK_OVERRIDES,
    Stages,
    complete_run,
    run_pipeline,
)

if TYPE_CHECKING:
    from attacks.audit import AuditSettings

log = logging.getLogger(__name__)

EPSILON_KEY = "dp.target_epsilon"
FAIRNESS_KEY = "fairness.method"
DEFAULT_REFERENCES = 8
INDEX_VERSION = 1


def parse_grid(items: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """``["dp.target_epsilon=1,4,inf", ...]`` -> {key: values}. Values are split on ``;`` when the
    item has one (for tuple-valued keys: ``model.blocks=1,1;2,2``), else on ``,``."""
    from common.config import Config

    known = set(Config().to_flat())
    grid: dict[str, tuple[str, ...]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        values = tuple(v.strip() for v in raw.split(";" if ";" in raw else ","))
        if not sep or not key or not all(values):
            raise ConfigError(f"--grid {item!r}: expected KEY=V1,V2,... e.g. dp.target_epsilon=1,4,inf")
        if key == "seed":
            raise ConfigError("--grid seed=...: seeds come from --seeds K (seed + 0 .. K-1)")
        if key not in known:
            raise ConfigError(f"--grid {key}: unknown configuration key (see common/config.py)")
        if key in grid:
            raise ConfigError(f"--grid {key}: given twice")
        if len(set(values)) != len(values):
            raise ConfigError(f"--grid {item!r}: a value is repeated")
        grid[key] = values
    if not grid:
        raise ConfigError("--grid: at least one KEY=V1,V2,... is needed")
    return grid


def entry_id(combination: dict[str, str], seed: int) -> str:
    """The index key of one run: the combination in key order, then the seed."""
    return " ".join(f"{k}={combination[k]}" for k in sorted(combination)) + f" seed={seed}"


def _is_inf(value: str) -> bool:
    try:
        return math.isinf(float(value))
    except ValueError:
        return False


def run_overrides(combination: dict[str, str], seed: int, base_noise: float) -> list[str]:
    """The configuration overrides of one entry; an infinite target epsilon without an explicit
    noise multiplier turns DP off (no guarantee) instead of failing validation."""
    out = [f"{k}={v}" for k, v in combination.items()] + [f"seed={seed}"]
    noise = combination.get("dp.noise_multiplier", str(base_noise))
    if _is_inf(combination.get(EPSILON_KEY, "")) and not float(noise) > 0:
        out.append("dp.mode=off")
    return out


def command_line(config: Path | None, grid_items: Sequence[str], seeds: int, quick: bool, references: int,
                 out: Path, he_keys: Path | None) -> str:
    """The ``facefl sweep`` command that these arguments spell (recorded in sweep.json)."""
    argv = ["facefl", "sweep", *([str(config)] if config else [])]
    for item in grid_items:
        argv += ["--grid", item]
    argv += ["--seeds", str(seeds), *(["--quick"] if quick else []), "--references", str(references),
             "--out", str(out), *(["--he-keys", str(he_keys)] if he_keys else [])]
    return shlex.join(argv)


@dataclass
class SweepResult:
    directory: Path
    entries: dict[str, dict[str, Any]]
    rows: list[dict[str, Any]]
    csv: Path
    plots: list[Path]
    ran: int  # entries trained or completed in this invocation (not skipped)

    @property
    def failed(self) -> list[str]:
        return [k for k, e in self.entries.items() if e["state"] != "finished"]


class SweepIndex:
    """``DIR/sweep.json``, saved atomically after every change of state."""

    def __init__(self, path: Path, base: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {"version": INDEX_VERSION, "base": base, "commands": [], "runs": {}}
        if path.exists():
            old = read_json(path)
            if old.get("base") != base:
                raise ValueError(f"{path}: this sweep was made with another base configuration {old.get('base')}, "
                                 f"not {base}; use another --out directory")
            self.data = old

    @property
    def runs(self) -> dict[str, dict[str, Any]]:
        return self.data["runs"]

    def save(self) -> None:
        atomic_write_json(self.path, self.data)


def _base(config: Path | None, quick: bool, references: int, he_keys: Path | None) -> dict[str, Any]:
    """What every entry of a sweep shares; a re-run with another base is refused."""
    digest = hashlib.sha256(config.read_bytes()).hexdigest() if config else None
    return {"config": str(config.resolve()) if config else None, "config_sha256": digest, "quick": quick,
            "references": references, "he_keys": str(he_keys.resolve()) if he_keys else None}


def run_sweep(out: Path, grid: dict[str, tuple[str, ...]], seeds: int, config: Path | None = None,
              quick: bool = False, references: int = DEFAULT_REFERENCES, he_keys: Path | None = None,
              progress: bool = True, command: str | None = None) -> SweepResult:
    """Run (or resume) the sweep in ``out``; write sweep.json, sweep.csv and the plots."""
    if seeds < 1:
        raise ConfigError(f"--seeds: expected >= 1, got {seeds}")
    if references < 4 or references % 2:  # each sample is IN for half of them; LiRA needs two IN scores
        raise ConfigError(f"--references: expected an even number >= 4, got {references}")
    if config is not None and not config.is_file():
        raise ConfigError(f"{config}: configuration file not found")
    base_overrides = list(QUICK_OVERRIDES if quick else ())
    base_cfg = load_config(config, base_overrides)
    index = SweepIndex(out / layout.SWEEP_INDEX, _base(config, quick, references, he_keys))
    if command:
        index.data["commands"].append(command)
    out.mkdir(parents=True, exist_ok=True)
    index.save()
    he = []
    secret = None
    if he_keys is not None:
        from common.he.keys import SECRET_FILE, he_overrides

        he, secret = he_overrides(he_keys), he_keys / SECRET_FILE
    combos = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    todo = [(c, base_cfg.seed + i) for c in combos for i in range(seeds)]
    ran = 0
    for n, (combination, seed) in enumerate(todo, 1):
        eid = entry_id(combination, seed)
        entry = index.runs.get(eid)
        if entry is not None and entry["state"] == "finished" and Path(entry["run_dir"]).is_dir():
            log.info("sweep: %s already finished (%s)", eid, entry["run_dir"])
            Stages(progress).say(f"[{n}/{len(todo)}] {eid}: finished earlier, skipped")
            continue
        ran += 1
        overrides = run_overrides(combination, seed, base_cfg.dp.noise_multiplier)
        previous = entry.get("run_dir") if entry else None
        entry = {"combination": combination, "seed": seed, "overrides": overrides, "state": "running",
                 "run_dir": previous, "error": None, "fair_twin": None, "seconds": None}
        index.runs[eid] = entry
        index.save()
        stages = Stages(progress)
        stages.say(f"[{n}/{len(todo)}] {eid}")
        start = time.perf_counter()
        settings = _audit_settings(references, quick, seed, progress)
        try:
            if previous and RunDir(previous).load_status().finished:
                complete_run(Path(previous), settings, stages, secret)  # resume at the first missing stage
            else:
                cfg = load_config(config, [*base_overrides, *he, *overrides])
                result = run_pipeline(cfg, out / layout.SWEEP_RUNS, "run", settings, stages, he_secret=secret,
                                      on_trained=functools.partial(_record_run_dir, index, entry))
                if result.report is None:
                    raise RuntimeError(f"training {result.status['status']}: "
                                       f"{result.status.get('error', 'no reason recorded')}")
            entry["state"] = "finished"
        except Exception as exc:
            log.debug("sweep: %s failed", eid, exc_info=True)
            entry["state"], entry["error"] = "failed", f"{type(exc).__name__}: {exc}"
            stages.say(f"[{n}/{len(todo)}] {eid}: FAILED ({entry['error']}); the sweep goes on")
        entry["seconds"] = round(time.perf_counter() - start, 1)
        index.save()
    if FAIRNESS_KEY in grid:
        ran += _pair_fair_twins(index, grid[FAIRNESS_KEY], references, quick, secret, progress)
    results = finished_results(index.runs)
    rows = sweep_rows(index.runs, results)
    grid_keys = list(dict.fromkeys(k for e in index.runs.values() for k in e["combination"]))
    csv_path = write_csv(out / layout.SWEEP_CSV, rows, grid_keys)
    plots = write_plots(out / layout.SWEEP_PLOTS, rows, grid_keys, plotted_attacks(results.values()))
    return SweepResult(out, index.runs, rows, csv_path, plots, ran)


def _audit_settings(references: int, quick: bool, seed: int, progress: bool) -> AuditSettings:
    from attacks.audit import AuditSettings

    full = AuditSettings(references=references, seed=seed, progress=progress)  # as many as the run allows
    return dataclasses.replace(full, max_per_class=QUICK_MAX_PER_CLASS) if quick else full


def _record_run_dir(index: SweepIndex, entry: dict[str, Any], run: RunDir) -> None:
    """Training ended: record where, so that an interrupted audit resumes there instead of retraining."""
    entry["run_dir"] = str(run.path)
    index.save()


def fair_twins(entries: dict[str, dict[str, Any]], methods: Sequence[str]) -> dict[str, str]:
    """{unmitigated entry: its fair twin}: each finished ``fairness.method=none`` entry with the
    same combination and seed under the first other method of ``methods`` that finished."""
    out = {}
    for eid, entry in entries.items():
        combo = entry["combination"]
        if entry["state"] != "finished" or combo.get(FAIRNESS_KEY) != "none":
            continue
        twin = next((t for m in methods if m != "none"
                     if (t := entry_id({**combo, FAIRNESS_KEY: m}, entry["seed"])) in entries
                     and entries[t]["state"] == "finished"), None)
        if twin is not None:
            out[eid] = twin
    return out


def _pair_fair_twins(index: SweepIndex, methods: tuple[str, ...], references: int, quick: bool,
                     secret: Path | None, progress: bool) -> int:
    """Re-audit each unmitigated run with its fair twin (FD-MIA on the pair), once per pairing."""
    done = 0
    for eid, twin in fair_twins(index.runs, methods).items():
        entry = index.runs[eid]
        if entry.get("fair_twin") == twin:
            continue
        done += 1
        settings = _audit_settings(references, quick, entry["seed"], progress)
        try:
            complete_run(Path(entry["run_dir"]), settings, Stages(progress), secret,
                         fair_dir=Path(index.runs[twin]["run_dir"]))
            entry["fair_twin"] = twin
        except Exception as exc:  # the plain audit stays; the pair's failure is recorded
            log.warning("sweep: FD-MIA audit of %s with %s failed", eid, twin, exc_info=True)
            entry["error"] = f"FD-MIA with {twin}: {exc}"
        index.save()
    return done


def finished_results(entries: dict[str, dict[str, Any]]) -> dict[str, RunResults]:
    """The results of every finished entry whose run directory exists, by entry."""
    return {eid: RunResults.load(e["run_dir"]) for eid, e in entries.items()
            if e["state"] == "finished" and e.get("run_dir") and Path(e["run_dir"]).is_dir()}


def sweep_rows(entries: dict[str, dict[str, Any]],
               results: Mapping[str, RunResults] | None = None) -> list[dict[str, Any]]:
    """One row per entry: the grid values, seed, state, error, run dir and the run's headline numbers
    (``results``: the finished entries' results, when already loaded)."""
    results = finished_results(entries) if results is None else results
    rows = []
    for eid, e in entries.items():
        row: dict[str, Any] = {"entry": eid, **e["combination"], "seed": e["seed"], "state": e["state"],
                               "error": e.get("error") or "", "run_dir": e.get("run_dir") or "",
                               "seconds": e.get("seconds"), "fair_twin": e.get("fair_twin") or ""}
        if eid in results:
            row.update(results[eid].headline())
            row["state"] = e["state"]  # headline's "status" is the training status; keep both
        rows.append(row)
    return rows


def plotted_attacks(results: Iterable[RunResults]) -> dict[str, str | None]:
    """{``name @ target``: the FPR key of its headline TPR (the lowest target FPR every run's audit
    resolves for it; None: no TPR is plotted)} of every per-run attack of the runs; attacks on one
    client's update are per client, in sweep.csv only."""
    resolved: dict[str, list[str]] = {}
    for r in results:
        for a in r.attacks(include_updates=False):
            keys = [k for k in r.audit.fpr_keys if a.resolves(k)]
            resolved[a.label] = [k for k in resolved.get(a.label, keys) if k in keys]
    return {label: keys[0] if keys else None for label, keys in resolved.items()}


def summary_rows(rows: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """The printed sweep table: each entry's state, accounted and best empirical epsilon, utility and
    its strongest attack."""
    from common.report.html import fmt

    out = []
    for r in rows:
        aucs = {k[len("auc: "):]: v for k, v in r.items() if k.startswith("auc: ") and math.isfinite(_num(v))}
        best = max(aucs, key=aucs.__getitem__, default=None)
        out.append((r["entry"], r["state"], fmt(r.get("epsilon")), fmt(r.get("empirical_epsilon"), 2),
                    fmt(r.get("verification_auc")),
                    fmt(r.get("attribute_accuracy")), f"{best} ({fmt(aucs[best])})" if best else "-",
                    r["error"] or "-"))
    return out


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return "inf" if math.isinf(v) and v > 0 else repr(v)
    return str(v)


def write_csv(path: Path, rows: list[dict[str, Any]], grid_keys: list[str]) -> Path:
    """sweep.csv: the fixed columns first, then every other column in order of first appearance."""
    first = ["entry", *grid_keys, "seed", "state", "error", "status", "epsilon"]
    columns = list(dict.fromkeys(first + [k for r in rows for k in r]))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        writer.writerow([_cell(r.get(c)) for c in columns])
    return atomic_write_text(path, buf.getvalue())


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _series(rows: list[dict[str, Any]], grid_keys: list[str]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """{series label: {combination: [rows over seeds]}}: a series per value of the grid keys other
    than the epsilon key, finished rows with a known epsilon only."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in rows:
        if r.get("state") != "finished" or math.isnan(_num(r.get("epsilon"))):
            continue
        label = ", ".join(f"{k}={r[k]}" for k in grid_keys if k != EPSILON_KEY and k in r) or "all runs"
        combo = " ".join(f"{k}={r[k]}" for k in grid_keys if k in r)
        out.setdefault(label, {}).setdefault(combo, []).append(r)
    return out


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def plot_vs_epsilon(rows: list[dict[str, Any]], grid_keys: list[str], panels: Sequence[tuple[str, str]], path: Path,
                    title: str, diagonal: str | None = None) -> Path | None:
    """One panel per (column, label) with data: mean over seeds against epsilon, with the min-max
    band and error bars; infinite epsilon (no DP) at the right end of the axis, labelled. ``diagonal``
    labels a y = x line over the finite epsilons (where the y values are epsilons too)."""
    series = _series(rows, grid_keys)
    panels = [(c, label) for c, label in panels
              if any(math.isfinite(_num(r.get(c))) for s in series.values() for rs in s.values() for r in rs)]
    if not panels:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    eps = [_num(r["epsilon"]) for s in series.values() for rs in s.values() for r in rs]
    finite = sorted({e for e in eps if math.isfinite(e) and e > 0})
    x_inf = finite[-1] * 3 if finite else 1.0
    units = "/".join(sorted({str(r["epsilon_unit"]) for s in series.values() for rs in s.values()
                             for r in rs if r.get("epsilon_unit")}))
    fig = Figure(figsize=(max(6.4, 4.6 * len(panels)), 3.8))  # the suptitle fits one panel too
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (column, label) in zip(axes, panels, strict=True):
        for name, combos in series.items():
            pts = []
            for rs in combos.values():
                e = [_num(r["epsilon"]) for r in rs]
                ys = [y for y in (_num(r.get(column)) for r in rs) if math.isfinite(y)]
                if ys and all(v > 0 for v in e):  # epsilon 0 (no DP step taken) has no place on a log axis
                    x = x_inf if any(math.isinf(v) for v in e) else float(sum(e) / len(e))
                    pts.append((x, sum(ys) / len(ys), min(ys), max(ys)))
            if not pts:
                continue
            pts.sort()
            xs, mean, lo, hi = (list(t) for t in zip(*pts, strict=True))
            line = ax.errorbar(xs, mean, yerr=[[m - a for m, a in zip(mean, lo, strict=True)],
                                               [b - m for m, b in zip(mean, hi, strict=True)]],
                               marker="o", capsize=3, label=name, linestyle="none")
            color = line[0].get_color()
            finite_n = sum(x != x_inf for x in xs)  # the no-DP point is joined by a dotted line only
            ax.plot(xs[:finite_n], mean[:finite_n], color=color)
            ax.plot(xs[max(finite_n - 1, 0):], mean[max(finite_n - 1, 0):], color=color, linestyle=":")
            ax.fill_between(xs, lo, hi, alpha=0.15, color=color)
        if diagonal and finite:
            ax.plot(finite, finite, color="black", linestyle="--", linewidth=0.8, label=diagonal)
        ax.set_xscale("log")
        ticks = [*finite, x_inf] if any(math.isinf(e) for e in eps) else finite
        ax.set_xticks(ticks, [f"{t:.3g}" for t in finite] + (["∞\n(no DP)"] if len(ticks) > len(finite) else []))
        ax.minorticks_off()
        ax.set_xlabel(f"epsilon spent (largest client; per {units})" if units else "epsilon spent (largest client)")
        ax.set_title(label, fontsize="medium")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="x-small")
    fig.suptitle(f"{title} (mean over seeds; bars and band: min-max)", fontsize="medium")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def write_plots(directory: Path, rows: list[dict[str, Any]], grid_keys: list[str],
                attacks: Mapping[str, str | None]) -> list[Path]:
    """Utility, fairness, the empirical epsilon lower bound (best attack or canary audit) and each of
    ``attacks`` ({``name @ target``: FPR key or None, see ``plotted_attacks``}: AUC and TPR at that
    FPR) against the accounted epsilon."""
    made = [plot_vs_epsilon(rows, grid_keys, (("verification_auc", "verification AUC (probe identities)"),
                                   ("attribute_accuracy", "attribute accuracy (held out)")),
                            directory / layout.SWEEP_UTILITY_PLOT, "utility"),
            plot_vs_epsilon(rows, grid_keys, (("attribute_deo_sum", "DEO |dTPR|+|dFPR| (lower = fairer)"),
                                   ("attribute_bias_amplification", "bias amplification"),
                                   (f"{TEMPLATES} fdr", f"FDR, {TEMPLATES} (higher = fairer)"),
                                   (f"{BALANCED_GALLERY} fdr", f"FDR, {BALANCED_GALLERY} (higher = fairer)")),
                            directory / layout.SWEEP_FAIRNESS_PLOT, "fairness")]
    made.append(plot_vs_epsilon(rows, grid_keys, (("empirical_epsilon", "best empirical lower bound (95%)"),),
                                directory / layout.SWEEP_PRIVACY_PLOT, "empirical vs accounted epsilon",
                                diagonal="accounted = empirical"))
    for label, fpr in attacks.items():
        tpr = () if fpr is None else ((f"tpr@{fpr}: {label}", f"TPR at {float(fpr) * 100:g}% FPR"),)
        made.append(plot_vs_epsilon(rows, grid_keys, ((f"auc: {label}", "AUC"), *tpr),
                                    directory / layout.sweep_attack_plot(slug(label)), label))
    return [p for p in made if p is not None]
