"""The key holder's step of an HE run: decrypt every round's encrypted checkpoint,
write the plaintext final model and evaluate each round (the server could not). A per-member run
needs only the final model: its members evaluated every round's model themselves."""

from __future__ import annotations

import os
from pathlib import Path

from common.config import load_config
from common.evaluation.global_model import GlobalEvaluator
from common.he.checkpoints import decrypt_checkpoint
from common.he.keys import load_secret_context
from common.nn.build import build_model
from common.nn.checkpoint import save_checkpoint
from common.nn.face_model import ModelSpec
from common.runs.load import load_run
from common.runs.rundir import RunDir


def decrypt_run(run_dir: str | os.PathLike[str], secret_context: str | os.PathLike[str]) -> tuple[Path, dict[str, float]]:
    """Decrypt the run's final model into ``models/final.safetensors`` and evaluate it.

    Each earlier round's global model is decrypted in memory and evaluated too: the server could
    not measure them, and without them an HE run would have no learning curve. One "decrypted"
    event per round is logged, the final model's last.
    """
    run = RunDir(run_dir)
    source = run.final_encrypted
    ctx = load_secret_context(secret_context)
    state, meta = decrypt_checkpoint(source, ctx, secret_context)
    plain_meta = {k: v for k, v in meta.items() if k not in ("encrypted", "total_weight", "fingerprint")}
    out = save_checkpoint(run.final_model, state, {**plain_meta, "decrypted_from": source.name})
    if load_config(run.config_path).data.layout == "per-member":  # the members evaluated every round themselves
        run.log_metrics("decrypted", round=meta["round"])
        return out, {}
    cfg, ds, manifest = load_run(run)
    evaluator = GlobalEvaluator.from_manifest(cfg, ds, manifest)
    model = build_model(ModelSpec.from_dict(meta["spec"]), cfg.seed)
    for r in range(1, int(meta["round"])):
        checkpoint = run.round_checkpoint(r, encrypted=True)
        if checkpoint.exists():  # a run resumed from an older facefl may lack some
            model.load_state_dict(decrypt_checkpoint(checkpoint, ctx, secret_context)[0])
            run.log_metrics("decrypted", round=r, **evaluator.evaluate(model))
    model.load_state_dict(state)
    metrics = evaluator.evaluate(model)
    run.log_metrics("decrypted", round=meta["round"], **metrics)
    return out, metrics


