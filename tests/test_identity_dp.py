"""Identity-level DP-SGD (dp.unit = identity): one person, with all of their images, is the unit.

Real Opacus per-sample gradients on the project's model, no mocks: per-identity clipping (each
identity's summed gradient, over all parameters jointly, has norm <= C whatever its image count),
Gaussian noise of std sigma C once per step from the DP noise generator, Poisson sampling of whole
identities, the accountant against Google's dp_accounting, a client's two rounds through
``local_train`` and the ledger's unit and person-level bound.
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
from sim_runs import LEDGER_FULL
from torch import nn

from client.local import local_data, local_train
from common.config import ConfigError, DPConfig, TrainConfig, load_config
from common.nn.build import build_identity_head, build_model, model_spec
from common.nn.face_model import ModelSpec
from common.train.dp import make_accountant, spent_epsilon, total_steps
from common.train.identity_dp import (
    DP_UNITS,
    IdentityPoissonLoader,
    capped_members,
    group_privacy,
    identity_clipped_gradients,
    identity_sample_rate,
    identity_steps_per_epoch,
    make_private_by_identity,
    num_identities,
)
from common.train.local_round import ClientState, dp_sampling, largest_identity_images
from common.train.loop import _Joint, task_loss, train
from server.ledger import IDENTITY_UNIT, SAMPLE_UNIT, PrivacyLedger

pytestmark = pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook is firing",
                                        "ignore:The given NumPy array is not writable",
                                        "ignore:Optimal order is the largest alpha")

# Opacus' default RDP orders (opacus.accountants.RDPAccountant.DEFAULT_ALPHAS).
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
DELTA = 1e-5
SPEC = ModelSpec(width=8, blocks=(1, 1), embedding_dim=16, image_size=32, attribute_head=True)
TRAIN = TrainConfig(task="both", attribute="gender", optimizer="adam", lr=0.002, weight_decay=5e-4, margin="arcface",
                    margin_scale=30.0, max_seconds=0.0, augment=True, batch_size=16)


@pytest.fixture(scope="module", autouse=True)
def _quiet_absl() -> None:
    logging.getLogger("absl").setLevel(logging.ERROR)


def _dp(**kw) -> DPConfig:
    """Every setting spelled out: the tests must not depend on the project's defaults."""
    return DPConfig(**{"mode": "sample", "unit": "identity", "max_images_per_identity": 5, "grad_sample_mode": "hooks",
                       "accountant": "rdp", "max_grad_norm": 1.0, "delta": DELTA, **kw})


def rdp_epsilon(history, delta: float = DELTA) -> float:
    acc = RdpAccountant(ORDERS)
    for sigma, q, steps in history:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


def _flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


# --- clipping -------------------------------------------------------------------------------

def test_each_identity_is_clipped_jointly_whatever_its_image_count() -> None:
    """Identities of 1, 3 and 9 images (interleaved in the batch), random inputs and targets."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([0] * 1 + [1] * 3 + [2] * 9)[torch.randperm(13, generator=gen)]
    x = torch.rand(13, 3, 32, 32, generator=gen) * 2 - 1
    y_id = torch.randint(0, 5, (13,), generator=gen)
    y_attr = torch.randint(0, 2, (13,), generator=gen)
    joint = _Joint(build_model(SPEC, 0), build_identity_head(SPEC, 5, 1))
    params = [p for p in joint.parameters() if p.requires_grad]

    def loss(module: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        # Per-sample weights (as fairness reweighting gives) bring the norms of a fresh model on
        # random images (~1e3) near 1, where float32 resolves the 1e-6 of the clipping check.
        cos, attr = module(x[rows])
        return task_loss(cos, attr, y_id[rows], y_attr[rows], TRAIN) * 1e-3

    # Reference, independent of Opacus: each identity's gradient by plain autograd.
    reference = [_flat(torch.autograd.grad(loss(joint, (ids == i).nonzero().flatten()).sum(), params))
                 for i in range(3)]
    raw = torch.stack([r.norm() for r in reference])
    order = raw.argsort()
    clip = float(raw[order[0]] + raw[order[1]]) / 2  # the smallest identity is below C, the others above

    module, opt = make_private_by_identity(joint, torch.optim.SGD(params, lr=0.0), noise_multiplier=0.0,
                                           max_grad_norm=clip, expected_identities=1.0, grad_sample_mode="hooks",
                                           generator=None)
    try:
        opt.zero_grad(set_to_none=True)
        loss(module, torch.arange(13)).sum().backward()
        clipped, codes, norms = identity_clipped_gradients([p.grad_sample for p in params], ids, clip)
        assert codes.tolist() == [0, 1, 2]
        torch.testing.assert_close(norms, raw, rtol=1e-4, atol=1e-6)  # Opacus' per-sample grads, summed per identity
        per_identity = [_flat([c[i] for c in clipped]) for i in range(3)]
        for i in range(3):
            assert per_identity[i].norm() <= clip + 1e-6, (i, float(per_identity[i].norm()), clip)
        small = int(order[0])
        torch.testing.assert_close(per_identity[small], reference[small], rtol=1e-4, atol=1e-6)  # not scaled
        for i in (int(order[1]), int(order[2])):  # scaled down to C, direction kept
            assert per_identity[i].norm() == pytest.approx(clip, rel=1e-5)
            torch.testing.assert_close(per_identity[i], reference[i] * clip / raw[i], rtol=1e-4, atol=1e-6)
        # The optimiser's own path (noise multiplier 0, one expected identity): the sum of the clipped sums.
        opt.set_identities(ids)
        opt.step()
        torch.testing.assert_close(_flat([p.grad for p in params]), sum(per_identity), rtol=1e-4, atol=1e-6)
    finally:
        module._close()


def test_a_step_without_set_identities_is_refused() -> None:
    layer = nn.Linear(4, 2)
    module, opt = make_private_by_identity(layer, torch.optim.SGD(layer.parameters(), lr=0.1), noise_multiplier=1.0,
                                           max_grad_norm=1.0, expected_identities=1.0, grad_sample_mode="ghost",
                                           generator=None)
    try:
        module(torch.ones(3, 4)).sum().backward()
        with pytest.raises(ValueError, match="set_identities"):
            opt.step()
    finally:
        module._close()


# --- noise ----------------------------------------------------------------------------------

def test_noise_is_added_once_per_step_with_std_sigma_c_from_the_noise_generator() -> None:
    """Empty batches (no identity drawn) are noise-only steps: the gradient is exactly the noise
    over the expected number of identities. 100,500 values per step: a 3 % tolerance on the std
    is over 10 standard errors."""
    sigma, clip, expected, steps = 1.3, 0.7, 2.5, 4
    layer = nn.Linear(200, 500)
    noise = torch.Generator().manual_seed(11)
    replay = torch.Generator().manual_seed(11)
    accountant = make_accountant("rdp")
    module, opt = make_private_by_identity(layer, torch.optim.SGD(layer.parameters(), lr=0.0), noise_multiplier=sigma,
                                           max_grad_norm=clip, expected_identities=expected, grad_sample_mode="hooks",
                                           generator=noise, step_hook=accountant.get_optimizer_hook_fn(sample_rate=0.1))
    try:
        previous = None
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            opt.set_identities(torch.zeros(0, dtype=torch.int64))
            opt.step()
            grad = _flat([p.grad for p in opt.params]) * expected
            assert grad.std().item() == pytest.approx(sigma * clip, rel=0.03)
            assert abs(grad.mean().item()) < 0.02 * sigma * clip
            # Exactly one draw per parameter per step, from the DP noise generator.
            drawn = _flat([torch.normal(0.0, sigma * clip, p.shape, generator=replay) for p in opt.params])
            torch.testing.assert_close(grad, drawn, rtol=1e-5, atol=1e-6)
            assert previous is None or not torch.equal(grad, previous)
            previous = grad
        assert accountant.history == [(sigma, 0.1, steps)]
    finally:
        module._close()


# --- sampling -------------------------------------------------------------------------------

def test_the_sampler_draws_whole_capped_identities() -> None:
    rng = np.random.default_rng(0)
    sizes = [1, 3, 9, 12, 4, 2, 7, 5]
    identity = rng.permutation(np.repeat(np.arange(len(sizes)) * 10 + 3, sizes))  # arbitrary codes, shuffled
    cap, batch = 4, 6
    members = capped_members(identity, cap)
    for code, m in zip(sorted(set(identity.tolist())), members):
        assert m.tolist() == np.flatnonzero(identity == code)[:cap].tolist()  # the first `cap` in sample order
    q = identity_sample_rate(len(sizes), batch, cap)
    assert q == batch / (cap * len(sizes)) and identity_steps_per_epoch(len(sizes), batch, cap) == math.ceil(1 / q)

    rows = torch.arange(len(identity))
    loader = IdentityPoissonLoader((rows, torch.from_numpy(identity)), identity, batch_size=batch,
                                   max_images_per_identity=cap, generator=torch.Generator().manual_seed(3))
    twin = IdentityPoissonLoader((rows,), identity, batch_size=batch, max_images_per_identity=cap,
                                 generator=torch.Generator().manual_seed(3))
    assert loader.sample_rate == q and len(loader) == identity_steps_per_epoch(len(sizes), batch, cap)
    global_rng = torch.random.get_rng_state()
    drawn = np.zeros(len(sizes))
    empty = total = 0
    for _ in range(600):  # epochs
        for (got, got_ids), (again,) in zip(loader, twin):
            assert torch.equal(got, again)  # the generator alone decides
            present = set(got.tolist())
            total += 1
            empty += not present
            assert torch.equal(got_ids, torch.from_numpy(identity)[got])
            for i, m in enumerate(members):
                hit = present & set(m.tolist())
                assert not hit or hit == set(m.tolist()), "part of an identity was drawn"
                drawn[i] += bool(hit)
            assert present <= set(torch.cat(members).tolist()), "an image beyond the cap was drawn"
    assert torch.equal(torch.random.get_rng_state(), global_rng)
    assert total == 600 * len(loader) and empty > 0
    np.testing.assert_allclose(drawn / total, q, atol=0.05)  # each identity on its own, at rate q


# --- accounting -----------------------------------------------------------------------------

def test_identity_training_accounts_q_identity_and_matches_dp_accounting(synth_small) -> None:
    dp = _dp(max_images_per_identity=5)
    n = num_identities(synth_small.identity)
    q, per_epoch = identity_sample_rate(n, TRAIN.batch_size, 5), identity_steps_per_epoch(n, TRAIN.batch_size, 5)
    assert (q, per_epoch) == (0.16, 7)  # 20 identities x cap 5 = 100 capped images, batch 16
    model, head = build_model(SPEC, 0), build_identity_head(SPEC, n, 1)
    before = [p.detach().clone() for p in model.parameters()]
    history = None
    for call, epochs in enumerate([2, 1]):
        out = train(model, synth_small, TRAIN, dp, seed=call, epochs=epochs, head=head, noise_multiplier=1.1,
                    dp_history=history, noise_seed=100 + call)
        assert out.steps == epochs * per_epoch and out.sample_rate == q and out.noise_multiplier == 1.1
        history = out.dp_history
    assert history == [(1.1, q, 3 * per_epoch)]
    assert spent_epsilon("rdp", history, DELTA) == pytest.approx(rdp_epsilon(history), rel=1e-3)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # it trained
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in model.parameters())


def test_identity_training_is_reproducible_from_the_noise_seed_only(synth_small) -> None:
    def run(noise_seed: int) -> torch.Tensor:
        model = build_model(SPEC, 0)
        train(model, synth_small, TRAIN, _dp(), seed=0, epochs=1, head=build_identity_head(SPEC, 20, 1),
              noise_multiplier=1.0, noise_seed=noise_seed)
        return _flat(model.state_dict().values())

    first = run(5)
    assert torch.equal(first, run(5))
    assert not torch.equal(first, run(6))


# --- a client, two rounds -------------------------------------------------------------------

@pytest.mark.timeout(300)
def test_local_train_with_identity_unit_composes_over_rounds() -> None:
    cfg = load_config(None, [*LEDGER_FULL, "dp.unit=identity"])
    partition = 1
    data = local_data(cfg, partition)
    n = num_identities(data.identity)
    q = identity_sample_rate(n, cfg.train.batch_size, cfg.dp.max_images_per_identity)
    per_round = cfg.federation.local_epochs * identity_steps_per_epoch(n, cfg.train.batch_size,
                                                                       cfg.dp.max_images_per_identity)
    assert dp_sampling(cfg, data) == (q, per_round // cfg.federation.local_epochs)

    global_state = build_model(model_spec(cfg), cfg.seed).state_dict()
    state = ClientState()
    ledger = PrivacyLedger("rdp", cfg.dp.delta)
    epsilons = []
    for server_round in (1, 2):
        global_state, state, report = local_train(cfg, partition, server_round, global_state, state)
        assert state.unit == "identity" and report["sample-rate"] == q
        assert report["steps"] == per_round and total_steps(state.dp_history) == server_round * per_round
        assert state.dp_history == [(state.noise_multiplier, q, server_round * per_round)]
        report_json = json.loads(state.privacy_json())
        assert report_json["unit"] == "identity"
        entry = ledger.record(partition, server_round, state.privacy_json())
        assert entry["unit"] == IDENTITY_UNIT and entry["sample_rate"] == q
        assert entry["epsilon"] == pytest.approx(report["epsilon"], rel=1e-9)
        assert report["epsilon"] == pytest.approx(rdp_epsilon(state.dp_history), rel=1e-3)
        assert entry["epsilon_person_bound"] == entry["epsilon"]  # the person is the unit: no group bound
        epsilons.append(report["epsilon"])
    assert 0 < epsilons[0] < epsilons[1]  # composes, never restarts
    # Calibrated once for all rounds at q_identity: the planned run spends the target, not more.
    planned = [(state.noise_multiplier, q, cfg.federation.rounds * per_round)]
    assert cfg.dp.target_epsilon - 0.05 < spent_epsilon("rdp", planned, cfg.dp.delta) <= cfg.dp.target_epsilon
    doc = ledger.to_json()
    assert doc["unit"] == IDENTITY_UNIT and doc["guarantee"].startswith("identity-level")


# --- ledger ---------------------------------------------------------------------------------

def test_the_ledger_bounds_a_person_under_sample_level_dp_by_group_privacy() -> None:
    k = 4
    client = ClientState(dp_history=[(2.0, 0.05, 20)], noise_multiplier=2.0, largest_identity_images=k)
    assert json.loads(client.privacy_json())["unit"] == "sample"
    ledger = PrivacyLedger("rdp", DELTA)
    entry = ledger.record(0, 1, client.privacy_json())
    eps = entry["epsilon"]
    assert entry["unit"] == SAMPLE_UNIT and entry["largest_identity_images"] == k
    assert entry["epsilon_person_bound"] == pytest.approx(k * eps, rel=1e-12)
    assert entry["delta_person_bound"] == pytest.approx(min(1.0, k * math.exp((k - 1) * eps) * DELTA), rel=1e-12)
    assert entry["delta_person_bound"] < 1  # this history is small enough to give a non-vacuous bound
    assert group_privacy(8.0, DELTA, 10) == (80.0, 1.0)  # at DP-SGD's usual epsilons the delta is vacuous
    # A client report of an older version (no unit, no count) is sample-level, without a person bound.
    ledger.record(1, 1, json.dumps({"history": [[1.0, 0.25, 10]], "noise_multiplier": 1.0}))
    doc = json.loads(json.dumps(ledger.to_json()))
    assert doc["clients"]["1"]["unit"] == SAMPLE_UNIT and "epsilon_person_bound" not in doc["clients"]["1"]
    assert doc["unit"] == SAMPLE_UNIT and doc["guarantee"].startswith("sample-level (one image)")
    assert PrivacyLedger.from_json(doc, "privacy.json").clients[0]["epsilon_person_bound"] == entry["epsilon_person_bound"]
    with pytest.raises(ValueError, match="unknown DP unit 'household'"):
        ledger.record(2, 1, json.dumps({"history": [], "noise_multiplier": 1.0, "unit": "household"}))


def test_a_sample_level_client_reports_its_largest_identity(synth_small) -> None:
    ds = synth_small.subset(np.flatnonzero(synth_small.identity != 0)[:-3])
    counts = np.unique(ds.identity, return_counts=True)[1]
    assert largest_identity_images(ds) == counts.max() == 8


# --- configuration --------------------------------------------------------------------------

def test_the_unit_and_its_cap_are_configuration() -> None:
    assert DP_UNITS == ("sample", "identity")
    cfg = load_config(None, [])
    assert (cfg.dp.unit, cfg.dp.max_images_per_identity) == ("sample", 10)
    cfg = load_config(None, ["dp.unit=identity", "dp.max_images_per_identity=3"])
    assert (cfg.dp.unit, cfg.dp.max_images_per_identity) == ("identity", 3)
    with pytest.raises(ConfigError, match="dp.unit"):
        load_config(None, ["dp.unit=household"])
    with pytest.raises(ConfigError, match="dp.max_images_per_identity"):
        load_config(None, ["dp.max_images_per_identity=0"])
    with pytest.raises(ConfigError, match="dp.unit: 'identity' cannot be combined with fairness.method = 'reweight'"):
        load_config(None, ["dp.unit=identity", "fairness.method=reweight", "train.task=attribute"])
