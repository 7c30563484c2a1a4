"""The split manifest: which sample plays which role, and which client trains on it.

The manifest is the audit's ground truth: a membership attack is scored against it, so it is
written once per run (``runs/<id>/manifest.json``), bound to the exact data by the data set's
fingerprint, and validated in full whenever it is read back.

Roles. Every identity gets one identity role, stratified by (gender, group) so that each role
has the population's demographics. Samples of nonmember, aux and probe identities take their
identity's role. Samples of member identities are split once more: a fraction is held out as
``nonmember`` (same person, unseen image: sample-level MIA) and a fraction as ``probe`` (MOTE
verifies enrolled members on images never trained on); an identity with too few images keeps
them all as ``member``. Member samples are then partitioned over clients
(``common.split.partition``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.config import SplitSettings
from common.config.loader import parse_section
from common.config.values import parse_value
from common.data.dataset import AGE_BUCKET_NAMES, GENDER_NAMES, FaceDataset
from common.runs.io import atomic_write_json, read_json
from common.split.partition import (
    assign_clients,
    identity_modes,
    seeded_rng,
    shuffled_groups,
)

log = logging.getLogger(__name__)

ROLES: tuple[str, ...] = ("member", "nonmember", "aux", "probe")
MANIFEST_VERSION = 2  # 2: the config section holds the split settings' own keys
_MEMBER, _NONMEMBER, _AUX, _PROBE = range(len(ROLES))
_MANIFEST_KEYS = frozenset({"version", "source", "fingerprint", "num_samples", "config", "counts", "samples",
                            "identities", "clients", "client_summary"})
_IDENTITY_STREAM = 1
_HOLDOUT_STREAM = 2


def is_int(value: Any) -> bool:
    """An integer in a parsed JSON document (a bool is not one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def json_object(raw: Any, where: str, keys: frozenset[str] | set[str]) -> Callable[[str, str], ValueError]:
    """Check that a parsed JSON document is an object with exactly ``keys`` (else a ValueError naming
    ``where`` and the first odd key); returns the maker of its further errors, ``fail(key, problem)``."""
    def fail(key: str, problem: str) -> ValueError:
        return ValueError(f"{where}: {key}: {problem}")

    if not isinstance(raw, dict):
        raise fail("<root>", f"expected a JSON object, got {type(raw).__name__}")
    if set(raw) != keys:
        key = min(set(raw) ^ set(keys))
        raise fail(key, "missing key" if key in keys else "unknown key")
    return fail


def _apportion(total: int, fractions: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``total``, proportional to ``fractions`` (largest remainder)."""
    raw = total * fractions / fractions.sum()
    counts = np.floor(raw).astype(np.int64)
    extra = np.argsort(-(raw - counts), kind="stable")[: total - int(counts.sum())]
    counts[extra] += 1
    return counts


def _spread_roles(total: int, fractions: np.ndarray) -> np.ndarray:
    """A role sequence with exact totals in which every role is spread evenly, so that any
    contiguous stretch holds each role about in proportion (within one or two)."""
    counts = _apportion(total, fractions)
    keys = np.concatenate([(np.arange(c) + 0.5) / c for c in counts if c])
    labels = np.repeat(np.arange(len(counts)), counts)
    return labels[np.lexsort((labels, keys))]


def _identity_roles(ds: FaceDataset, split: SplitSettings, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted identities and their role index, stratified by (gender, group).

    Identities are laid out stratum by stratum (strata in random order, identities shuffled
    within) and dealt an evenly spread role sequence: each stratum gets each role in proportion
    and the global totals are exact, even when strata are tiny.
    """
    ids, gender = identity_modes(ds.identity, ds.gender)
    _, group = identity_modes(ds.identity, ds.group)
    _, stratum = np.unique(np.stack([gender, group], axis=1), axis=0, return_inverse=True)
    stratum = stratum.reshape(-1)
    rng = seeded_rng(seed, _IDENTITY_STREAM)
    stratum_rank = rng.permutation(int(stratum.max()) + 1)[stratum]
    order = np.lexsort((rng.permutation(ids.size), stratum_rank))
    roles = np.empty(ids.size, dtype=np.int64)
    roles[order] = _spread_roles(ids.size, np.asarray([split.fractions()[r] for r in ROLES]))
    return ids, roles


def _systematic_round(x: np.ndarray, offset: float) -> np.ndarray:
    """Round each of ``x`` down or up so that the running total tracks ``sum(x)`` within one."""
    return np.diff(np.floor(np.cumsum(x) + offset), prepend=np.floor(offset)).astype(np.int64)


def _hold_out(identity: np.ndarray, roles: np.ndarray, split: SplitSettings, seed: int) -> None:
    """Turn a random share of each member identity's samples into nonmember / probe, in place.

    Each identity holds out ``size * fraction`` rounded down or up, with the roundings carried
    over the identities (in random order) so that the overall shares match the configuration:
    rounding each identity alone would hold out far too many (half up) or none (down) of the
    images of identities with few images. At least one sample stays member, so an identity
    with one image (UTKFace) keeps it.
    """
    pos = np.flatnonzero(roles == _MEMBER)
    rng = seeded_rng(seed, _HOLDOUT_STREAM)
    order, grouped, rank, sizes = shuffled_groups(identity[pos], rng)
    perm = rng.permutation(sizes.size)
    n_held = []
    for fraction in (split.member_nonmember_fraction, split.member_probe_fraction):
        k = np.empty(sizes.size, dtype=np.int64)
        k[perm] = _systematic_round(sizes[perm] * fraction, rng.random())
        n_held.append(k)
    n_nonmember = np.minimum(n_held[0], sizes - 1)
    n_probe = np.minimum(n_held[1], sizes - 1 - n_nonmember)
    held = np.full(pos.size, _MEMBER)
    held[rank < (n_nonmember + n_probe)[grouped]] = _PROBE
    held[rank < n_nonmember[grouped]] = _NONMEMBER
    roles[pos[order]] = held


def attribute_values(ds: FaceDataset, name: str) -> np.ndarray:
    """Per-sample values of the partition attribute: a sensitive attribute or a task label."""
    columns = {"gender": ds.gender, "group": ds.group, "age": ds.age, **ds.labels}
    if name not in columns:
        raise ValueError(f"split.partition_attribute: expected one of {sorted(columns)} for data set "
                         f"{ds.source!r}, got {name!r}")
    return columns[name]


def _value_counts(values: np.ndarray, names: tuple[str, ...]) -> dict[str, int]:
    """Counts of each code present, by name (-1 'unknown'; codes without a name as digits)."""
    codes, counts = np.unique(values, return_counts=True)
    label = {-1: "unknown", **dict(enumerate(names))}
    return {label.get(int(c), str(int(c))): int(n) for c, n in zip(codes, counts, strict=True)}


def make_manifest(ds: FaceDataset, split: SplitSettings, seed: int, min_samples_per_client: int = 1) -> Manifest:
    """Assign every sample of ``ds`` a role and every member sample a client.

    Deterministic: the same data, split settings and seed give a byte-identical manifest.
    Raises ValueError when the data cannot feed ``split.num_clients`` clients with at least
    ``min_samples_per_client`` samples each.
    """
    split.validate()
    for name, value in (("seed", seed), ("min_samples_per_client", min_samples_per_client)):
        if not (is_int(value) and value >= 0):
            raise ValueError(f"{name}: expected an integer >= 0, got {value!r}")
    if len(ds) == 0:
        raise ValueError(f"make_manifest: data set {ds.source!r} is empty")
    attribute = attribute_values(ds, split.partition_attribute) if split.partition == "attribute" else None
    ids, id_roles = _identity_roles(ds, split, seed)
    roles = id_roles[np.searchsorted(ids, ds.identity)]
    _hold_out(ds.identity, roles, split, seed)
    members = np.flatnonzero(roles == _MEMBER)
    clients = assign_clients(ds.identity[members], None if attribute is None else attribute[members],
                             scheme=split.partition, num_clients=split.num_clients, alpha=split.alpha,
                             min_samples=min_samples_per_client, seed=seed)
    sids = ds.sample_ids
    client_pos = [members[clients == c] for c in range(split.num_clients)]
    manifest = Manifest(
        source=ds.source,
        fingerprint=ds.fingerprint(),
        num_samples=len(ds),
        split=split,
        seed=seed,
        samples={role: tuple(sids[roles == r].tolist()) for r, role in enumerate(ROLES)},
        identities={role: tuple(ids[id_roles == r].tolist()) for r, role in enumerate(ROLES)},
        clients=tuple(tuple(sids[p].tolist()) for p in client_pos),
        client_summary=tuple({
            "samples": int(p.size),
            "identities": int(np.unique(ds.identity[p]).size),
            "gender": _value_counts(ds.gender[p], GENDER_NAMES),
            "group": _value_counts(ds.group[p], ds.group_names),
            "age": _value_counts(ds.age[p], AGE_BUCKET_NAMES),
        } for p in client_pos),
    )
    log.info("split of %s (%d samples): %s; %d clients (%s) with %s member samples", ds.source, len(ds),
             manifest.counts()["samples"], split.num_clients, split.partition, [p.size for p in client_pos])
    return manifest


@dataclass
class Manifest:
    """Roles and client assignment of one data set, by sample id (never by position).

    Attributes:
        source: data source name.
        fingerprint: ``FaceDataset.fingerprint()`` of the data it was made from.
        num_samples: number of samples in that data.
        split: the split settings it was made with.
        seed: the run seed it was made with.
        samples: role -> sample ids (data set order); every sample in exactly one role.
        identities: identity role -> identity codes (ascending). Member identities also own the
            nonmember / probe samples held out from them; aux and probe identities never
            overlap member identities.
        clients: client -> its member sample ids (data set order); every member on exactly one.
        client_summary: per client, counts of samples, identities, gender, group and age values
            (for reading and plotting; not needed to use the manifest).
    """

    source: str
    fingerprint: str
    num_samples: int
    split: SplitSettings
    seed: int
    samples: dict[str, tuple[str, ...]]
    identities: dict[str, tuple[int, ...]]
    clients: tuple[tuple[str, ...], ...]
    client_summary: tuple[dict[str, Any], ...]

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def counts(self) -> dict[str, dict[str, int]]:
        """Number of samples and of identities per role."""
        return {"samples": {r: len(self.samples[r]) for r in ROLES},
                "identities": {r: len(self.identities[r]) for r in ROLES}}

    def check_data(self, ds: FaceDataset) -> None:
        """Raise ValueError unless ``ds`` is the data this manifest was made from."""
        actual = ds.fingerprint()
        if actual != self.fingerprint:
            raise ValueError(f"manifest fingerprint {self.fingerprint} does not match data set {ds.source!r} "
                             f"(fingerprint {actual}): the manifest was made from other data")

    def role_mask(self, ds: FaceDataset, role: str) -> np.ndarray:
        """Boolean mask over the positions of ``ds`` selecting the samples of ``role``."""
        if role not in ROLES:
            raise ValueError(f"role: expected one of {ROLES}, got {role!r}")
        self.check_data(ds)
        mask = np.zeros(len(ds), dtype=bool)
        mask[ds.positions(self.samples[role])] = True
        return mask

    def client_indices(self, ds: FaceDataset, client: int) -> np.ndarray:
        """Positions in ``ds`` of the member samples of ``client`` (ascending)."""
        if not 0 <= client < self.num_clients:
            raise ValueError(f"client: expected 0..{self.num_clients - 1}, got {client}")
        self.check_data(ds)
        return ds.positions(self.clients[client])

    def to_json(self) -> dict[str, Any]:
        """The JSON document (``version`` 2); ``counts`` is derived and checked on load."""
        return {
            "version": MANIFEST_VERSION,
            "source": self.source,
            "fingerprint": self.fingerprint,
            "num_samples": self.num_samples,
            "config": {**dataclasses.asdict(self.split), "seed": self.seed},
            "counts": self.counts(),
            "samples": {r: list(self.samples[r]) for r in ROLES},
            "identities": {r: list(self.identities[r]) for r in ROLES},
            "clients": [list(c) for c in self.clients],
            "client_summary": list(self.client_summary),
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the manifest atomically as JSON."""
        return atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str], expect_fingerprint: str | None = None) -> Manifest:
        """Read and fully validate a manifest; any problem is a ValueError naming the file and
        the key or sample id at fault."""
        manifest = cls.from_json(read_json(path), where=str(path))
        if expect_fingerprint is not None and manifest.fingerprint != expect_fingerprint:
            raise ValueError(f"{path}: manifest fingerprint {manifest.fingerprint} does not match the "
                             f"expected fingerprint {expect_fingerprint}")
        return manifest

    @classmethod
    def from_json(cls, raw: Any, where: str = "manifest") -> Manifest:
        """Validate a parsed manifest document (see ``to_json``) and build the manifest."""
        fail = json_object(raw, where, _MANIFEST_KEYS)
        if not is_int(raw["version"]) or raw["version"] != MANIFEST_VERSION:
            raise fail("version", f"expected {MANIFEST_VERSION}, got {raw['version']!r}")
        for key in ("source", "fingerprint"):
            if not (isinstance(raw[key], str) and raw[key]):
                raise fail(key, f"expected a non-empty string, got {raw[key]!r}")
        if not is_int(raw["num_samples"]) or raw["num_samples"] < 0:
            raise fail("num_samples", f"expected an integer >= 0, got {raw['num_samples']!r}")
        try:
            settings = dict(raw["config"])
            seed = parse_value("seed", settings.pop("seed", None), int, {"min": 0})
            split = parse_section(SplitSettings, settings).validate()
        except (TypeError, ValueError) as exc:
            raise fail("config", str(exc)) from None

        sample_role = _role_lists(raw["samples"], "samples", lambda s: isinstance(s, str), fail)
        # Identity codes are >= 0 (FaceDataset.identity); validates, the result is unused.
        _role_lists(raw["identities"], "identities", lambda i: is_int(i) and i >= 0, fail)
        if len(sample_role) != raw["num_samples"]:
            raise fail("samples", f"{len(sample_role)} samples in all roles, expected num_samples={raw['num_samples']}")

        clients = raw["clients"]
        if not (isinstance(clients, list) and len(clients) == split.num_clients):
            raise fail("clients", f"expected a list of {split.num_clients} client lists (config.num_clients)")
        owner: dict[str, int] = {}
        for c, sids in enumerate(clients):
            if not isinstance(sids, list):
                raise fail(f"clients[{c}]", "expected a list of sample ids")
            for sid in sids:
                if not isinstance(sid, str) or sample_role.get(sid) != "member":
                    raise fail(f"clients[{c}]", f"sample id {sid!r} is not a member sample "
                                                f"(role {sample_role.get(sid) if isinstance(sid, str) else None})")
                if sid in owner:
                    raise fail(f"clients[{c}]", f"sample id {sid!r} is also on client {owner[sid]}")
                owner[sid] = c
        unassigned = [s for s in raw["samples"]["member"] if s not in owner]
        if unassigned:
            raise fail("clients", f"member sample id {unassigned[0]!r} is on no client")

        summary = raw["client_summary"]
        if not (isinstance(summary, list) and len(summary) == split.num_clients
                and all(isinstance(s, dict) for s in summary)):
            raise fail("client_summary", f"expected a list of {split.num_clients} objects")
        for c, s in enumerate(summary):
            if s.get("samples") != len(clients[c]):
                raise fail(f"client_summary[{c}].samples", f"expected {len(clients[c])}, got {s.get('samples')!r}")

        manifest = cls(
            source=raw["source"], fingerprint=raw["fingerprint"], num_samples=raw["num_samples"], split=split,
            seed=seed,
            samples={r: tuple(raw["samples"][r]) for r in ROLES},
            identities={r: tuple(sorted(raw["identities"][r])) for r in ROLES},
            clients=tuple(tuple(c) for c in clients), client_summary=tuple(summary),
        )
        if raw["counts"] != manifest.counts():
            raise fail("counts", f"expected {manifest.counts()} (derived from samples/identities), got {raw['counts']!r}")
        return manifest


def _role_lists(raw: Any, key: str, valid: Callable[[Any], bool],
                fail: Callable[[str, str], ValueError]) -> dict[Any, str]:
    """Check a role -> list mapping (exactly the four roles, valid elements, no element twice
    within or across roles) and return element -> role."""
    if not isinstance(raw, dict):
        raise fail(key, "expected an object of role -> list")
    for role in raw:
        if role not in ROLES:
            raise fail(f"{key}.{role}", f"unknown role (expected one of {ROLES})")
    seen: dict[Any, str] = {}
    for role in ROLES:
        items = raw.get(role)
        if not isinstance(items, list):
            raise fail(f"{key}.{role}", "missing, or not a list")
        for item in items:
            if not valid(item):
                raise fail(f"{key}.{role}", f"invalid entry {item!r}")
            if item in seen:
                raise fail(f"{key}.{role}", f"{item!r} is listed twice (also under role {seen[item]!r})")
            seen[item] = role
    return seen
