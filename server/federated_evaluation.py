"""Federated evaluation: the members score each round's global model on their own held-out data.

With ``data.layout = per-member`` the server holds no private data, so the learning curve comes
from the members: each evaluates the global model (decrypting it itself under HE, so an
encrypted run needs no key holder to replay it) on its held-out identities and images and sends
back only metrics and the counts they rest on (``client.app.evaluate``). The server averages
them weighted by those counts: verification AUC by probe images, attribute metrics by held-out
images. A weighted mean of per-member AUCs is not the AUC of the pooled pairs (no member sees
another's impostors); the table says so by naming it the members' AUC.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, MessageType, RecordDict
from flwr.serverapp import Grid

from common import wire
from common.config import Config
from common.evaluation.global_model import MEMBERS_PREFIX
from server.strategy import FaceFedAvg, ask_every_client

log = logging.getLogger(__name__)

WEIGHTS = {"verification_auc": "probe-images"}
"""The count each metric is weighted by; every other metric (attribute_*) by held-out images."""


def evaluate_phase(grid: Grid, cfg: Config, strategy: FaceFedAvg, global_record: ArrayRecord,
                   server_round: int, run_key: str) -> dict[str, Any]:
    """Send the global model to every member for evaluation and combine the replies (in partition
    order); a member that fails or does not answer is named in ``failures`` and left out of the
    averages."""
    content = RecordDict({wire.CONFIG: wire.config_record(cfg, server_round),
                          wire.RUN_RECORD: wire.run_record(run_key, 0), **strategy.model_content(global_record)})
    replies, failures = ask_every_client(grid, strategy.partitions, content, MessageType.EVALUATE,
                                         cfg.federation.round_timeout, group_id=str(server_round))
    members = [{k: float(v) for k, v in msg.content[wire.METRICS].items()}  # type: ignore[arg-type]
               for _, _, msg in replies]
    for failure in failures:
        log.warning("round %d: federated evaluation failed at %s", server_round, failure)
    return {**combine(members), "members": members, "failures": failures}


def combine(members: list[dict[str, float]]) -> dict[str, float]:
    """Count-weighted means of each metric over the members that report it (named with ``MEMBERS_PREFIX``)."""
    out: dict[str, float] = {}
    names = sorted({k for m in members for k in m if k == "verification_auc" or k.startswith("attribute_")})
    for name in names:
        weight = WEIGHTS.get(name, "held-out-images")
        have = [m for m in members if name in m and m.get(weight, 0) > 0]
        if have:
            out[MEMBERS_PREFIX + name] = float(np.average([m[name] for m in have], weights=[m[weight] for m in have]))
    return out
