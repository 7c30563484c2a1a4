"""The central (non-federated) baseline: how hard is the data, and what can one model learn?

It pools every member sample, trains an identity backbone and one attribute classifier per
requested attribute, and scores them on data no model saw: open-set verification on the
probe identities (against the raw-pixel cosine baseline) and attribute accuracy on the
held-out samples. Federated runs are compared against these numbers.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from common.config import Config
from common.data.cache import build_dataset
from common.evaluation.global_model import GlobalEvaluator
from common.evaluation.verification import pixel_verification_auc
from common.nn.build import build_identity_head, build_initial_model, build_model, model_spec
from common.nn.checkpoint import save_checkpoint
from common.runs.layout import BASELINE_IDENTITY, baseline_attribute
from common.runs.rundir import RunDir
from common.split.build import build_manifest
from common.train.dp import noise_for, poisson_sample_rate, steps_per_epoch
from common.train.loop import (
    identity_classes,
    train,
)

log = logging.getLogger(__name__)

BASELINE_ATTRIBUTES = ("gender", "smiling")


@dataclass
class BaselineResult:
    run_dir: Path
    pixel_auc: float
    backbone_auc: float
    attribute_accuracy: dict[str, float]
    train_seconds: dict[str, float]

    def rows(self) -> list[tuple[str, str, str]]:
        """(metric, value, what it is measured on) rows for the printed table."""
        out = [("verification AUC, raw pixels", f"{self.pixel_auc:.4f}", "probe identities, cosine"),
               ("verification AUC, backbone", f"{self.backbone_auc:.4f}",
                f"probe identities, trained {self.train_seconds['identity']:.0f} s")]
        out += [(f"{name} accuracy", f"{acc:.4f}", f"held-out samples, trained {self.train_seconds[name]:.0f} s")
                for name, acc in self.attribute_accuracy.items()]
        return out


def run_baseline(cfg: Config, runs_root: str | Path, attributes: tuple[str, ...] = BASELINE_ATTRIBUTES,
                 progress: bool = True) -> BaselineResult:
    """Generate/load data, split it, train the central models and write a run directory."""
    run = RunDir.create(runs_root, "baseline", cfg)
    ds = build_dataset(cfg, progress=progress)
    manifest = build_manifest(cfg, ds)
    manifest.save(run.manifest_path)
    evaluator = GlobalEvaluator.from_manifest(cfg, ds, manifest)
    train_ds = evaluator.train
    run.log_metrics("data", samples=len(ds), identities=ds.num_identities, members=len(train_ds),
                    probe_samples=len(evaluator.probe), held_out=len(evaluator.held_out))

    pixel_auc = pixel_verification_auc(evaluator.probe.images, evaluator.probe.identity, seed=cfg.seed)
    seconds: dict[str, float] = {}
    q = poisson_sample_rate(len(train_ds), cfg.train.batch_size)
    sigma = noise_for(cfg.dp, q, cfg.train.epochs * steps_per_epoch(q))

    id_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, task="identity"))
    spec = model_spec(id_cfg)
    model = build_initial_model(cfg, spec)
    initial_backbone = copy.deepcopy(model.backbone.state_dict())  # the attribute models start from it too
    head = build_identity_head(spec, identity_classes(train_ds.identity)[0].size, cfg.seed + 1)
    start = time.perf_counter()
    outcome = train(model, train_ds, id_cfg.train, cfg.dp, seed=cfg.seed, epochs=cfg.train.epochs, head=head,
                    noise_multiplier=sigma, progress=progress, desc="identity backbone")
    seconds["identity"] = time.perf_counter() - start
    backbone_auc = evaluator.verification(model)
    save_checkpoint(run.checkpoint(BASELINE_IDENTITY), model.state_dict(),
                    {"task": "identity", "spec": spec.to_dict(), "steps": outcome.steps})
    run.log_metrics("identity", pixel_auc=pixel_auc, backbone_auc=backbone_auc, steps=outcome.steps,
                    seconds=seconds["identity"], samples_per_second=outcome.samples_per_second)

    accuracy: dict[str, float] = {}
    for name in attributes:
        attr_cfg = dataclasses.replace(cfg.train, task="attribute", attribute=name)
        attr_spec = dataclasses.replace(spec, attribute_head=True)
        attr_model = build_model(attr_spec, cfg.seed)
        attr_model.backbone.load_state_dict(initial_backbone)
        start = time.perf_counter()
        outcome = train(attr_model, train_ds, attr_cfg, cfg.dp, seed=cfg.seed, epochs=cfg.train.epochs,
                        noise_multiplier=sigma, progress=progress, desc=f"{name} classifier")
        seconds[name] = time.perf_counter() - start
        accuracy[name] = float(evaluator.attribute(attr_model, name)["accuracy"])
        save_checkpoint(run.checkpoint(baseline_attribute(name)), attr_model.state_dict(),
                        {"task": "attribute", "attribute": name, "spec": attr_spec.to_dict(), "steps": outcome.steps})
        run.log_metrics("attribute", attribute=name, accuracy=accuracy[name], steps=outcome.steps, seconds=seconds[name])
    log.info("baseline written to %s", run.path)
    return BaselineResult(run.path, pixel_auc, backbone_auc, accuracy, seconds)
