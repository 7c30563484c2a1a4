"""DP-SGD accounting helpers around Opacus.

Epsilon must compose over every step a client ever took, not restart per round: Opacus'
accountant history (noise multiplier, sample rate, steps) is therefore exported as plain
JSON-able lists and restored into a fresh accountant before each training call.
The noise and the Poisson sampler are what protect a client's data, so they must be unpredictable
to everyone else, the server first: by default their generators are seeded from the operating
system's entropy on the client (``dp_generators``), never from the run seed, which the server
distributes. Opacus' ``secure_mode`` needs torchcsprng, which no registry here has: the generators
are torch's Mersenne Twister seeded with 63 bits of OS entropy, unpredictable from the run's
configuration and messages but not a cryptographically secure RNG.
"""

from __future__ import annotations

import math
import secrets
import warnings

import numpy as np
import torch
from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier

from common.config import DPConfig

History = list[tuple[float, float, int]]

# Two warnings every DP-SGD call raises that say nothing about a facefl run: Opacus' "Secure RNG
# turned off" (facefl seeds its generators from OS entropy instead, see the module docstring) and
# torch's "Full backward hook is firing" from inside Opacus' ghost clipping. Left on, they fill
# every client's log in every round.
warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Full backward hook is firing")


def fresh_noise_seed() -> int:
    """63 bits of the operating system's entropy: a noise seed nobody else can derive."""
    return secrets.randbits(63)


def dp_generators(noise_seed: int | None, device: torch.device | str = "cpu"
                  ) -> tuple[torch.Generator, torch.Generator]:
    """Generators of DP-SGD's Gaussian noise and of its Poisson sampler, from ``noise_seed``
    (None: a fresh one from ``fresh_noise_seed``), on separate streams. The noise generator lives
    on ``device``, the gradients' (torch draws on a tensor's device only from a generator of that
    device); the sampler's stays on the CPU, where the loaders sample. The same seed gives other
    noise on CUDA than on the CPU (another RNG)."""
    seed = fresh_noise_seed() if noise_seed is None else noise_seed
    noise, sampler = np.random.SeedSequence([seed, 0xD9]).generate_state(2, dtype=np.uint64) & np.uint64(2**63 - 1)
    return torch.Generator(device=device).manual_seed(int(noise)), torch.Generator().manual_seed(int(sampler))


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """Noise multiplier that spends exactly ``target_epsilon`` over ``steps`` steps (all rounds)."""
    if not 0 < target_epsilon < math.inf:
        raise ValueError(f"dp.target_epsilon: expected a finite value > 0, got {target_epsilon}")
    if steps < 1:
        raise ValueError(f"cannot calibrate DP noise for {steps} steps")
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps, accountant=accountant))


def make_accountant(kind: str, history: History | None = None) -> IAccountant:
    """A fresh Opacus accountant that already holds ``history`` (steps spent earlier)."""
    acc = create_accountant(kind)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in (history or [])]
    return acc


def accountant_history(acc: IAccountant) -> History:
    return [(float(s), float(q), int(n)) for s, q, n in acc.history]


def spent_epsilon(kind: str, history: History, delta: float) -> float:
    """Epsilon spent by ``history`` at ``delta`` (0 when nothing was spent)."""
    if not history:
        return 0.0
    with np.errstate(divide="ignore"):  # Opacus' PRV takes log(1 - q), -inf at q = 1, and handles it
        return float(make_accountant(kind, history).get_epsilon(delta=delta))


def total_steps(history: History) -> int:
    return sum(n for _, _, n in history)


def poisson_sample_rate(num_samples: int, batch_size: int) -> float:
    """Sampling rate q that Opacus' DPDataLoader uses: 1 / (batches per epoch)."""
    return 1.0 / max(1, -(-num_samples // batch_size))


def steps_per_epoch(sample_rate: float) -> int:
    """Steps Opacus' DPDataLoader takes per epoch at ``sample_rate`` (its own ``int(1 / q)``)."""
    return int(1 / sample_rate)


def noise_for(dp: DPConfig, sample_rate: float, steps: int, spent: History | None = None) -> float:
    """The noise multiplier a job uses: 0 without DP, the given one, or one calibrated so that
    ``steps`` steps at ``sample_rate`` spend exactly ``dp.target_epsilon`` (all rounds included),
    on top of what ``spent`` already cost (e.g. a noisy histogram for reweighting)."""
    if dp.mode == "off":
        return 0.0
    if not 0 < dp.target_epsilon < math.inf:
        return dp.noise_multiplier
    if not spent:
        return calibrate_noise(dp.target_epsilon, dp.delta, sample_rate, steps, dp.accountant)
    return _calibrate_after(dp, sample_rate, steps, spent)


def _calibrate_after(dp: DPConfig, sample_rate: float, steps: int, spent: History) -> float:
    """The smallest noise multiplier (within 0.1%) whose ``steps`` steps, composed with ``spent``,
    stay within ``dp.target_epsilon``; bisection on the accountant itself."""
    def total(sigma: float) -> float:
        return spent_epsilon(dp.accountant, [*spent, (sigma, sample_rate, steps)], dp.delta)

    floor = spent_epsilon(dp.accountant, spent, dp.delta)
    if floor >= dp.target_epsilon:
        raise ValueError(f"dp.target_epsilon: {dp.target_epsilon} is already spent before training ({floor:.3f} "
                         f"by {spent}); raise the target or the noise of what came first")
    lo, hi = 1e-2, 1.0
    while total(hi) > dp.target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError(f"dp.target_epsilon: no noise multiplier reaches {dp.target_epsilon} after {spent}")
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if total(mid) <= dp.target_epsilon else (mid, hi)
    return hi
