"""The server's side of one run: describe the clients, run the rounds, record everything.

Each round: sample clients (seeded), send the global model with the configuration, validate
and average the replies, update the privacy ledger, checkpoint the global model, evaluate it on
the probe split, and append the round's metrics; then commit the round (status.json, written
last: see common/runs/rundir.py). ``status.json`` says how the run ended.

A resumed run (``facefl run --resume``) restores the server's state after the last committed
round from that round's checkpoint (global model or encrypted sum, mask, total weight, and the
privacy ledger as of that round), skips the start phase and runs the remaining rounds, the final
checkpoint and MOTE enrollment. The clients restore theirs from node-local files (client/app.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid
from tqdm.auto import tqdm

from common import wire
from common.config import Config
from common.data.cache import build_dataset
from common.evaluation.global_model import MEMBERS_PREFIX, GlobalEvaluator, public_evaluator
from common.he.checkpoints import save_encrypted
from common.he.keys import load_public_context
from common.he.selection import EncryptionLayout
from common.nn.build import build_initial_model, build_model, model_spec
from common.nn.checkpoint import load_checkpoint, save_checkpoint
from common.nn.face_model import FaceModel
from common.runs.layout import FINAL, round_name
from common.runs.rundir import ResumePoint, RunDir
from common.split.build import build_manifest
from common.split.canaries import canary_plan, client_sample_counts, write_canaries
from common.split.manifest import Manifest
from common.train.pretraining import Pretrained, pretrain
from server.enrollment import enroll_phase
from server.federated_evaluation import evaluate_phase
from server.he_strategy import HEFedAvg, he_strategy
from server.ledger import PrivacyLedger
from server.self_audit import self_audit_phase
from server.strategy import FaceFedAvg, StrategySettings, error_summary, sender

log = logging.getLogger(__name__)


class RunFailed(RuntimeError):
    """The federation cannot go on; the message says which round and which clients."""


def _wait_for_nodes(grid: Grid, count: int, timeout: float, report_every: float = 10.0) -> list[int]:
    """The node ids once ``count`` SuperNodes are connected; while waiting, say how many there
    are, how many are needed and for how much longer, so that a federation started with too
    few SuperNodes (e.g. ``flwr run`` with the local default of 2) is not a silent hour."""
    start = time.monotonic()
    said = 3.0 - report_every  # the first report after 3 s: nodes that connect at once stay silent
    while len(nodes := sorted(grid.get_node_ids())) < count:
        waited = time.monotonic() - start
        if waited > timeout:
            raise RunFailed(f"only {len(nodes)} of {count} SuperNodes connected within {timeout:.0f} s "
                            f"(split.num_clients = {count}: start that many SuperNodes, e.g. flwr run . --federation-"
                            f"config 'num-supernodes={count}')")
        if waited - said >= report_every:
            log.warning("waiting for SuperNodes: %d of %d connected (split.num_clients = %d); waiting up to %.0f s "
                        "more", len(nodes), count, count, timeout - waited)
            said = waited
        time.sleep(0.5)
    return nodes


DESCRIBE_PATIENCE = 120.0
"""At least this many seconds for nodes to connect and describe themselves: starting the engine and
a first ClientApp process can take longer than a short ``round_timeout`` meant for training."""


def describe_clients(grid: Grid, cfg: Config, manifest: Manifest, counts: list[int] | None = None) -> dict[int, int]:
    """Map partition id -> node id, and refuse nodes that split different data than the server or
    that claim another sample count than their partition has in the server's manifest (``counts``:
    per partition, its members plus its canaries, ``common.split.canaries.client_sample_counts``).

    A node that cannot describe itself is left out as long as every partition is claimed by
    another: the SuperLink lists a SuperNode that died as online until its heartbeat expires
    (up to 60 s), so right after SuperNodes were restarted (a new node id each) the dead ones
    are still asked, and the SuperLink answers for them with an error."""
    fingerprint = manifest.fingerprint
    expected = counts if counts is not None else [len(c) for c in manifest.clients]
    patience = max(cfg.federation.round_timeout, DESCRIBE_PATIENCE)
    nodes = _wait_for_nodes(grid, cfg.split.num_clients, patience)
    content = RecordDict({wire.CONFIG: wire.config_record(cfg, 0)})
    messages = [Message(content, node, "query.describe") for node in nodes]
    replies = grid.send_and_receive(messages, timeout=patience)
    owners = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
    partitions: dict[int, int] = {}
    failed: list[str] = []
    for msg in replies:
        node = sender(msg, owners)  # the SuperLink answers for an unavailable node in its own name
        if msg.has_error():
            failed.append(f"node {node} failed to describe itself: {error_summary(msg.error.reason)}")
            continue
        pid = int(msg.content[wire.METRICS][wire.PARTITION])
        theirs = str(msg.content[wire.CONFIG]["fingerprint"])
        if theirs != fingerprint:
            raise RunFailed(f"client {pid} (node {node}) has data fingerprint {theirs[:16]}..., the server's "
                            f"manifest has {fingerprint[:16]}...: the nodes do not hold the same data set")
        if pid in partitions:
            raise RunFailed(f"nodes {partitions[pid]} and {node} both claim partition-id {pid}")
        claimed = int(msg.content[wire.METRICS][wire.NUM_EXAMPLES])
        if 0 <= pid < manifest.num_clients and claimed != expected[pid]:
            raise RunFailed(f"client {pid} (node {node}) claims {claimed} samples, its partition has "
                            f"{expected[pid]} in the server's manifest")
        partitions[pid] = node
    missing = sorted(set(range(cfg.split.num_clients)) - set(partitions))
    if missing:
        raise RunFailed(f"no node answered for partition ids {missing}" + "".join(f"; {f}" for f in failed))
    for failure in failed:
        log.warning("%s; left out, every partition has a node", failure)
    return partitions


def _manifest_data(cfg: Config, run: RunDir, started: bool) -> tuple[Manifest, GlobalEvaluator, list[int]]:
    """``data.layout = manifest``: the split of the whole data set (written at the start, the audit's
    ground truth; checked against the data on resume), the canaries, the server's evaluator, and
    each partition's sample count (its members plus its canaries)."""
    ds = build_dataset(cfg)
    if started:
        manifest = Manifest.load(run.manifest_path, expect_fingerprint=ds.fingerprint())
    else:
        manifest = build_manifest(cfg, ds)
        manifest.save(run.manifest_path)
    canaries = canary_plan(cfg, ds, manifest)  # the same plan every client derives (client.local.local_data)
    if not started:
        write_canaries(run, canaries)  # for the auditor only (attacks.canary_audit)
    return manifest, GlobalEvaluator.from_manifest(cfg, ds, manifest), client_sample_counts(manifest, canaries)


def describe_members(grid: Grid, cfg: Config, run_key: str) -> tuple[dict[int, int], dict[int, dict[str, int]]]:
    """``data.layout = per-member``: map partition id -> node id, with the counts each member
    reports of its own data (``common.split.member.counts``; its updates must claim its number
    of training images). The
    message carries the run key, under which each member keeps its split on its own disk."""
    patience = max(cfg.federation.round_timeout, DESCRIBE_PATIENCE)
    nodes = _wait_for_nodes(grid, cfg.split.num_clients, patience)
    content = RecordDict({wire.CONFIG: wire.config_record(cfg, 0), wire.RUN_RECORD: wire.run_record(run_key, 0)})
    messages = [Message(content, node, "query.describe") for node in nodes]
    replies = grid.send_and_receive(messages, timeout=patience)
    owners = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
    partitions: dict[int, int] = {}
    members: dict[int, dict[str, int]] = {}
    failed: list[str] = []
    for msg in replies:
        node = sender(msg, owners)
        if msg.has_error():
            failed.append(f"node {node}: {error_summary(msg.error.reason)}")
            continue
        reported = {k: int(v) for k, v in msg.content[wire.METRICS].items()}  # type: ignore[arg-type]
        pid = reported.pop(wire.PARTITION)
        if pid in partitions:
            raise RunFailed(f"nodes {partitions[pid]} and {node} both claim partition-id {pid}")
        partitions[pid], members[pid] = node, reported
    missing = sorted(set(range(cfg.split.num_clients)) - set(partitions))
    if missing:
        raise RunFailed(f"no member described its data for partition ids {missing}" + "".join(f"; {f}" for f in failed))
    return partitions, members


def run_federation(grid: Grid, cfg: Config, run: RunDir, progress: bool = False,
                   resume: bool = False) -> dict[str, Any]:
    """Run every round (after the last committed one when ``resume``) while holding the run's
    lock; write status.json as finished or failed (with the reason and the last commit, so a
    failed run can be resumed) either way."""
    with run.lock():
        point = run.rollback() if resume else None
        if point is None:
            run.write_status("running", rounds_completed=0)
        try:
            summary = _rounds(grid, cfg, run, progress, point)
        except Exception as exc:
            run.write_status("failed", error=f"{type(exc).__name__}: {exc}", **run.last_commit())
            raise
        run.write_status("finished", **summary)
    return summary


@dataclass
class _ServerState:
    """The server's state between rounds: what a committed round leaves behind for the next."""

    strategy: FaceFedAvg
    global_record: ArrayRecord
    ledger: PrivacyLedger
    last_round: dict[int, int]  # partition -> last round whose update the server accepted
    metrics: dict[str, float]  # evaluation of the latest global model (plaintext runs)
    rounds_completed: int


def _rounds(grid: Grid, cfg: Config, run: RunDir, progress: bool, point: ResumePoint | None) -> dict[str, Any]:
    if cfg.dp.mode != "off" and cfg.dp.reproducible_noise:
        log.warning("dp.reproducible_noise = true: every client's DP noise and sampling derive from the run seed, "
                    "which this server knows, so the DP guarantee does not hold against the server (research "
                    "simulations only; clients refuse it unless their operator allows it)")
    started = point is not None and point.rounds_completed is not None
    spec = model_spec(cfg)
    # A bad init_checkpoint is refused before the data is built or a node awaited.
    model = build_model(spec, cfg.seed) if started else build_initial_model(cfg, spec)
    key = run.path.name
    evaluator: GlobalEvaluator | None = None
    if cfg.data.layout == "per-member":  # the members' data stay with them: no manifest, public data at most
        evaluator = public_evaluator(cfg)
        partitions, members = describe_members(grid, cfg, key)
        if not started:
            run.log_metrics("members", members={str(p): c for p, c in sorted(members.items())})
        counts = {p: c["train-images"] for p, c in members.items()}  # what each member's updates must claim
    else:
        manifest, evaluator, counts = _manifest_data(cfg, run, started)
        partitions = describe_clients(grid, cfg, manifest, counts)
    settings = StrategySettings(cfg.seed, partitions, cfg.federation, {p: counts[p] for p in partitions})
    meta = {"spec": spec.to_dict(), "task": cfg.train.task, "attribute": cfg.train.attribute}
    if started:
        assert point is not None and point.rounds_completed is not None
        state = _restore(cfg, run, model, evaluator, point.rounds_completed, settings)
        run.log_metrics("resume", after_round=state.rounds_completed, previous_status=point.previous_status,
                        partitions={str(p): n for p, n in partitions.items()},
                        interrupted=[{k: r[k] for k in ("interrupted_event", "round") if k in r}
                                     for r in point.interrupted])
    else:
        if point is not None:
            run.log_metrics("resume", after_round=None, previous_status=point.previous_status,
                            interrupted=[{"interrupted_event": r["interrupted_event"]} for r in point.interrupted])
        state = _start(cfg, run, model, evaluator, settings, progress, meta)
    run.commit(state.rounds_completed)
    strategy, ledger = state.strategy, state.ledger
    node_partition = {n: p for p, n in partitions.items()}
    bar = tqdm(range(state.rounds_completed + 1, cfg.federation.rounds + 1), desc="rounds", disable=not progress,
               unit="round")
    for server_round in bar:
        start = time.perf_counter()
        messages = [_with_run_record(m, key, state.last_round.get(node_partition[m.metadata.dst_node_id], 0))
                    for m in strategy.configure_train(server_round, state.global_record,
                                                      wire.config_record(cfg, server_round), grid)]
        replies = grid.send_and_receive(messages, timeout=cfg.federation.round_timeout)
        global_record, _ = strategy.aggregate_train(server_round, replies)
        if global_record is None:
            raise RunFailed(f"round {server_round}: {len(strategy.accepted)} usable replies, at least "
                            f"{cfg.federation.min_train_clients} needed; " + "; ".join(strategy.failures))
        state.global_record = global_record
        for reply in strategy.accepted:
            state.last_round[reply.partition] = server_round
            if reply.privacy_json is not None and cfg.dp.mode != "off":
                ledger.record(reply.partition, server_round, reply.privacy_json)
        if cfg.federation.save_client_models and not cfg.he.enabled:
            _save_client_models(run, strategy.accepted, {**meta, "round": server_round})
        federated_seconds = time.perf_counter() - start  # send, local training, (de/en)cryption, aggregation
        # The round's checkpoint carries the ledger as of this round: a resumed run restores both from one file.
        state.metrics = _checkpoint(run, strategy, global_record, model, evaluator, round_name(server_round),
                                    {**meta, "round": server_round, "privacy": ledger.to_json()})
        federated: dict[str, Any] = {}
        if cfg.data.layout == "per-member":
            result = evaluate_phase(grid, cfg, strategy, global_record, server_round, key)
            state.metrics.update({k: v for k, v in result.items() if k.startswith(MEMBERS_PREFIX)})
            federated = {"members_evaluation": {k: result[k] for k in ("members", "failures")}}
        ledger.save(run.privacy_path)
        clients = [{"partition": r.partition, **{k: v for k, v in r.metrics.items() if k != wire.PARTITION}}
                   for r in strategy.accepted]
        run.log_metrics("round", round=server_round, seconds=time.perf_counter() - start,
                        federated_seconds=federated_seconds, clients=clients,
                        failures=strategy.failures, max_epsilon=ledger.max_epsilon(), encrypted=cfg.he.enabled,
                        train_loss=float(np.average([r.metrics["train-loss"] for r in strategy.accepted],
                                                    weights=[r.num_examples for r in strategy.accepted])),
                        **state.metrics, **federated)
        bar.set_postfix(eps=f"{ledger.max_epsilon():.2f}",
                        **{"auc": f"{v:.3f}" for k, v in state.metrics.items() if k.endswith("verification_auc")})
        run.commit(server_round)  # the commit point: status.json is written last
    _checkpoint(run, strategy, state.global_record, model, None, FINAL, {**meta, "round": cfg.federation.rounds})
    summary = {"rounds_completed": cfg.federation.rounds, "max_epsilon": ledger.max_epsilon(),
               "encrypted": cfg.he.enabled, **state.metrics}
    if cfg.data.layout == "per-member" and cfg.audit.self_audit:
        start = time.perf_counter()
        initial = wire.state_to_record(load_checkpoint(run.initial_model)[0])
        audited = self_audit_phase(grid, cfg, run, strategy, state.global_record, initial, ledger)
        run.log_metrics("self-audit", seconds=time.perf_counter() - start, members=len(audited["members"]),
                        failures=audited["failures"])
    if cfg.mote.enabled and cfg.train.task in ("identity", "both"):
        enrolled = enroll_phase(grid, cfg, run, strategy, state.global_record, ledger)
        run.log_metrics("enroll", **enrolled)
        summary["mote_identities"] = enrolled["identities"]
    return summary


def _start(cfg: Config, run: RunDir, model: FaceModel, evaluator: GlobalEvaluator | None, settings: StrategySettings,
           progress: bool, meta: dict[str, Any]) -> _ServerState:
    """The start phase: evaluate the seeded model, pretrain it on public data, save it as the
    initial global model, and build the strategy (for HE: the key, the selective-encryption mask)."""
    run.log_metrics("start", partitions={str(p): n for p, n in settings.partitions.items()},
                    **({"initial": evaluator.evaluate(model)} if evaluator is not None else {}))
    pretrained = pretrain(model, cfg, progress=progress)
    if pretrained is not None:
        run.log_metrics("pretrain", steps=pretrained.outcome.steps, seconds=pretrained.outcome.seconds,
                        **(evaluator.evaluate(model) if evaluator is not None else {}))
    # The initial global model is public (seeded initialisation + public pretraining): the audit's
    # reference models start from it, as the target did.
    save_checkpoint(run.initial_model, model.state_dict(), {**meta, "round": 0})
    return _before_round_one(cfg, run, model, pretrained, settings, {})


def _before_round_one(cfg: Config, run: RunDir, model: FaceModel, pretrained: Pretrained | None,
                      settings: StrategySettings, last_round: dict[int, int]) -> _ServerState:
    """The state before round 1 with ``model`` as the initial global model: a new strategy (for HE:
    the key and the selective-encryption mask) and an empty ledger."""
    strategy = he_strategy(cfg, model, pretrained, run, settings) if cfg.he.enabled else FaceFedAvg(settings)
    ledger = PrivacyLedger(cfg.dp.accountant, cfg.dp.delta)
    return _ServerState(strategy, wire.state_to_record(model.state_dict()), ledger, last_round, {}, 0)


def _restore(cfg: Config, run: RunDir, model: FaceModel, evaluator: GlobalEvaluator | None, rounds_completed: int,
             settings: StrategySettings) -> _ServerState:
    """The server's state after the committed round ``rounds_completed``, from its checkpoint:
    the global model (or, under HE, the encrypted sum with the mask and total weight it was made
    with), the privacy ledger, and who last trained when (from the committed round events)."""
    r = rounds_completed
    last_round = {c["partition"]: e["round"] for e in run.read_metrics() if e.get("event") == "round"
                  for c in e["clients"]}
    if r == 0:
        initial, _ = load_checkpoint(run.initial_model)
        pretrained = None
        if cfg.he.enabled and cfg.he.encrypt_fraction < 1:
            # The mask ranks parameters by Fisher information on the public data after pretraining;
            # no round used it yet, so it is derived again (pretraining is seeded) rather than stored.
            pretrained = pretrain(model, cfg)
        model.load_state_dict(initial)
        return _before_round_one(cfg, run, model, pretrained, settings, last_round)
    path = run.round_checkpoint(r, encrypted=cfg.he.enabled)
    saved, meta = load_checkpoint(path)
    if meta.get("round") != r or "privacy" not in meta:
        raise RunFailed(f"{path}: checkpoint of round {meta.get('round')} without a privacy ledger; status.json "
                        f"committed round {r} (written by a facefl without resume support?)")
    ledger = PrivacyLedger.from_json(meta["privacy"], str(path))
    if not cfg.he.enabled:
        model.load_state_dict(saved)
        metrics = evaluator.evaluate(model) if r == cfg.federation.rounds and evaluator is not None else {}
        record = wire.state_to_record(model.state_dict())
        return _ServerState(FaceFedAvg(settings), record, ledger, last_round, metrics, r)
    ctx, key_fingerprint = load_public_context(cfg.he.public_context)
    if meta.get("fingerprint") != key_fingerprint:
        raise RunFailed(f"{path}: encrypted under key {str(meta.get('fingerprint'))[:16]}..., but "
                        f"he.public_context {cfg.he.public_context} is key {key_fingerprint[:16]}...")
    layout = EncryptionLayout.for_state({k: v.numpy() for k, v in model.state_dict().items()}, saved["mask"].numpy())
    strategy = HEFedAvg(settings, ctx=ctx, key_fingerprint=key_fingerprint, layout=layout,
                        on_key_mismatch=cfg.he.on_key_mismatch)
    strategy.total_weight = int(meta["total_weight"])
    record = wire.numpy_to_record({k: saved[k].numpy() for k in ("plain", "ciphertext", "lengths")})
    return _ServerState(strategy, record, ledger, last_round, {}, r)


def _with_run_record(msg: Message, run_key: str, last_round: int) -> Message:
    """Tell the client which run this is (its key for node-local state) and the last round the
    server accepted its update in (the state it must restore when it has none in memory).
    Changes ``msg`` in place: the strategy matches replies to the very Message objects it made."""
    msg.content = RecordDict({**dict(msg.content.items()), wire.RUN_RECORD: wire.run_record(run_key, last_round)})
    return msg


def _save_client_models(run: RunDir, replies: list, meta: dict[str, Any]) -> None:
    """What a curious plaintext server holds: each client's own post-round model (the latest)."""
    for reply in replies:
        state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in reply.arrays.items()}
        save_checkpoint(run.client_model(reply.partition), state,
                        {**meta, "partition": reply.partition, "num_examples": reply.num_examples})


def _checkpoint(run: RunDir, strategy: FaceFedAvg, record: ArrayRecord, model: FaceModel,
                evaluator: GlobalEvaluator | None, name: str, meta: dict[str, Any]) -> dict[str, float]:
    """Save the aggregate (encrypted when HE is on) and evaluate it when the server can read it."""
    if isinstance(strategy, HEFedAvg):
        save_encrypted(run.checkpoint(name, encrypted=True), wire.record_to_numpy(record), strategy.layout.mask,
                       {**meta, "fingerprint": strategy.fingerprint, "total_weight": strategy.total_weight})
        return {}  # the server cannot evaluate what it cannot decrypt
    model.load_state_dict(wire.record_to_state(record))
    save_checkpoint(run.checkpoint(name), model.state_dict(), meta)
    return evaluator.evaluate(model) if evaluator is not None else {}
