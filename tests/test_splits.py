"""Split manifest and client partitioners: the audit's ground truth must be exact.

Property tests run over random small data sets and configurations with every partition scheme;
example tests pin down stratification, skew, determinism and the validation of files on disk.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.config import SplitSettings
from common.config.loader import parse_section
from common.data.dataset import FaceDataset
from common.split.manifest import ROLES, Manifest, make_manifest
from common.split.partition import PARTITIONS


def make_dataset(num_identities: int, seed: int, *, max_images: int = 15, male_share: float = 0.5,
                 group_p: tuple[float, ...] = (0.1, 0.4, 0.2, 0.2, 0.1)) -> FaceDataset:
    """Identities with 1..max_images images each; gender and group per identity (-1 possible)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, max_images + 1, num_identities)
    identity = np.repeat(rng.permutation(num_identities * 3)[:num_identities], sizes)
    gender = rng.choice([-1, 0, 1], num_identities, p=[0.05, 0.95 * (1 - male_share), 0.95 * male_share])
    group = rng.choice(np.arange(-1, 4), num_identities, p=group_p)
    idx = np.repeat(np.arange(num_identities), sizes)
    n = int(sizes.sum())
    return FaceDataset(
        images=np.zeros((n, 4, 4, 3), np.uint8), identity=identity, gender=gender[idx], group=group[idx],
        age=rng.integers(-1, 3, num_identities)[idx], labels={"smiling": rng.integers(0, 2, n)},
        sample_ids=[f"img/{i:05d}.png" for i in rng.permutation(n)], source="test",
        group_names=("g0", "g1", "g2", "g3"),
    )


def single_image_dataset(n: int) -> FaceDataset:
    """UTKFace-like: every image its own identity."""
    return FaceDataset(images=np.zeros((n, 4, 4, 3), np.uint8), identity=np.arange(n), gender=np.arange(n) % 2,
                       group=np.full(n, -1), age=np.full(n, -1), labels={}, sample_ids=[f"u{i}" for i in range(n)],
                       source="utk")


@st.composite
def split_configs(draw: st.DrawFn) -> SplitSettings:
    weights = [draw(st.integers(12, 20))] + [draw(st.integers(0, 4)) for _ in ROLES[1:]]
    return SplitSettings(
        **{role: w / sum(weights) for role, w in zip(ROLES, weights, strict=True)},
        member_nonmember_fraction=draw(st.sampled_from([0.0, 0.1, 0.15, 0.3])),
        member_probe_fraction=draw(st.sampled_from([0.0, 0.1, 0.15, 0.3])),
        num_clients=draw(st.integers(1, 4)),
        partition=draw(st.sampled_from(PARTITIONS)),
        alpha=draw(st.sampled_from([0.5, 1.0, 5.0, 100.0])),
        partition_attribute=draw(st.sampled_from(["gender", "group", "age", "smiling"])),
    )


def sample_role_array(m: Manifest, ds: FaceDataset) -> np.ndarray:
    roles = np.full(len(ds), "", dtype=object)
    for role in ROLES:
        roles[m.role_mask(ds, role)] = role
    return roles


@settings(max_examples=60, deadline=None)
@given(num_identities=st.integers(24, 60), data_seed=st.integers(0, 2**16), cfg=split_configs(),
       seed=st.integers(0, 2**32 - 1))
def test_manifest_properties(num_identities: int, data_seed: int, cfg: SplitSettings, seed: int) -> None:
    ds = make_dataset(num_identities, data_seed)
    m = make_manifest(ds, cfg, seed)

    # Every sample has exactly one role.
    masks = np.stack([m.role_mask(ds, r) for r in ROLES])
    assert (masks.sum(axis=0) == 1).all()
    assert sum(len(v) for v in m.samples.values()) == m.num_samples == len(ds)
    roles = sample_role_array(m, ds)

    # Every identity has exactly one identity role; held-out roles never share identities with members.
    id_sets = {r: set(m.identities[r]) for r in ROLES}
    assert set().union(*id_sets.values()) == set(ds.identity.tolist())
    assert sum(len(s) for s in id_sets.values()) == ds.num_identities
    for role in ("nonmember", "aux", "probe"):
        assert not id_sets[role] & id_sets["member"]
        assert (roles[np.isin(ds.identity, list(id_sets[role]))] == role).all()
    for ident in id_sets["member"]:
        own = roles[ds.identity == ident]
        assert set(own) <= {"member", "nonmember", "probe"} and (own == "member").any()
        assert ident in m.identities["member"]

    # Each member sample on exactly one client, nothing else on any client, each client big enough.
    per_client = [m.client_indices(ds, c) for c in range(cfg.num_clients)]
    on_clients = np.concatenate(per_client)
    assert np.array_equal(np.sort(on_clients), np.flatnonzero(roles == "member"))
    assert min(p.size for p in per_client) >= 1  # make_manifest's min_samples_per_client
    assert [s["samples"] for s in m.client_summary] == [p.size for p in per_client]
    client_of = np.full(len(ds), -1)
    for c, p in enumerate(per_client):
        client_of[p] = c
    if cfg.partition in ("identity_disjoint", "attribute"):
        member_ids = ds.identity[on_clients]
        assert all(np.unique(client_of[on_clients][member_ids == i]).size == 1 for i in np.unique(member_ids))
    if cfg.partition == "iid":
        sizes = [p.size for p in per_client]
        assert max(sizes) - min(sizes) <= 1

    # Deterministic, and the JSON document round-trips.
    doc = m.to_json()
    assert json.dumps(make_manifest(ds, cfg, seed).to_json()) == json.dumps(doc)
    assert Manifest.from_json(json.loads(json.dumps(doc))) == m


def test_save_load_is_byte_identical(tmp_path: Path) -> None:
    ds = make_dataset(40, 1)
    cfg = SplitSettings(partition="dirichlet", num_clients=3)
    first = make_manifest(ds, cfg, 7).save(tmp_path / "a.json")
    second = make_manifest(ds, cfg, 7).save(tmp_path / "b.json")
    assert first.read_bytes() == second.read_bytes()
    loaded = Manifest.load(first, expect_fingerprint=ds.fingerprint())
    assert loaded == make_manifest(ds, cfg, 7)
    assert loaded.seed == 7
    assert loaded.save(tmp_path / "c.json").read_bytes() == first.read_bytes()
    doc = json.loads(first.read_text())
    assert doc["version"] == 2 and doc["fingerprint"] == ds.fingerprint() and doc["source"] == "test"


def test_different_seeds_give_different_manifests() -> None:
    ds = make_dataset(40, 2)
    docs = [make_manifest(ds, SplitSettings(partition="dirichlet"), s) for s in range(5)]
    assert len({json.dumps(d.to_json()["samples"]) for d in docs}) == 5
    assert len({json.dumps(d.to_json()["clients"]) for d in docs}) == 5


@pytest.fixture()
def saved(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    ds = make_dataset(30, 3)
    path = make_manifest(ds, SplitSettings(num_clients=3, partition="iid"), 0).save(tmp_path / "manifest.json")
    return path, json.loads(path.read_text())


def _dup_role(d: dict[str, Any]) -> None:
    d["samples"]["aux"].append(d["samples"]["member"][0])


def _two_clients(d: dict[str, Any]) -> None:
    d["clients"][1].append(d["clients"][0][0])


def _unknown_role(d: dict[str, Any]) -> None:
    d["samples"]["attacker"] = []


def _aux_on_client(d: dict[str, Any]) -> None:
    d["clients"][2].append(d["samples"]["aux"][0])


def _member_on_no_client(d: dict[str, Any]) -> None:
    d["clients"][0].pop()


def _identity_twice(d: dict[str, Any]) -> None:
    d["identities"]["probe"].append(d["identities"]["member"][0])


def _set(key: str, value: Any) -> Any:
    return lambda d: d.update({key: value})


@pytest.mark.parametrize(("tamper", "problem"), [
    (_dup_role, r"samples\.aux: '.*' is listed twice \(also under role 'member'\)"),
    (_two_clients, r"clients\[1\]: sample id '.*' is also on client 0"),
    (_unknown_role, r"samples\.attacker: unknown role"),
    (_aux_on_client, r"clients\[2\]: sample id '.*' is not a member sample \(role aux\)"),
    (_member_on_no_client, r"clients: member sample id '.*' is on no client"),
    (_identity_twice, r"identities\.probe: .* is listed twice"),
    (_set("version", 1), r"version: expected 2, got 1"),
    (_set("num_samples", 3), r"samples: .* expected num_samples=3"),
    (_set("counts", {}), r"counts: expected"),
    (_set("extra", 1), r"extra: unknown key"),
    (lambda d: d.pop("clients"), r"clients: missing key"),
    (lambda d: d["config"].update(num_clients=5), r"clients: expected a list of 5"),
    (lambda d: d["config"].update(partition="random"), r"config: split\.partition: expected one of"),
    (lambda d: d["client_summary"][0].update(samples=-1), r"client_summary\[0\]\.samples"),
])
def test_load_rejects_tampered_file(saved: tuple[Path, dict[str, Any]], tamper: Any, problem: str) -> None:
    path, doc = saved
    tamper(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=problem) as info:
        Manifest.load(path)
    assert str(path) in str(info.value)


def test_load_rejects_truncated_json(saved: tuple[Path, dict[str, Any]]) -> None:
    path, _ = saved
    path.write_text(path.read_text()[:500])
    with pytest.raises(ValueError, match="not valid JSON") as info:
        Manifest.load(path)
    assert str(path) in str(info.value)


def test_fingerprint_mismatch_names_both(saved: tuple[Path, dict[str, Any]]) -> None:
    path, doc = saved
    with pytest.raises(ValueError, match=f"{doc['fingerprint']}.*{'0' * 64}"):
        Manifest.load(path, expect_fingerprint="0" * 64)
    other = make_dataset(30, 4)
    m = Manifest.load(path)
    for use in (lambda: m.role_mask(other, "member"), lambda: m.client_indices(other, 0)):
        with pytest.raises(ValueError, match=f"{doc['fingerprint']}.*{other.fingerprint()}"):
            use()


def test_lookup_errors(saved: tuple[Path, dict[str, Any]]) -> None:
    m = Manifest.load(saved[0])
    ds = make_dataset(30, 3)
    with pytest.raises(ValueError, match="client: expected 0..2, got 3"):
        m.client_indices(ds, 3)
    with pytest.raises(ValueError, match="role: expected one of"):
        m.role_mask(ds, "members")


def test_stratification_keeps_demographics_per_role() -> None:
    ds = make_dataset(2000, 5, max_images=3, male_share=0.75, group_p=(0.05, 0.55, 0.2, 0.15, 0.05))
    m = make_manifest(ds, SplitSettings(member_nonmember_fraction=0.0, member_probe_fraction=0.0, partition="iid"), 0)
    first = np.unique(ds.identity, return_index=True)[1]
    ident_gender = dict(zip(ds.identity[first].tolist(), ds.gender[first].tolist(), strict=True))
    ident_group = dict(zip(ds.identity[first].tolist(), ds.group[first].tolist(), strict=True))
    population = {(g, k) for g in (-1, 0, 1) for k in range(-1, 4)}
    all_ids = list(ident_gender)
    for role, fraction in SplitSettings().fractions().items():
        ids = m.identities[role]
        assert len(ids) == round(fraction * 2000)
        for g, k in population:
            share = np.mean([ident_gender[i] == g and ident_group[i] == k for i in ids])
            expected = np.mean([ident_gender[i] == g and ident_group[i] == k for i in all_ids])
            assert abs(share - expected) <= 2.5 / len(ids), (role, g, k)
        male = np.mean([ident_gender[i] == 1 for i in ids])
        assert abs(male - np.mean([ident_gender[i] == 1 for i in all_ids])) < 0.015, role


def test_member_holdout_shares() -> None:
    ds = make_dataset(600, 6)
    m = make_manifest(ds, SplitSettings(member_nonmember_fraction=0.15, member_probe_fraction=0.1, partition="iid"), 0)
    own = np.isin(ds.identity, m.identities["member"])
    for role, share in (("nonmember", 0.15), ("probe", 0.1)):
        assert abs((m.role_mask(ds, role) & own).sum() / own.sum() - share) < 0.01


def test_single_image_identities_stay_members() -> None:
    ds = single_image_dataset(200)
    m = make_manifest(ds, SplitSettings(num_clients=4, partition="identity_disjoint"), 0)
    member = m.role_mask(ds, "member")
    assert np.array_equal(np.sort(ds.identity[member]), np.asarray(m.identities["member"]))
    assert member.sum() == 120


def _client_sizes(ds: FaceDataset, m: Manifest) -> list[int]:
    return [m.client_indices(ds, c).size for c in range(m.num_clients)]


def _mean_identity_max_share(ds: FaceDataset, m: Manifest) -> float:
    client_of = np.full(len(ds), -1)
    for c in range(m.num_clients):
        client_of[m.client_indices(ds, c)] = c
    shares = []
    for ident in m.identities["member"]:
        clients = client_of[(ds.identity == ident) & (client_of >= 0)]
        if clients.size >= 5:
            shares.append(np.bincount(clients).max() / clients.size)
    return float(np.mean(shares))


def test_dirichlet_small_alpha_is_more_skewed() -> None:
    ds = make_dataset(200, 7)
    skewed, flat = (_mean_identity_max_share(ds, make_manifest(ds, SplitSettings(partition="dirichlet", alpha=a), 0))
                    for a in (0.05, 100.0))
    assert skewed > 0.85 and flat < 0.5 and skewed > flat


def test_attribute_partition_skews_the_attribute() -> None:
    ds = make_dataset(300, 8)

    def max_gender_share(m: Manifest) -> float:
        return float(np.mean([np.bincount(ds.gender[m.client_indices(ds, c)] + 1).max() / _client_sizes(ds, m)[c]
                              for c in range(m.num_clients)]))

    skewed = make_manifest(ds, SplitSettings(partition="attribute", alpha=0.1), 1)
    iid = make_manifest(ds, SplitSettings(partition="iid"), 1)
    assert max_gender_share(skewed) > 0.9 and max_gender_share(iid) < 0.65


def test_identity_disjoint_balances_clients() -> None:
    ds = make_dataset(200, 9)
    sizes = _client_sizes(ds, make_manifest(ds, SplitSettings(partition="identity_disjoint"), 0))
    assert max(sizes) - min(sizes) <= 15


def _only_members(ds: FaceDataset, min_samples_per_client: int = 1, **kw: Any) -> Manifest:
    kw.setdefault("partition", "iid")
    split = SplitSettings(member=1.0, nonmember=0.0, aux=0.0, probe=0.0, member_nonmember_fraction=0.0,
                          member_probe_fraction=0.0, **kw)
    return make_manifest(ds, split, 0, min_samples_per_client=min_samples_per_client)


@pytest.mark.parametrize(("ds", "kw", "problem"), [
    (single_image_dataset(3), {"num_clients": 4}, "3 member samples are too few for 4 clients"),
    (make_dataset(3, 0, max_images=15), {"num_clients": 4, "partition": "identity_disjoint"},
     "3 member identities are too few for 4 clients"),
    (FaceDataset(images=np.zeros((24, 4, 4, 3), np.uint8), identity=np.repeat([0, 1], 12), gender=np.zeros(24),
                 group=np.zeros(24), age=np.zeros(24), labels={}, sample_ids=[f"s{i}" for i in range(24)], source="x"),
     {"num_clients": 3, "partition": "dirichlet", "alpha": 1e-3, "min_samples_per_client": 7},
     r"no draw in 100 gave each of 3 clients >= 7 samples .*alpha=0.001 is too small"),
])
def test_infeasible_partition_raises(ds: FaceDataset, kw: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        _only_members(ds, **kw)


def test_unknown_partition_attribute() -> None:
    with pytest.raises(ValueError, match="partition_attribute: expected one of .*'smiling'.* got 'beard'"):
        make_manifest(make_dataset(30, 0), SplitSettings(partition="attribute", partition_attribute="beard"), 0)


# The split settings are the configuration's [split] section: built in code they are checked as
# when read from a file (field by field on construction, across fields by make_manifest).
@pytest.mark.parametrize(("kw", "field"), [
    ({"member": 0.5}, r"split\.member \+ split\.nonmember \+ split\.aux \+ split\.probe must sum to 1"),
    ({"member": 0.0, "nonmember": 0.5, "aux": 0.5, "probe": 0.0}, "split.member: expected a fraction > 0"),
    ({"member_nonmember_fraction": 1.0}, r"split.member_nonmember_fraction: expected a value in \[0.0, 0.9\]"),
    ({"member_nonmember_fraction": 0.6, "member_probe_fraction": 0.5}, "split.member_probe_fraction: expected"),
    ({"num_clients": 0}, r"split.num_clients: expected a value in \[1, inf\]"),
    ({"num_clients": 2.5}, "split.num_clients: expected int"),
    ({"seed": True}, "seed: expected an integer >= 0"),
    ({"partition": "random"}, "split.partition: expected one of"),
    ({"alpha": 0}, r"split.alpha: expected a value in \[1e-06, inf\]"),
    ({"alpha": float("inf")}, "split.alpha: expected a finite number"),
    ({"partition_attribute": ""}, "split.partition_attribute: expected"),
    ({"min_samples_per_client": -1}, "min_samples_per_client: expected an integer >= 0"),
])
def test_config_validation(kw: dict[str, Any], field: str) -> None:
    seed = kw.pop("seed", 0)
    min_samples = kw.pop("min_samples_per_client", 1)
    with pytest.raises(ValueError, match=field):
        make_manifest(make_dataset(30, 0), SplitSettings(**kw), seed, min_samples_per_client=min_samples)


def test_config_forms_and_round_trip() -> None:
    coerced = SplitSettings(alpha=1, num_clients=np.int64(4))
    assert coerced == SplitSettings(alpha=1.0)
    assert isinstance(coerced.alpha, float) and type(coerced.num_clients) is int
    assert parse_section(SplitSettings, dataclasses.asdict(coerced)) == coerced
    with pytest.raises(ValueError, match="split.clients: unknown key"):
        parse_section(SplitSettings, {"clients": 3})
