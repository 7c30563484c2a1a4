"""The privacy ledger (privacy.json): per-client DP parameters and epsilon, composed over rounds.

Everything a client released under its budget is in its accountant history: DP-SGD's steps and,
with reweighting, the one Gaussian histogram its weights come from (``reweighting`` names it).

The server does not take a client's word for its epsilon: each client reports its accountant
history (noise multiplier, sample rate, steps), and the ledger recomputes epsilon from it with
both the RDP and the PRV accountant.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.runs.io import atomic_write_json
from common.train.dp import History, spent_epsilon, total_steps

SAMPLE_UNIT = "sample (one image)"
ADVERSARY = ("holds against the server and the other clients: each client's noise and sampling come from its own "
             "entropy")
ADVERSARY_REPRODUCIBLE = ("does NOT hold against the server: dp.reproducible_noise derived the noise from the run "
                          "seed, which the server knows (research simulations only)")


@dataclass
class PrivacyLedger:
    accountant: str
    delta: float
    clients: dict[int, dict[str, Any]] = field(default_factory=dict)

    def record(self, partition: int, server_round: int, privacy_json: str) -> dict[str, Any]:
        """Update one client's entry from the history it reported after ``server_round``."""
        d = json.loads(privacy_json)
        history: History = [(float(s), float(q), int(n)) for s, q, n in d["history"]]
        entry = self.clients.setdefault(partition, {"rounds": []})
        if server_round not in entry["rounds"]:
            entry["rounds"].append(server_round)
        sigma = float(d["noise_multiplier"])
        entry.update({
            "unit": SAMPLE_UNIT, "reproducible_noise": bool(d.get("reproducible_noise", False)),
            **({"reweighting": d["reweighting"]} if "reweighting" in d else {}),
            "noise_multiplier": sigma, "sample_rate": history[-1][1] if history else 0.0,
            "steps": total_steps(history), "delta": self.delta, "history": history,
            "epsilon_rdp": spent_epsilon("rdp", history, self.delta),
            "epsilon_prv": spent_epsilon("prv", history, self.delta) if history else 0.0,
        })
        entry["epsilon"] = entry[f"epsilon_{self.accountant}"]
        return entry

    def max_epsilon(self) -> float:
        return max((c["epsilon"] for c in self.clients.values()), default=0.0)

    def reproducible_noise(self) -> bool:
        """True if any client derived its noise from the run seed: then the server could predict it."""
        return any(c.get("reproducible_noise", False) for c in self.clients.values())

    def to_json(self) -> dict[str, Any]:
        reproducible = self.reproducible_noise()
        return {"accountant": self.accountant, "delta": self.delta, "max_epsilon": self.max_epsilon(),
                "unit": SAMPLE_UNIT, "reproducible_noise": reproducible,
                "guarantee": ("sample-level (one image) (epsilon, delta) per client, composed over every round it "
                              "trained in; " + (ADVERSARY_REPRODUCIBLE if reproducible else ADVERSARY)),
                "clients": {str(k): v for k, v in sorted(self.clients.items())}}

    def save(self, path: Path) -> None:
        atomic_write_json(path, self.to_json())

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str) -> PrivacyLedger:
        """The ledger ``to_json`` wrote (a resumed run continues it); errors name ``where``."""
        try:
            clients = {int(k): {**v, "history": [(float(s), float(q), int(n)) for s, q, n in v["history"]]}
                       for k, v in d["clients"].items()}
            return cls(str(d["accountant"]), float(d["delta"]), clients)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{where}: malformed privacy ledger ({type(exc).__name__}: {exc})") from None
