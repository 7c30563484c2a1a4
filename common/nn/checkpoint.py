"""Checkpoints as safetensors with JSON metadata, written atomically, never unpickled.

A pickle-based ``torch.save`` file can execute code when loaded, and checkpoints travel between
consortium members, so every checkpoint is a safetensors file whose header carries the JSON
metadata (round, task, architecture) under the key ``facefl``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from common.runs.io import atomic_write_bytes

_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write tensors + metadata atomically (temp file + rename)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    blob = save(tensors, metadata={"facefl": json.dumps(metadata, sort_keys=True)})
    return atomic_write_bytes(path, blob)


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by ``save_checkpoint``; refuse anything else, naming the file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: checkpoint not found")
    try:
        with safe_open(str(p), framework="pt") as fh:
            raw = (fh.metadata() or {}).get("facefl")
        state = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as exc:
        # Only a file safetensors rejects is checked for pickle magic: a valid header length can
        # start with the same byte as a pickle.
        with open(p, "rb") as fh:
            if fh.read(4).startswith(_PICKLE_MAGIC):
                raise ValueError(f"{p}: looks like a pickle / torch.save file; refusing to unpickle "
                                 "(facefl reads safetensors checkpoints only)") from None
        raise ValueError(f"{p}: not a valid safetensors checkpoint ({exc})") from None
    if raw is None:
        raise ValueError(f"{p}: safetensors file has no 'facefl' metadata")
    try:
        metadata = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # bad JSON, a 4300-digit integer, deep nesting
        raise ValueError(f"{p}: corrupt 'facefl' metadata ({str(exc)[:200]})") from None
    if not isinstance(metadata, dict):
        raise ValueError(f"{p}: 'facefl' metadata must be a JSON object, got {type(metadata).__name__}")
    return state, metadata


def check_state(path: str | os.PathLike[str], state: Mapping[str, torch.Tensor],
                reference: Mapping[str, torch.Tensor]) -> None:
    """Raise ValueError naming ``path`` and the tensor unless ``state`` has exactly the keys,
    shapes and dtypes of ``reference`` (e.g. the ``state_dict()`` of the model it is meant for).

    ``load_state_dict`` would raise a RuntimeError for a wrong shape and silently cast a wrong
    dtype; a checkpoint is untrusted input and gets a ValueError like any other.
    """
    if set(state) != set(reference):
        missing, extra = sorted(set(reference) - set(state)), sorted(set(state) - set(reference))
        raise ValueError(f"{path}: tensors do not match the model (missing {missing[:3]}, unexpected {extra[:3]})")
    for key, ref in reference.items():
        got = state[key]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            raise ValueError(f"{path}: tensor {key!r} is {got.dtype} {tuple(got.shape)}, expected "
                             f"{ref.dtype} {tuple(ref.shape)}")
