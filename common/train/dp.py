"""DP-SGD accounting helpers around Opacus.

Epsilon must compose over every step a client ever took, not restart per round: Opacus'
accountant history (noise multiplier, sample rate, steps) is therefore exported as plain
JSON-able lists and restored into a fresh accountant before each training call.
Opacus is run with ``secure_mode=False`` (torchcsprng is unavailable here), so the noise RNG is
seeded and reproducible but not cryptographically secure.
"""

from __future__ import annotations

import math

from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier

from common.config import DPConfig

History = list[tuple[float, float, int]]


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
    return float(make_accountant(kind, history).get_epsilon(delta=delta))


def total_steps(history: History) -> int:
    return sum(n for _, _, n in history)


def poisson_sample_rate(num_samples: int, batch_size: int) -> float:
    """Sampling rate q that Opacus' DPDataLoader uses: 1 / (batches per epoch)."""
    return 1.0 / max(1, -(-num_samples // batch_size))


def steps_per_epoch(sample_rate: float) -> int:
    """Steps Opacus' DPDataLoader takes per epoch at ``sample_rate`` (its own ``int(1 / q)``)."""
    return int(1 / sample_rate)


def noise_for(dp: DPConfig, sample_rate: float, steps: int) -> float:
    """The noise multiplier a job uses: 0 without DP, the given one, or one calibrated so that
    ``steps`` steps at ``sample_rate`` spend exactly ``dp.target_epsilon`` (all rounds included)."""
    if dp.mode == "off":
        return 0.0
    if 0 < dp.target_epsilon < math.inf:
        return calibrate_noise(dp.target_epsilon, dp.delta, sample_rate, steps, dp.accountant)
    return dp.noise_multiplier
