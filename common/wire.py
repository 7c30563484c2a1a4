"""What travels in Flower messages between ServerApp and ClientApp.

Client and server never import each other, so both sides encode and decode here. The server
sends the whole resolved configuration (flat keys) with every message, which makes the
server's config the single source of truth in both engines; a client adds only what its node
configuration says about itself (partition id, local paths).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from common.config import Config, from_flat
from common.he.ckks import Ciphertexts
from common.mote.gallery import MoteGallery
from common.mote.networks import PARAM_NAMES
from common.runs.io import check_npy_size

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
PRIVACY = "privacy"
ROUND = "server-round"
NUM_EXAMPLES = "num-examples"
PARTITION = "partition-id"

# Encrypted aggregation (common/he/ckks.py): the mask of encrypted entries, the encrypted
# weighted sum (server -> clients) or update (client -> server) with its plaintext part, and
# plaintext metadata (key fingerprint, total sample count of the sum).
HE_MASK = "he-mask"
HE_PAYLOAD = "he-payload"
HE_META = "he"
FINGERPRINT = "fingerprint"
TOTAL_WEIGHT = "total-weight"

# The members' self-audit (query.self-audit, data.layout = per-member): the run's initial model,
# public (seeded initialisation + public pretraining), from which their reference models start;
# the reply is one JSON of numbers (query name self_audit: Flower wants an identifier).
INITIAL_MODEL = "initial-model"
SELF_AUDIT = "self-audit"

# MOTE enrollment (query.enroll): one gallery record per balancing factor, and a JSON summary.
MOTE_INFO = "mote-info"
MOTE_EVALUATION = "mote-evaluation"  # data.layout = per-member: the member's MOTE-vs-templates numbers (JSON)
# Train messages of a run that can be resumed: which run (the run directory's name) and the last
# round whose update the server accepted from this client (client/app.py restores its state of it).
RUN_RECORD = "run"
RUN_KEY = "run-key"
LAST_ROUND = "last-round"


def run_record(run_key: str, last_round: int) -> ConfigRecord:
    """Which run a message belongs to (the client's key for its node-local state) and the last
    round the server accepted this client's update in."""
    return ConfigRecord({RUN_KEY: run_key, LAST_ROUND: last_round})


def config_record(cfg: Config, server_round: int) -> ConfigRecord:
    rec = ConfigRecord(cfg.to_flat())
    rec[ROUND] = server_round
    return rec


def config_from_record(rec: Mapping[str, object]) -> tuple[Config, int]:
    """The Config and round number carried by a message's ConfigRecord."""
    flat = {k: v for k, v in rec.items() if k != ROUND}
    return from_flat(flat), int(rec.get(ROUND, 0))


def state_to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(torch_state_dict={k: v.detach().cpu() for k, v in state.items()})


def numpy_to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def record_to_numpy(rec: ArrayRecord) -> dict[str, np.ndarray]:
    """The arrays of a record; a payload that is not one .npy array is a ValueError naming the key.

    The declared size is checked against the bytes received before numpy allocates the array.
    """
    out = {}
    for key, array in rec.items():
        try:
            check_npy_size(io.BytesIO(array.data), len(array.data))
            out[key] = array.numpy()
        except (ValueError, TypeError, EOFError, OSError, zipfile.BadZipFile) as exc:
            raise ValueError(f"array {key!r}: not a valid numpy payload ({str(exc)[:200]})") from None
        if not isinstance(out[key], np.ndarray):
            raise ValueError(f"array {key!r}: expected one numpy array, got {type(out[key]).__name__}")
    return out


def record_to_state(rec: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in record_to_numpy(rec).items()}


def payload_to_record(plain: np.ndarray, ct: Ciphertexts) -> ArrayRecord:
    """An encrypted update or sum: the plaintext values and the ciphertexts."""
    return numpy_to_record({"plain": plain.astype(np.float32), "ciphertext": ct.blob, "lengths": ct.lengths})


def record_to_payload(rec: ArrayRecord, who: str) -> tuple[np.ndarray, Ciphertexts]:
    """Inverse of ``payload_to_record``; a missing part raises KeyError naming it and ``who``."""
    try:
        arrays = record_to_numpy(rec)
    except ValueError as exc:
        raise ValueError(f"{who}: encrypted payload: {exc}") from None
    missing = sorted({"plain", "ciphertext", "lengths"} - set(arrays))
    if missing:
        raise KeyError(f"{who}: encrypted payload lacks {missing}")
    return arrays["plain"], Ciphertexts(arrays["ciphertext"], arrays["lengths"])


def gallery_key(index: int) -> str:
    return f"mote-{index}"


def gallery_to_record(gallery: MoteGallery) -> ArrayRecord:
    return numpy_to_record({**{n: t.numpy() for n, t in gallery.params.items()},
                            "identity_ids": gallery.identity_ids, "balancing_factor": gallery.balancing_factor})


def record_to_gallery(rec: ArrayRecord, seed: int, who: str) -> MoteGallery:
    """A client's MOTE gallery; raises ValueError naming ``who`` for missing, misshaped or non-finite parts."""
    try:
        arrays = record_to_numpy(rec)
    except ValueError as exc:
        raise ValueError(f"{who}: MOTE gallery: {exc}") from None
    missing = sorted({*PARAM_NAMES, "identity_ids", "balancing_factor"} - set(arrays))
    if missing:
        raise ValueError(f"{who}: MOTE gallery lacks {missing}")
    try:
        return MoteGallery(arrays["identity_ids"], {n: np.array(arrays[n]) for n in PARAM_NAMES},  # writable copies
                           arrays["balancing_factor"], seed)
    except ValueError as exc:
        raise ValueError(f"{who}: {exc}") from None


def metric_record(values: Mapping[str, float | int]) -> MetricRecord:
    return MetricRecord({k: (float(v) if isinstance(v, float) else int(v)) for k, v in values.items()})


def partition_of(node_config: Mapping[str, object], num_clients: int) -> int:
    """This node's client index from its node config; errors say what the operator must set."""
    if PARTITION not in node_config:
        raise ValueError(f"node config: missing 'partition-id' (set --node-config \"partition-id=K "
                         f"num-partitions={num_clients}\" on the SuperNode)")
    pid, total = node_config[PARTITION], node_config.get("num-partitions", num_clients)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (pid, total)):
        raise ValueError(f"node config: partition-id={pid!r} num-partitions={total!r} must be integers")
    if total != num_clients or not 0 <= pid < num_clients:
        raise ValueError(f"node config: partition-id={pid} num-partitions={total} does not fit "
                         f"split.num_clients = {num_clients}")
    return pid
