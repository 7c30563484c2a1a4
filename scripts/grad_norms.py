"""Per-sample gradient norms of a client's first DP-SGD step, by parameter group.

Why: DP-SGD clips each sample's gradient over every trained parameter jointly, so a group whose
gradients are much larger takes nearly all of the clipping norm C and leaves the others below
the noise. This measures, at a run's initial (publicly pretrained) model and a fresh private
identity head as a client starts round 1, each sample's gradient norm over the shared
normalisation / backbone parameters, the attribute head and the identity head, on the run's
member photos (``dp.head_clip_share`` splits C between the shared parameters and the head).

    python scripts/grad_norms.py RUN_DIR [--samples 256] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.evaluation.global_model import GlobalEvaluator
from common.nn.build import build_identity_head, load_model
from common.runs.load import load_run
from common.runs.rundir import RunDir
from common.train.finetune import restrict_training
from common.train.local_round import derived_seed
from common.train.loop import identity_classes, target_labels, task_loss, to_tensor

GROUPS = {"shared backbone": "model.backbone", "shared attribute head": "model.attribute", "private identity head": "head"}


def grad_norms(run_dir: Path, samples: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """Quantiles (10%, median, 90%) of the per-sample gradient norm of each group, and of all."""
    run = RunDir(run_dir)
    cfg, ds, manifest = load_run(run)
    members = GlobalEvaluator.from_manifest(cfg, ds, manifest).train
    model = load_model(run.initial_model)[0]
    restrict_training(model, cfg.federation.trainable)
    classes, labels = identity_classes(members.identity)
    head = build_identity_head(model.spec, classes.size, derived_seed(cfg.seed, 7, 0))
    named = [("model." + n, p) for n, p in model.named_parameters() if p.requires_grad] + [("head.weight", head.weight)]
    use_attr = cfg.train.task != "identity" and model.attribute is not None
    y_attr = torch.from_numpy(target_labels(members, cfg.train.attribute)) if use_attr else None
    pick = np.random.default_rng(seed).choice(len(members), min(samples, len(members)), replace=False)
    model.eval()
    rows = []
    for i in pick.tolist():
        x = to_tensor(torch.from_numpy(members.images[i:i + 1]).permute(0, 3, 1, 2).contiguous())
        feats, attr = model(x)
        y = torch.tensor([labels[i]])
        loss = task_loss(head(feats), attr if use_attr else None, y, y_attr[i:i + 1] if use_attr else y, cfg.train)
        grads = torch.autograd.grad(loss.sum(), [p for _, p in named], allow_unused=True)
        rows.append({g: float(torch.sqrt(sum((gr.pow(2).sum() for (n, _), gr in zip(named, grads, strict=True)
                                               if gr is not None and n.startswith(prefix)), torch.tensor(0.0))))
                     for g, prefix in GROUPS.items()})
    out = {}
    for g in [*GROUPS, "all"]:
        v = np.array([np.sqrt(sum(r[k] ** 2 for k in GROUPS)) if g == "all" else r[g] for r in rows])
        out[g] = {"p10": float(np.quantile(v, 0.1)), "median": float(np.median(v)), "p90": float(np.quantile(v, 0.9))}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--json", type=Path, help="also write the quantiles here")
    args = parser.parse_args()
    result = grad_norms(args.run_dir, args.samples)
    for group, q in result.items():
        print(f"{group:24s} median {q['median']:9.3f}   10% {q['p10']:9.3f}   90% {q['p90']:9.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
