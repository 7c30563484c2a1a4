"""Models from a configuration or a checkpoint: the same seed gives the same weights."""

from __future__ import annotations

import logging
import os

import torch

from common.config import Config
from common.nn.arcface_checkpoint import load_arcface_backbone
from common.nn.checkpoint import check_state, load_checkpoint
from common.nn.face_model import FaceModel, ModelSpec
from common.nn.heads import CosineClassifier


def model_spec(cfg: Config, attribute_head: bool | None = None) -> ModelSpec:
    """Architecture of the shared model; the attribute head exists when the task has one."""
    if attribute_head is None:
        attribute_head = cfg.train.task != "identity"
    m = cfg.model
    return ModelSpec(width=m.width, blocks=m.blocks, embedding_dim=m.embedding_dim,
                     image_size=cfg.data.image_size, dropout=m.dropout, attribute_head=attribute_head, arch=m.arch)


def build_model(spec: ModelSpec, seed: int) -> FaceModel:
    """A freshly initialised model; the same seed gives the same weights (global RNG untouched)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return FaceModel(spec)


def build_initial_model(cfg: Config, spec: ModelSpec | None = None) -> FaceModel:
    """A run's starting model: seeded, then (``model.init_checkpoint``) the user's arcface_torch
    backbone copied in, so that public pretraining and the federation fine-tune it."""
    model = build_model(spec or model_spec(cfg), cfg.seed)
    if cfg.model.init_checkpoint:
        dropped = load_arcface_backbone(model, cfg.model.init_checkpoint)
        logging.getLogger(__name__).info("model.init_checkpoint: %s loaded into the %s backbone (%d BatchNorm "
                                         "statistics dropped: GroupNorm normalises per sample)",
                                         cfg.model.init_checkpoint, model.spec.arch, dropped)
    return model


def load_model(path: str | os.PathLike[str], spec: ModelSpec | None = None) -> tuple[FaceModel, dict]:
    """A model from a checkpoint (architecture from its metadata unless ``spec`` is given), in eval mode."""
    state, meta = load_checkpoint(path)
    if spec is None:
        try:
            spec = ModelSpec.from_dict(meta["spec"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: metadata has no valid model spec ({type(exc).__name__}: {exc})") from None
    model = build_model(spec, 0)
    check_state(path, state, model.state_dict())
    model.load_state_dict(state)
    return model.eval(), meta


def build_identity_head(spec: ModelSpec, num_classes: int, seed: int) -> CosineClassifier:
    """A private identity head over ``num_classes`` local identities, seeded like the model."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return CosineClassifier(spec.embedding_dim, num_classes)
