"""ArcFace-class backbones: the improved ResNets (IResNet) of arcface_torch, with GroupNorm.

Duta, Liu, Zhu and Shao, "Improved Residual Networks for Image and Video Recognition" (ICPR 2020),
as used by Deng et al.'s ArcFace (CVPR 2019) reference training code, arcface_torch: a 3x3 stem
at full resolution (BN, PReLU), four stages of pre-activation basic blocks (BN, conv 3x3, BN,
PReLU, conv 3x3 with the stage's stride 2, BN, plus a 1x1-conv + BN shortcut on the first block),
then BN, dropout, a linear layer over the flattened 512 x (s/16)^2 map and a 1-d BN of the
512-d embedding whose scale is frozen at 1. Written here from that description, not copied.

Every BatchNorm becomes a GroupNorm (32 groups) under the same attribute name, so that Opacus
and the book-keeping mode can compute per-sample gradients (BatchNorm mixes the samples of a
batch) and so that an arcface_torch checkpoint's keys map one to one
(``common.nn.arcface_checkpoint``).
"""

from __future__ import annotations

import torch
from torch import nn

from common.nn.backbone import Backbone

IRESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
}
"""Blocks per stage of each depth, as in arcface_torch."""

STAGE_WIDTHS = (64, 128, 256, 512)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(32, channels), num_channels=channels, eps=1e-5)


class IBasicBlock(nn.Module):
    """Pre-activation basic block; ``stride`` on the second convolution, as arcface_torch has it."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.bn1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = _norm(out_ch)
        self.prelu = nn.PReLU(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn3 = _norm(out_ch)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), _norm(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (self.downsample(x) if self.downsample is not None else x)


class IResNet(Backbone):
    """IResNet backbone (``Backbone``: ``blocks``, ``embedding_from``, L2-normalised ``forward``).

    Args:
        arch: a key of ``IRESNET_LAYERS``.
        embedding_dim: 512 in ArcFace.
        image_size: a multiple of 16 (112 for aligned ArcFace crops: a 7 x 7 final map).
    """

    def __init__(self, arch: str, embedding_dim: int = 512, image_size: int = 112, dropout: float = 0.0) -> None:
        super().__init__()
        if arch not in IRESNET_LAYERS:
            raise ValueError(f"model.arch: expected one of {sorted(IRESNET_LAYERS)}, got {arch!r}")
        if image_size % 16:
            raise ValueError(f"{arch}: image_size must be a multiple of 16, got {image_size}")
        self.embedding_dim = embedding_dim
        self.conv1 = nn.Conv2d(3, STAGE_WIDTHS[0], 3, padding=1, bias=False)
        self.bn1 = _norm(STAGE_WIDTHS[0])
        self.prelu = nn.PReLU(STAGE_WIDTHS[0])
        in_ch = STAGE_WIDTHS[0]
        for i, (n, width) in enumerate(zip(IRESNET_LAYERS[arch], STAGE_WIDTHS), start=1):
            blocks = [IBasicBlock(in_ch if j == 0 else width, width, 2 if j == 0 else 1) for j in range(n)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            in_ch = width
        self.bn2 = _norm(in_ch)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_ch * (image_size // 16) ** 2, embedding_dim)
        self.features = nn.GroupNorm(min(32, embedding_dim), embedding_dim, eps=1e-5)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False  # frozen at 1, as arcface_torch does

    def blocks(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Activation maps after the stem and after each stage (MINT reads these)."""
        out = [self.prelu(self.bn1(self.conv1(x)))]
        for i in range(1, 5):
            out.append(getattr(self, f"layer{i}")(out[-1]))
        return out

    def embedding_from(self, last: torch.Tensor) -> torch.Tensor:
        """The unnormalised embedding from the last stage's map."""
        return self.features(self.fc(self.dropout(torch.flatten(self.bn2(last), 1))))
