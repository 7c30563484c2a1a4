"""Encrypted aggregation with real TenSEAL CKKS contexts.

* The decrypted HE aggregate equals plaintext FedAvg within 1e-6 relative, also with selective
  encryption (part of the values in plaintext).
* The server's context is public: it cannot decrypt, and a secret context is refused as the
  server's.
* A client with another key is named and left out (or fails the round, as configured); a sum
  polluted by another key is caught by the canary when decrypted.
* Malformed or truncated ciphertexts are rejected with an error naming the client; the others
  are aggregated.
* End to end: a 3-round DP + HE simulation's decrypted final model equals the same run without
  HE within 1e-4, and the server side only ever stored encrypted checkpoints.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flower_messages import reply_message
from sim_runs import REPLAYABLE, simulated_run

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                         "ignore::FutureWarning")]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """The consortium's key directory and a second, unrelated one."""
    from common.he.keys import KeyParams, write_keys

    root = tmp_path_factory.mktemp("keys")
    write_keys(root / "ours", KeyParams())
    write_keys(root / "other", KeyParams())
    return root / "ours", root / "other"


@pytest.fixture(scope="module")
def contexts(keys):
    from common.he.keys import (
        PUBLIC_FILE,
        SECRET_FILE,
        load_public_context,
        load_secret_context,
    )

    ours, other = keys
    public, fp = load_public_context(ours / PUBLIC_FILE)
    return {"secret": load_secret_context(ours / SECRET_FILE), "public": public, "fingerprint": fp,
            "other": load_secret_context(other / SECRET_FILE)}


def _updates(seed: int, clients: int, shapes: dict[str, tuple[int, ...]]):
    rng = np.random.default_rng(seed)
    return [(int(rng.integers(5, 400)), {k: (rng.normal(size=s) * 10.0 ** rng.integers(-3, 1)).astype(np.float32)
                                         for k, s in shapes.items()}) for _ in range(clients)]


SHAPES = {"conv.weight": (16, 3, 3, 3), "fc.bias": (7,), "fc.weight": (300, 9)}  # 3171 values: 2 ciphertexts


def _he_reply(ctx, fp, layout, node, partition, n, arrays):
    from flwr.app import ConfigRecord

    from common import wire
    from common.he.ckks import encrypt_weighted

    secret, plain = layout.split(arrays)
    return reply_message(node, partition, n, {
        wire.HE_PAYLOAD: wire.payload_to_record(plain, encrypt_weighted(ctx, secret, n)),
        wire.HE_META: ConfigRecord({wire.FINGERPRINT: fp})})


def _strategy(contexts, layout, partitions, on_key_mismatch="exclude", min_train=2, examples=None):
    from common.config import FederationConfig
    from server.he_strategy import HEFedAvg
    from server.strategy import StrategySettings

    settings = StrategySettings(0, partitions, FederationConfig(min_train_clients=min_train), examples or {})
    return HEFedAvg(settings, ctx=contexts["public"], key_fingerprint=contexts["fingerprint"], layout=layout,
                    on_key_mismatch=on_key_mismatch)


def _decrypt(contexts, strategy, record):
    from common import wire
    from common.he.ckks import decrypt_mean

    plain, ct = wire.record_to_payload(record, "test")
    mean = decrypt_mean(contexts["secret"], ct, strategy.layout.n_encrypted, strategy.total_weight, "test")
    return strategy.layout.merge(mean, plain.astype(np.float64))


@pytest.mark.parametrize("fraction", [1.0, 0.3])
def test_decrypted_aggregate_equals_plaintext_fedavg(server_task, contexts, fraction) -> None:
    from common.he.selection import EncryptionLayout, top_fraction_mask
    from common.train.fedavg import weighted_average

    updates = _updates(0, 4, SHAPES)
    layout = EncryptionLayout.for_state(updates[0][1])
    if fraction < 1:  # any sensitivity map will do here: rank by magnitude of the first update
        layout = EncryptionLayout.for_state(updates[0][1], top_fraction_mask(layout, {k: np.abs(v) for k, v in updates[0][1].items()}, fraction))
        assert 0 < layout.n_plain < layout.mask.size
    partitions = {p: 100 + p for p in range(4)}
    strategy = _strategy(contexts, layout, partitions)
    replies = [_he_reply(contexts["secret"], contexts["fingerprint"], layout, 100 + p, p, n, a)
               for p, (n, a) in enumerate(updates)]
    record, _ = strategy.aggregate_train(1, replies)
    assert strategy.failures == [] and strategy.total_weight == sum(n for n, _ in updates)
    got, want = _decrypt(contexts, strategy, record), weighted_average(updates)
    for key in SHAPES:
        scale = np.abs(want[key]).max()
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-6 * scale, err_msg=key)


def test_inflated_sample_count_is_refused_before_it_enters_the_encrypted_sum(server_task, contexts) -> None:
    """The weight of an encrypted update is inside the ciphertext (n x update), so the server checks
    the claimed count against its manifest before adding: client 2 claims 50x its samples."""
    from common.he.selection import EncryptionLayout
    from common.train.fedavg import weighted_average

    updates = _updates(0, 3, SHAPES)
    layout = EncryptionLayout.for_state(updates[0][1])
    strategy = _strategy(contexts, layout, {p: 100 + p for p in range(3)},
                         examples={p: n for p, (n, _) in enumerate(updates)})
    replies = [_he_reply(contexts["secret"], contexts["fingerprint"], layout, 100 + p, p, n * (50 if p == 2 else 1), a)
               for p, (n, a) in enumerate(updates)]
    record, _ = strategy.aggregate_train(1, replies)
    (failure,) = strategy.failures
    assert failure.startswith("client 2 (node 102)") and f"claims num-examples {updates[2][0] * 50}" in failure
    assert strategy.total_weight == updates[0][0] + updates[1][0]
    got, want = _decrypt(contexts, strategy, record), weighted_average(updates[:2])
    for key in SHAPES:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-6 * np.abs(want[key]).max(), err_msg=key)


def test_server_context_is_public_and_cannot_decrypt(keys, contexts) -> None:
    import tenseal as ts

    from common.he.ckks import CiphertextError, decrypt_mean, encrypt_weighted
    from common.he.keys import SECRET_FILE, HEKeyError, load_public_context

    assert not contexts["public"].has_secret_key()
    ct = encrypt_weighted(contexts["secret"], np.arange(10.0), 3)
    vector = ts.ckks_vector_from(contexts["public"], ct.split("test")[0])
    with pytest.raises(ValueError, match="secret"):
        vector.decrypt()
    with pytest.raises(CiphertextError, match="public"):
        decrypt_mean(contexts["public"], ct, 10, 3, "test")
    with pytest.raises(HEKeyError, match="holds the secret key"):
        load_public_context(keys[0] / SECRET_FILE)  # a server handed the secret context refuses it


def test_fingerprints_tell_keys_apart(keys, contexts) -> None:
    from common.he.keys import SECRET_FILE, fingerprint, load_secret_context

    assert fingerprint(contexts["secret"]) == contexts["fingerprint"]
    assert fingerprint(load_secret_context(keys[0] / SECRET_FILE)) == contexts["fingerprint"]
    assert fingerprint(contexts["other"]) != contexts["fingerprint"]


def test_client_with_another_key_is_named_and_excluded_or_fails_the_round(server_task, contexts) -> None:
    from common.he.keys import fingerprint
    from common.he.selection import EncryptionLayout
    from server.he_strategy import KeyMismatchError

    updates = _updates(1, 3, SHAPES)
    layout = EncryptionLayout.for_state(updates[0][1])
    partitions = {p: 100 + p for p in range(3)}
    other = contexts["other"]
    keys_of = [(contexts["secret"], contexts["fingerprint"])] * 2 + [(other, fingerprint(other))]
    replies = [_he_reply(c, fp, layout, 100 + p, p, n, a) for p, ((n, a), (c, fp)) in enumerate(zip(updates, keys_of))]
    strategy = _strategy(contexts, layout, partitions)
    record, _ = strategy.aggregate_train(1, replies)
    assert [r.partition for r in strategy.accepted] == [0, 1]
    assert len(strategy.failures) == 1 and "client 2 (node 102)" in strategy.failures[0]
    assert "fingerprint" in strategy.failures[0]
    from common.train.fedavg import weighted_average

    np.testing.assert_allclose(_decrypt(contexts, strategy, record)["fc.weight"],
                               weighted_average(updates[:2])["fc.weight"], rtol=1e-6, atol=1e-6)
    with pytest.raises(KeyMismatchError, match="client 2"):
        _strategy(contexts, layout, partitions, on_key_mismatch="fail").aggregate_train(1, replies)


def test_canary_catches_a_sum_polluted_by_another_key(server_task, contexts) -> None:
    """A client that encrypts with another key but claims the consortium's fingerprint gets past
    the server; the key holders' canary check then refuses the aggregate."""
    from common.he.ckks import CiphertextError
    from common.he.selection import EncryptionLayout

    updates = _updates(2, 2, SHAPES)
    layout = EncryptionLayout.for_state(updates[0][1])
    lying = [(contexts["secret"], contexts["fingerprint"]), (contexts["other"], contexts["fingerprint"])]
    replies = [_he_reply(c, fp, layout, 100 + p, p, n, a) for p, ((n, a), (c, fp)) in enumerate(zip(updates, lying))]
    strategy = _strategy(contexts, layout, {0: 100, 1: 101})
    record, _ = strategy.aggregate_train(1, replies)
    with pytest.raises(CiphertextError, match="canary"):
        _decrypt(contexts, strategy, record)


def _corrupt(record, how: str):
    from common import wire
    from common.he.ckks import Ciphertexts

    plain, ct = wire.record_to_payload(record, "test")
    blob, lengths = ct.blob.copy(), ct.lengths.copy()
    if how == "truncated":
        blob = blob[: blob.size // 2]
    elif how == "garbage":
        blob[: lengths[0]] = np.random.default_rng(0).integers(0, 256, lengths[0], dtype=np.uint8)
    elif how == "zeros":  # parses as an empty vector in TenSEAL: must be caught by the size check
        blob[: lengths[0]] = 0
    elif how == "dropped":
        blob, lengths = blob[lengths[0]:], lengths[1:]
    elif how == "reframed":  # same total, wrong boundaries
        lengths[0] -= 10
        lengths[1] += 10
    elif how == "dtype":
        blob = blob.astype(np.int64)
    return wire.payload_to_record(plain, Ciphertexts(blob, lengths))


@pytest.mark.parametrize("how", ["truncated", "garbage", "zeros", "dropped", "reframed", "dtype"])
def test_malformed_ciphertexts_are_rejected_naming_the_client(server_task, contexts, how) -> None:
    from common import wire
    from common.he.selection import EncryptionLayout
    from common.train.fedavg import weighted_average

    updates = _updates(3, 3, SHAPES)
    layout = EncryptionLayout.for_state(updates[0][1])
    replies = [_he_reply(contexts["secret"], contexts["fingerprint"], layout, 100 + p, p, n, a)
               for p, (n, a) in enumerate(updates)]
    bad = replies[1].content
    bad[wire.HE_PAYLOAD] = _corrupt(bad[wire.HE_PAYLOAD], how)
    strategy = _strategy(contexts, layout, {p: 100 + p for p in range(3)})
    record, _ = strategy.aggregate_train(1, replies)
    assert [r.partition for r in strategy.accepted] == [0, 2]
    assert len(strategy.failures) == 1 and strategy.failures[0].startswith("client 1 (node 101): rejected update")
    np.testing.assert_allclose(_decrypt(contexts, strategy, record)["fc.weight"],
                               weighted_average([updates[0], updates[2]])["fc.weight"], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- end to end (real simulation)

@pytest.mark.timeout(300)
def test_he_run_equals_plaintext_run_and_server_stores_only_ciphertexts(tmp_path_factory, keys) -> None:
    from common.he.keys import PUBLIC_FILE, SECRET_FILE
    from common.nn.checkpoint import load_checkpoint
    from workflow.decryption import decrypt_run

    plain_run = simulated_run(tmp_path_factory, REPLAYABLE)[0]
    he_run = simulated_run(tmp_path_factory, REPLAYABLE + ("he.enabled=true", f"he.public_context={keys[0] / PUBLIC_FILE}"),
                           tag="he", he_secret=keys[0] / SECRET_FILE)[0]
    models = sorted(p.name for p in (he_run.path / "models").iterdir())
    # Only the initial model (seeded init + public pretraining, nothing private) is in plaintext.
    assert models == ["final.he.safetensors", "initial.safetensors"] + [f"round-{r:03d}.he.safetensors"
                                                                        for r in (1, 2, 3)]
    he_info = json.loads((he_run.path / "he.json").read_text())
    assert he_info["plaintext"] == 0 and he_info["encrypted"] == he_info["values"] > 0
    events = [r for r in he_run.read_metrics() if r["event"] == "round"]
    assert all(e["encrypted"] and "verification_auc" not in e and e["max_epsilon"] > 0 for e in events)  # DP on

    with pytest.raises(ValueError, match="not the consortium's secret key"):
        decrypt_run(he_run.path, keys[1] / SECRET_FILE)
    path, metrics = decrypt_run(he_run.path, keys[0] / SECRET_FILE)
    got, want = load_checkpoint(path)[0], load_checkpoint(plain_run.path / "models" / "final.safetensors")[0]
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_allclose(got[key].numpy(), want[key].numpy(), rtol=1e-4, atol=1e-4, err_msg=key)
    # The key holder sees the learning curve the server could not: every round's decrypted model
    # scores as the plaintext run's global model of that round did.
    plain_rounds = [r for r in plain_run.read_metrics() if r["event"] == "round"]
    decrypted = [r for r in he_run.read_metrics() if r["event"] == "decrypted"]
    assert [e["round"] for e in decrypted] == [1, 2, 3]
    for he_round, plain_round in zip(decrypted, plain_rounds, strict=True):
        assert he_round["verification_auc"] == pytest.approx(plain_round["verification_auc"], abs=1e-3)
    assert metrics == {k: v for k, v in decrypted[-1].items() if k in metrics}
