"""Canaries of the one-run privacy audit (Steinke, Nasr & Jagielski 2023, "Privacy auditing with one
(1) training run").

``audit.canaries = m`` picks m nonmember-role samples as canaries. Each is included independently
with probability 1/2; an included canary is trained by one client, drawn at random, with its
attribute label flipped: a mislabelled sample is the strongest simple canary, since nothing but
its own presence makes the model predict the wrong label (Jagielski, Ullman & Oprea 2020; Steinke
et al. 2023). Excluded canaries train nowhere. The auditor then guesses inclusion from the final
model and turns the guesses into a lower bound on epsilon (``attacks.canary_audit``).

The draws are the auditor's experiment design, not DP randomness: they come from the run seed on
their own stream (``CANARY_STREAM``), so that the server (which writes ``canaries.json`` for the
auditor) and every client (which adds its own canaries to its data in ``client.local.local_data``)
derive the same plan from the same configuration, data and manifest. The manifest is unchanged:
canaries keep the nonmember role there, and the ordinary membership audit leaves them out
(``canary_sample_ids`` / ``canary_mask``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.config import Config
from common.data.dataset import FaceDataset
from common.runs.io import atomic_write_json, read_json
from common.runs.rundir import RunDir
from common.split.manifest import Manifest, is_int, json_object
from common.split.partition import seeded_rng
from common.train.loop import target_labels

CANARIES_VERSION = 1
CANARY_STREAM = 0xCA4A
"""``seeded_rng(seed, CANARY_STREAM)`` draws the canaries, apart from every stream of the split."""
_KEYS = frozenset({"version", "fingerprint", "attribute", "seed", "stream", "num_clients", "sample_ids", "included",
                   "client", "label"})


@dataclass(frozen=True)
class CanaryPlan:
    """Which samples are canaries, which are included, who trains them and with which label.

    Attributes:
        fingerprint: ``FaceDataset.fingerprint()`` of the data the plan was drawn from.
        attribute: the attribute whose label is flipped (``train.attribute``).
        seed: the run seed; ``stream``: the stream of it the draws came from.
        num_clients: clients of the split (``client`` values are below it).
        sample_ids: the m canaries, in data set order.
        included: per canary, whether it is trained (each with probability 1/2).
        client: per canary, the partition that trains it; -1 when excluded.
        label: per canary, the flipped label it is trained with (1 - its true label).
    """

    fingerprint: str
    attribute: str
    seed: int
    num_clients: int
    sample_ids: tuple[str, ...]
    included: tuple[bool, ...]
    client: tuple[int, ...]
    label: tuple[int, ...]
    stream: int = CANARY_STREAM

    @property
    def m(self) -> int:
        return len(self.sample_ids)

    def client_sample_ids(self, partition: int) -> tuple[str, ...]:
        """The canaries ``partition`` trains on (data set order)."""
        return tuple(s for s, c in zip(self.sample_ids, self.client, strict=True) if c == partition)

    def check_data(self, ds: FaceDataset) -> None:
        """Raise ValueError unless ``ds`` is the data this plan was drawn from."""
        if ds.fingerprint() != self.fingerprint:
            raise ValueError(f"canary plan fingerprint {self.fingerprint} does not match data set {ds.source!r} "
                             f"(fingerprint {ds.fingerprint()}): the canaries were drawn from other data")

    def to_json(self) -> dict[str, Any]:
        return {"version": CANARIES_VERSION, "fingerprint": self.fingerprint, "attribute": self.attribute,
                "seed": self.seed, "stream": self.stream, "num_clients": self.num_clients,
                "sample_ids": list(self.sample_ids), "included": list(self.included), "client": list(self.client),
                "label": list(self.label)}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the plan atomically as JSON."""
        return atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CanaryPlan:
        """Read and validate a plan; any problem is a ValueError naming the file and the key."""
        return cls.from_json(read_json(path), where=str(path))

    @classmethod
    def from_json(cls, raw: Any, where: str = "canaries") -> CanaryPlan:
        """Validate a parsed canaries document (see ``to_json``) and build the plan."""
        fail = json_object(raw, where, _KEYS)
        if not is_int(raw["version"]) or raw["version"] != CANARIES_VERSION:
            raise fail("version", f"expected {CANARIES_VERSION}, got {raw['version']!r}")
        for key in ("fingerprint", "attribute"):
            if not (isinstance(raw[key], str) and raw[key]):
                raise fail(key, f"expected a non-empty string, got {raw[key]!r}")
        for key, lo in (("seed", 0), ("stream", 0), ("num_clients", 1)):
            if not (is_int(raw[key]) and raw[key] >= lo):
                raise fail(key, f"expected an integer >= {lo}, got {raw[key]!r}")
        columns = {"sample_ids": lambda v: isinstance(v, str), "included": lambda v: isinstance(v, bool),
                   "client": lambda v: is_int(v) and -1 <= v < raw["num_clients"],
                   "label": lambda v: is_int(v) and v in (0, 1)}
        m = len(raw["sample_ids"]) if isinstance(raw["sample_ids"], list) else -1
        for key, valid in columns.items():
            if not (isinstance(raw[key], list) and len(raw[key]) == m):
                raise fail(key, f"expected a list of one entry per canary ({m})")
            bad = [v for v in raw[key] if not valid(v)]
            if bad:
                raise fail(key, f"invalid entry {bad[0]!r}")
        if len(set(raw["sample_ids"])) != m:
            raise fail("sample_ids", "a sample id is listed twice")
        wrong = [i for i, (inc, c) in enumerate(zip(raw["included"], raw["client"], strict=True)) if inc != (c >= 0)]
        if wrong:
            raise fail(f"client[{wrong[0]}]", "an included canary needs a client >= 0, an excluded one -1")
        return cls(fingerprint=raw["fingerprint"], attribute=raw["attribute"], seed=raw["seed"], stream=raw["stream"],
                   num_clients=raw["num_clients"], sample_ids=tuple(raw["sample_ids"]),
                   included=tuple(raw["included"]), client=tuple(raw["client"]), label=tuple(raw["label"]))


def canary_plan(cfg: Config, ds: FaceDataset, manifest: Manifest) -> CanaryPlan:
    """The run's canaries (none when ``audit.canaries`` is 0), drawn from the nonmember-role samples
    whose attribute label is known. Deterministic in (configuration, data, manifest): the server and
    every client get the same plan. ValueError naming audit.canaries when there are too few."""
    manifest.check_data(ds)
    m = cfg.audit.canaries
    attribute = cfg.train.attribute
    if m == 0:
        return CanaryPlan(ds.fingerprint(), attribute, cfg.seed, manifest.num_clients, (), (), (), ())
    truth = target_labels(ds, attribute)
    eligible = np.flatnonzero(manifest.role_mask(ds, "nonmember") & (truth >= 0))
    if m > eligible.size:
        raise ValueError(f"audit.canaries: {m} canaries requested, but only {eligible.size} nonmember-role samples "
                         f"have a known {attribute!r} label; lower audit.canaries or raise split.nonmember / "
                         "split.member_nonmember_fraction")
    rng = seeded_rng(cfg.seed, CANARY_STREAM)
    pos = np.sort(rng.choice(eligible, size=m, replace=False))
    included = rng.random(m) < 0.5
    client = np.where(included, rng.integers(manifest.num_clients, size=m), -1)
    return CanaryPlan(fingerprint=ds.fingerprint(), attribute=attribute, seed=cfg.seed,
                      num_clients=manifest.num_clients, sample_ids=tuple(ds.sample_ids[pos].tolist()),
                      included=tuple(included.tolist()), client=tuple(client.tolist()),
                      label=tuple((1 - truth[pos]).tolist()))


def client_training_data(ds: FaceDataset, manifest: Manifest, plan: CanaryPlan, partition: int) -> FaceDataset:
    """``partition``'s member samples (data set order) followed by its included canaries, which
    carry their flipped label."""
    plan.check_data(ds)
    members = manifest.client_indices(ds, partition)
    canaries = ds.positions(plan.client_sample_ids(partition))
    if not canaries.size:
        return ds.subset(members)
    data = ds.subset(np.concatenate([members, canaries]))
    return data.with_flipped(plan.attribute, np.arange(members.size, len(data)))


def client_sample_counts(manifest: Manifest, plan: CanaryPlan) -> list[int]:
    """Per partition, the samples its client trains on: members plus included canaries. FedAvg
    weighs by these, and the server checks that every client claims its count."""
    return [len(manifest.clients[p]) + len(plan.client_sample_ids(p)) for p in range(manifest.num_clients)]


def _run(run: RunDir | str | os.PathLike[str]) -> RunDir:
    return run if isinstance(run, RunDir) else RunDir(run)


def write_canaries(run: RunDir, plan: CanaryPlan) -> Path | None:
    """Record ``plan`` as the run's canaries.json (nothing without canaries)."""
    return plan.save(run.canaries_path) if plan.m else None


def load_canaries(run: RunDir | str | os.PathLike[str]) -> CanaryPlan | None:
    """The run's canary plan, validated; None when the run has no canaries."""
    path = _run(run).canaries_path
    return CanaryPlan.load(path) if path.is_file() else None


def canary_sample_ids(run: RunDir | str | os.PathLike[str]) -> frozenset[str]:
    """The ids of every canary of the run, included or not (empty without canaries): the ordinary
    membership audit must audit none of them (an included canary is a nonmember-role sample that
    was trained on)."""
    plan = load_canaries(run)
    return frozenset(plan.sample_ids) if plan is not None else frozenset()


def canary_mask(run: RunDir | str | os.PathLike[str], ds: FaceDataset) -> np.ndarray:
    """Boolean mask over the positions of ``ds`` selecting the run's canaries (all False without);
    e.g. ``manifest.role_mask(ds, "nonmember") & ~canary_mask(run, ds)``."""
    mask = np.zeros(len(ds), dtype=bool)
    plan = load_canaries(run)
    if plan is not None:
        plan.check_data(ds)
        mask[ds.positions(plan.sample_ids)] = True
    return mask
