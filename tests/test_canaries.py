"""The one-run canary audit (Steinke, Nasr & Jagielski 2023): the canary plan, how clients train
the included canaries, canaries.json, the configuration checks and the audit's lower bound."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from sim_runs import TINY, round_events, simulated_run

from attacks.canary_audit import RAW_ARRAYS, canary_audit
from client.local import local_data
from common.config import AuditConfig, Config, ConfigError, load_config
from common.data.cache import build_dataset
from common.data.dataset import FaceDataset
from common.nn.build import build_model, model_spec
from common.runs.rundir import RunDir
from common.split.build import build_manifest
from common.split.canaries import (
    CANARY_STREAM,
    CanaryPlan,
    canary_mask,
    canary_plan,
    canary_sample_ids,
    client_sample_counts,
    load_canaries,
    write_canaries,
)
from common.split.manifest import Manifest
from common.train.loop import target_labels, train

M = 48
# 40 identities x 8 images of 32 px; a large nonmember share gives 120 nonmember-role samples.
BASE = ["data.identities=40", "data.images_per_identity=8", "data.image_size=32", "split.member=0.5",
        "split.nonmember=0.3", "split.aux=0.1", "split.probe=0.1", "train.task=attribute", f"audit.canaries={M}",
        "dp.mode=off", "model.width=8", "model.blocks=1,1", "model.embedding_dim=16", "pretrain.identities=0",
        "mote.enabled=false", "train.augment=false", "train.weight_decay=0", "train.batch_size=32", "train.lr=0.01"]


def config(*extra: str, clients: int = 3) -> Config:
    return load_config(None, [*BASE, f"split.num_clients={clients}", "federation.min_train_clients=1",
                              "federation.min_available_clients=1", *extra])


@pytest.fixture(scope="module")
def setup() -> tuple[Config, FaceDataset, CanaryPlan]:
    cfg = config()
    ds = build_dataset(cfg)
    return cfg, ds, canary_plan(cfg, ds, build_manifest(cfg, ds))


def test_plan_is_deterministic_and_draws_labelled_nonmember_samples(setup) -> None:
    cfg, ds, plan = setup
    manifest = build_manifest(cfg, ds)
    assert canary_plan(cfg, ds, manifest) == plan
    assert plan.m == M and plan.stream == CANARY_STREAM and plan.seed == cfg.seed
    pos = ds.positions(plan.sample_ids)
    assert (np.diff(pos) > 0).all()  # data set order, no repeats
    assert manifest.role_mask(ds, "nonmember")[pos].all() and not manifest.role_mask(ds, "member")[pos].any()
    np.testing.assert_array_equal(plan.label, 1 - target_labels(ds, "smiling")[pos])
    client = np.asarray(plan.client)
    np.testing.assert_array_equal(client >= 0, plan.included)
    assert client.max() < manifest.num_clients
    other = config("seed=1")
    assert canary_plan(other, ds, build_manifest(other, ds)).sample_ids != plan.sample_ids


def test_held_out_evaluation_leaves_the_canaries_out(setup) -> None:
    from common.evaluation.global_model import GlobalEvaluator

    cfg, ds, plan = setup
    manifest = build_manifest(cfg, ds)
    held_out = set(GlobalEvaluator.from_manifest(cfg, ds, manifest).held_out.sample_ids.tolist())
    nonmembers = set(ds.sample_ids[manifest.role_mask(ds, "nonmember")].tolist())
    assert not held_out & set(plan.sample_ids) and nonmembers - set(plan.sample_ids) <= held_out


def test_about_half_of_the_canaries_are_included(setup) -> None:
    _, ds, _ = setup
    included = clients = 0
    seeds = range(20)
    for seed in seeds:
        cfg = config(f"seed={seed}")
        plan = canary_plan(cfg, ds, build_manifest(cfg, ds))
        included += sum(plan.included)
        clients += len({c for c in plan.client if c >= 0}) == 3
    n = M * len(seeds)
    assert abs(included - n / 2) < 4 * np.sqrt(n / 4)  # Binomial(960, 1/2): sd 15.5
    assert clients >= 18  # with ~24 included canaries, every client nearly always gets some


def test_each_included_canary_trains_once_on_its_client_with_its_label_flipped(setup) -> None:
    cfg, ds, plan = setup
    manifest = build_manifest(cfg, ds)
    truth = dict(zip(ds.sample_ids.tolist(), target_labels(ds, "smiling").tolist(), strict=True))
    seen: Counter[str] = Counter()
    for p in range(manifest.num_clients):
        data = local_data(cfg, p)
        n = len(manifest.clients[p])
        assert data.sample_ids[:n].tolist() == list(manifest.clients[p])
        extra = data.sample_ids[n:].tolist()
        assert extra == list(plan.client_sample_ids(p))
        seen.update(extra)
        labels = target_labels(data, "smiling").tolist()
        assert labels[:n] == [truth[s] for s in data.sample_ids[:n].tolist()]  # members keep their labels
        assert labels[n:] == [1 - truth[s] for s in extra]
        assert len(data) == client_sample_counts(manifest, plan)[p]  # what the server expects a client to claim
    for sid, inc, client in zip(plan.sample_ids, plan.included, plan.client, strict=True):
        assert seen[sid] == (1 if inc else 0), (sid, inc, client)


def test_canaries_json_round_trips_and_names_what_is_wrong(setup, tmp_path: Path) -> None:
    _, ds, plan = setup
    run = RunDir(tmp_path / "run")
    assert load_canaries(run) is None and canary_sample_ids(run) == frozenset() and not canary_mask(run, ds).any()
    assert write_canaries(run, plan) == run.canaries_path
    assert load_canaries(run) == plan
    raw = json.loads(run.canaries_path.read_text())
    assert raw["version"] == 1 and raw["attribute"] == "smiling" and raw["stream"] == CANARY_STREAM
    assert sum(raw["included"]) == sum(plan.included) and raw["client"].count(-1) == M - sum(plan.included)
    assert canary_sample_ids(run) == frozenset(plan.sample_ids)
    assert canary_mask(run, ds).sum() == M and set(ds.sample_ids[canary_mask(run, ds)]) == set(plan.sample_ids)

    i = plan.included.index(True)
    bad = {**raw, "client": [*raw["client"][:i], -1, *raw["client"][i + 1:]]}
    with pytest.raises(ValueError, match=rf"canaries.json: client\[{i}\]: an included canary needs a client"):
        CanaryPlan.from_json(bad, where=str(run.canaries_path))
    with pytest.raises(ValueError, match="label: invalid entry 2"):
        CanaryPlan.from_json({**raw, "label": [2] * M})
    with pytest.raises(ValueError, match="included: expected a list of one entry per canary"):
        CanaryPlan.from_json({**raw, "included": raw["included"][:-1]})
    with pytest.raises(ValueError, match="fingerprint: missing key"):
        CanaryPlan.from_json({k: v for k, v in raw.items() if k != "fingerprint"})

    off = config("audit.canaries=0")
    empty = canary_plan(off, ds, build_manifest(off, ds))
    assert empty.m == 0 and write_canaries(RunDir(tmp_path / "off"), empty) is None
    assert canary_audit(tmp_path / "off", build_model(model_spec(off), 0), off, ds, 1e-5) is None


def test_configuration_and_data_checks_name_audit_canaries(setup) -> None:
    _, ds, _ = setup
    with pytest.raises(ConfigError, match=r"audit\.canaries: 4 canaries .* train\.task = 'identity'"):
        load_config(None, ["audit.canaries=4"])
    with pytest.raises(ConfigError, match=r"audit\.canaries: expected a value in \[0"):
        load_config(None, ["audit.canaries=-1", "train.task=attribute"])
    with pytest.raises(ConfigError, match=r"audit\.canaries"):
        AuditConfig(canaries=-2)
    assert load_config(None, ["audit.canaries=4", "train.task=both"]).audit.canaries == 4
    greedy = config("audit.canaries=1000")
    with pytest.raises(ValueError, match=r"audit\.canaries: 1000 canaries requested, but only 120"):
        canary_plan(greedy, ds, build_manifest(greedy, ds))


def test_with_flipped_flips_only_the_given_positions(synth_small: FaceDataset) -> None:
    flipped = synth_small.with_flipped("gender", [0, 5])
    np.testing.assert_array_equal(flipped.gender[[0, 5]], 1 - synth_small.gender[[0, 5]])
    np.testing.assert_array_equal(flipped.gender[1:5], synth_small.gender[1:5])
    smiling = synth_small.with_flipped("smiling", [3])
    assert smiling.labels["smiling"][3] == 1 - synth_small.labels["smiling"][3]
    assert smiling.fingerprint() != synth_small.fingerprint()  # the copy is hashed afresh
    with pytest.raises(KeyError, match="'age' is not a label"):
        synth_small.with_flipped("age", [0])


def test_canary_audit_bounds_epsilon_only_when_the_model_trained_its_canaries(tmp_path: Path) -> None:
    """One client trains all members and the included canaries without DP until it memorises the
    flipped labels: a positive lower bound (46 of 48 guesses right: about 1.7). Untrained, or trained
    without the canaries: none (chance guesses)."""
    cfg = config(clients=1)
    ds = build_dataset(cfg)
    manifest = build_manifest(cfg, ds)
    run = RunDir(tmp_path)
    plan = canary_plan(cfg, ds, manifest)
    write_canaries(run, plan)

    untrained = canary_audit(run, build_model(model_spec(cfg), 0), cfg, ds, delta=1e-5)
    assert untrained is not None and untrained["bound"]["epsilon"] == 0.0

    clean = build_model(model_spec(cfg), 0)
    train(clean, ds.subset(manifest.client_indices(ds, 0)), cfg.train, cfg.dp, seed=0, epochs=30)
    without = canary_audit(run, clean, cfg, ds, delta=1e-5)
    assert without is not None and without["bound"]["epsilon"] < 0.3

    model = build_model(model_spec(cfg), 0)
    data = local_data(cfg, 0)
    assert len(data) == len(manifest.clients[0]) + sum(plan.included)
    train(model, data, cfg.train, cfg.dp, seed=0, epochs=60)
    result = canary_audit(run, model, cfg, ds, delta=1e-5)
    assert result is not None
    assert result["counts"] == {"m": M, "included": sum(plan.included), "excluded": M - sum(plan.included)}
    assert result["bound"]["epsilon"] > 1.0 and result["bound"]["canaries"] == M
    assert result["raw"] == list(RAW_ARRAYS) and list(result["arrays"]) == list(RAW_ARRAYS)
    ids, included, score = (result["arrays"][k] for k in RAW_ARRAYS)
    assert ids.tolist() == list(plan.sample_ids) and included.tolist() == list(plan.included)
    assert score.dtype == np.float64 and (score <= 0).all()
    assert score[included].mean() > score[~included].mean() + 1.0
    json.dumps({k: v for k, v in result.items() if k != "arrays"})  # JSON-ready but for the arrays


def test_a_simulated_run_records_its_canaries_and_its_clients_train_them(tmp_path_factory) -> None:
    """The server writes canaries.json beside an unchanged manifest, and accepts every client's
    sample count: its members plus the canaries it derived from the same seed (one Flower round)."""
    run, _ = simulated_run(tmp_path_factory, (
        *TINY, "split.num_clients=2", "federation.min_train_clients=2", "federation.min_available_clients=2",
        "data.identities=24", "data.images_per_identity=6", "federation.local_epochs=1", "federation.rounds=1",
        "train.task=attribute", "dp.mode=off", "audit.canaries=10", "split.member=0.5", "split.nonmember=0.3",
        "split.aux=0.1", "split.probe=0.1"), tag="canaries")
    cfg = load_config(run.config_path)
    ds = build_dataset(cfg)
    manifest = Manifest.load(run.manifest_path, expect_fingerprint=ds.fingerprint())
    plan = load_canaries(run)
    assert plan is not None and plan == canary_plan(cfg, ds, manifest)
    assert {c for c in plan.client if c >= 0} == {0, 1}  # both clients train canaries (seed 0)
    (event,) = round_events(run)
    claimed = {c["partition"]: c["num-examples"] for c in event["clients"]}
    assert claimed == dict(enumerate(client_sample_counts(manifest, plan)))
