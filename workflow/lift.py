"""What the federation taught the model: open-set verification before and after it, and the
central non-DP upper bound on the same data.

Public pretraining is free of privacy cost, so a federated run is only worth its epsilon by what it
adds on top: the verification AUC of the final global model minus that of the initial (pretrained)
one, on the same probe identities and the same pairs, with a paired bootstrap interval over
identities (``pair_auc_difference``). The upper bound is the initial model trained
centrally without DP on the pooled member data for as many passes as the federation made (rounds
x local epochs): what the members' data could teach without federation or DP. Written to
``evaluation/lift.json`` with the pair scores behind every number in ``evaluation/lift.npz``
(docs/architecture.md, the run directory).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from common.config import DPConfig
from common.evaluation.global_model import GlobalEvaluator
from common.evaluation.verification import cosine_pair_scores, pair_auc_difference, verification_pairs
from common.he.checkpoints import load_final_model
from common.nn.build import build_identity_head, load_model
from common.nn.face_model import FaceModel
from common.runs.io import atomic_save_npz, atomic_write_json
from common.runs.load import load_run
from common.runs.rundir import RunDir
from common.train.loop import embed, identity_classes, train
from common.train.pretraining import full_recipe

MODELS = ("initial", "final", "central")


def central_upper_bound(initial: FaceModel, evaluator: GlobalEvaluator, epochs: int, seed: int) -> FaceModel:
    """A copy of ``initial`` trained centrally, without DP, on the pooled member data, every
    parameter by public pretraining's recipe (``full_recipe``)."""
    cfg = evaluator.cfg
    model = copy.deepcopy(initial)
    members = evaluator.train
    head = build_identity_head(model.spec, identity_classes(members.identity)[0].size, seed)
    task = cfg.train.task if model.attribute is not None else "identity"
    train(model, members, full_recipe(cfg, task), DPConfig(mode="off"),
          seed=seed, epochs=epochs, head=head, desc="central non-DP upper bound")
    return model


def federation_lift(run_dir: str | Path, n_boot: int = 1000) -> dict[str, Any]:
    """Compute, write and return the lift of a finished run (see the module docstring)."""
    run = RunDir(run_dir)
    cfg, ds, manifest = load_run(run)
    evaluator = GlobalEvaluator.from_manifest(cfg, ds, manifest)
    initial = load_model(run.initial_model)[0]
    final = load_final_model(run)
    passes = cfg.federation.rounds * cfg.federation.local_epochs
    central = central_upper_bound(initial, evaluator, passes, cfg.seed)
    probe = evaluator.probe
    i, j, genuine = verification_pairs(probe.identity, cfg.seed)
    scores = {name: cosine_pair_scores(embed(m, probe.images), i, j)
              for name, m in zip(MODELS, (initial, final, central), strict=True)}

    def difference(a: str, b: str) -> dict[str, Any]:
        return pair_auc_difference(scores[a], scores[b], genuine, i, j, probe.identity, cfg.seed, n_boot)

    lift, headroom = difference("final", "initial"), difference("central", "final")
    out = {"verification_auc": {"initial": lift["auc_b"], "final": lift["auc_a"], "central": headroom["auc_a"]},
           "lift": {k: lift[k] for k in ("difference", "ci95", "n_boot")},
           "central_minus_final": {k: headroom[k] for k in ("difference", "ci95", "n_boot")},
           "probe_identities": lift["identities"], "pairs": lift["pairs"], "seed": cfg.seed,
           "central_epochs": passes, "pretrain_condition": cfg.pretrain.condition,
           "test": "paired bootstrap over probe identities (pairs weighted by how often their identities are drawn)"}
    run.evaluation.mkdir(exist_ok=True)
    atomic_save_npz(run.lift_pairs_path, sample_ids=probe.sample_ids, identity=probe.identity, pair_i=i, pair_j=j,
                    genuine=genuine, **{f"score_{name}": s for name, s in scores.items()})
    atomic_write_json(run.lift_path, out)
    return out


def lift_line(lift: dict[str, Any]) -> str:
    """One line for a table or the demo: before -> after (lift [95% CI]); central upper bound."""
    auc, d = lift["verification_auc"], lift["lift"]
    lo, hi = d["ci95"]
    return (f"{auc['initial']:.3f} -> {auc['final']:.3f} (lift {d['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}]); "
            f"central non-DP {auc['central']:.3f}")

