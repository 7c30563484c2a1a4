"""Identity margin heads (ArcFace, CosFace) and the binary attribute head.

The identity head is split in two: ``CosineClassifier`` (the only part with parameters, a pure
function of the embedding, so Opacus can compute its per-sample gradients) and
``margin_logits`` (parameter-free, needs the labels). Identity heads stay private on their
client; the attribute head is shared.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MARGINS = ("arcface", "cosface")


class CosineClassifier(nn.Module):
    """Cosine similarity between the embedding and one learned centre per identity."""

    def __init__(self, embedding_dim: int, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(embedding, dim=1), F.normalize(self.weight, dim=1))


def margin_logits(cosine: torch.Tensor, labels: torch.Tensor, kind: str = "arcface",
                  scale: float = 30.0, margin: float | None = None) -> torch.Tensor:
    """Scaled logits with the additive margin applied to the true class.

    ArcFace (Deng et al., CVPR 2019): cos(theta + m), m = 0.5 by default, with the usual
    fallback cos(theta) - m*sin(m) past theta > pi - m so the logit stays monotonic.
    CosFace (Wang et al., CVPR 2018): cos(theta) - m, m = 0.35 by default.
    """
    if kind not in MARGINS:
        raise ValueError(f"margin kind must be one of {MARGINS}, got {kind!r}")
    one_hot = F.one_hot(labels, cosine.shape[1]).to(cosine.dtype)
    if kind == "cosface":
        m = 0.35 if margin is None else margin
        target = cosine - m
    else:
        m = 0.5 if margin is None else margin
        cos_c = cosine.clamp(-1 + 1e-6, 1 - 1e-6)
        sin_c = torch.sqrt(1.0 - cos_c**2)
        target = cos_c * math.cos(m) - sin_c * math.sin(m)
        target = torch.where(cos_c > math.cos(math.pi - m), target, cos_c - m * math.sin(m))
    return scale * (one_hot * target + (1.0 - one_hot) * cosine)


class AttributeHead(nn.Module):
    """Binary attribute classifier (e.g. smiling) on the unnormalised embedding: one logit."""

    def __init__(self, embedding_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(embedding_dim, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features).squeeze(1)
