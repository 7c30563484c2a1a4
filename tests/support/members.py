"""A consortium of members holding their own images (``data.layout = per-member``), shared by the
simulation and the deployment tests: 24 SynthFaces identities dealt to three ImageFolders, and a
tiny federation over them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MEMBERS = 3
IMAGES_PER_MEMBER = 48  # 8 identities x 6 images

# Every value as the run config types it, for ``flwr run -c`` and ``facefl run --set`` alike.
PER_MEMBER: dict[str, Any] = {
    "data.layout": "per-member", "data.source": "imagefolder", "data.image_size": 32,
    "model.width": 8, "model.blocks": "1,1", "model.embedding_dim": 16, "train.batch_size": 8,
    "train.task": "both", "split.num_clients": MEMBERS,
    "mote.epochs": 5, "mote.synthetic": 10, "mote.balancing_factors": "0.5", "mote.kde_population": "public",
    "federation.min_train_clients": MEMBERS, "federation.min_available_clients": MEMBERS,
    "federation.client_cpus": 1.0, "federation.local_epochs": 1, "federation.rounds": 2,
    "split.member_nonmember_fraction": 0.25, "pretrain.identities": 12, "pretrain.images_per_identity": 2,
    "pretrain.epochs": 1, "evaluation.public": "synthfaces", "evaluation.public_identities": 12,
}


def overrides(values: dict[str, Any]) -> list[str]:
    """``key=value`` strings of ``values``, as ``load_config`` and ``facefl run --set`` take them."""
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items()]


def set_args(values: dict[str, Any]) -> list[str]:
    """``--set key=value`` arguments of ``facefl run`` for ``values``."""
    return [a for o in overrides(values) for a in ("--set", o)]


def write_consortium(root: Path) -> Path:
    """``root/member-00`` .. ``member-02``: 24 SynthFaces identities dealt 8 to each member."""
    from common.data.datadir import write_synth_dir
    from common.data.sources.synthfaces.generator import SynthConfig

    write_synth_dir(SynthConfig(num_identities=8 * MEMBERS, images_per_identity=6, image_size=32, seed=3), root,
                    members=MEMBERS)
    return root
