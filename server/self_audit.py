"""The members' self-audit (``data.layout = per-member``), collected at the end of the run.

Only a member knows which of its images trained, so only it can audit the final model on its own
data (``attacks/self_audit.py``, run by ``client.app.self_audit_query``). The server sends the
final global model (encrypted under HE: each member decrypts it) and the public initial model
the members' reference models start from, and receives numbers: attack AUCs with intervals,
resolvable TPRs, empirical epsilon lower bounds and sample counts. It writes them to
``audit/self-audit.json`` beside each member's accounted epsilon from the privacy ledger, so the
report can set the bound a member measured against the guarantee it was given.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from flwr.app import ArrayRecord, RecordDict
from flwr.serverapp import Grid

from common import wire
from common.config import Config
from common.runs.io import atomic_write_json
from common.runs.rundir import RunDir
from server.ledger import PrivacyLedger
from server.strategy import FaceFedAvg, ask_every_client

log = logging.getLogger(__name__)


def self_audit_phase(grid: Grid, cfg: Config, run: RunDir, strategy: FaceFedAvg, global_record: ArrayRecord,
                     initial_record: ArrayRecord, ledger: PrivacyLedger) -> dict[str, Any]:
    """Ask every member for its self-audit; write and return them with each one's accounted epsilon."""
    content = RecordDict({wire.CONFIG: wire.config_record(cfg, cfg.federation.rounds),
                          wire.RUN_RECORD: wire.run_record(run.path.name, 0), wire.INITIAL_MODEL: initial_record,
                          **strategy.model_content(global_record)})
    replies, failures = ask_every_client(grid, strategy.partitions, content, "query.self_audit",
                                         cfg.federation.round_timeout)
    members: dict[str, Any] = {}
    for partition, who, msg in replies:
        try:
            result = json.loads(str(msg.content[wire.SELF_AUDIT]["json"]))
        except (KeyError, json.JSONDecodeError) as exc:
            failures.append(f"{who}: malformed self-audit ({exc})")
            continue
        if not isinstance(result, dict):
            failures.append(f"{who}: self-audit is not a JSON object")
            continue
        accounted = ledger.clients.get(partition, {})
        result["accounted_epsilon"] = accounted.get("epsilon") if cfg.dp.mode != "off" else None
        result["accounted_unit"] = accounted.get("unit")
        members[str(partition)] = result
    for failure in failures:
        log.warning("self-audit failed at %s", failure)
    out = {"what": "each member's membership audit of the final model on its own data: its training images vs "
                   "half its held-out images (attacks/self_audit.py); numbers only, computed at the member",
           "delta": cfg.dp.delta, "members": members,
           "failures": failures}
    run.audit.mkdir(exist_ok=True)
    atomic_write_json(run.self_audit_path, out)
    return out
