"""The ``facefl`` command: argument parsing and dispatch only; the work lives in the modules."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from common.train import threads

if TYPE_CHECKING:
    from common.config import Config
    from common.runs.rundir import RunDir

log = logging.getLogger("facefl")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _images_per_identity(text: str) -> int | tuple[int, int]:
    lo, sep, hi = text.partition("-")
    try:
        return (int(lo), int(hi)) if sep else int(lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX, got {text!r}") from None


def _attack_names(text: str) -> tuple[str, ...]:
    """``--attacks a,b``: names of the registry (``attacks.registry``); unknown ones are refused here,
    before any work starts, with the list of known ones."""
    from attacks.registry import check_names

    try:
        return check_names(x.strip() for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _attacks_help() -> str:
    from attacks.registry import MOTE_ATTACKS, Output, selectable

    attribute, embedding = selectable((Output.ATTRIBUTE,)), selectable((Output.EMBEDDING,))
    return (f"attribute models: {', '.join(attribute)}; identity models: "
            f"{', '.join(a for a in embedding if a not in MOTE_ATTACKS)}; MOTE gallery pairs: "
            f"{', '.join(MOTE_ATTACKS)} (default: all that apply; FD-MIA on a --fair pair always runs)")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", type=Path, help="TOML configuration (defaults when omitted)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one configuration key, e.g. --set dp.target_epsilon=4 (repeatable)")
    p.add_argument("--out", type=Path, default=Path("runs"), help="runs directory (default: ./runs)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facefl", description="Federated, privacy-preserving face recognition "
                                     "with a privacy-leakage audit.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="generate, export and inspect face data").add_subparsers(dest="data_command",
                                                                                                  required=True)
    synth = data.add_parser("synth", help="generate SynthFaces into a data directory")
    synth.add_argument("--out", type=Path, required=True, help="output directory")
    synth.add_argument("--identities", type=int, default=300)
    synth.add_argument("--images-per-identity", type=_images_per_identity, default=10, metavar="N|MIN-MAX")
    synth.add_argument("--image-size", type=int, default=64)
    synth.add_argument("--male-fraction", type=float, default=0.5)
    synth.add_argument("--group-proportions", type=_floats, default=(0.25, 0.25, 0.25, 0.25), metavar="P1,P2,P3,P4")
    synth.add_argument("--smiling-rate", type=_floats, default=(0.5, 0.5), metavar="P_FEMALE,P_MALE",
                       help="P(smiling | gender): the task / sensitive-attribute correlation")
    synth.add_argument("--smile-visibility", type=float, default=1.0, metavar="P",
                       help="P(a smiling face shows its smile): below 1, gender fills the gap (a biased model)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--no-export", action="store_true", help="write only the npz cache, not the ImageFolder")
    synth.add_argument("--members", type=int, metavar="N",
                       help="instead of OUT/images, write N identity-disjoint ImageFolders OUT/member-00, ... (one "
                            "per consortium member, identities dealt by a --seed shuffle) and their counts in "
                            "OUT/members.json")
    synth.add_argument("--overwrite", action="store_true", help="replace existing ImageFolder exports")

    show = data.add_parser("show", help="write a labelled contact sheet of a data directory")
    show.add_argument("path", type=Path, help="data directory (from 'data synth'), npz file or ImageFolder root")
    show.add_argument("--out", type=Path, required=True, help="PNG to write")
    show.add_argument("--identities", type=int, default=12, help="rows: the first N identities (default 12)")
    show.add_argument("--per-identity", type=int, default=6,
                      help="columns: the first K images of each identity (default 6)")
    show.add_argument("--image-size", type=int, default=None,
                      help="decode an ImageFolder at this size (default: the size 'data synth' wrote it at, else "
                           "64); an npz keeps its own")

    run = sub.add_parser("run", help="run a federation on Flower's simulation engine")
    _add_config_args(run)
    run.set_defaults(out=None)  # so that --resume can tell an explicit --out from the default
    run.add_argument("--he-keys", type=Path, metavar="DIR",
                     help="encrypt updates with the keys of `facefl keys init --out DIR` (sets he.enabled); the "
                          "simulated clients use its secret context, the server its public one, and the final "
                          "model is decrypted into the run directory afterwards")
    run.add_argument("--resume", type=Path, metavar="RUN_DIR",
                     help="continue an interrupted (killed or failed) run after its last complete round, with the "
                          "configuration in RUN_DIR/config.toml (no config file, --set or --out; --he-keys again "
                          "for an HE run)")

    evaluate = sub.add_parser("evaluate", help="verification with MOTE vs templates (FNMR@FMR=1e-3, FDR, iGARBE, "
                                               "IR per gender) and the gender-inference attack on both galleries")
    evaluate.add_argument("run_dir", type=Path, help="run directory with models/final.safetensors and mote/")

    audit = sub.add_parser("audit", help="membership-inference audit of a run's final global model")
    audit.add_argument("run_dir", type=Path, help="run directory with models/final.safetensors")
    audit.add_argument("--fair", type=Path, metavar="FAIR_RUN_DIR",
                       help="the fair twin of an attribute run (same data and split, a fairness intervention): "
                            "adds the attacks on the fair model and FD-MIA on the pair")
    audit.add_argument("--attacks", type=_attack_names, default=None, metavar="NAME,...", help=_attacks_help())
    audit.add_argument("--references", type=int, default=16, help="LiRA / RMIA reference models (even, default 16)")
    audit.add_argument("--max-per-class", type=int, default=5000,
                       help="audited members and as many nonmembers, at most (default 5000: as many as the run has)")
    audit.add_argument("--reference-recipe", choices=("target", "central"), default="target",
                       help="how reference and shadow models train: 'target' (default) replays the run's own recipe "
                            "(FedAvg over its clients, rounds, DP-SGD with its noise, its fairness intervention, from "
                            "its initial model) on each reference's half; 'central' trains them centrally without DP")
    audit.add_argument("--seed", type=int, default=0)
    audit.add_argument("--vectorised", action="store_true",
                       help="train the reference models with stacked weights (one vmap); on 2 CPU cores this was "
                            "2x slower than one at a time (bench/attacks.py)")

    compare = sub.add_parser("compare", help="two audits on the same samples (e.g. a DP budget vs no DP): paired "
                             "bootstrap intervals of each shared attack's AUC and resolvable TPR differences")
    compare.add_argument("run_a", type=Path, help="audited run directory A")
    compare.add_argument("run_b", type=Path, help="audited run directory B (same data and split as A)")
    compare.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    compare.add_argument("--json", type=Path, metavar="FILE", help="also write the rows as JSON")

    keys = sub.add_parser("keys", help="CKKS keys for encrypted aggregation").add_subparsers(dest="keys_command",
                                                                                          required=True)
    init = keys.add_parser("init", help="write a secret context (clients), a public one (server) and key.json")
    init.add_argument("--out", type=Path, required=True, help="directory for the key files")
    init.add_argument("--poly-modulus", type=int, default=4096, help="CKKS polynomial modulus degree N (default 4096)")
    init.add_argument("--coeff-bits", type=_ints, default=(60, 49), metavar="B1,B2,...",
                      help="coefficient modulus bit sizes (default 60,49: one level, addition only)")
    init.add_argument("--scale-bits", type=int, default=40, help="encoding scale 2^bits (default 40)")
    decrypt = keys.add_parser("decrypt-model", help="(key holder) decrypt an HE run's final model and evaluate it")
    decrypt.add_argument("run_dir", type=Path, help="run directory of an HE run")
    decrypt.add_argument("--key", type=Path, required=True, help="secret-context.bin")

    baseline = sub.add_parser("baseline", help="train central models on the configured data and print metrics")
    _add_config_args(baseline)

    mint = sub.add_parser("mint-study", help="MINT at the paper's terms: a face recogniser trained on D, never-seen "
                                             "identities as E, MINT on >= 5,000 samples against the embedding-only "
                                             "baseline (docs/audit.md)")
    _add_config_args(mint)
    mint.add_argument("--used-identities", type=int, default=600, help="D: identities whose photos train the "
                                                                       "audited model (default 600)")
    mint.add_argument("--external-identities", type=int, default=600, help="E: identities it never sees "
                                                                           "(default 600)")

    demo = sub.add_parser("demo", help="the whole system on SynthFaces: federated training with DP-SGD and HE, MOTE, "
                                       "evaluation and audit; writes OUT/demo-<id>/report.html and prints a summary")
    demo.add_argument("--quick", action="store_true",
                      help="a tiny federation (about 30 s on 2 cores): a smoke test whose numbers sit at chance; "
                           "the tests run it")
    demo.add_argument("--out", type=Path, default=Path("runs"), help="where demo-<id>/ is created (default: ./runs)")

    sweep = sub.add_parser("sweep", help="every combination of --grid values x seeds: train, decrypt (HE), evaluate "
                                         "(MOTE), audit, report; sweep.csv and plots against epsilon; resumable")
    sweep.add_argument("config", nargs="?", type=Path, help="base TOML configuration (defaults when omitted)")
    sweep.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2,...",
                       help="values of one configuration key, e.g. dp.target_epsilon=0.5,1,2,4,8,inf (inf = DP off); "
                            "use ';' between values of tuple keys (model.blocks=1,1;2,2); repeatable: the product")
    sweep.add_argument("--seeds", type=int, default=1, help="seeds per combination: the config's seed + 0..K-1")
    sweep.add_argument("--quick", action="store_true", help="tiny federations (test-sized): their sizes override the "
                                                            "config's; the grid's values override both")
    sweep.add_argument("--references", type=int, default=None,
                       help="LiRA / RMIA reference models per audit (even; default 8, 4 with --quick)")
    sweep.add_argument("--he-keys", type=Path, metavar="DIR",
                       help="run every combination with HE (keys of `facefl keys init --out DIR`)")
    sweep.add_argument("--out", type=Path, default=Path("sweep"),
                       help="sweep directory: runs/, sweep.json, sweep.csv, plots/ (default: ./sweep)")

    report = sub.add_parser("report", help="write RUN_DIR/report.html: one self-contained page of the run's results")
    report.add_argument("run_dir", type=Path, help="run directory")
    return parser


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from common.data.datadir import MEMBERS_NAME, write_synth_dir
    from common.data.sources.synthfaces.generator import SynthConfig

    cfg = SynthConfig(num_identities=args.identities, images_per_identity=args.images_per_identity,
                      image_size=args.image_size, male_fraction=args.male_fraction,
                      group_proportions=args.group_proportions, smiling_rate=args.smiling_rate,
                      smile_visibility=args.smile_visibility, seed=args.seed)
    cfg.validate()
    start = time.perf_counter()
    ds = write_synth_dir(cfg, args.out, export_images=not args.no_export, overwrite=args.overwrite,
                         progress=not args.no_progress, members=args.members)
    split = f" ({args.members} members: {args.out / MEMBERS_NAME})" if args.members is not None else ""
    print(f"wrote {len(ds)} images of {ds.num_identities} identities to {args.out}{split} "
          f"in {time.perf_counter() - start:.1f} s (fingerprint {ds.fingerprint()[:16]})")
    return 0


def _cmd_data_show(args: argparse.Namespace) -> int:
    from common.data.contact_sheet import draw_sheet, sheet_layout
    from common.data.datadir import open_data_dir

    if args.identities < 1 or args.per_identity < 1:  # before loading a possibly large data set
        raise ValueError(f"--identities and --per-identity must be >= 1, got {args.identities}, {args.per_identity}")
    ds = open_data_dir(args.path, image_size=args.image_size)
    layout = sheet_layout(ds, max_identities=args.identities, per_identity=args.per_identity)
    out = draw_sheet(ds, layout, args.out)
    print(f"wrote {out}: {len(layout.rows)} identities, up to {layout.columns} images each")
    for note in layout.shortfall():
        print(note)
    return 0


def _cmd_baseline(args: argparse.Namespace) -> int:
    from common.config import load_config
    from common.report.tables import format_table
    from workflow.baseline import run_baseline

    cfg = load_config(args.config, args.overrides)
    result = run_baseline(cfg, args.out, progress=not args.no_progress)
    print(format_table(("metric", "value", "measured on"), result.rows()))
    print(f"run directory: {result.run_dir}")
    return 0


def _cmd_mint_study(args: argparse.Namespace) -> int:
    from common.config import load_config
    from common.report.tables import format_table
    from workflow.mint_study import StudyDesign, run_mint_study, study_rows

    cfg = load_config(args.config, args.overrides)
    design = StudyDesign(used_identities=args.used_identities, external_identities=args.external_identities)
    run, study = run_mint_study(cfg, args.out, design, progress=not args.no_progress)
    p, a = study["premise"], study["audited_model"]
    dp = f"DP-SGD, epsilon {a['epsilon']:.2f} {a['unit']}" if a["dp"] != "off" else "no DP"
    print(f"audited model: {a['epochs']} epochs, {dp}; identification top-1 {p['audited_train_top1']:.3f} on its "
          f"training photos vs {p['audited_held_out_top1']:.3f} held out; verification AUC on E "
          f"{p['audited_verification_auc_external']:.3f}")
    print(f"MINT trained on {p['mint_training_samples']} samples ({p['mint_training_used']} used, "
          f"{p['mint_training_external']} external; premise >= {p['min_training_samples']}: "
          f"{'met' if p['enough_samples'] else 'NOT met'}), tested on {study['test']['used']} used and "
          f"{study['test']['external']} external samples of other identities")
    print(format_table(("attack", "AUC [95% CI]", "accuracy at 0.5", "minus mint-embedding [paired 95% CI]"),
                       study_rows(study)))
    print(f"run directory: {run.path}")
    return 0


def _resume_config(args: argparse.Namespace) -> tuple[RunDir, Config]:
    """The configuration of the run ``--resume`` continues: its own config.toml, nothing else."""
    from common.config import load_config
    from common.he.keys import PUBLIC_FILE
    from common.runs.rundir import ResumeError, RunDir

    given = [name for name, value in (("a config file", args.config), ("--set", args.overrides), ("--out", args.out))
             if value]
    if given:
        raise ResumeError(f"--resume {args.resume}: a run resumes with its own config.toml; drop {', '.join(given)}")
    run = RunDir(args.resume)
    with run.lock():  # refuses a run another process is working on
        run.check_resumable()
    cfg = load_config(run.config_path)
    if cfg.he.enabled != (args.he_keys is not None):
        raise ResumeError(f"{run.config_path}: he.enabled = {str(cfg.he.enabled).lower()}: "
                          + ("pass --he-keys with the run's key directory (the clients need the secret context)"
                             if cfg.he.enabled else "drop --he-keys (the run does not encrypt)"))
    if args.he_keys is not None and (args.he_keys / PUBLIC_FILE).resolve() != Path(cfg.he.public_context).resolve():
        raise ResumeError(f"--he-keys {args.he_keys}: the run was started with he.public_context = "
                          f"{cfg.he.public_context}; resume with the same key directory")
    return run, cfg


def _cmd_run(args: argparse.Namespace) -> int:
    from common.config import load_config
    from common.he.keys import SECRET_FILE, he_overrides
    from common.report.tables import round_table, self_audit_table
    from common.runs.io import read_json
    from workflow.simulation import resume, simulate

    secret = args.he_keys / SECRET_FILE if args.he_keys is not None else None
    if args.resume is not None:
        run, cfg = _resume_config(args)
        status = resume(cfg, run, progress=not args.no_progress, he_secret=secret)
    else:
        overrides = list(args.overrides)
        if args.he_keys is not None:
            overrides += he_overrides(args.he_keys)
        cfg = load_config(args.config, overrides)
        run, status = simulate(cfg, args.out or Path("runs"), progress=not args.no_progress, he_secret=secret)
    if status["status"] == "finished" and secret is not None:
        from workflow.decryption import decrypt_run

        decrypt_run(run.path, secret)
    print(round_table(run.read_metrics(), cfg.dp.unit))
    if run.self_audit_path.is_file():
        print(self_audit_table(read_json(run.self_audit_path)))
    print(f"run directory: {run.path}")
    if status["status"] != "finished":
        print(f"facefl: error: run {status['status']}: {status.get('error', 'no reason recorded')}", file=sys.stderr)
        return 1
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from common.report.tables import format_table
    from common.runs.rundir import RunDir
    from workflow.pipeline import evaluate_run

    RunDir(args.run_dir).check_finished()
    report, header, rows = evaluate_run(args.run_dir)
    print(format_table(header, rows))
    print(f"{report.enrolled} enrolled identities, {report.probes} probe images; "
          f"written to {RunDir(args.run_dir).mote_evaluation_path}")
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from attacks.audit import AuditSettings, run_audit, summary_header, summary_rows
    from common.report.tables import format_table
    from common.runs.records import AuditReport
    from common.runs.rundir import RunDir

    RunDir(args.run_dir).check_finished()
    report = AuditReport.from_dict(run_audit(
        args.run_dir, AuditSettings(attacks=args.attacks, references=args.references, max_per_class=args.max_per_class,
                                    recipe=args.reference_recipe, seed=args.seed, vectorised=args.vectorised,
                                    progress=not args.no_progress),
        fair_dir=args.fair))
    print(format_table(summary_header(report), summary_rows(report)))
    if report.canary_audit:
        c = report.canary_audit
        print(f"one-run canary audit: epsilon >= {c['bound']['epsilon']:.2f} per image (95%, delta "
              f"{c['bound']['delta']}) from {c['bound']['correct']} of {c['bound']['guesses']} guesses right; "
              f"{c['counts']['included']} of {c['counts']['m']} canaries included")
    print(f"{report.audited['members']} members vs {report.audited['nonmembers']} nonmembers; "
          f"written to {RunDir(args.run_dir).audit}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from attacks.compare import compare_audits
    from common.report.html import fmt, with_ci
    from common.report.tables import format_table
    from common.runs.io import atomic_write_json

    rows = compare_audits(args.run_a, args.run_b, seed=args.seed)
    print(format_table(("attack (scores.npz key)", "metric", "A", "B", "A - B [95% paired CI]", "members / nonmembers"),
                       [(r["attack"], r["metric"] if r["metric"] == "auc" else f"TPR at FPR {r['metric']}",
                         fmt(r["value_a"]), fmt(r["value_b"]), with_ci(r["difference"], r["ci95"]),
                         f"{r['n_members']} / {r['n_nonmembers']}") for r in rows]))
    if args.json is not None:
        atomic_write_json(args.json, {"run_a": str(args.run_a), "run_b": str(args.run_b), "rows": rows})
        print(f"written to {args.json}")
    return 0


def _cmd_keys_init(args: argparse.Namespace) -> int:
    from common.he.keys import KeyParams, write_keys

    info = write_keys(args.out, KeyParams(args.poly_modulus, args.coeff_bits, args.scale_bits))
    print(f"wrote {args.out}/{info['secret']} (clients only, mode 0600), {args.out}/{info['public']} (server) "
          f"and key.json; fingerprint {info['fingerprint']}")
    return 0


def _cmd_keys_decrypt(args: argparse.Namespace) -> int:
    from common.report.tables import format_table
    from workflow.decryption import decrypt_run

    path, metrics = decrypt_run(args.run_dir, args.key)
    print(format_table(("metric", "value"), [(k, f"{v:.4f}") for k, v in metrics.items()]))
    print(f"wrote {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from common.report.tables import format_table
    from common.runs.results import RunResults
    from workflow.demo import demo_headline, demo_summary, run_demo
    from workflow.pipeline import StageFailed

    try:
        result = run_demo(args.out, quick=args.quick, progress=not args.no_progress)
    except StageFailed as exc:
        print(f"facefl: error: demo stage {exc} (see the report in {args.out})", file=sys.stderr)
        return 1
    run = result.pipeline.run
    results = RunResults.load(run.path)
    print(format_table(("result", "value ([a, b]: 95% bootstrap interval; AUC 0.5 = chance)"), demo_summary(results)))
    print(demo_headline(results))
    if args.quick:
        print("demo --quick is a smoke test: a federation too small to learn; its verification and attribute numbers "
              "sit at chance and mean nothing; run `facefl demo` for results")
    print(format_table(("stage", "seconds"), [(k, f"{v:.1f}") for k, v in result.timings.items()]
                       + [("total", f"{sum(result.timings.values()):.1f}")]))
    print(f"report: {result.report}\nrun directory: {run.path}")
    if result.pipeline.report is None:
        status = result.pipeline.status
        print(f"facefl: error: training {status['status']}: {status.get('error', 'no reason recorded')}", file=sys.stderr)
        return 1
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from common.report.tables import format_table
    from common.runs.layout import SWEEP_PLOTS
    from workflow.pipeline import QUICK_REFERENCES
    from workflow.sweep import (
        DEFAULT_REFERENCES,
        command_line,
        parse_grid,
        run_sweep,
        summary_rows,
    )

    grid = parse_grid(args.grid)
    references = args.references or (QUICK_REFERENCES if args.quick else DEFAULT_REFERENCES)
    command = command_line(args.config, args.grid, args.seeds, args.quick, references, args.out, args.he_keys)
    result = run_sweep(args.out, grid, args.seeds, args.config, quick=args.quick, references=references,
                       he_keys=args.he_keys, progress=not args.no_progress, command=command)
    print(format_table(("run", "state", "epsilon", "empirical eps >=", "verif. AUC", "attr. acc",
                        "strongest attack (AUC)", "error"),
                       summary_rows(result.rows)))
    print(f"{len(result.rows)} runs ({result.ran} worked on now, {len(result.failed)} failed); "
          f"{result.csv}; {len(result.plots)} plots in {args.out / SWEEP_PLOTS}")
    return 1 if result.failed else 0


def _cmd_report(args: argparse.Namespace) -> int:
    """Write the report of any run, finished or not (it shows what the run has); exit 1 when the
    run did not finish or its directory is damaged, naming why."""
    from common.report.html import write_report
    from common.runs import layout
    from common.runs.results import RunResults
    from common.runs.rundir import RunDir, RunNotFinished

    results = RunResults.load(args.run_dir)
    print(f"wrote {write_report(results)}")
    reasons = list(results.problems)
    if not results.problem_with(layout.STATUS):  # an unreadable status.json is among the problems already
        try:
            RunDir(results.path).check_finished()
        except RunNotFinished as exc:
            reasons.append(str(exc))
    for reason in reasons:
        print(f"facefl: error: {reason}", file=sys.stderr)
    return 1 if reasons else 0


_COMMANDS = {("run", None): _cmd_run, ("evaluate", None): _cmd_evaluate, ("audit", None): _cmd_audit,
             ("compare", None): _cmd_compare, ("keys", "init"): _cmd_keys_init, ("keys", "decrypt-model"): _cmd_keys_decrypt,
             ("data", "synth"): _cmd_data_synth, ("data", "show"): _cmd_data_show, ("baseline", None): _cmd_baseline,
             ("mint-study", None): _cmd_mint_study,
             ("demo", None): _cmd_demo, ("sweep", None): _cmd_sweep, ("report", None): _cmd_report}


def _quiet_libraries(verbose: int) -> None:
    """Flower logs every message at DEBUG/INFO and Opacus warns on every step: keep the CLI
    output to progress and results unless -v is given."""
    if verbose < 2:
        # Flower has its own console handler and re-sets its level in each simulation: keep its
        # records out of ours, or every message is printed twice.
        logging.getLogger("flwr").propagate = False
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning,ignore::DeprecationWarning")
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        threads.register()
        threads.wanted_threads()  # a bad FACEFL_THREADS fails here, not in the first epoch
    except ValueError as exc:
        print(f"facefl: error: {exc}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    args.no_progress = args.no_progress or not sys.stderr.isatty()  # piped: one line per stage, no \r bars
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_libraries(args.verbose)
    handler = _COMMANDS[(args.command, getattr(args, f"{args.command}_command", None))]
    try:
        return handler(args)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as exc:
        if args.verbose >= 2:
            raise
        print(f"facefl: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
