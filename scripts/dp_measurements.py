"""What DP costs: the backbone at epsilon 1, 4, 8 per unit, and MOTE at mote.dp_target_epsilon 1, 4, 8, inf.

    .venv/bin/python scripts/dp_measurements.py backbone --out runs/dp-backbone [--seeds 2] [--set KEY=VALUE ...]
    .venv/bin/python scripts/dp_measurements.py mote --out runs/dp-mote [--set KEY=VALUE ...]

``backbone``: the demo configuration without MOTE, DP off and at each epsilon for ``dp.unit =
sample`` and ``identity`` (the same epsilon value, a different unit); the final global model's
verification AUC per seed. ``mote``: the demo configuration with ``dp.reproducible_noise = true``,
so that every run has the same backbone (bit for bit) and only MOTE's DP differs; per gallery the
verification AUC and FNMR at FMR 1e-3 (``facefl evaluate``), the audit's MOTE attacks (``mote-score``,
``mote-lira``: does a photo belong to a template's references, which MOTE's DP does not protect),
and the membership of impostor records, which it does: the photos a client's gallery used as
impostors against held-out photos of the same people, scored by minus the mean logit of the
client's other models (trained impostors score lower); and, as the DP-free alternative, galleries
trained on public impostors only (``mote.impostor_population = public``). Writes ``results.json`` (every number, its
run directory and the raw scores of the impostor test) in ``--out`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from attacks.audit import AuditSettings, run_audit
from attacks.metrics import attack_metrics
from common.config import Config, load_config
from common.config.loader import preset
from common.mote.gallery import MoteGallery
from common.nn.build import load_model
from common.report.tables import format_table
from common.runs.io import atomic_write_json
from common.runs.load import load_run
from common.runs.records import AuditReport, MoteEvaluation, mote_method
from common.runs.rundir import RunDir
from common.train.loop import embed
from workflow.pipeline import evaluate_run
from workflow.simulation import simulate

EPSILONS = (1.0, 4.0, 8.0)


def _run(cfg: Config, out: Path, prefix: str) -> RunDir:
    run, status = simulate(cfg, out, prefix=prefix, progress=False)
    if status["status"] != "finished":
        raise SystemExit(f"{run.path}: {status['status']}: {status.get('error')}")
    return run


def _final_auc(run: RunDir) -> float:
    return float([e for e in run.read_metrics() if e.get("event") == "round"][-1]["verification_auc"])


def backbone(out: Path, base: str, seeds: int, extra: list[str]) -> list[dict[str, Any]]:
    rows = []
    grid = [("off", "sample", math.inf)] + [("sample", unit, eps) for unit in ("sample", "identity") for eps in EPSILONS]
    for seed in range(seeds):
        for mode, unit, eps in grid:
            cfg = load_config(None, [*preset(base), "mote.enabled=false", f"seed={seed}", f"dp.mode={mode}",
                                               f"dp.unit={unit}", f"dp.target_epsilon={eps}", *extra])
            run = _run(cfg, out, f"bb-{mode}-{unit}-{eps:g}-s{seed}")
            privacy = json.loads(run.privacy_path.read_text()) if mode != "off" else {}
            rows.append({"seed": seed, "dp": mode, "unit": unit if mode != "off" else "-", "target_epsilon": eps,
                         "epsilon": privacy.get("max_epsilon", math.inf), "verification_auc": _final_auc(run),
                         "run": str(run.path)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def impostor_membership(run: RunDir, b: float) -> dict[str, Any]:
    """IN = each client's impostor records (its member photos that are not references), OUT = the
    held-out (nonmember-role) photos of the people that client enrolled; score = minus the mean logit
    of the client's models other than the photo's own person."""
    cfg, ds, manifest = load_run(run)
    model, _ = load_model(run.final_model)
    gallery = MoteGallery.load(run.gallery(b))
    enrollment = json.loads(run.mote_enrollment_path.read_text())
    nonmember = manifest.role_mask(ds, "nonmember")
    scores, member = [], []
    for client in enrollment["per_client"]:
        ids = np.asarray(client["identities"], dtype=np.int64)
        refs = {s for sample_ids in client["references"].values() for s in sample_ids}
        own = manifest.client_indices(ds, int(client["client"]))
        records = own[~np.isin(ds.sample_ids[own], list(refs))]
        held_out = np.flatnonzero(nonmember & np.isin(ds.identity, ids))
        pos = np.concatenate([records, held_out])
        logits = gallery.subset(ids).logits(embed(model, ds.images[pos])).astype(np.float64)
        other = ds.identity[pos][:, None] != ids[None, :]
        scores.append(-(logits * other).sum(1) / other.sum(1))
        member.append(np.r_[np.ones(records.size, bool), np.zeros(held_out.size, bool)])
    s, m = np.concatenate(scores), np.concatenate(member)
    metrics = attack_metrics(s, m, None, seed=0)
    return {**{k: metrics[k] for k in ("auc", "tpr_at_fpr", "n_members", "n_nonmembers", "ci95")},
            "scores": s.tolist(), "is_member": m.astype(int).tolist()}


def mote(out: Path, base: str, extra: list[str]) -> list[dict[str, Any]]:
    rows = []
    series = [(eps, "members") for eps in (math.inf, *reversed(EPSILONS))] + [(math.inf, "public")]
    for eps, impostors in series:
        cfg = load_config(None, [*preset(base), "dp.reproducible_noise=true", f"mote.dp_target_epsilon={eps}",
                                 f"mote.impostor_population={impostors}", *extra])
        run = _run(cfg, out, f"mote-{eps:g}-{impostors}")
        evaluate_run(run.path)
        run_audit(run.path, AuditSettings(attacks=("mote-score", "mote-lira")))
        evaluation = MoteEvaluation.load(run.mote_evaluation_path)
        audit = AuditReport.load(run.audit_report_path)
        ledger = json.loads(run.privacy_path.read_text()).get("mote", {}).get("clients", {})
        for b in cfg.mote.balancing_factors:
            method = evaluation.method(mote_method(b))
            attacks = {a.name: {"auc": a.auc, "ci95": a.ci("auc"), "tpr_at_fpr": a.tpr_at_fpr}
                       for a in audit.attacks if a.balancing_factor == b}
            rows.append({"mote_target_epsilon": eps, "impostors": impostors, "balancing_factor": b,
                         "mote_epsilon": max((c["epsilon"] for c in ledger.values()), default=math.inf),
                         "verification_auc": method.get("auc"), "fnmr_at_fmr_1e-3": method.get("fnmr"),
                         "attacks": attacks, "impostor_membership": impostor_membership(run, b), "run": str(run.path)})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "impostor_membership"}), flush=True)
    return rows


def _table(kind: str, rows: list[dict[str, Any]]) -> str:
    if kind == "backbone":
        return format_table(("seed", "DP", "unit", "epsilon", "verification AUC"),
                            [(r["seed"], r["dp"], r["unit"], f"{r['epsilon']:.2f}", f"{r['verification_auc']:.4f}")
                             for r in rows])
    out = []
    for r in rows:
        imp = r["impostor_membership"]
        score = r["attacks"].get("mote-score", {})
        out.append((r["impostors"], f"{r['mote_target_epsilon']:g}", f"{r['mote_epsilon']:.2f}", r["balancing_factor"],
                    f"{r['verification_auc']:.4f}", f"{r['fnmr_at_fmr_1e-3']:.4f}",
                    f"{score.get('auc', float('nan')):.3f}", "{:.3f} [{:.3f}, {:.3f}]".format(imp["auc"], *imp["ci95"]["auc"])))
    return format_table(("impostors", "target eps", "eps (per record)", "b", "verif. AUC", "FNMR@FMR1e-3", "mote-score AUC",
                         "impostor-record AUC [95% CI]"), out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("backbone", "mote"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="demo", help="base configuration (a facefl preset; quick for a smoke test)")
    parser.add_argument("--seeds", type=int, default=1, help="backbone: seeds 0..K-1")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = (backbone(args.out, args.preset, args.seeds, args.extra) if args.kind == "backbone"
            else mote(args.out, args.preset, args.extra))
    atomic_write_json(args.out / "results.json", {"kind": args.kind, "argv": sys.argv, "rows": rows})
    print(_table(args.kind, rows))


if __name__ == "__main__":
    main()
