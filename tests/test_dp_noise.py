"""DP noise the server cannot predict (docs/threat-models.md, the curious server).

A client's DP-SGD noise and Poisson sampling draw from its own entropy: no value of the run
configuration (which the server writes) or of any message determines them. The research switch
``dp.reproducible_noise`` derives them from the run seed instead, and a client refuses it unless
its operator allows it. Real local training on a tiny configuration, no mocks of Opacus.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from sim_runs import LEDGER_FULL

from client.local import StateStore, local_train, update_digest
from common.config import load_config
from common.nn.build import build_model, model_spec
from common.train.dp import total_steps
from common.train.local_round import ClientState, derived_seed
from server.ledger import PrivacyLedger

PARTITION, ROUND = 1, 1


@pytest.fixture(scope="module")
def cfg():
    return load_config(None, list(LEDGER_FULL))


@pytest.fixture(scope="module")
def global_state(cfg) -> dict[str, torch.Tensor]:
    return build_model(model_spec(cfg), cfg.seed).state_dict()


def _update(cfg, global_state, **kwargs) -> str:
    new_state, _, _ = local_train(cfg, PARTITION, ROUND, global_state, ClientState(), **kwargs)
    return update_digest(new_state)


def _seeds_derivable_from(cfg) -> list[int]:
    """Every seed a server could derive from the run configuration it wrote and the round's
    message (run seed, round, partition): the seed itself, the streams facefl derives from it,
    and small offsets of each."""
    bases = [cfg.seed, ROUND, PARTITION, derived_seed(cfg.seed, ROUND, PARTITION),
             derived_seed(cfg.seed, ROUND, PARTITION, 0xD9), derived_seed(cfg.seed, 7, PARTITION)]
    return sorted({b + k for b, k in itertools.product(bases, range(3))})


@pytest.mark.timeout(300)
def test_default_noise_is_unpredictable_and_the_switch_makes_it_reproducible(cfg, global_state, monkeypatch) -> None:
    default = [_update(cfg, global_state) for _ in range(2)]
    assert default[0] != default[1], "two trainings with the same config and seed released the same update"

    switched = load_config(None, [*LEDGER_FULL, "dp.reproducible_noise=true"])
    reproducible = [_update(switched, global_state, allow_reproducible_noise=True) for _ in range(2)]
    assert reproducible[0] == reproducible[1]
    assert reproducible[0] not in default

    # The server's best guess: rerun the client's training with every seed it can derive. None of
    # them reproduces the update the client released by default.
    import client.local as local

    guesses = set()
    for seed in _seeds_derivable_from(cfg):
        monkeypatch.setattr(local, "fresh_noise_seed", lambda s=seed: s)
        guesses.add(_update(cfg, global_state))
    assert len(guesses) > 1  # the seed really drives the noise: the guesses differ from each other
    assert not guesses & set(default)


def test_a_client_refuses_reproducible_noise_unless_its_operator_allows_it(global_state) -> None:
    switched = load_config(None, [*LEDGER_FULL, "dp.reproducible_noise=true"])
    with pytest.raises(ValueError, match=r"client 1: dp.reproducible_noise = true would let the server.*"
                                         r"allow-reproducible-noise=true"):
        _update(switched, global_state)


@pytest.mark.timeout(300)
def test_a_rerun_round_reuses_the_clients_secret_and_is_charged_once(cfg, global_state, tmp_path) -> None:
    """A server that crashed after a client trained round 1 asks for round 1 again: the client
    trains with the secret it kept on its node, releases the same bits and pays once."""
    store = StateStore.for_client(tmp_path, "run-secret", PARTITION)
    first, s1, _ = local_train(cfg, PARTITION, ROUND, global_state, ClientState(), store)
    secret = store.load(ROUND).noise_seed
    assert secret is not None
    again, s1_again, _ = local_train(cfg, PARTITION, ROUND, global_state, ClientState(), store)
    assert update_digest(again) == update_digest(first)
    assert store.load(ROUND).noise_seed == secret and store.load(ROUND).released == [update_digest(first)]
    assert total_steps(s1_again.dp_history) == total_steps(s1.dp_history) > 0
    # The secret stays on the node: the report a client sends holds no seed.
    assert "seed" not in s1.privacy_json()


def test_the_ledger_names_the_unit_and_whom_the_guarantee_holds_against() -> None:
    private = ClientState(dp_history=[(1.0, 0.25, 10)], noise_multiplier=1.0)
    ledger = PrivacyLedger("rdp", 1e-5)
    ledger.record(0, 1, private.privacy_json(reproducible_noise=False))
    doc = ledger.to_json()
    assert doc["unit"] == doc["clients"]["0"]["unit"] == "sample (one image)"
    assert doc["reproducible_noise"] is False and "holds against the server" in doc["guarantee"]
    ledger.record(1, 1, private.privacy_json(reproducible_noise=True))
    doc = json.loads(json.dumps(ledger.to_json()))
    assert doc["reproducible_noise"] is True and doc["clients"]["1"]["reproducible_noise"] is True
    assert "does NOT hold against the server" in doc["guarantee"]
