"""Real simulated federations shared by test_federation.py and test_privacy_ledger.py.

Each Flower simulation costs 15-35 s (Ray start-up, actors importing torch), so a run is made at
most once per pytest session for a given (tag, overrides) and then only read. Runs are tiny:
32 px SynthFaces, an 8-channel backbone, batch 8 (so Poisson q < 1 and several DP steps per
round), and ``federation.client_cpus=1`` so each Ray actor trains with one torch thread, like the
test process (conftest): thread count changes float reduction order, and the end-to-end FedAvg
test reproduces client training bit for bit outside Flower.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

TINY = ("data.image_size=32", "model.width=8", "model.blocks=1,1", "model.embedding_dim=16",
        "train.batch_size=8", "federation.client_cpus=1", "pretrain.identities=0", "mote.enabled=false")

# 3 rounds, 2 DP clients, every client in every round. A Dirichlet split gives the clients 26 and
# 34 samples: different Poisson rates (1/4, 1/5), and FedAvg weights that differ from a plain mean.
# A token server-side pretraining (8 public images, 1 epoch) keeps that path in the replayed run.
LEDGER_FULL = TINY + ("pretrain.identities=4", "pretrain.images_per_identity=2", "pretrain.epochs=1",
                      "split.num_clients=2", "split.partition=dirichlet", "federation.min_train_clients=2", "federation.min_available_clients=2",
                      "data.identities=24", "data.images_per_identity=6", "federation.local_epochs=1",
                      "federation.rounds=3")

# The same run for tests that replay or compare runs bit for bit (FedAvg replayed outside Flower,
# same seed = same weights, resumed = uninterrupted, HE = plaintext): they need every client's DP
# noise derived from the run seed, i.e. the research switch dp.reproducible_noise, which facefl's
# simulation engine allows and a SuperNode only with node config allow-reproducible-noise=true. By
# default a client's noise is its own secret (tests/test_dp_noise.py), and no two runs are equal.
REPLAYABLE = LEDGER_FULL + ("dp.reproducible_noise=true",)

# 3 clients, half of them sampled per round: with seed 0 client 0 trains in rounds 1 and 3,
# client 1 in all three, client 2 only in round 2 (the tests read who trained from metrics.jsonl).
LEDGER_PARTIAL = TINY + ("split.num_clients=3", "federation.fraction_train=0.5", "federation.min_train_clients=1",
                         "federation.min_available_clients=2", "data.identities=24", "data.images_per_identity=6",
                         "federation.local_epochs=1", "federation.rounds=3")

_RUNS: dict[tuple[str, tuple[str, ...]], tuple[Any, dict[str, Any]]] = {}


def simulated_run(factory: pytest.TempPathFactory, overrides: tuple[str, ...], tag: str = "",
                  he_secret: Path | None = None) -> tuple[Any, dict]:
    """(RunDir, status) of a finished simulation of ``overrides``; made once per session per tag.

    Fails the calling test (with the run's error) if the run did not finish.
    """
    from common.config import load_config
    from workflow.simulation import simulate

    key = (tag, tuple(overrides))
    if key not in _RUNS:
        cfg = load_config(None, list(overrides))
        run, status = simulate(cfg, factory.mktemp("runs"), prefix=f"test{tag}", progress=False,
                               he_secret=he_secret)
        _RUNS[key] = (run, status)
    run, status = _RUNS[key]
    assert status["status"] == "finished", f"simulation {overrides} did not finish: {status}"
    return run, status


def round_events(run: Any) -> list[dict[str, Any]]:
    return [r for r in run.read_metrics() if r.get("event") == "round"]


def read_privacy(run: Any) -> dict[str, Any]:
    return json.loads((Path(run.path) / "privacy.json").read_text(encoding="utf-8"))
