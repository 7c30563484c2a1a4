"""The server's side of one run: describe the clients, run the rounds, record everything.

Each round: sample clients (seeded), send the global model with the configuration, validate
and average the replies, update the privacy ledger, checkpoint the global model, evaluate it on
the probe split, and append the round's metrics. ``status.json`` says how the run ended.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid
from tqdm.auto import tqdm

from common import wire
from common.builders import build_dataset, build_manifest, build_model, model_spec
from common.config import Config
from common.encrypted_model import ENCRYPTED_SUFFIX, save_encrypted
from common.evaluation import GlobalEvaluator
from common.models.checkpoint import save_checkpoint
from common.models.face_model import FaceModel
from common.pretraining import pretrain
from common.rundir import RunDir
from server.enrollment import enroll_phase
from server.he_strategy import HEFedAvg, he_strategy
from server.ledger import PrivacyLedger
from server.strategy import FaceFedAvg

log = logging.getLogger(__name__)


class RunFailed(RuntimeError):
    """The federation cannot go on; the message says which round and which clients."""


def _wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise RunFailed(f"only {len(nodes)} of {count} SuperNodes connected within {timeout:.0f} s")
        time.sleep(0.5)
    return nodes


def describe_clients(grid: Grid, cfg: Config, fingerprint: str) -> dict[int, int]:
    """Map partition id -> node id, and refuse nodes that split different data than the server."""
    nodes = _wait_for_nodes(grid, cfg.split.num_clients, cfg.federation.round_timeout)
    content = RecordDict({wire.CONFIG: wire.config_record(cfg, 0)})
    replies = grid.send_and_receive([Message(content, node, "query.describe") for node in nodes],
                                    timeout=cfg.federation.round_timeout)
    partitions: dict[int, int] = {}
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            raise RunFailed(f"node {node} failed to describe itself: {msg.error.reason}")
        pid = int(msg.content[wire.METRICS][wire.PARTITION])
        theirs = str(msg.content[wire.CONFIG]["fingerprint"])
        if theirs != fingerprint:
            raise RunFailed(f"client {pid} (node {node}) has data fingerprint {theirs[:16]}..., the server's "
                            f"manifest has {fingerprint[:16]}...: the nodes do not hold the same data set")
        if pid in partitions:
            raise RunFailed(f"nodes {partitions[pid]} and {node} both claim partition-id {pid}")
        partitions[pid] = node
    missing = sorted(set(range(cfg.split.num_clients)) - set(partitions))
    if missing:
        raise RunFailed(f"no node answered for partition ids {missing}")
    return partitions


def run_federation(grid: Grid, cfg: Config, run: RunDir, progress: bool = False) -> dict[str, Any]:
    """Run every round; write status.json as finished or failed (with the reason) either way."""
    run.write_status("running", rounds_completed=0)
    try:
        summary = _rounds(grid, cfg, run, progress)
    except Exception as exc:
        run.write_status("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    run.write_status("finished", **summary)
    return summary


def _rounds(grid: Grid, cfg: Config, run: RunDir, progress: bool) -> dict[str, Any]:
    ds = build_dataset(cfg)
    manifest = build_manifest(cfg, ds)
    manifest.save(run.manifest_path)
    evaluator = GlobalEvaluator(cfg, ds, manifest)
    partitions = describe_clients(grid, cfg, manifest.fingerprint)
    spec = model_spec(cfg)
    model = build_model(spec, cfg.seed)
    run.log_metrics("start", partitions={str(p): n for p, n in partitions.items()}, initial=evaluator.evaluate(model))
    pretrained = pretrain(model, cfg, progress=progress)
    if pretrained is not None:
        run.log_metrics("pretrain", steps=pretrained.outcome.steps, seconds=pretrained.outcome.seconds,
                        **evaluator.evaluate(model))
    # The initial global model is public (seeded initialisation + public pretraining): the audit's
    # reference models start from it, as the target did.
    save_checkpoint(run.models / "initial.safetensors", model.state_dict(),
                    {"spec": spec.to_dict(), "task": cfg.train.task, "attribute": cfg.train.attribute, "round": 0})
    common = dict(seed=cfg.seed, partitions=partitions, fraction_train=cfg.federation.fraction_train,
                  min_train_nodes=cfg.federation.min_train_clients,
                  min_available_nodes=cfg.federation.min_available_clients)
    strategy = he_strategy(cfg, model, pretrained, run, **common) if cfg.he.enabled else FaceFedAvg(**common)
    global_record = wire.state_to_record(model.state_dict())
    ledger = PrivacyLedger(cfg.dp.accountant, cfg.dp.delta)
    meta = {"spec": spec.to_dict(), "task": cfg.train.task, "attribute": cfg.train.attribute}
    metrics: dict[str, float] = {}
    bar = tqdm(range(1, cfg.federation.rounds + 1), desc="rounds", disable=not progress, unit="round")
    for server_round in bar:
        start = time.perf_counter()
        messages = strategy.configure_train(server_round, global_record, wire.config_record(cfg, server_round), grid)
        replies = grid.send_and_receive(messages, timeout=cfg.federation.round_timeout)
        global_record, _ = strategy.aggregate_train(server_round, replies)
        if global_record is None:
            raise RunFailed(f"round {server_round}: {len(strategy.accepted)} usable replies, at least "
                            f"{cfg.federation.min_train_clients} needed; " + "; ".join(strategy.failures))
        for reply in strategy.accepted:
            if reply.privacy_json is not None and cfg.dp.mode != "off":
                ledger.record(reply.partition, server_round, reply.privacy_json)
        ledger.save(run.path / "privacy.json")
        if cfg.federation.save_client_models and not cfg.he.enabled:
            _save_client_models(run, strategy.accepted, {**meta, "round": server_round})
        federated_seconds = time.perf_counter() - start  # send, local training, (de/en)cryption, aggregation
        metrics = _checkpoint(run, strategy, global_record, model, evaluator, f"round-{server_round:03d}",
                              {**meta, "round": server_round})
        clients = [{"partition": r.partition, **{k: v for k, v in r.metrics.items() if k != wire.PARTITION}}
                   for r in strategy.accepted]
        run.log_metrics("round", round=server_round, seconds=time.perf_counter() - start,
                        federated_seconds=federated_seconds, clients=clients,
                        failures=strategy.failures, max_epsilon=ledger.max_epsilon(), encrypted=cfg.he.enabled,
                        train_loss=float(np.average([r.metrics["train-loss"] for r in strategy.accepted],
                                                    weights=[r.num_examples for r in strategy.accepted])),
                        **metrics)
        bar.set_postfix(eps=f"{ledger.max_epsilon():.2f}",
                        **({"auc": f"{metrics['verification_auc']:.3f}"} if metrics else {}))
        run.write_status("running", rounds_completed=server_round)
    _checkpoint(run, strategy, global_record, model, None, "final", {**meta, "round": cfg.federation.rounds})
    summary = {"rounds_completed": cfg.federation.rounds, "max_epsilon": ledger.max_epsilon(),
               "encrypted": cfg.he.enabled, **metrics}
    if cfg.mote.enabled and cfg.train.task in ("identity", "both"):
        enrolled = enroll_phase(grid, cfg, run, strategy, global_record)
        run.log_metrics("enroll", **enrolled)
        summary["mote_identities"] = enrolled["identities"]
    return summary


def _save_client_models(run: RunDir, replies: list, meta: dict[str, Any]) -> None:
    """What a curious plaintext server holds: each client's own post-round model (the latest)."""
    for reply in replies:
        state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in reply.arrays.items()}
        save_checkpoint(run.models / "clients" / f"client-{reply.partition}.safetensors", state,
                        {**meta, "partition": reply.partition, "num_examples": reply.num_examples})


def _checkpoint(run: RunDir, strategy: FaceFedAvg, record: ArrayRecord, model: FaceModel,
                evaluator: GlobalEvaluator | None, name: str, meta: dict[str, Any]) -> dict[str, float]:
    """Save the aggregate (encrypted when HE is on) and evaluate it when the server can read it."""
    if isinstance(strategy, HEFedAvg):
        save_encrypted(run.models / f"{name}{ENCRYPTED_SUFFIX}", wire.record_to_numpy(record), strategy.layout.mask,
                       {**meta, "fingerprint": strategy.fingerprint, "total_weight": strategy.total_weight})
        return {}  # the server cannot evaluate what it cannot decrypt
    model.load_state_dict(wire.record_to_state(record))
    save_checkpoint(run.models / f"{name}.safetensors", model.state_dict(), meta)
    return evaluator.evaluate(model) if evaluator is not None else {}
