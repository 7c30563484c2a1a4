"""Encrypted checkpoints: what an HE server stores, and how a key holder turns them into models.

With HE on, the server never holds the plaintext global model, so its checkpoints are the
encrypted weighted sum, the plaintext share, the mask and the total sample count, in a
safetensors file (``round-XXX.he.safetensors``). A key holder (any client of the consortium)
runs ``facefl keys decrypt-model RUN_DIR --key secret-context.bin`` to write the plaintext
``final.safetensors`` into the run directory and evaluate it, so that evaluation and audits
work on HE runs exactly as on plaintext ones.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import tenseal as ts
import torch

from common.he.ckks import Ciphertexts, decrypt_mean
from common.he.keys import HEKeyError, fingerprint
from common.he.selection import EncryptionLayout
from common.nn.build import build_model, load_model
from common.nn.checkpoint import load_checkpoint, save_checkpoint
from common.nn.face_model import FaceModel, ModelSpec
from common.runs.rundir import RunDir


def save_encrypted(path: str | os.PathLike[str], payload: dict[str, np.ndarray], mask: np.ndarray,
                   metadata: dict[str, Any]) -> Path:
    """Store an encrypted aggregate (``plain``, ``ciphertext``, ``lengths``) with its mask."""
    tensors = {k: torch.from_numpy(np.ascontiguousarray(payload[k])) for k in ("plain", "ciphertext", "lengths")}
    tensors["mask"] = torch.from_numpy(mask.astype(np.uint8))
    return save_checkpoint(path, tensors, {**metadata, "encrypted": True})


def decrypt_checkpoint(path: str | os.PathLike[str], ctx: ts.Context, secret_context: str | os.PathLike[str]
                       ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The plaintext state dict of an encrypted checkpoint, and its metadata; ``ctx`` is the
    secret context loaded from ``secret_context`` (named in errors), loaded once per run."""
    state, meta = load_checkpoint(path)
    if not meta.get("encrypted"):
        raise ValueError(f"{path}: not an encrypted checkpoint")
    if meta["fingerprint"] != fingerprint(ctx):
        raise HEKeyError(f"{secret_context}: key fingerprint {fingerprint(ctx)[:16]}... is not the run's "
                         f"{str(meta['fingerprint'])[:16]}...: this is not the consortium's secret key")
    template = build_model(ModelSpec.from_dict(meta["spec"]), 0).state_dict()
    layout = EncryptionLayout.for_state({k: v.numpy() for k, v in template.items()}, state["mask"].numpy())
    ct = Ciphertexts(state["ciphertext"].numpy(), state["lengths"].numpy())
    mean = decrypt_mean(ctx, ct, layout.n_encrypted, int(meta["total_weight"]), str(path))
    arrays = layout.merge(mean, state["plain"].numpy().astype(np.float64))
    return {k: torch.from_numpy(v) for k, v in arrays.items()}, meta


def load_final_model(run: RunDir) -> FaceModel:
    """The run's plaintext final model; for an HE run that nobody decrypted yet, says how to."""
    path = run.final_model
    if not path.exists():
        hint = (" (the run is encrypted: a key holder must first run `facefl keys decrypt-model`)"
                if run.final_encrypted.exists() else "")
        raise FileNotFoundError(f"{path}: no plaintext final model{hint}")
    return load_model(path)[0]
