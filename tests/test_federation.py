"""Federated averaging, reproducibility and failure reporting, on real Flower simulations.

* ``common.train.fedavg.weighted_average`` and ``FaceFedAvg.aggregate_train`` are unit-tested on
  hand-made Flower Messages (exact values, order independence).
* End to end, the global model of every round of a real 3-round, 2-client DP run equals, bit for
  bit, the sample-weighted mean of the two clients' updates recomputed outside Flower with
  ``client.local.local_train`` (carrying each client's private state from round to round).
* The same seed gives bitwise identical final weights; another seed gives different ones.
* A client that raises fails ``facefl run`` with a non-zero exit and the client's own error.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flower_messages import plain_reply
from hypothesis import given, settings
from hypothesis import strategies as st
from sim_runs import REPLAYABLE, TINY, round_events, simulated_run

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                         "ignore::FutureWarning")]


# ---------------------------------------------------------------- weighted_average (unit)

def test_weighted_average_two_clients_exact() -> None:
    from common.train.fedavg import weighted_average

    a = {"w": np.array([[4.0, -2.0], [0.0, 1.0]], np.float32), "b": np.array([1.0], np.float32)}
    b = {"w": np.array([[8.0, 2.0], [4.0, 1.0]], np.float32), "b": np.array([5.0], np.float32)}
    out = weighted_average([(1, a), (3, b)])  # weights 1/4 and 3/4: exactly representable
    np.testing.assert_array_equal(out["w"], np.array([[7.0, 1.0], [3.0, 1.0]], np.float32))
    np.testing.assert_array_equal(out["b"], np.array([4.0], np.float32))
    assert out["w"].dtype == np.float32 and set(out) == {"w", "b"}


def test_weighted_average_float64_expectation() -> None:
    from common.train.fedavg import weighted_average

    rng = np.random.default_rng(0)
    n1, n2 = 37, 91
    a, b = rng.normal(size=(64, 9)), rng.normal(size=(64, 9))
    out = weighted_average([(n1, {"x": a}), (n2, {"x": b})])["x"]
    # The float64 result is the weighted mean computed the textbook way, to the last bit...
    np.testing.assert_array_equal(out, (n1 / (n1 + n2)) * a + (n2 / (n1 + n2)) * b)
    # ...and np.average's differently-rounded form agrees to float64 precision.
    np.testing.assert_allclose(out, np.average(np.stack([a, b]), axis=0, weights=[n1, n2]), rtol=1e-13, atol=1e-15)
    # float32 updates are averaged in float64 and rounded once.
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    out32 = weighted_average([(n1, {"x": a32}), (n2, {"x": b32})])["x"]
    expected = ((n1 / (n1 + n2)) * a32.astype(np.float64) + (n2 / (n1 + n2)) * b32.astype(np.float64))
    np.testing.assert_array_equal(out32, expected.astype(np.float32))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 10_000), st.floats(-1e3, 1e3, allow_nan=False, width=32)),
                min_size=1, max_size=6))
def test_weighted_average_is_a_convex_combination(updates: list[tuple[int, float]]) -> None:
    from common.train.fedavg import weighted_average

    arrays = [(n, {"x": np.full(3, v, np.float32)}) for n, v in updates]
    out = weighted_average(arrays)["x"]
    values = [v for _, v in updates]
    total = sum(n for n, _ in updates)
    assert np.all(out >= np.float32(min(values))) and np.all(out <= np.float32(max(values)))
    np.testing.assert_allclose(out, sum(n * v for n, v in updates) / total, rtol=1e-6, atol=1e-6)


def test_weighted_average_rejects_empty_and_zero_weights() -> None:
    from common.train.fedavg import weighted_average

    with pytest.raises(ValueError, match="no updates"):
        weighted_average([])
    with pytest.raises(ValueError, match="sum to > 0"):
        weighted_average([(0, {"x": np.zeros(2)})])


# ---------------------------------------------------------------- FaceFedAvg.aggregate_train (unit)

def _send(strategy, arrays: dict[str, np.ndarray]) -> None:
    """Send the round's global arrays (configure_train), against which replies are validated."""
    from flwr.app import ConfigRecord

    from common import wire

    list(strategy.configure_train(1, wire.numpy_to_record(arrays), ConfigRecord(), grid=None))


def test_aggregate_train_is_independent_of_arrival_order(server_task) -> None:
    from common import wire
    from common.config import FederationConfig
    from common.train.fedavg import weighted_average
    from server.strategy import FaceFedAvg, StrategySettings

    rng = np.random.default_rng(1)
    expected = {"w": np.zeros((50, 20)), "b": np.zeros(7)}
    partitions = {p: 1000 + 17 * p for p in range(4)}
    updates = {p: (int(rng.integers(5, 500)), {k: rng.normal(size=v.shape) for k, v in expected.items()})
               for p in partitions}
    # Float addition is not associative: summing the same float64 updates in another order changes
    # bits, which is why the strategy must fix the order.
    perms = [list(p) for p in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1], [1, 3, 0, 2])]
    raw = [weighted_average([updates[p] for p in perm])["w"].tobytes() for perm in perms]
    assert len(set(raw)) > 1, "test data too benign: every summation order gave the same bits"

    strategy = FaceFedAvg(StrategySettings(0, partitions, FederationConfig()))
    reference = weighted_average([updates[p] for p in sorted(partitions)])
    _send(strategy, expected)
    for perm in perms:
        replies = [plain_reply(partitions[p], p, *updates[p]) for p in perm]
        record, _ = strategy.aggregate_train(1, replies)
        got = wire.record_to_numpy(record)
        assert [r.partition for r in strategy.accepted] == [0, 1, 2, 3] and strategy.failures == []
        for key in expected:
            assert got[key].tobytes() == reference[key].tobytes(), (perm, key)


def test_aggregate_train_rejects_bad_updates_and_keeps_the_rest(server_task) -> None:
    from common.config import FederationConfig
    from server.strategy import FaceFedAvg, StrategySettings

    expected = {"w": np.zeros(3)}
    partitions = {0: 10, 1: 11, 2: 12}
    strategy = FaceFedAvg(StrategySettings(0, partitions, FederationConfig()))
    _send(strategy, expected)
    replies = [plain_reply(10, 0, 4, {"w": np.ones(3)}), plain_reply(11, 1, 4, {"w": np.array([1.0, np.nan, 1.0])}),
               plain_reply(12, 2, 12, {"w": np.full(3, 5.0)})]
    record, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_array_equal(record["w"].numpy(), np.full(3, 4.0))
    assert len(strategy.failures) == 1 and "client 1" in strategy.failures[0] and "NaN" in strategy.failures[0]
    strategy.min_train_nodes = 3
    assert strategy.aggregate_train(1, replies)[0] is None


# ---------------------------------------------------------------- end to end (real simulations)

def _load(path: Path) -> dict[str, torch.Tensor]:
    from common.nn.checkpoint import load_checkpoint

    return load_checkpoint(path)[0]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    return simulated_run(tmp_path_factory, REPLAYABLE)[0]


@pytest.mark.timeout(300)
def test_global_model_is_sample_weighted_mean_of_client_updates(full_run) -> None:
    """Replays the whole run outside Flower: the server's initial model (``build_model`` then
    ``pretrain``), then each round every client's ``local_train`` from the previous global model
    (with its private head and DP history carried over) and the num-examples-weighted mean in
    float64; every round's checkpoint must match bit for bit."""
    from client.local import local_train
    from common.config import load_config
    from common.nn.build import build_model, model_spec
    from common.train.local_round import ClientState
    from common.train.pretraining import pretrain

    cfg = load_config(full_run.path / "config.toml")
    events = round_events(full_run)
    assert len(events) == cfg.federation.rounds == 3
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the Ray actors train with one thread (federation.client_cpus=1)
    try:
        model = build_model(model_spec(cfg), cfg.seed)
        assert cfg.pretrain.identities > 0 and pretrain(model, cfg) is not None  # the server's public pretraining
        global_state = model.state_dict()
        states = {p: ClientState() for p in range(cfg.split.num_clients)}
        for event in events:
            r = event["round"]
            assert sorted(c["partition"] for c in event["clients"]) == [0, 1]
            updates = []
            for client in sorted(event["clients"], key=lambda c: c["partition"]):
                p = client["partition"]
                new, states[p], report = local_train(cfg, p, r, global_state, states[p],
                                                     allow_reproducible_noise=True)
                assert report["num-examples"] == client["num-examples"]
                assert report["train-loss"] == client["train-loss"]  # same training, bit for bit
                updates.append((report["num-examples"], new))
            total = sum(n for n, _ in updates)
            assert len({n for n, _ in updates}) == 2, "equal shards would not tell a weighted mean from a plain one"
            mean = {k: sum((n / total) * u[k].double() for n, u in updates).float() for k in global_state}
            saved = _load(full_run.path / "models" / f"round-{r:03d}.safetensors")
            assert set(saved) == set(mean)
            for k, expected in mean.items():
                assert torch.equal(saved[k], expected), (r, k, float((saved[k] - expected).abs().max()))
            plain = {k: sum(0.5 * u[k].double() for _, u in updates).float() for k in global_state}
            assert any(not torch.equal(saved[k], plain[k]) for k in saved)
            global_state = mean
    finally:
        torch.set_num_threads(threads)
    final = _load(full_run.path / "models" / "final.safetensors")
    assert all(torch.equal(final[k], global_state[k]) for k in final)


@pytest.mark.timeout(300)
def test_the_audits_target_recipe_is_the_runs_training(full_run) -> None:
    """``--reference-recipe target``: a reference federation given exactly the run's client data and
    seed reproduces the run's final global model bit for bit (DP with reproducible noise, public
    pretraining, a Dirichlet split with unequal clients), so the recipe really is the target's;
    with fresh noise (the default) two replays differ, as two trainings of a DP target would."""
    import dataclasses

    from attacks.federated_references import TargetRecipe, federated_model
    from client.local import local_data
    from common.config import load_config
    from common.runs.rundir import RunDir

    cfg = load_config(full_run.path / "config.toml")
    recipe = TargetRecipe.of_run(RunDir(full_run.path), cfg)
    assert set(recipe.noise_multipliers) == {0, 1} and all(s > 0 for s in recipe.noise_multipliers.values())
    clients = [local_data(cfg, p) for p in range(cfg.split.num_clients)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the Ray actors train with one thread (federation.client_cpus=1)
    try:
        replay = federated_model(recipe, clients, cfg.seed).state_dict()
        fresh_cfg = dataclasses.replace(cfg, dp=dataclasses.replace(cfg.dp, reproducible_noise=False))
        fresh = [federated_model(dataclasses.replace(recipe, cfg=fresh_cfg), clients, cfg.seed).state_dict()
                 for _ in range(2)]
    finally:
        torch.set_num_threads(threads)
    final = _load(full_run.path / "models" / "final.safetensors")
    assert set(final) == set(replay)
    for k in final:
        assert torch.equal(final[k], replay[k]), (k, float((final[k] - replay[k]).abs().max()))
    assert any(not torch.equal(fresh[0][k], fresh[1][k]) for k in final)
    # A reference client holding other data keeps the target client's Poisson rate (and steps per epoch).
    from common.train.local_round import dp_sampling

    for p, q in recipe.sample_rates.items():
        others = [clients[p].subset(np.arange(round(share * len(clients[p])))) for share in (0.4, 0.8)]
        for other in [*others, clients[1 - p]]:  # smaller, and the other client's (Dirichlet: other size)
            assert dp_sampling(recipe.client_config(cfg, p, other), other)[0] == q, (p, len(other))


@pytest.mark.timeout(300)
def test_same_seed_gives_identical_weights_and_other_seed_differs(tmp_path_factory, full_run) -> None:
    again, _ = simulated_run(tmp_path_factory, REPLAYABLE, tag="repeat")
    other, _ = simulated_run(tmp_path_factory, REPLAYABLE + ("seed=1",), tag="seed1")
    a, b, c = (_load(r.path / "models" / "final.safetensors") for r in (full_run, again, other))
    assert set(a) == set(b) == set(c)
    for k in a:
        assert a[k].numpy().tobytes() == b[k].numpy().tobytes(), k
    assert any(not torch.equal(a[k], c[k]) for k in a)
    # Everything the run derives from its seed repeats too: the privacy ledger and per-round losses.
    assert (full_run.path / "privacy.json").read_bytes() == (again.path / "privacy.json").read_bytes()
    losses = [[(cl["partition"], cl["train-loss"]) for cl in e["clients"]] for e in round_events(full_run)]
    assert losses == [[(cl["partition"], cl["train-loss"]) for cl in e["clients"]] for e in round_events(again)]
    assert losses != [[(cl["partition"], cl["train-loss"]) for cl in e["clients"]] for e in round_events(other)]


@pytest.mark.timeout(240)
def test_client_error_fails_the_cli_with_the_clients_message(tmp_path, capsys, monkeypatch) -> None:
    """A DP budget no noise can meet: only clients calibrate noise (at their first round), so the
    server prepares the run (data, manifest, describe phase) and the clients' training raises."""
    from workflow.cli import main

    # main() sets these with setdefault; pre-set them so monkeypatch restores the environment.
    monkeypatch.setenv("RAY_DEDUP_LOGS", "1")
    monkeypatch.setenv("PYTHONWARNINGS", "ignore::UserWarning,ignore::DeprecationWarning")
    overrides = TINY + ("split.num_clients=2", "data.identities=24", "data.images_per_identity=6",
                        "federation.rounds=1", "dp.target_epsilon=0.05")
    argv = ["--no-progress", "run", "--out", str(tmp_path)]
    for item in overrides:
        argv += ["--set", item]
    code = main(argv)
    err = capsys.readouterr().err
    client_error = "The privacy budget is too low."  # opacus.accountants.utils.get_noise_multiplier
    assert code != 0
    assert "facefl: error: run failed" in err and client_error in err
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed"
    assert "round 1" in status["error"] and client_error in status["error"]
    assert "client 0" in status["error"] and "client 1" in status["error"]
    assert (run_dir / "manifest.json").is_file()  # the server's own preparation succeeded
    assert not (run_dir / "models" / "final.safetensors").exists()
