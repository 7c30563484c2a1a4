"""Hand-made Flower train replies, as a ServerApp receives them, for strategy unit tests."""

from __future__ import annotations

import time
from typing import Any

import numpy as np


def reply_message(node: int, partition: int, n: int, records: dict[str, Any]):
    """A train reply from ``node`` holding ``records`` plus the usual metrics and privacy records."""
    from flwr.app import (
        ConfigRecord,
        Message,
        MessageType,
        Metadata,
        MetricRecord,
        RecordDict,
    )

    from common import wire

    # Outside a running ServerApp there is no task identity to reply to: set the metadata directly.
    metadata = Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="",
                        group_id="1", created_at=0.0, ttl=3600.0, message_type=MessageType.TRAIN)
    content = RecordDict({wire.METRICS: MetricRecord({wire.PARTITION: partition, wire.NUM_EXAMPLES: n,
                                                      "train-loss": 0.5}),
                          wire.PRIVACY: ConfigRecord({"json": "{}"}), **records})
    return Message(content=content, metadata=metadata)


def plain_reply(node: int, partition: int, n: int, arrays: dict[str, np.ndarray]):
    from common import wire

    return reply_message(node, partition, n, {wire.ARRAYS: wire.numpy_to_record(arrays)})


def next_instruction(state, node: int, timeout: float):
    """The next message the SuperLink ``state`` holds for ``node``, as its SuperNode would pull it
    (polling); None when none came within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (instructions := state.get_message_ins(node_id=node, limit=1)):
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)
    return instructions[0]
