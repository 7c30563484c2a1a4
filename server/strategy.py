"""FedAvg with reproducible client sampling and exact, validated aggregation.

Flower's FedAvg samples nodes with the unseeded global ``random`` and averages in arrival order;
a run must instead be reproducible from its seed. Nodes are therefore sampled by their
partition id (learned in the describe phase) with a generator seeded by (seed, round), and
replies are checked and averaged in partition order (``common.train.fedavg``).

Faulty clients never stop a round that still has ``min_train_nodes`` usable replies; each one
is recorded in ``failures`` by name ("client P (node N): ..."), which federation.py writes to
metrics.jsonl:

* a client that raised, or a node the SuperLink reports unavailable: its error reply;
* a sampled client with no reply by ``federation.round_timeout``. A late reply never reaches a
  later round: Flower's grid returns only replies to the message ids of the current
  ``send_and_receive`` call, train messages expire with the round (TTL = round_timeout), so the
  SuperLink drops a reply that comes after that and a node does not start a message it picks
  up too late, and each message carries its round as group id, so a reply of another round
  would still be refused here;
* a reply larger than ``federation.max_update_mb``, refused before anything in it is decoded;
* an update with other keys, shapes or dtypes than the global model, NaN / Inf values, missing
  or mistyped records, or a partition id that is not the sender's.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common import wire
from common.config import FederationConfig
from common.train.fedavg import sample_partitions, weighted_average

log = logging.getLogger(__name__)

AUTO_LIMIT_FACTOR = 2
"""With ``federation.max_update_mb = 0`` a reply may carry twice the bytes of a valid update..."""
METADATA_BYTES = 1_000_000
"""...plus this much for metrics and the privacy history (a few kB in practice)."""

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXPIRED = (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE)


def error_summary(reason: str | None) -> str:
    """The last ``Type: message`` line of a client's traceback, without terminal colours."""
    lines = [ln.strip() for ln in _ANSI.sub("", reason or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "no reason given"


def sender(msg: Message, owners: Mapping[str, int]) -> int:
    """The node a reply is about. The SuperLink answers for a node it deems unavailable, or an
    instruction that expired, with an error from itself: those are told apart by the instruction
    they answer (``owners``: message id -> destination node)."""
    return owners.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)


def client_name(node: int, partitions: Mapping[int, int]) -> str:
    """The name every log line and error gives a client: "client P (node N)"."""
    partition = next((p for p, n in partitions.items() if n == node), "?")
    return f"client {partition} (node {node})"


def in_partition_order(replies: Iterable[Message], partitions: dict[int, int],
                       owners: Mapping[str, int] | None = None) -> list[tuple[str, Message]]:
    """Replies sorted by partition id (a fixed order whatever the arrival order), each with the
    "client P (node N)" name of the node it is about (see ``sender``)."""
    owners = owners or {}
    node_to_partition = {n: p for p, n in partitions.items()}
    nodes = [(sender(m, owners), m) for m in replies]
    return [(client_name(node, partitions), m)
            for node, m in sorted(nodes, key=lambda item: node_to_partition.get(item[0], -1))]


def ask_every_client(grid: Grid, partitions: dict[int, int], content: RecordDict, message_type: str,
                     timeout: float, group_id: str | None = None) -> tuple[list[tuple[int, str, Message]], list[str]]:
    """Send ``content`` to every partition's node and wait up to ``timeout``: the (partition id,
    "client P (node N)", reply) of each that answered, in partition order, and one line per client
    that failed or did not answer in time."""
    messages = [Message(content, node, message_type, group_id=group_id) for _, node in sorted(partitions.items())]
    owners = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    answered = {sender(m, owners) for m in replies}
    failures = [f"{client_name(node, partitions)}: no reply within {timeout:g} s"
                for node in sorted(set(partitions.values()) - answered)]
    node_partition = {n: p for p, n in partitions.items()}
    good = []
    for who, msg in in_partition_order(replies, partitions, owners):
        if msg.has_error():
            failures.append(f"{who}: {error_summary(msg.error.reason)}")
        else:
            good.append((node_partition[sender(msg, owners)], who, msg))
    return good, failures


def reply_bytes(content: RecordDict) -> int:
    """The bytes a reply carries, counted from its serialised buffers without decoding any:
    every array's npy buffer, and the strings, bytes and numbers of its config and metric records."""
    def scalar(value: object) -> int:
        if isinstance(value, list):
            return sum(scalar(v) for v in value)
        return len(value) if isinstance(value, (str, bytes)) else 8

    arrays = sum(len(a.data) for record in content.array_records.values() for a in record.values())
    records = [*content.config_records.values(), *content.metric_records.values()]
    return arrays + sum(scalar(v) for record in records for v in record.values())


def record(content: RecordDict, kind: str, key: str, who: str) -> ArrayRecord | ConfigRecord | MetricRecord:
    """The reply's ``kind`` ("array", "config" or "metric") record ``key``; ValueError naming
    ``who`` when it is missing or is another kind of record."""
    records = {"array": content.array_records, "config": content.config_records, "metric": content.metric_records}[kind]
    if key not in records:
        raise ValueError(f"{who}: reply has no {kind} record {key!r}")
    return records[key]


class ClientReply:
    """A train reply's plaintext envelope: who sent it, its sample count, metrics and privacy."""

    def __init__(self, msg: Message, partition: int, examples: int | None = None) -> None:
        """``partition``: the sender's partition id from the describe phase, which the reply must repeat;
        ``examples``: that partition's member samples in the server's manifest. FedAvg weighs updates by
        the count a client claims, so a client claiming more than it holds would outweigh the others."""
        content = msg.content
        self.node_id = msg.metadata.src_node_id
        self.who = f"client {partition} (node {self.node_id})"
        metrics = record(content, "metric", wire.METRICS, self.who)
        self.partition = int(metrics[wire.PARTITION])
        self.num_examples = int(metrics[wire.NUM_EXAMPLES])
        self.metrics = dict(metrics)
        self.privacy_json = str(content[wire.PRIVACY]["json"]) if wire.PRIVACY in content.config_records else None
        if self.partition != partition:
            raise ValueError(f"{self.who}: reply claims partition-id {self.partition}")
        if self.num_examples <= 0:
            raise ValueError(f"{self.who}: num-examples must be > 0, got {self.num_examples}")
        if examples is not None and self.num_examples != examples:
            raise ValueError(f"{self.who}: claims num-examples {self.num_examples}, but its partition has {examples} "
                             "member samples in the server's manifest")


def check_arrays(who: str, arrays: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    """Same keys, shapes and dtypes as ``expected``, and finite; errors name ``who`` and the tensor."""
    if set(arrays) != set(expected):
        raise ValueError(f"{who}: update has keys {sorted(set(arrays) ^ set(expected))[:3]} "
                         "that differ from the global model's")
    for key, ref in expected.items():
        arr = arrays[key]
        if arr.shape != ref.shape:
            raise ValueError(f"{who}: {key} has shape {arr.shape}, expected {ref.shape}")
        if arr.dtype != ref.dtype:
            raise ValueError(f"{who}: {key} has dtype {arr.dtype}, expected {ref.dtype}")
        if not np.isfinite(arr).all():
            raise ValueError(f"{who}: {key} contains NaN or Inf")


class PlainReply(ClientReply):
    """A plaintext train reply whose arrays match the global model's keys, shapes and dtypes."""

    def __init__(self, msg: Message, partition: int, expected: dict[str, np.ndarray],
                 examples: int | None = None) -> None:
        super().__init__(msg, partition, examples)
        self.arrays = wire.record_to_numpy(record(msg.content, "array", wire.ARRAYS, self.who))
        check_arrays(self.who, self.arrays, expected)


@dataclass(frozen=True)
class StrategySettings:
    """What every strategy of a run is built with, from the start phase on (and again on resume).

    ``partitions``: partition id -> node id (the describe phase); ``examples``: partition id ->
    its member samples in the manifest, which replies must claim; ``federation``: sampling,
    minimum replies, round timeout and reply size limit."""

    seed: int
    partitions: dict[int, int]
    federation: FederationConfig
    examples: dict[int, int] = field(default_factory=dict)


class FaceFedAvg(FedAvg):
    """FedAvg over the shared model, sampling by partition id with a seeded generator."""

    def __init__(self, settings: StrategySettings) -> None:
        """The global model is evaluated by the server (``common.evaluation.global_model``) and the
        clients do not evaluate it: ``configure_evaluate`` sends nothing. (Passing
        ``fraction_evaluate=0`` instead would make Flower warn on every run.)"""
        fed = settings.federation
        super().__init__(fraction_train=fed.fraction_train, min_train_nodes=fed.min_train_clients,
                         min_evaluate_nodes=0, min_available_nodes=fed.min_available_clients)
        self.seed = settings.seed
        self.partitions = settings.partitions  # partition id -> node id
        self.examples = settings.examples
        self.federation = fed
        self.failures: list[str] = []
        self.accepted: list[ClientReply] = []
        self._global: dict[str, np.ndarray] = {}  # the global arrays of the round, to validate replies
        self._instructions: list[Message] = []  # the round's train messages (the grid sets their ids)

    def sample(self, server_round: int) -> list[int]:
        """Partition ids trained in this round (all of them at fraction 1)."""
        return sample_partitions(self.seed, server_round, list(self.partitions), self.fraction_train,
                                 self.min_train_nodes)

    def model_content(self, arrays: ArrayRecord) -> dict[str, ArrayRecord | ConfigRecord]:
        """The records that carry the global model ``arrays`` to a client."""
        return {wire.ARRAYS: arrays}

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """No federated evaluation: the server evaluates the global model itself."""
        return []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """One train message per sampled client, tagged with the round and expiring with it."""
        if wire.ARRAYS in (content := self.model_content(arrays)):
            self._global = wire.record_to_numpy(arrays)
        message_content = RecordDict({wire.CONFIG: config, **content})
        self._instructions = [Message(content=message_content, message_type=MessageType.TRAIN,
                                      dst_node_id=self.partitions[p], group_id=str(server_round),
                                      ttl=self.federation.round_timeout)
                              for p in self.sample(server_round)]
        return self._instructions

    def valid_update_bytes(self) -> int:
        """The size of a valid update: the global model's arrays."""
        return sum(a.nbytes for a in self._global.values())

    def max_reply_bytes(self) -> int:
        """``federation.max_update_mb``, or with 0 twice a valid update plus room for metrics."""
        if self.federation.max_update_mb > 0:
            return int(self.federation.max_update_mb * 1e6)
        return AUTO_LIMIT_FACTOR * self.valid_update_bytes() + METADATA_BYTES

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, None]:
        """Combine the valid replies in partition order; record each failure (the client's own
        error text, a timeout, a rejected update). None when fewer than ``min_train_nodes``
        replies are usable."""
        self.failures, self.accepted = [], []
        self.start_aggregation()
        owners = {m.metadata.message_id: m.metadata.dst_node_id for m in self._instructions if m.metadata.message_id}
        node_to_partition = {n: p for p, n in self.partitions.items()}
        answered: set[int] = set()
        for who, msg in in_partition_order(replies, self.partitions, owners):
            node = sender(msg, owners)
            if msg.has_error():
                answered.add(node)
                self.failures.append(f"{who}: {self._error_text(msg.error)}")
            elif msg.metadata.group_id != str(server_round):
                self.failures.append(f"{who}: ignored a reply to round {msg.metadata.group_id or '?'} "
                                     f"that arrived in round {server_round}")
            else:
                answered.add(node)
                try:
                    self.accepted.append(self._screen_and_accept(msg, node_to_partition.get(node, -1)))
                except (KeyError, TypeError, ValueError, OverflowError) as exc:
                    self.failures.append(f"{who}: rejected update: {exc}")
        self.failures += [f"{client_name(node, self.partitions)}: no reply within {self.federation.round_timeout:g} s"
                          for node in sorted((m.metadata.dst_node_id for m in self._instructions),
                                             key=lambda n: node_to_partition.get(n, -1))
                          if node not in answered]
        for failure in self.failures:
            log.warning("round %d: %s", server_round, failure)
        if len(self.accepted) < self.min_train_nodes:
            return None, None
        return self.combine(), None

    def _error_text(self, error: Error) -> str:
        """The client's own error, or a timeout when the SuperLink answers for an expired message."""
        if error.code in _EXPIRED:
            return f"no reply within {self.federation.round_timeout:g} s (the SuperLink expired the message)"
        return error_summary(error.reason)

    def _screen_and_accept(self, msg: Message, partition: int) -> ClientReply:
        """Refuse an oversized reply before decoding anything in it, then validate it."""
        size, limit = reply_bytes(msg.content), self.max_reply_bytes()
        if size > limit:
            raise ValueError(f"{size / 1e6:.3g} MB exceeds the limit of {limit / 1e6:.3g} MB (federation.max_update_mb"
                             f"{'' if self.federation.max_update_mb else ' = 0: twice a valid update + 1 MB'})")
        return self.accept(msg, partition)

    def start_aggregation(self) -> None:
        """Reset per-round accumulators (plaintext FedAvg keeps the replies until ``combine``)."""

    def accept(self, msg: Message, partition: int) -> ClientReply:
        """Validate one reply from the client of ``partition`` against the arrays sent by ``configure_train``."""
        return PlainReply(msg, partition, self._global, self.examples.get(partition))

    def combine(self) -> ArrayRecord:
        return wire.numpy_to_record(weighted_average([(r.num_examples, r.arrays) for r in self.accepted]))
