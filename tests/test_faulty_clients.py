"""Faulty clients: crashes, timeouts, NaN / Inf, wrong shapes and dtypes, oversized payloads.

* Unit level, ``FaceFedAvg`` / ``HEFedAvg`` on hand-built Flower Messages: each malformed update
  is rejected with a warning naming the client while the others are averaged; an oversized reply
  is refused before anything in it is decoded (automatic and configured limit; under HE the
  ciphertext size the layout allows, a bound checked against real ciphertexts); a sampled client
  that sent nothing is named as timed out; a reply of another round is ignored.
* Flower's real in-memory SuperLink state and grid, the test playing the nodes: a reply that
  comes after the round's timeout is refused by the SuperLink (train messages expire with the
  round), the client is named from the message the SuperLink answers for it, the round completes
  with the others, and the next round aggregates exactly its own replies.
* One real simulation (``faulty_client_app``): a client crashing in round 2 is recorded in
  metrics.jsonl and the round completes with the others; too few replies in round 3 fail the run,
  and status.json names the round and the clients.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid

import numpy as np
import pytest
from faulty_client_app import CRASH, FAULTS_ENV
from flower_messages import next_instruction, plain_reply, reply_message
from sim_runs import TINY, round_events

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                         "ignore::FutureWarning")]

PARTITIONS = {0: 10, 1: 11, 2: 12}  # partition id -> node id
EXAMPLES = {0: 1, 1: 2, 2: 3}  # partition id -> its samples in the server's manifest
LINK_TIMEOUT = 4  # round_timeout of the SuperLink test: room for threads on a loaded machine
GLOBAL = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}


def _update(value: float, dtype: type = np.float32) -> dict[str, np.ndarray]:
    return {k: np.full(v.shape, value, dtype) for k, v in GLOBAL.items()}


def _plain_strategy(*overrides: str, server_round: int = 1):
    """A FaceFedAvg after configure_train sent ``GLOBAL`` with the run configuration ``overrides``."""
    from common import wire
    from common.config import load_config
    from server.strategy import FaceFedAvg, StrategySettings

    cfg = load_config(None, list(overrides))
    strategy = FaceFedAvg(StrategySettings(0, PARTITIONS, cfg.federation, EXAMPLES))
    config = wire.config_record(cfg, server_round)
    strategy.configure_train(server_round, wire.numpy_to_record(GLOBAL), config, grid=None)
    return strategy


def _good_replies():
    """Clients 0 and 2 with 1 and 3 samples of all-ones and all-fives: their weighted mean is 4."""
    return [plain_reply(10, 0, 1, _update(1.0)), plain_reply(12, 2, 3, _update(5.0))]


def _assert_only_client_1_failed(strategy, record, caplog, *fragments: str) -> None:
    """Client 1's failure is recorded and logged by name with ``fragments``; 0 and 2 are averaged."""
    (failure,) = strategy.failures
    assert failure.startswith("client 1 (node 11): "), failure
    assert all(f in failure for f in fragments), failure
    logged = [r.getMessage() for r in caplog.records if r.name == "server.strategy" and r.levelno == logging.WARNING]
    assert logged == [f"round 1: {failure}"]
    assert [r.partition for r in strategy.accepted] == [0, 2]
    for key, value in GLOBAL.items():
        np.testing.assert_array_equal(record[key].numpy(), np.full(value.shape, 4.0, np.float32))


# ---------------------------------------------------------------- bad updates (unit)

def _bad_update(kind: str):
    """Client 1's reply, faulty as ``kind`` says."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    from common import wire

    update = _update(2.0)
    if kind == "nan":
        update["w"][1, 2] = np.nan
    elif kind == "inf":
        update["b"][0] = -np.inf
    elif kind == "shape":
        update["w"] = np.ones((3, 4), np.float32)
    elif kind == "float64":
        update = _update(2.0, np.float64)
    elif kind == "int":
        update = _update(2, np.int32)
    elif kind == "keys":
        del update["b"]
    elif kind == "config-record":  # the arrays sent as a config record instead of an array record
        return reply_message(11, 1, 2, {wire.ARRAYS: ConfigRecord({"w": 2.0, "b": 2.0})})
    elif kind == "torch-stype":  # an Array that is not an npy buffer
        arrays = {k: Array(dtype="float32", shape=v.shape, stype="torch.raw", data=v.tobytes())
                  for k, v in update.items()}
        return reply_message(11, 1, 2, {wire.ARRAYS: ArrayRecord(arrays)})
    elif kind == "corrupt-npy":
        arrays = {k: Array(dtype="float32", shape=v.shape, stype="numpy.ndarray", data=b"\x93NUMPY" + v.tobytes())
                  for k, v in update.items()}
        return reply_message(11, 1, 2, {wire.ARRAYS: ArrayRecord(arrays)})
    elif kind == "no-metrics":
        msg = plain_reply(11, 1, 2, update)
        del msg.content[wire.METRICS]
        return msg
    elif kind == "other-partition":  # node 11 is client 1, but claims to be client 2
        return plain_reply(11, 2, 2, update)
    elif kind == "inflated":  # claims 100x its samples, to outweigh the others in FedAvg
        return plain_reply(11, 1, 200, update)
    return plain_reply(11, 1, 2, update)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind, fragments", [
    ("nan", ("w contains NaN or Inf",)), ("inf", ("b contains NaN or Inf",)),
    ("shape", ("w has shape (3, 4), expected (4, 3)",)),
    ("float64", ("has dtype float64, expected float32",)), ("int", ("has dtype int32, expected float32",)),
    ("keys", ("update has keys ['b']",)), ("config-record", ("no array record 'arrays'",)),
    ("torch-stype", ()), ("corrupt-npy", ()),  # the decoder's message is common/wire.py's
    ("no-metrics", ("no metric record 'metrics'",)), ("other-partition", ("claims partition-id 2",)),
    ("inflated", ("claims num-examples 200, but its partition has 2 member samples in the server's manifest",)),
])
def test_bad_update_is_rejected_and_logged_naming_the_client(server_task, caplog, kind, fragments) -> None:
    strategy = _plain_strategy()
    caplog.set_level(logging.WARNING, logger="server.strategy")
    record, _ = strategy.aggregate_train(1, [*_good_replies(), _bad_update(kind)])
    _assert_only_client_1_failed(strategy, record, caplog, "rejected update", *fragments)


# ---------------------------------------------------------------- oversized replies (unit)

@pytest.mark.timeout(60)
def test_oversized_reply_is_refused_before_decoding(server_task, caplog) -> None:
    """Automatic limit (twice a valid update + 1 MB): 2 MB of bytes that are not even an npy
    buffer are refused for their size, so nothing tried to decode them."""
    from flwr.app import Array

    from common import wire

    strategy = _plain_strategy()
    caplog.set_level(logging.WARNING, logger="server.strategy")
    bloated = wire.numpy_to_record(_update(2.0))
    bloated["junk"] = Array(dtype="uint8", shape=(2_000_000,), stype="numpy.ndarray", data=bytes(2_000_000))
    record, _ = strategy.aggregate_train(1, [*_good_replies(), reply_message(11, 1, 2, {wire.ARRAYS: bloated})])
    _assert_only_client_1_failed(strategy, record, caplog, "rejected update: 2 MB exceeds the limit of 1 MB",
                                 "max_update_mb = 0")


@pytest.mark.timeout(60)
def test_configured_size_limit_counts_every_record(server_task, caplog) -> None:
    """``federation.max_update_mb``: the valid replies fit in 1 kB; client 1's 2 kB privacy
    record (a config record, not an array) does not."""
    from flwr.app import ConfigRecord

    from common import wire

    strategy = _plain_strategy("federation.max_update_mb=0.001")
    caplog.set_level(logging.WARNING, logger="server.strategy")
    bloated = plain_reply(11, 1, 2, _update(2.0))
    bloated.content[wire.PRIVACY] = ConfigRecord({"json": json.dumps({"history": [], "pad": "x" * 2000})})
    record, _ = strategy.aggregate_train(1, [*_good_replies(), bloated])
    _assert_only_client_1_failed(strategy, record, caplog, "exceeds the limit of 0.001 MB (federation.max_update_mb)")


@pytest.fixture(scope="module")
def he_keys(he_contexts):
    """(secret context, public context, fingerprint) of the session's key set."""
    return he_contexts[1:]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("poly_modulus, coeff_bits", [(4096, (60, 49)), (8192, (60, 40, 60))])
def test_ciphertext_bound_holds_and_is_tight(poly_modulus, coeff_bits) -> None:
    """The bound the server derives from its public context alone is above every real ciphertext
    and within 15% of it (SEAL compresses the coefficients a little)."""
    import tenseal as ts

    from common.he.keys import KeyParams, generate
    from server.he_strategy import ciphertext_max_bytes

    secret = generate(KeyParams(poly_modulus=poly_modulus, coeff_bits=coeff_bits))
    bound = ciphertext_max_bytes(ts.context_from(secret.serialize(save_secret_key=False)))
    rng = np.random.default_rng(0)
    sizes = [len(ts.ckks_vector(secret, rng.normal(size=n) * 100).serialize()) for n in (1, poly_modulus // 2)]
    assert all(0.85 * bound < s <= bound for s in sizes), (sizes, bound)


@pytest.mark.timeout(60)
def test_encrypted_reply_larger_than_its_layout_is_refused_before_parsing(server_task, caplog, he_keys) -> None:
    from flwr.app import ConfigRecord

    from common import wire
    from common.config import FederationConfig
    from common.he.ckks import Ciphertexts, encrypt_weighted
    from common.he.selection import EncryptionLayout
    from server.he_strategy import HEFedAvg
    from server.strategy import StrategySettings

    secret, public, fingerprint = he_keys
    state = {"w": np.zeros(3000, np.float32)}  # 2 ciphertexts of 2048 slots
    layout = EncryptionLayout.for_state(state)
    strategy = HEFedAvg(StrategySettings(0, PARTITIONS, FederationConfig()), ctx=public, key_fingerprint=fingerprint,
                        layout=layout, on_key_mismatch="exclude")
    caplog.set_level(logging.WARNING, logger="server.strategy")

    def reply(node: int, partition: int, n: int, pad: int = 0):
        enc, plain = layout.split({"w": np.full(3000, partition, np.float32)})
        ct = encrypt_weighted(secret, enc, n)
        assert ct.blob.size <= strategy.max_ciphertext_bytes
        # Padding that keeps the framing consistent: only the size gives it away before parsing.
        ct = Ciphertexts(np.concatenate([ct.blob, np.zeros(pad, np.uint8)]), ct.lengths + np.array([0, pad]))
        return reply_message(node, partition, n, {wire.HE_PAYLOAD: wire.payload_to_record(plain, ct),
                                                  wire.HE_META: ConfigRecord({wire.FINGERPRINT: fingerprint})})

    replies = [reply(10, 0, 1), reply(11, 1, 2, pad=strategy.max_ciphertext_bytes), reply(12, 2, 3)]
    strategy.aggregate_train(1, replies)
    (failure,) = strategy.failures
    assert failure.startswith("client 1 (node 11): rejected update: ") and "bytes of ciphertext" in failure
    assert f"take at most {strategy.max_ciphertext_bytes}" in failure
    assert [r.partition for r in strategy.accepted] == [0, 2] and strategy.total_weight == 4
    assert any("round 1: client 1 (node 11)" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- missing and stale replies (unit)

@pytest.mark.timeout(60)
def test_sampled_client_without_reply_is_named_as_timed_out(server_task, caplog) -> None:
    strategy = _plain_strategy("federation.round_timeout=45")
    caplog.set_level(logging.WARNING, logger="server.strategy")
    record, _ = strategy.aggregate_train(1, _good_replies())
    _assert_only_client_1_failed(strategy, record, caplog)
    assert strategy.failures == ["client 1 (node 11): no reply within 45 s"]


@pytest.mark.timeout(60)
def test_reply_of_another_round_is_ignored(server_task) -> None:
    """Train messages carry their round (group id) and expire with it (TTL = round_timeout); a
    reply to round 1 handed to round 2 is never averaged, and client 1 counts as not replied."""
    strategy = _plain_strategy("federation.round_timeout=45", server_round=2)
    assert [(m.metadata.group_id, m.metadata.ttl) for m in strategy._instructions] == [("2", 45.0)] * 3
    replies = _good_replies()
    for msg in replies:
        msg.metadata.group_id = "2"
    record, _ = strategy.aggregate_train(2, [*replies, plain_reply(11, 1, 100, _update(7.0))])
    assert strategy.failures == ["client 1 (node 11): ignored a reply to round 1 that arrived in round 2",
                                 "client 1 (node 11): no reply within 45 s"]
    np.testing.assert_array_equal(record["w"].numpy(), np.full((4, 3), 4.0, np.float32))


@pytest.mark.timeout(60)
def test_describe_phase_refuses_a_node_claiming_more_samples_than_its_partition(server_task) -> None:
    """The describe replies are real Messages from a grid that plays three nodes: honest, they map
    partitions to nodes; with client 2 claiming one sample more than its partition has in the
    server's manifest, the run stops naming it."""
    from flwr.app import ConfigRecord

    from common import wire
    from common.config import load_config
    from common.data.cache import build_dataset
    from common.split.build import build_manifest
    from server.federation import RunFailed, describe_clients

    cfg = load_config(None, [*TINY, "split.num_clients=3"])
    manifest = build_manifest(cfg, build_dataset(cfg))
    counts = [len(c) for c in manifest.clients]

    class ThreeNodes:  # the two Grid calls describe_clients makes
        def __init__(self, extra: int) -> None:
            self.extra = extra

        def get_node_ids(self) -> list[int]:
            return list(PARTITIONS.values())

        def send_and_receive(self, messages, timeout):
            return [reply_message(node, p, counts[p] + self.extra * (p == 2), {
                wire.CONFIG: ConfigRecord({"fingerprint": manifest.fingerprint})}) for p, node in PARTITIONS.items()]

    assert describe_clients(ThreeNodes(0), cfg, manifest) == PARTITIONS
    with pytest.raises(RunFailed, match=rf"client 2 \(node 12\) claims {counts[2] + 1} samples, its partition has "
                                        rf"{counts[2]} in the server's manifest"):
        describe_clients(ThreeNodes(1), cfg, manifest)


# ---------------------------------------------------------------- late replies on Flower's SuperLink state

def _play_node(state, node: int, partition: int, value: float, late: bool) -> tuple[threading.Thread, list]:
    """A node that takes its train message and replies with ``value`` everywhere, ``late`` = after
    the message expired. The list receives the SuperLink's answer: the stored reply's id, or None."""
    from flwr.app import Message

    stored: list = []

    def run() -> None:
        if (ins := next_instruction(state, node, 20)) is None:
            return
        if late:
            time.sleep(max(0.0, ins.metadata.created_at + ins.metadata.ttl + 0.3 - time.time()))
        reply = Message(plain_reply(node, partition, partition + 1, _update(value)).content, reply_to=ins)
        reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())  # as Flower's simulation engine does
        stored.append(state.store_message_res(reply))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, stored


def _round(grid, state, nodes, strategy, server_round: int, wait: float, late: set[int]) -> tuple[object, list]:
    """One round as server/federation.py runs it, the nodes answering ``server_round * 10 + partition``."""
    from common import wire
    from common.config import load_config

    config = wire.config_record(load_config(None, [f"federation.round_timeout={LINK_TIMEOUT}"]), server_round)
    messages = strategy.configure_train(server_round, wire.numpy_to_record(GLOBAL), config, grid)
    players = [_play_node(state, node, p, server_round * 10 + p, p in late) for p, node in nodes.items()]
    record, _ = strategy.aggregate_train(server_round, grid.send_and_receive(messages, timeout=wait))
    for thread, _ in players:
        thread.join(timeout=20)
        assert not thread.is_alive()
    return record, [stored for _, stored in players]


@pytest.mark.timeout(120)
def test_late_reply_is_dropped_and_never_reaches_the_next_round(link) -> None:
    from common.config import FederationConfig
    from server.strategy import FaceFedAvg, StrategySettings

    grid, state, nodes = link
    strategy = FaceFedAvg(StrategySettings(0, nodes, FederationConfig(round_timeout=LINK_TIMEOUT)))
    # Round 1: client 1 replies 0.3 s after its message expired. The server waits longer than the
    # timeout here, so the SuperLink's own error for the expired message (sent from the SuperLink's
    # node id) comes back deterministically, and must still name client 1.
    record, stored = _round(grid, state, nodes, strategy, 1, wait=LINK_TIMEOUT + 3, late={1})
    assert stored[0][0] and stored[2][0] and stored[1] == [None]  # the SuperLink refused the late reply
    expired = f"client 1 (node {nodes[1]}): no reply within {LINK_TIMEOUT} s (the SuperLink expired the message)"
    assert strategy.failures == [expired]
    assert [r.partition for r in strategy.accepted] == [0, 2]
    np.testing.assert_allclose(record["w"].numpy(), (1 * 10 + 3 * 12) / 4)
    # Round 2, as federation.py waits (timeout = round_timeout): everyone in time, and the mean
    # is exactly round 2's (weights 1, 2, 3): nothing of round 1 came back.
    record, _ = _round(grid, state, nodes, strategy, 2, wait=LINK_TIMEOUT, late=set())
    assert strategy.failures == [] and [r.partition for r in strategy.accepted] == [0, 1, 2]
    np.testing.assert_allclose(record["w"].numpy(), (1 * 20 + 2 * 21 + 3 * 22) / 6, rtol=1e-6)


# ---------------------------------------------------------------- crashes in a real simulation

@pytest.mark.timeout(400)
def test_crashing_clients_in_a_simulation(tmp_path, monkeypatch) -> None:
    """3 clients, at least 2 needed: client 0 crashes in round 2 (the round goes on with 1 and 2),
    clients 0 and 2 crash in round 3 (one reply left: the run fails)."""
    import faulty_client_app

    from common.config import load_config
    from workflow import simulation

    monkeypatch.setattr(simulation, "CLIENT_APP", faulty_client_app.app)
    monkeypatch.setenv(FAULTS_ENV, json.dumps({"2": [0], "3": [0, 2]}))
    cfg = load_config(None, [*TINY, "split.num_clients=3", "data.identities=24", "data.images_per_identity=6",
                             "federation.local_epochs=1", "federation.rounds=3", "federation.min_train_clients=2",
                             "dp.mode=off"])
    run, status = simulation.simulate(cfg, tmp_path, prefix="faulty", progress=False)

    start = next(e for e in run.read_metrics() if e["event"] == "start")
    nodes = {int(p): n for p, n in start["partitions"].items()}
    rounds = round_events(run)
    assert [[c["partition"] for c in e["clients"]] for e in rounds] == [[0, 1, 2], [1, 2]]
    assert rounds[0]["failures"] == []
    (failure,) = rounds[1]["failures"]
    assert failure.startswith(f"client 0 (node {nodes[0]}): ") and f"{CRASH} of client 0 in round 2" in failure

    assert status["status"] == "failed" and status["error"].startswith("RunFailed: round 3: ")
    for p in (0, 2):
        assert f"client {p} (node {nodes[p]}): " in status["error"]
        assert f"{CRASH} of client {p} in round 3" in status["error"]
    assert f"(node {nodes[1]})" not in status["error"]
    assert (run.path / "models" / "round-002.safetensors").is_file()
    assert not (run.path / "models" / "round-003.safetensors").exists()
