"""The privacy ledger (privacy.json): per-client DP parameters and epsilon, composed over rounds.

Everything a client released under its budget is in its accountant history: DP-SGD's steps and,
with reweighting, the one Gaussian histogram its weights come from (``reweighting`` names it).

The server does not take a client's word for its epsilon: each client reports its accountant
history (noise multiplier, sample rate, steps), and the ledger recomputes epsilon from it with
both the RDP and the PRV accountant.

The unit of each client's guarantee is what its DP-SGD protected (``dp.unit``, reported by the
client; a report without one is sample-level): one image, or one person with all of their images
(identity-level DP-SGD, ``common.train.identity_dp``). For a sample-level client the entry also
says what its epsilon gives a person: with k = the largest number of images of one identity on
that client (a count the client reports), group privacy turns (epsilon, delta) for one image into
(k epsilon, k e^{(k-1) epsilon} delta) for any k images (Dwork and Roth, 2014, Theorem 2.2 and its
approximate-DP form): ``epsilon_person_bound`` = k epsilon and ``delta_person_bound`` =
min(1, k e^{(k-1) epsilon} delta). It is a loose upper bound, not the person-level epsilon, and
for the epsilons of DP-SGD its delta is usually 1, i.e. vacuous: a person-level guarantee needs
``dp.unit = identity``, whose entries carry the client's own (epsilon, delta) there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.mote.private import RECORD_UNITS
from common.runs.io import atomic_write_json
from common.train.dp import History, spent_epsilon, total_steps
from common.train.identity_dp import group_privacy

SAMPLE_UNIT = "sample (one image)"
IDENTITY_UNIT = "identity (one person, all of their images)"
UNITS = {"sample": SAMPLE_UNIT, "identity": IDENTITY_UNIT}
"""What a client's ``unit`` (``dp.unit``) protects, as the ledger names it."""
ADVERSARY = ("holds against the server and the other clients: each client's noise and sampling come from its own "
             "entropy")
ADVERSARY_REPRODUCIBLE = ("does NOT hold against the server: dp.reproducible_noise derived the noise from the run "
                          "seed, which the server knows (research simulations only)")

MOTE_GUARANTEE = ("(epsilon, delta) per impostor record of each client's enrollment population (one image, or one "
                  "person with all of their images: 'unit'), composed over all of that client's galleries; the "
                  "enrolled person's own reference images are the templates' subjects and are not protected. An image "
                  "used both by DP-SGD of the backbone and as a MOTE impostor record is protected by the sum of the "
                  "two epsilons (and of the two deltas)")


def person_bound(unit: str, epsilon: float, delta: float, largest_identity_images: int) -> dict[str, Any]:
    """What a client's (epsilon, delta) guarantees one person (see the module docstring): its own
    (epsilon, delta) under ``unit = identity``; under ``unit = sample`` the group-privacy bound over
    k = ``largest_identity_images`` images (nothing when the client reported no k)."""
    if unit == "identity":
        return {"epsilon_person_bound": epsilon, "delta_person_bound": delta}
    if largest_identity_images < 1:
        return {}
    eps_k, delta_k = group_privacy(epsilon, delta, largest_identity_images)
    return {"largest_identity_images": largest_identity_images, "epsilon_person_bound": eps_k,
            "delta_person_bound": delta_k}


@dataclass
class PrivacyLedger:
    accountant: str
    delta: float
    clients: dict[int, dict[str, Any]] = field(default_factory=dict)
    mote: dict[int, dict[str, Any]] = field(default_factory=dict)

    def record(self, partition: int, server_round: int, privacy_json: str) -> dict[str, Any]:
        """Update one client's entry from the history it reported after ``server_round``."""
        d = json.loads(privacy_json)
        history: History = [(float(s), float(q), int(n)) for s, q, n in d["history"]]
        entry = self.clients.setdefault(partition, {"rounds": []})
        if server_round not in entry["rounds"]:
            entry["rounds"].append(server_round)
        sigma = float(d["noise_multiplier"])
        unit = str(d.get("unit", "sample"))
        if unit not in UNITS:
            raise ValueError(f"client {partition}: unknown DP unit {unit!r} (expected one of {sorted(UNITS)})")
        entry.update({
            "unit": UNITS[unit], "reproducible_noise": bool(d.get("reproducible_noise", False)),
            **({"reweighting": d["reweighting"]} if "reweighting" in d else {}),
            "noise_multiplier": sigma, "sample_rate": history[-1][1] if history else 0.0,
            "steps": total_steps(history), "delta": self.delta, "history": history,
            "epsilon_rdp": spent_epsilon("rdp", history, self.delta),
            "epsilon_prv": spent_epsilon("prv", history, self.delta) if history else 0.0,
        })
        entry["epsilon"] = entry[f"epsilon_{self.accountant}"]
        entry.update(person_bound(unit, entry["epsilon"], self.delta, int(d.get("largest_identity_images", 0))))
        return entry

    def record_mote(self, partition: int, reported: dict[str, Any]) -> dict[str, Any]:
        """One client's MOTE enrollment under DP (``common.mote.private``): its mechanism as
        reported, with both epsilons recomputed here from (sigma, q, steps of all galleries, times
        the different releases the client made: an enrollment re-sent after a crash that released
        other galleries is charged again)."""
        try:
            sigma, q = float(reported["noise_multiplier"]), float(reported["sample_rate"])
            per_gallery, galleries = int(reported["steps_per_gallery"]), int(reported["galleries"])
            releases = int(reported.get("releases", 1))
            unit = str(reported["unit"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"client {partition}: malformed MOTE privacy report ({type(exc).__name__}: {exc})") from None
        if unit not in RECORD_UNITS or not (sigma > 0 and 0 < q <= 1 and per_gallery > 0 and galleries > 0 and releases > 0):
            raise ValueError(f"client {partition}: MOTE privacy report out of range (unit {unit!r}, sigma {sigma}, "
                             f"q {q}, {per_gallery} steps x {galleries} galleries x {releases} releases)")
        history: History = [(sigma, q, per_gallery * galleries * releases)]
        one: History = [(sigma, q, per_gallery)]
        entry = {**reported, "unit": RECORD_UNITS[unit], "delta": self.delta, "history": history,
                 "releases": releases, "steps": per_gallery * galleries * releases,
                 "epsilon_rdp": spent_epsilon("rdp", history, self.delta),
                 "epsilon_prv": spent_epsilon("prv", history, self.delta),
                 "epsilon_per_gallery": spent_epsilon(self.accountant, one, self.delta)}
        entry["epsilon"] = entry[f"epsilon_{self.accountant}"]
        self.mote[partition] = entry
        return entry

    def max_epsilon(self) -> float:
        return max((c["epsilon"] for c in self.clients.values()), default=0.0)

    def reproducible_noise(self) -> bool:
        """True if any client derived its noise from the run seed: then the server could predict it."""
        return any(c.get("reproducible_noise", False) for c in self.clients.values())

    def unit(self) -> str:
        """The clients' unit; with none recorded sample-level, with different ones both named."""
        units = sorted({c.get("unit", SAMPLE_UNIT) for c in self.clients.values()}) or [SAMPLE_UNIT]
        return units[0] if len(units) == 1 else "mixed: " + "; ".join(units)

    def to_json(self) -> dict[str, Any]:
        reproducible = self.reproducible_noise()
        unit = self.unit()
        level = {SAMPLE_UNIT: "sample-level (one image)", IDENTITY_UNIT: "identity-level (one person, all of "
                 "their images)"}.get(unit, "each client's own unit")
        return {"accountant": self.accountant, "delta": self.delta, "max_epsilon": self.max_epsilon(),
                "unit": unit, "reproducible_noise": reproducible,
                "guarantee": (f"{level} (epsilon, delta) per client, composed over every round it "
                              "trained in; " + (ADVERSARY_REPRODUCIBLE if reproducible else ADVERSARY)),
                "clients": {str(k): v for k, v in sorted(self.clients.items())},
                **({"mote": {"guarantee": MOTE_GUARANTEE, "clients": {str(k): v for k, v in sorted(self.mote.items())}}}
                   if self.mote else {})}

    def save(self, path: Path) -> None:
        atomic_write_json(path, self.to_json())

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str) -> PrivacyLedger:
        """The ledger ``to_json`` wrote (a resumed run continues it); errors name ``where``."""
        try:
            clients = {int(k): {**v, "history": [(float(s), float(q), int(n)) for s, q, n in v["history"]]}
                       for k, v in d["clients"].items()}
            mote = {int(k): v for k, v in d.get("mote", {}).get("clients", {}).items()}
            return cls(str(d["accountant"]), float(d["delta"]), clients, mote)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{where}: malformed privacy ledger ({type(exc).__name__}: {exc})") from None
