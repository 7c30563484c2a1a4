"""The shared face model: backbone plus an optional attribute head.

Only this module's parameters ever leave a client; identity heads are separate objects that
the client keeps (FedFace / FedFR keep class centres private for the same reason).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from common.nn.backbone import Backbone, ResNetBackbone
from common.nn.heads import AttributeHead
from common.nn.iresnet import IRESNET_LAYERS, IResNet

ARCHS: tuple[str, ...] = ("resnet_gn", *IRESNET_LAYERS)
"""``model.arch``: the small GroupNorm ResNet (sized by width and blocks), or an ArcFace IResNet."""


@dataclass(frozen=True)
class ModelSpec:
    """Architecture hyper-parameters; stored in every checkpoint's metadata to rebuild it."""

    width: int = 32
    blocks: tuple[int, ...] = (1, 1, 1)  # resnet_gn only; an IResNet's depth is its arch
    embedding_dim: int = 128
    image_size: int = 64
    dropout: float = 0.0
    attribute_head: bool = True
    arch: str = "resnet_gn"

    def to_dict(self) -> dict:
        return {"width": self.width, "blocks": list(self.blocks), "embedding_dim": self.embedding_dim,
                "image_size": self.image_size, "dropout": self.dropout, "attribute_head": self.attribute_head,
                "arch": self.arch}

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        return cls(width=int(d["width"]), blocks=tuple(int(b) for b in d["blocks"]),
                   embedding_dim=int(d["embedding_dim"]), image_size=int(d["image_size"]),
                   dropout=float(d.get("dropout", 0.0)), attribute_head=bool(d.get("attribute_head", True)),
                   arch=str(d.get("arch", "resnet_gn")))


class FaceModel(nn.Module):
    """Backbone (L2-normalised embedding) and, when the task has one, a binary attribute logit."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.backbone: Backbone
        if spec.arch == "resnet_gn":
            self.backbone = ResNetBackbone(width=spec.width, blocks=spec.blocks, embedding_dim=spec.embedding_dim,
                                           image_size=spec.image_size, dropout=spec.dropout)
        else:
            self.backbone = IResNet(spec.arch, embedding_dim=spec.embedding_dim, image_size=spec.image_size,
                                    dropout=spec.dropout)
        self.attribute = AttributeHead(spec.embedding_dim) if spec.attribute_head else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (unnormalised embedding features, attribute logit or None)."""
        feats = self.backbone.unnormalised(x)
        return feats, (self.attribute(feats) if self.attribute is not None else None)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)
