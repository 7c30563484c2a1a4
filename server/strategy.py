"""FedAvg with reproducible client sampling and exact, validated aggregation.

Flower's FedAvg samples nodes with the unseeded global ``random`` and averages in arrival order;
a run must instead be reproducible from its seed. Nodes are therefore sampled by their
partition id (learned in the describe phase) with a generator seeded by (seed, round), and
replies are checked and averaged in partition order (``server.aggregation``).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common import wire
from server.aggregation import weighted_average

log = logging.getLogger(__name__)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def error_summary(reason: str | None) -> str:
    """The last ``Type: message`` line of a client's traceback, without terminal colours."""
    lines = [ln.strip() for ln in _ANSI.sub("", reason or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "no reason given"


def in_partition_order(replies: Iterable[Message], partitions: dict[int, int]) -> list[tuple[str, Message]]:
    """Replies sorted by partition id (a fixed order whatever the arrival order), each with the
    "client P (node N)" name that every log line and error about it uses."""
    node_to_partition = {n: p for p, n in partitions.items()}

    def partition(msg: Message) -> int:
        return node_to_partition.get(msg.metadata.src_node_id, -1)

    return [(f"client {node_to_partition.get(m.metadata.src_node_id, '?')} (node {m.metadata.src_node_id})", m)
            for m in sorted(replies, key=partition)]


class ClientReply:
    """A train reply's plaintext envelope: who sent it, its sample count, metrics and privacy."""

    def __init__(self, msg: Message) -> None:
        content = msg.content
        self.node_id = msg.metadata.src_node_id
        metrics = content[wire.METRICS]
        self.partition = int(metrics[wire.PARTITION])
        self.num_examples = int(metrics[wire.NUM_EXAMPLES])
        self.metrics = dict(metrics)
        self.privacy_json = str(content[wire.PRIVACY]["json"]) if wire.PRIVACY in content.config_records else None
        self.who = f"client {self.partition} (node {self.node_id})"
        if self.num_examples <= 0:
            raise ValueError(f"{self.who}: num-examples must be > 0, got {self.num_examples}")


def check_arrays(who: str, arrays: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    """Same keys and shapes as ``expected``, and finite; errors name ``who`` and the tensor."""
    if set(arrays) != set(expected):
        raise ValueError(f"{who}: update has keys {sorted(set(arrays) ^ set(expected))[:3]} "
                         "that differ from the global model's")
    for key, ref in expected.items():
        arr = arrays[key]
        if arr.shape != ref.shape:
            raise ValueError(f"{who}: {key} has shape {arr.shape}, expected {ref.shape}")
        if not np.isfinite(arr).all():
            raise ValueError(f"{who}: {key} contains NaN or Inf")


class PlainReply(ClientReply):
    """A plaintext train reply whose arrays match the global model's keys and shapes."""

    def __init__(self, msg: Message, expected: dict[str, np.ndarray]) -> None:
        super().__init__(msg)
        self.arrays = wire.record_to_numpy(msg.content[wire.ARRAYS])
        check_arrays(self.who, self.arrays, expected)


class FaceFedAvg(FedAvg):
    """FedAvg over the shared model, sampling by partition id with a seeded generator."""

    def __init__(self, *, seed: int, partitions: dict[int, int], fraction_train: float, min_train_nodes: int,
                 min_available_nodes: int) -> None:
        super().__init__(fraction_train=fraction_train, fraction_evaluate=0.0, min_train_nodes=min_train_nodes,
                         min_evaluate_nodes=0, min_available_nodes=min_available_nodes)
        self.seed = seed
        self.partitions = partitions  # partition id -> node id
        self.failures: list[str] = []
        self.accepted: list[ClientReply] = []
        self._sent: dict[str, np.ndarray] = {}  # the global arrays of the round, to validate replies

    def sample(self, server_round: int) -> list[int]:
        """Partition ids trained in this round (all of them at fraction 1)."""
        ids = sorted(self.partitions)
        k = min(len(ids), max(self.min_train_nodes, math.ceil(self.fraction_train * len(ids))))
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0xFEDA, server_round]))
        return sorted(rng.choice(ids, size=k, replace=False).tolist())

    def model_content(self, arrays: ArrayRecord) -> dict[str, ArrayRecord | ConfigRecord]:
        """The records that carry the global model ``arrays`` to a client."""
        return {wire.ARRAYS: arrays}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if wire.ARRAYS in (content := self.model_content(arrays)):
            self._sent = wire.record_to_numpy(arrays)
        record = RecordDict({wire.CONFIG: config, **content})
        return [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=self.partitions[p])
                for p in self.sample(server_round)]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, None]:
        """Combine the valid replies in partition order; record each failure with the client's own
        error text. None when fewer than ``min_train_nodes`` replies are usable."""
        self.failures, self.accepted = [], []
        self.start_aggregation()
        for who, msg in in_partition_order(replies, self.partitions):
            if msg.has_error():
                self.failures.append(f"{who}: {error_summary(msg.error.reason)}")
                continue
            try:
                self.accepted.append(self.accept(msg))
            except (KeyError, TypeError, ValueError) as exc:
                self.failures.append(f"{who}: rejected update: {exc}")
        for failure in self.failures:
            log.warning("round %d: %s", server_round, failure)
        if len(self.accepted) < self.min_train_nodes:
            return None, None
        return self.combine(), None

    def start_aggregation(self) -> None:
        """Reset per-round accumulators (plaintext FedAvg keeps the replies until ``combine``)."""

    def accept(self, msg: Message) -> ClientReply:
        """Validate one reply against the arrays sent by ``configure_train``."""
        return PlainReply(msg, self._sent)

    def combine(self) -> ArrayRecord:
        return wire.numpy_to_record(weighted_average([(r.num_examples, r.arrays) for r in self.accepted]))
