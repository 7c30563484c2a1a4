"""Which parameters a client's training updates (``federation.trainable``).

DP-SGD adds noise of the same scale to every trained coordinate while each sample's clipped
gradient has norm at most C whatever the count, so the noise grows with the number of trained
parameters and a small private data set learns little when it trains them all. Fine-tuning only
the normalisation layers' scales and shifts and the heads, as bias-term fine-tuning does (Bu et
al., "Differentially Private Bias-Term Fine-tuning of Foundation Models", 2022), adapts a publicly
pretrained backbone to the members' photographs at a fraction of the noise.
"""

from __future__ import annotations

from torch import nn

from common.nn.face_model import FaceModel

TRAINABLE = ("all", "norms")
_NORMS = (nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)


def restrict_training(model: FaceModel, trainable: str) -> int:
    """Freeze what ``trainable`` leaves out ("norms": all but the backbone's normalisation layers
    and the attribute head; "all": nothing); returns the number of parameters left to train.
    A frozen parameter stays frozen (the IResNet's fixed feature scale)."""
    if trainable not in TRAINABLE:
        raise ValueError(f"federation.trainable: expected one of {list(TRAINABLE)}, got {trainable!r}")
    if trainable == "norms":
        keep = {id(p) for m in model.backbone.modules() if isinstance(m, _NORMS) for p in m.parameters()}
        if model.attribute is not None:
            keep |= {id(p) for p in model.attribute.parameters()}
        for p in model.parameters():
            if id(p) not in keep:
                p.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
