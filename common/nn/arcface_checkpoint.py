"""Start an IResNet from a user's arcface_torch backbone checkpoint.

arcface_torch saves the backbone's ``state_dict`` (``model.pt``; keys such as ``conv1.weight``,
``layer1.0.bn1.running_mean``, ``fc.weight``, ``features.bias``), sometimes with DistributedDataParallel's
``module.`` prefix. ``common.nn.iresnet`` keeps its attribute names with GroupNorm in place of
BatchNorm, so the mapping is one to one, with one documented loss: BatchNorm's affine parameters
(weight, bias) become the GroupNorm's, but its running statistics (mean, variance, batch count)
describe a normalisation over the batch that GroupNorm, normalising each sample by its own
groups, does not do. They are dropped and counted; fine-tuning (public pretraining, then the
federation) adapts the network to per-sample normalisation.

The file is untrusted input: ``torch.load(weights_only=True)`` (no pickled code) or safetensors,
and every key and shape is checked against the model before anything is copied.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from common.nn.face_model import FaceModel

BATCHNORM_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def read_state(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, ``module.`` prefixes removed; a clear error for anything else."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model.init_checkpoint: {p}: no such file")
    try:
        state = load_file(str(p)) if p.suffix == ".safetensors" else torch.load(p, map_location="cpu",
                                                                                  weights_only=True)
    except Exception as exc:  # torch and safetensors raise many types for a bad file
        raise ValueError(f"model.init_checkpoint: {p}: not a readable checkpoint ({type(exc).__name__}: "
                         f"{str(exc)[:200]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"model.init_checkpoint: {p}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_arcface_backbone(model: FaceModel, path: str | os.PathLike[str]) -> int:
    """Copy an arcface_torch backbone checkpoint into ``model.backbone``; return how many
    BatchNorm statistics were dropped. Refuses, naming the key, a tensor the backbone lacks, one
    of another shape, and a backbone tensor the file lacks."""
    state = read_state(path)
    own = model.backbone.state_dict()
    dropped = 0
    chosen: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.rsplit(".", 1)[-1] in BATCHNORM_STATISTICS:
            dropped += 1
            continue
        if key not in own:
            raise ValueError(f"model.init_checkpoint: {path}: key {key!r} has no place in a {model.spec.arch} "
                             f"backbone (expected arcface_torch's key layout)")
        if value.shape != own[key].shape:
            raise ValueError(f"model.init_checkpoint: {path}: key {key!r} has shape {tuple(value.shape)}, a "
                             f"{model.spec.arch} at {model.spec.image_size} px with a {model.spec.embedding_dim}-d "
                             f"embedding needs {tuple(own[key].shape)}")
        if not value.is_floating_point():
            raise ValueError(f"model.init_checkpoint: {path}: key {key!r} is {value.dtype}, expected floating point")
        chosen[key] = value.to(own[key].dtype)
    missing = sorted(set(own) - set(chosen))
    if missing:
        raise ValueError(f"model.init_checkpoint: {path}: no tensor for {len(missing)} backbone key(s), first "
                         f"{missing[:3]} (expected a {model.spec.arch} checkpoint)")
    model.backbone.load_state_dict(chosen)
    return dropped
