"""The MOTE enrollment phase: after the backbone rounds, every client enrolls its identities.

The server sends the final global model (plaintext, or the encrypted sum that each client
decrypts itself) in a ``query.enroll`` message to every client, validates the galleries that
come back (one per balancing factor), merges them over the clients and writes the server's
gallery into the run directory: ``mote/gallery-b<b>.safetensors`` and ``mote/enrollment.json``
(which client enrolled which identities, from which reference images, the KDE bandwidths).
A client that fails is recorded and the phase goes on with the others.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, RecordDict
from flwr.serverapp import Grid

from common import wire
from common.config import Config
from common.mote.gallery import MoteGallery
from common.runs.io import atomic_write_json
from common.runs.records import MoteEvaluation, resolvable
from common.runs.rundir import RunDir
from server.ledger import PrivacyLedger
from server.strategy import FaceFedAvg, ask_every_client

log = logging.getLogger(__name__)


def enroll_phase(grid: Grid, cfg: Config, run: RunDir, strategy: FaceFedAvg, global_record: ArrayRecord,
                 ledger: PrivacyLedger) -> dict[str, Any]:
    """Run the enrollment, write the gallery and, under MOTE DP, each client's MOTE entry of the
    privacy ledger; returns a summary for metrics.jsonl."""
    start = time.perf_counter()
    content = RecordDict({wire.CONFIG: wire.config_record(cfg, cfg.federation.rounds),
                          wire.RUN_RECORD: wire.run_record(run.path.name, cfg.federation.rounds),
                          **strategy.model_content(global_record)})
    replies, failures = ask_every_client(grid, strategy.partitions, content, "query.enroll",
                                         cfg.federation.round_timeout)
    factors = cfg.mote.balancing_factors
    per_member = cfg.data.layout == "per-member"
    shared = not per_member or cfg.mote.share_gallery
    evaluations: dict[str, dict[str, Any]] = {}
    galleries: list[list[MoteGallery]] = [[] for _ in factors]
    clients, enrolled = [], set()
    for partition, who, msg in replies:
        try:
            info = json.loads(str(msg.content[wire.MOTE_INFO]["json"]))
            got = [wire.record_to_gallery(msg.content[wire.gallery_key(i)], cfg.seed, who) for i in range(len(factors))
                   ] if shared else []
            dims = {g.dim for g in got}
            if got and (dims != {cfg.model.embedding_dim} or len({tuple(g.identity_ids) for g in got}) != 1):
                raise ValueError(f"{who}: galleries of embedding size {sorted(dims)} or with differing identities")
            ids = set(got[0].identity_ids.tolist()) if got else {int(i) for i in info["identities"]}
            if taken := enrolled & ids:
                raise ValueError(f"{who}: identities {sorted(taken)[:5]} were already enrolled by another client")
            if per_member:
                own = MoteEvaluation.from_dict(json.loads(str(msg.content[wire.MOTE_EVALUATION]["json"])))
                evaluations[str(partition)] = own.to_dict()
            if cfg.mote.dp_enabled():
                if not isinstance(info.get("privacy"), dict):
                    raise ValueError(f"{who}: MOTE DP is on but the reply carries no privacy report")
                ledger.record_mote(partition, info["privacy"])
        except (KeyError, TypeError, ValueError) as exc:
            failures.append(f"{who}: rejected enrollment: {exc}")
            continue
        enrolled |= ids
        for bucket, gallery in zip(galleries, got):
            bucket.append(gallery)
        clients.append(info)
    for failure in failures:
        log.warning("enrollment: %s", failure)
    if not clients:
        raise RuntimeError("enrollment: no client enrolled anyone; " + "; ".join(failures))
    files = {}
    for b, parts in zip(factors, galleries, strict=True):
        if not parts:  # per-member, galleries not shared: they stay at the members
            continue
        merged = MoteGallery.concat(parts, cfg.seed, {"balancing_factor": b})
        path = run.gallery(b)
        merged.save(path, fp16=cfg.mote.fp16)
        files[f"{b:.2f}"] = path.name
    summary = {"identities": sum(len(c["identities"]) for c in clients), "clients": len(clients),
               "failures": failures, "seconds": time.perf_counter() - start, "galleries": files}
    if per_member:
        atomic_write_json(run.mote_members_evaluation_path, members_evaluation(evaluations))
    atomic_write_json(run.mote_enrollment_path, {**summary, "per_client": clients})
    if ledger.mote:
        ledger.save(run.privacy_path)
        summary["mote_max_epsilon"] = max(e["epsilon"] for e in ledger.mote.values())
    return summary


def members_evaluation(members: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each member's MOTE-vs-templates report (computed at the member on its held-out images) and,
    per method, the AUC averaged over the members weighted by their probe images (a weighted mean
    of per-member numbers, not the AUC of pooled pairs), with FNMR at the target FMR only where
    every member's impostor comparisons resolve that FMR."""
    methods = sorted({m for e in members.values() for m in e["methods"]})
    weighted: dict[str, dict[str, float]] = {}
    for method in methods:
        have = [e["methods"][method] | {"probes": e["probes"], "target_fmr": e["target_fmr"]}
                for e in members.values() if method in e["methods"]]
        keys = ["auc"] + (["fnmr"] if all(resolvable(r["n_impostor"], r["target_fmr"]) for r in have) else [])
        weighted[method] = {k: float(np.average([r[k] for r in have], weights=[r["probes"] for r in have]))
                            for k in keys}
    return {"what": "MOTE vs templates at each member, on its held-out images (client/member_mote.py)",
            "members": members, "weighted_by_probes": weighted}
