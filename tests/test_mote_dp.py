"""MOTE under DP-SGD (common.mote.private): a gallery is one accounted mechanism over impostor records.

Checked against autograd and Google's dp_accounting, no mocks: each sampled record's joint gradient
(summed over its rows and over every model of the stack) is clipped to C, a record never trains its
own person's model, the sampler takes all of a record's rows or none, the ledger's epsilon is
dp_accounting's for the recorded (q, sigma, steps), the noise is the client's secret, and a real
enrollment from the federation's data reports its mechanism.
"""

from __future__ import annotations

import json
import logging
import math

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.rdp import RdpAccountant
from sim_runs import TINY, simulated_run

from common.config import ConfigError, DPConfig, MoteConfig, load_config
from common.mote.gallery import enroll
from common.mote.kde import GenderKDE
from common.mote.networks import HIDDEN, backprop, parameter_count, unflatten
from common.mote.private import ImpostorRecords, PrivateRun, PrivateSteps, plan, record_weights
from common.train.dp import dp_generators
from server.ledger import PrivacyLedger

ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # Opacus' default RDP orders
DELTA = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
SMALL = MoteConfig(synthetic=20, impostors=40, synthetic_impostors=20, batch_size=16, epochs=3, patience=2)


@pytest.fixture(scope="module", autouse=True)
def _quiet_absl() -> None:
    logging.getLogger("absl").setLevel(logging.ERROR)


def _dp(unit: str = "sample") -> DPConfig:
    return DPConfig(unit=unit, max_images_per_identity=3, delta=DELTA, accountant="rdp")


def _dp_accounting_epsilon(sigma: float, q: float, steps: int) -> float:
    acc = RdpAccountant(ORDERS)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(DELTA)


def _sample_loss(p: dict, x: torch.Tensor, y: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
    a1 = torch.relu(x @ p["w1"] + p["b1"]) * m1
    a2 = torch.relu(a1 @ p["w2"] + p["b2"]) * m2
    return torch.nn.functional.binary_cross_entropy_with_logits(a2 @ p["w3"] + p["b3"], y)


def test_each_records_joint_gradient_over_all_models_is_clipped_to_c() -> None:
    """Records of 1-3 rows in a stack of 3 models; one row shows model 1's own person. The weighted
    joint gradient of every record (autograd, per row and per model) has norm <= C, records below
    C keep weight 1, and a row never enters its own person's model."""
    k, dim = 3, 6
    gen = torch.Generator().manual_seed(0)
    flat = torch.randn(k, parameter_count(dim), generator=gen, dtype=torch.float64) * 0.5
    record = torch.tensor([0, 0, 0, 1, 2, 2, 3])
    person = torch.tensor([10, 10, 10, 11, 12, 12, 21])  # models enroll persons 20, 21, 22
    models = torch.tensor([20, 21, 22])
    n = record.numel()
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64).unsqueeze(0).expand(k, n, dim)
    y = torch.zeros(n, dtype=torch.float64)
    m1 = (torch.rand(k, n, HIDDEN[0], generator=gen) > 0.5).double() * 2
    m2 = (torch.rand(k, n, HIDDEN[1], generator=gen) > 0.5).double() * 2
    p = unflatten(flat, dim)
    own = (person.unsqueeze(0) == models.unsqueeze(1)).double()
    per_row = torch.func.vmap(torch.func.grad(_sample_loss), in_dims=(None, 0, 0, 0, 0))
    grads = []  # (n, P) per model, PARAM_NAMES order
    for i in range(k):
        g = per_row({name: t[i] for name, t in p.items()}, x[i], y, m1[i], m2[i])
        grads.append(torch.cat([t.reshape(n, -1) for t in g.values()], dim=1))

    def joint(weight: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(int(record.max()) + 1, k, parameter_count(dim), dtype=torch.float64)
        for i in range(k):
            for r in range(n):
                out[record[r], i] += weight[i, r] * grads[i][r]
        return out.flatten(1).norm(dim=1)

    raw = joint(1 - own)
    C = float(raw.sort().values[1:3].mean())  # between the 2nd and 3rd record: both branches exercised
    weight = record_weights(backprop(p, x, y, m1, m2), (record.unsqueeze(0) == record.unsqueeze(1)).double(), own, C)
    norms = joint(weight)
    assert (norms <= C * (1 + 1e-6)).all()
    big = raw > C
    assert 0 < big.sum() < big.numel()
    torch.testing.assert_close(norms[big], torch.full_like(norms[big], C), rtol=1e-5, atol=0)
    torch.testing.assert_close(norms[~big], raw[~big])  # below C: untouched
    assert weight[1, 6] == 0 and weight[0, 6] > 0 and weight[2, 6] > 0  # never in its own person's model


def test_records_group_rows_by_unit_and_the_sampler_takes_whole_records() -> None:
    emb = np.random.default_rng(0).normal(size=(12, 4)).astype(np.float32)
    ident = np.array([5, 5, 5, 5, 5, 7, 7, 9, 9, 9, 3, 3])
    by_image = ImpostorRecords.build(emb, ident, "sample", 3)
    assert by_image.count == 12 and by_image.rows_per_record == 1
    by_person = ImpostorRecords.build(emb, ident, "identity", 3)
    assert by_person.count == 4 and by_person.rows_per_record == 3
    assert by_person.embeddings.shape[0] == 3 + 2 + 3 + 2  # person 5 capped at its first 3 images
    np.testing.assert_array_equal(by_person.embeddings[:3], emb[:3])
    settings = MoteConfig(batch_size=8, impostors=4, synthetic_impostors=0, epochs=1)
    mech = plan(by_person, settings, _dp("identity"), galleries=1)
    assert mech.sample_rate == pytest.approx(min(1.0, 4 / (4 * 3))) and mech.steps_per_epoch == 3
    steps = PrivateSteps(np.array([1]), by_person, mech, settings, *dp_generators(1), torch.Generator())
    seen = []
    for _ in range(200):
        rows = steps.sample()
        chosen = set(by_person.record[rows.numpy()].tolist())
        assert rows.numel() == sum(int((by_person.record == r).sum()) for r in chosen)
        seen.append(len(chosen))
    assert 0.25 < np.mean(seen) / by_person.count < 0.42  # q = 1/3


@pytest.mark.parametrize("unit", ["sample", "identity"])
def test_ledger_epsilon_equals_dp_accounting_and_the_target(unit: str) -> None:
    emb = np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32)
    records = ImpostorRecords.build(emb, np.repeat(np.arange(20), 3), unit, 3)
    settings = MoteConfig(batch_size=16, epochs=5, dp_target_epsilon=4.0)
    mech = plan(records, settings, _dp(unit), galleries=2)
    ledger = PrivacyLedger("rdp", DELTA)
    entry = ledger.record_mote(0, mech.ledger(False, [7, 9]))
    steps = mech.steps_per_gallery * 2
    assert entry["steps"] == steps and entry["galleries"] == 2
    want = _dp_accounting_epsilon(mech.noise_multiplier, mech.sample_rate, steps)
    assert entry["epsilon_rdp"] == pytest.approx(want, abs=1e-3)
    assert entry["epsilon"] == pytest.approx(4.0, rel=0.02) and entry["epsilon"] <= 4.0 + 1e-6
    assert entry["epsilon_per_gallery"] < entry["epsilon"]
    assert entry["epsilon_prv"] == pytest.approx(entry["epsilon_rdp"], rel=0.3)
    assert ("impostor record" in entry["unit"]) and ("person" in entry["unit"]) == (unit == "identity")
    twice = ledger.record_mote(1, {**mech.ledger(False, [7, 9]), "releases": 2})
    assert twice["steps"] == 2 * steps and twice["epsilon_rdp"] == pytest.approx(
        _dp_accounting_epsilon(mech.noise_multiplier, mech.sample_rate, 2 * steps), abs=1e-3)
    back = PrivacyLedger.from_json(ledger.to_json(), "privacy.json")
    assert back.mote[0]["epsilon"] == entry["epsilon"] and "impostor record" in ledger.to_json()["mote"]["guarantee"]


def _toy(seed: int = 0) -> dict:
    """8 enrolled persons (ids 0-7) with one reference each, 24 record rows of persons 0-11, a
    public population of 30 persons (negative ids) for the KDEs and the public rows."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(42, 8))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(persons: np.ndarray) -> np.ndarray:
        return (centres[persons] + rng.normal(scale=0.05, size=(persons.size, 8))).astype(np.float32)

    pub_id = np.repeat(np.arange(12, 42), 4)
    rec_id = np.repeat(np.arange(12), 2)
    return {"ref": draw(np.arange(8)), "ref_id": np.arange(8), "rec": draw(rec_id), "rec_id": rec_id,
            "pub": draw(pub_id), "pub_id": -1 - pub_id, "pub_gender": (pub_id % 2)}


def _private_gallery(toy: dict, noise_seed: int | None, settings: MoteConfig):
    records = ImpostorRecords.build(toy["rec"], toy["rec_id"], "sample", 1)
    mech = plan(records, settings, _dp(), galleries=1)
    kde = GenderKDE.fit(toy["pub"], toy["pub_id"], toy["pub_gender"], bandwidths=[0.02, 0.05], seed=0)
    private = PrivateRun(records, mech, *dp_generators(noise_seed))
    return enroll(toy["ref"], toy["ref_id"], kde, toy["pub"], toy["pub_id"], 0.5, 0, settings, private), mech


def test_private_enrollment_noise_is_the_clients_secret_and_learns_at_large_epsilon() -> None:
    toy = _toy()
    settings = MoteConfig(**{**vars(SMALL), "dp_noise_multiplier": 1.0})
    a, mech = _private_gallery(toy, noise_seed=11, settings=settings)
    b, _ = _private_gallery(toy, noise_seed=11, settings=settings)
    c, _ = _private_gallery(toy, noise_seed=12, settings=settings)
    assert a.info["steps"] <= mech.steps_per_gallery
    for name in a.params:
        assert torch.equal(a.params[name], b.params[name])  # same secret seed: same release
    assert not torch.allclose(a.params["w1"], c.params["w1"])  # the run seed alone does not fix the noise
    quiet = MoteConfig(**{**vars(SMALL), "dp_noise_multiplier": 0.05, "epochs": 15, "patience": 15})
    gallery, _ = _private_gallery(toy, noise_seed=3, settings=quiet)
    scores = gallery.logits(toy["ref"])  # (8 probes, 8 models): each model should prefer its own person
    assert (scores.argmax(1) == np.arange(8)).mean() >= 0.75


def test_the_mote_noise_seed_is_fresh_entropy_unless_the_operator_allows_reproducible_noise() -> None:
    from client.local import mote_noise_seed

    assert mote_noise_seed(load_config(None, []), 0, allow_reproducible=True) is None  # no MOTE DP, no seed
    cfg = load_config(None, ["mote.dp_target_epsilon=4"])
    assert mote_noise_seed(cfg, 0, False) != mote_noise_seed(cfg, 0, False)
    research = load_config(None, ["mote.dp_target_epsilon=4", "dp.reproducible_noise=true"])
    with pytest.raises(ValueError, match="allow-reproducible-noise"):
        mote_noise_seed(research, 0, allow_reproducible=False)
    assert mote_noise_seed(research, 0, True) == mote_noise_seed(research, 0, True) != mote_noise_seed(research, 1, True)
    toy = _toy()
    settings = MoteConfig(**{**vars(SMALL), "dp_noise_multiplier": 1.0})
    fresh = [_private_gallery(toy, None, settings)[0].params["w1"] for _ in range(2)]
    derived = _private_gallery(toy, mote_noise_seed(research, 0, True), settings)[0].params["w1"]
    assert not torch.allclose(fresh[0], fresh[1]) and not torch.allclose(fresh[0], derived)


@pytest.mark.parametrize("population", ["public", "members"])
def test_public_impostors_use_no_private_image_but_the_references(population: str) -> None:
    """With mote.impostor_population = public, replacing every non-reference image of the client
    changes no weight of its galleries; with the paper's member impostors it does (the control)."""
    import dataclasses

    from common.data.cache import build_dataset
    from common.mote.enrollment import client_references, enroll_client
    from common.nn.build import build_model, model_spec
    from common.split.build import build_manifest

    cfg = load_config(None, [*TINY[:-2], "split.num_clients=2", "data.identities=24", "data.images_per_identity=6",
                             "pretrain.identities=12", "pretrain.images_per_identity=4", "mote.epochs=2",
                             "mote.balancing_factors=0.5", "mote.synthetic=20", "mote.impostors=40",
                             "mote.synthetic_impostors=20", "mote.batch_size=16", f"mote.impostor_population={population}"])
    ds = build_dataset(cfg)
    model = build_model(model_spec(cfg), 0)
    manifest = build_manifest(cfg, ds)
    refs = np.concatenate(list(client_references(manifest, ds, cfg, 0).values()))
    others = np.setdiff1d(manifest.client_indices(ds, 0), refs)
    images = ds.images.copy()
    images[others] = 255 - images[others]
    a, info = enroll_client(cfg, ds, model, 0, seed=0)
    b, _ = enroll_client(cfg, dataclasses.replace(ds, images=images), model, 0, seed=0)
    same = all(torch.equal(a[0].params[n], b[0].params[n]) for n in a[0].params)
    assert same == (population == "public")
    assert info["impostors"] == population and info["kde"]["population"] == ("public" if same else "members")


def test_a_re_sent_enrollment_reuses_the_secret_and_a_different_release_is_counted(tmp_path) -> None:
    from client.local import StateStore, mote_noise_seed

    store = StateStore.for_client(tmp_path, "run-1", 0)
    assert store.mote_seed() is None
    cfg = load_config(None, ["mote.dp_target_epsilon=4"])
    seed = mote_noise_seed(cfg, 0, False, store.mote_seed())
    assert store.record_mote_release(seed, "a" * 64) == 1
    assert mote_noise_seed(cfg, 0, False, store.mote_seed()) == seed  # the enrollment is sent again
    assert store.record_mote_release(seed, "a" * 64) == 1  # same galleries: nothing new released
    assert store.record_mote_release(seed, "b" * 64) == 2  # other galleries: a second release


def test_config_refuses_mote_dp_with_private_kdes_or_without_public_data() -> None:
    cfg = load_config(None, ["mote.dp_target_epsilon=4"])
    assert cfg.mote.dp_enabled() and cfg.mote.kde_source() == "public"
    with pytest.raises(ConfigError, match="mote.kde_population"):
        load_config(None, ["mote.dp_target_epsilon=4", "mote.kde_population=members"])
    with pytest.raises(ConfigError, match="pretrain.identities"):
        load_config(None, ["mote.dp_target_epsilon=4", "pretrain.identities=0"])
    with pytest.raises(ConfigError, match="nothing to protect"):
        load_config(None, ["mote.dp_target_epsilon=4", "mote.impostor_population=public"])
    with pytest.raises(ConfigError, match="mote.impostor_population"):
        load_config(None, ["mote.impostor_population=public", "pretrain.identities=0"])
    assert not load_config(None, ["mote.dp_target_epsilon=inf"]).mote.dp_enabled()
    assert math.isinf(load_config(None, ["mote.dp_target_epsilon=inf"]).mote.dp_target_epsilon)


# One backbone round without DP, then a private enrollment of persons (dp.unit = identity): the
# wiring from the client's enroll query to the server's ledger and the report.
MOTE_DP_RUN = tuple(o for o in TINY if o not in ("mote.enabled=false", "pretrain.identities=0")) + (
    "split.num_clients=2", "federation.min_train_clients=2", "federation.min_available_clients=2",
    "data.identities=40", "data.images_per_identity=8", "federation.local_epochs=1", "federation.rounds=1",
    "dp.mode=off", "dp.unit=identity", "pretrain.identities=24", "pretrain.images_per_identity=4",
    "pretrain.epochs=1", "mote.epochs=3", "mote.references=2", "mote.balancing_factors=0.0,0.5",
    "mote.dp_target_epsilon=2")


@pytest.mark.timeout(300)
def test_a_federation_enrolls_under_mote_dp_and_the_server_ledgers_it(tmp_path_factory) -> None:
    from common.report.html import write_report

    run, _ = simulated_run(tmp_path_factory, MOTE_DP_RUN, tag="mote-dp")
    mote = json.loads(run.privacy_path.read_text())["mote"]["clients"]
    assert set(mote) == {"0", "1"}
    for entry in mote.values():
        assert 1.9 < entry["epsilon"] <= 2.0 + 1e-6
        assert "person" in entry["unit"] and entry["galleries"] == 2 and not entry["reproducible_noise"]
        want = _dp_accounting_epsilon(entry["noise_multiplier"], entry["sample_rate"], entry["steps"])
        assert entry["epsilon_rdp"] == pytest.approx(want, abs=1e-3)
        assert all(0 < s <= entry["steps_per_gallery"] for s in entry["steps_taken"])
        assert entry["releases"] == 1  # recorded in the client's state directory
    enrollment = json.loads(run.mote_enrollment_path.read_text())
    assert [c["kde"]["population"] for c in enrollment["per_client"]] == ["public", "public"]
    enrolled = [e for e in run.read_metrics() if e.get("event") == "enroll"][-1]
    assert enrolled["mote_max_epsilon"] == max(e["epsilon"] for e in mote.values())
    html = write_report(run.path).read_text(encoding="utf-8")
    assert "MOTE enrollment with DP-SGD" in html and "impostor record" in html
