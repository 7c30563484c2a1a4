"""Where training runs (``train.device``), resolved in one place for every training path.

The configuration cannot check the device when it is loaded: a server, or the laptop that writes
a run's configuration, may configure GPU clients without a GPU of its own. The value is resolved
where training is about to start, on the machine that trains, so that ``cuda`` without CUDA fails
there, before any step, naming the key. Only the model, the batches and the DP noise move to the
device: data, augmentation, Poisson sampling, evaluation and HE stay on the CPU, and trained
models come back to it, so that a CPU run is bit-identical to one without this setting. The
module imports nothing from ``common.config`` (the schema takes ``DEVICES`` from here).
"""

from __future__ import annotations

import torch

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
"""``train.device``: auto = CUDA when torch sees a GPU, else the CPU."""


def resolve_device(name: str) -> torch.device:
    """The torch device ``train.device = name`` means on this machine; ``cuda`` without CUDA is refused."""
    if name not in DEVICES:
        raise ValueError(f"train.device: expected one of {', '.join(DEVICES)}, got {name!r}")
    cuda = torch.cuda.is_available()
    if name == "cuda" and not cuda:
        raise ValueError("train.device: 'cuda', but CUDA is not available on this machine (torch "
                         f"{torch.__version__}); set train.device = auto or cpu")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and cuda) else "cpu")
