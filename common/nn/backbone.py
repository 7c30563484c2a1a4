"""A small ResNet-style face backbone that DP-SGD can train.

Opacus rejects BatchNorm (its statistics mix samples, so per-sample gradients are undefined),
so every normalisation here is GroupNorm. The embedding is L2-normalised, as in ArcFace /
CosFace, so that verification compares embeddings by cosine similarity.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(8, channels), num_channels=channels)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (He et al., 2016), GroupNorm instead of BN."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = _norm(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), _norm(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Backbone(nn.Module, ABC):
    """What the face model, MINT and the audit read of a backbone: ``blocks`` (the maps after
    the stem and each stage), ``embedding_from`` (the unnormalised embedding from the last map);
    the L2-normalised embedding follows from them."""

    @abstractmethod
    def blocks(self, x: torch.Tensor) -> list[torch.Tensor]: ...

    @abstractmethod
    def embedding_from(self, last: torch.Tensor) -> torch.Tensor: ...

    def unnormalised(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding_from(self.blocks(x)[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.unnormalised(x), dim=1)


class ResNetBackbone(Backbone):
    """Strided stem + residual stages (stride 2 each) + linear embedding.

    Sized for CPU training (about 12 M multiply-adds per 64x64 image with the defaults): the stem
    halves the resolution at once, and each stage halves it again.

    Args:
        width: channels of the first stage; stages use width x (1, 2, 4, ...).
        blocks: residual blocks per stage.
        embedding_dim: size of the L2-normalised embedding (128 default, 512 like ArcFace).
        image_size: side of the square RGB input; the final map is image_size / 2**(1 + len(blocks)).
    """

    def __init__(self, width: int = 32, blocks: tuple[int, ...] = (1, 1, 1), embedding_dim: int = 128,
                 image_size: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        reduction = 2 ** (1 + len(blocks))
        if image_size % reduction:
            raise ValueError(f"image_size must be a multiple of {reduction} for {len(blocks)} stages, got {image_size}")
        self.embedding_dim = embedding_dim
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), _norm(width), nn.ReLU())
        stages: list[nn.Module] = []
        in_ch = width
        for i, n in enumerate(blocks):
            out_ch = width * 2**i
            layers = [BasicBlock(in_ch if j == 0 else out_ch, out_ch, stride=2 if j == 0 else 1) for j in range(n)]
            stages.append(nn.Sequential(*layers))
            in_ch = out_ch
        self.stages = nn.ModuleList(stages)
        self.feature_dim = in_ch
        self.dropout = nn.Dropout(dropout)
        # A linear layer over the flattened final map keeps spatial layout (eyes vs mouth matter),
        # unlike global pooling; the map is small (image_size/16)^2.
        self.embed = nn.Linear(in_ch * (image_size // reduction) ** 2, embedding_dim)

    def blocks(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Activation maps after the stem and after each stage (MINT reads these)."""
        out = [self.stem(x)]
        for stage in self.stages:
            out.append(stage(out[-1]))
        return out

    def embedding_from(self, last: torch.Tensor) -> torch.Tensor:
        """The unnormalised embedding from the last stage's map."""
        return self.embed(self.dropout(torch.flatten(last, 1)))
