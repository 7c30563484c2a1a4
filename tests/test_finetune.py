"""``federation.trainable = norms``: a client's DP-SGD trains only the normalisation layers and the
heads (common/train/finetune.py). Real local rounds with Opacus' accountant, no mocks."""

from __future__ import annotations

import pytest
import torch
from sim_runs import LEDGER_FULL
from torch import nn

from client.local import local_train
from common.config import load_config
from common.nn.build import build_model, model_spec
from common.train.finetune import restrict_training
from common.train.local_round import ClientState

NORMS = ("federation.trainable=norms", "train.task=both")


def _round(*overrides: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float | int]]:
    cfg = load_config(None, [*LEDGER_FULL, "train.task=both", *overrides])
    start = build_model(model_spec(cfg), cfg.seed).state_dict()
    new, _, report = local_train(cfg, 0, 1, {k: v.clone() for k, v in start.items()}, ClientState())
    return start, new, report


@pytest.mark.timeout(120)
def test_norms_moves_only_the_norm_layers_and_the_heads_and_is_accounted_the_same() -> None:
    start, new, report = _round(*NORMS)
    model = build_model(model_spec(load_config(None, [*LEDGER_FULL, *NORMS])), 0)
    norm_names = {f"{prefix}.{name}" for prefix, m in model.named_modules() if isinstance(m, nn.GroupNorm)
                  for name, _ in m.named_parameters()}
    moved = {k for k in start if not torch.equal(start[k], new[k])}
    assert moved, "the round changed nothing"
    assert moved <= norm_names | {k for k in start if k.startswith("attribute.")}
    assert moved & norm_names and any(k.startswith("attribute.") for k in moved)
    assert any(k.startswith("backbone.") and k.endswith("conv1.weight") for k in start)  # frozen, and present
    _, _, full = _round()
    assert report["epsilon"] == pytest.approx(full["epsilon"])  # same sampling and noise: same epsilon


def test_restrict_training_counts_and_refuses_unknown_scopes() -> None:
    cfg = load_config(None, [*LEDGER_FULL, *NORMS])
    model = build_model(model_spec(cfg), 0)
    total = sum(p.numel() for p in model.parameters())
    assert restrict_training(model, "all") == total
    kept = restrict_training(model, "norms")
    assert 0 < kept < total / 10
    with pytest.raises(ValueError, match="federation.trainable"):
        restrict_training(model, "convs")
