"""Flower ClientApp: decodes messages, keeps private state in ``context.state``, replies.

Private per-node state (never sent): the identity head (an ArrayRecord) and the DP accountant
history (a ConfigRecord), so that epsilon composes across every round this node trained in.
``context.state`` lives as long as one Flower run; with a state directory (node config
``state-dir``, or $FACEFL_CLIENT_STATE in simulation) the state is also written to this node's
disk after every round (``client.local.StateStore``), keyed by the run key the server sends, so
that a resumed run (a new Flower run) or a restarted SuperNode continues from it.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import update_console_handler

from attacks.self_audit import ATTACKS, SelfAuditSets, reference_models, self_audit
from client.he_client import Encryption, decode_global, encode_update, secret_context
from client.local import (
    ALLOW_REPRODUCIBLE_NOISE_ENV,
    ALLOW_REPRODUCIBLE_NOISE_NODE_CONFIG,
    StateStore,
    local_data,
    local_train,
    mote_noise_seed,
    update_digest,
)
from client.member_data import member_dataset, member_folder, member_split
from client.member_mote import enroll_member, keep_galleries
from common import wire
from common.config import Config
from common.data.cache import build_dataset
from common.data.dataset import FaceDataset
from common.evaluation.global_model import GlobalEvaluator
from common.mote.enrollment import enroll_client
from common.nn.build import build_identity_head, build_model, model_spec
from common.nn.face_model import FaceModel
from common.runs.rundir import CLIENT_STATE_ENV, CLIENT_STATE_NODE_CONFIG
from common.split.member import MemberSplit, counts
from common.train.local_round import ClientState, derived_seed
from common.train.loop import identity_classes

log = logging.getLogger(__name__)
# This process's Flower log lines (a Ray worker's pipe in simulation, a SuperNode's log or
# terminal in deployment) carry ANSI colours only where they reach a terminal.
update_console_handler(colored=sys.stderr.isatty())

HEAD_KEY = "identity-head"
PRIVACY_KEY = "privacy"

app = ClientApp()


def _load_state(context: Context) -> ClientState:
    head = wire.record_to_state(context.state[HEAD_KEY]) if HEAD_KEY in context.state.array_records else None
    if PRIVACY_KEY in context.state.config_records:
        return ClientState.from_local_json(str(context.state[PRIVACY_KEY]["json"]), head)
    return ClientState(head=head)


def _restore_state(msg: Message, context: Context, partition: int,
                   server_round: int) -> tuple[ClientState, StateStore | None]:
    """This client's state before ``server_round`` and where to persist the next one.

    From memory when this Flower run already trained here, else from the node's state
    directory, else fresh; but never fresh when the server says it accepted this client's
    update in an earlier round (``last-round`` > 0): starting over would lose the identity head
    and, worse, the DP history, so that epsilon would be under-reported.
    """
    run = msg.content.config_records.get(wire.RUN_RECORD)
    if run is None:  # a server that sends no run key: state lives in memory only
        return _load_state(context), None
    store = _state_store(msg, context, partition)
    if PRIVACY_KEY in context.state.config_records:
        return _load_state(context), store
    saved = store.latest_before(server_round) if store is not None else None
    last_round = int(run[wire.LAST_ROUND])  # type: ignore[arg-type]
    if saved is not None and saved.server_round >= last_round:
        return saved.state, store
    if last_round > 0:
        where = (f"{store.directory} has none" if store is not None else "no state directory is set (node config "
                 f"'{CLIENT_STATE_NODE_CONFIG}', or ${CLIENT_STATE_ENV} in simulation)")
        raise ValueError(f"client {partition}: the server accepted this client's update in round {last_round} of run "
                         f"{run[wire.RUN_KEY]}, but this node holds no state of that round or later ({where}); it cannot "
                         "go on without the identity head and DP history of those rounds")
    return ClientState(), store


def _state_store(msg: Message, context: Context, partition: int) -> StateStore | None:
    """This client's node-local store for the message's run; None without a run key or a state
    directory (node config ``state-dir``, or the simulation's environment)."""
    run = msg.content.config_records.get(wire.RUN_RECORD)
    root = str(context.node_config.get(CLIENT_STATE_NODE_CONFIG) or os.environ.get(CLIENT_STATE_ENV, ""))
    if run is None or not root:
        return None
    return StateStore.for_client(root, str(run[wire.RUN_KEY]), partition)


def _allows_reproducible_noise(context: Context) -> bool:
    """Whether this node's operator lets a run derive the client's DP noise from the run seed:
    node config ``allow-reproducible-noise=true``, or the simulation engine's environment."""
    value = context.node_config.get(ALLOW_REPRODUCIBLE_NOISE_NODE_CONFIG, os.environ.get(ALLOW_REPRODUCIBLE_NOISE_ENV))
    return str(value).strip().lower() in ("1", "true", "yes")


def _member(context: Context, cfg: Config, partition: int,
            store: StateStore | None) -> tuple[FaceDataset, MemberSplit, StateStore]:
    """``data.layout = per-member``: this node's own data set, its split, kept in ``store``'s folder
    (this node's state of this run, ``client.member_data``), and that store, which must exist."""
    if store is None:
        raise ValueError(f"client {partition}: data.layout = 'per-member' keeps the member's split of its images in "
                         f"its state directory: set node config '{CLIENT_STATE_NODE_CONFIG}' (or ${CLIENT_STATE_ENV} in "
                         "simulation)")
    folder, source = member_folder(cfg, context.node_config, partition)
    ds = member_dataset(cfg, folder, source, partition)
    reproducible = cfg.dp.reproducible_noise and _allows_reproducible_noise(context)
    return ds, member_split(cfg, ds, store.directory, partition, reproducible), store


def _save_state(context: Context, state: ClientState) -> None:
    if state.head is not None:
        context.state[HEAD_KEY] = wire.state_to_record(state.head)
    context.state[PRIVACY_KEY] = ConfigRecord({"json": state.local_json()})


def _global_face_model(msg: Message, context: Context, cfg: Config) -> FaceModel:
    """The global model a server message carries, built (decrypted with this node's key under HE)."""
    model = build_model(model_spec(cfg), cfg.seed)
    model.load_state_dict(_global_model(msg, context, cfg)[0])
    return model


def _global_model(msg: Message, context: Context, cfg: Config) -> tuple[dict[str, torch.Tensor], Encryption | None]:
    """The global model a server message carries: plaintext, or decrypted with this node's key."""
    if wire.HE_META not in msg.content.config_records:
        return wire.record_to_state(msg.content[wire.ARRAYS]), None
    ctx, own_fingerprint = secret_context(context.node_config)
    template = build_model(model_spec(cfg), cfg.seed).state_dict()
    state, layout = decode_global(msg.content, ctx, own_fingerprint, template)
    return state, Encryption(ctx, own_fingerprint, layout)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, server_round = wire.config_from_record(msg.content[wire.CONFIG])
    partition = wire.partition_of(context.node_config, cfg.split.num_clients)
    global_state, encryption = _global_model(msg, context, cfg)
    state, store = _restore_state(msg, context, partition, server_round)
    data = None
    if cfg.data.layout == "per-member":
        ds, split, _ = _member(context, cfg, partition, store)
        data = split.subset(ds, "train")
    new_state, client_state, report = local_train(cfg, partition, server_round, global_state, state, store,
                                                  allow_reproducible_noise=_allows_reproducible_noise(context),
                                                  data=data)
    _save_state(context, client_state)
    privacy = client_state.privacy_json(cfg.dp.mode != "off" and cfg.dp.reproducible_noise)
    content = RecordDict({wire.METRICS: wire.metric_record(report), wire.PRIVACY: ConfigRecord({"json": privacy})})
    if encryption is not None:
        for key, record in encode_update(encryption, new_state, int(report[wire.NUM_EXAMPLES])).items():
            content[key] = record
    else:
        content[wire.ARRAYS] = wire.state_to_record(new_state)
    return Message(content, reply_to=msg)


@app.query("enroll")
def enroll(msg: Message, context: Context) -> Message:
    """MOTE enrollment of this client's identities with the final global backbone (decrypted by
    the client itself under HE); one gallery per balancing factor goes back to the server. Under
    MOTE DP the noise and record sampling are this client's secret, like its DP-SGD's, and the
    reply's enrollment info carries the mechanism (``privacy``) for the server's ledger. With
    ``data.layout = per-member`` the member enrolls its own identities, keeps its galleries, and
    sends its MOTE-vs-templates numbers, and its galleries only with ``mote.share_gallery``."""
    cfg, _ = wire.config_from_record(msg.content[wire.CONFIG])
    partition = wire.partition_of(context.node_config, cfg.split.num_clients)
    model = _global_face_model(msg, context, cfg)
    store = _state_store(msg, context, partition)
    noise_seed = mote_noise_seed(cfg, partition, _allows_reproducible_noise(context),
                                 store.mote_seed() if store is not None else None)
    seed = derived_seed(cfg.seed, 0xE4, partition)
    evaluation = None
    if cfg.data.layout == "per-member":  # the member's own identities; galleries kept at the site
        ds, split, own = _member(context, cfg, partition, store)
        galleries, info, evaluation = enroll_member(cfg, ds, split, model, partition, seed, noise_seed)
        keep_galleries(cfg, galleries, own.directory)
    else:
        galleries, info = enroll_client(cfg, build_dataset(cfg), model, partition, seed, noise_seed)
    if "privacy" in info and store is not None and noise_seed is not None:
        digest = update_digest({f"{i}/{name}": t for i, g in enumerate(galleries) for name, t in g.params.items()})
        info["privacy"]["releases"] = store.record_mote_release(noise_seed, digest)
    content = RecordDict({wire.METRICS: MetricRecord({wire.PARTITION: partition, "identities": len(galleries[0])}),
                          wire.MOTE_INFO: ConfigRecord({"json": json.dumps(info)})})
    if evaluation is not None:
        content[wire.MOTE_EVALUATION] = ConfigRecord({"json": json.dumps(evaluation)})
    if cfg.data.layout != "per-member" or cfg.mote.share_gallery:
        for i, gallery in enumerate(galleries):
            content[wire.gallery_key(i)] = wire.gallery_to_record(gallery)
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Federated evaluation (``data.layout = per-member``): the global model, decrypted by this node
    under HE, on the member's held-out identities (open-set verification) and held-out images
    (the attribute task, where its data are labelled). Only the metrics and the counts they rest
    on go back."""
    cfg, _ = wire.config_from_record(msg.content[wire.CONFIG])
    partition = wire.partition_of(context.node_config, cfg.split.num_clients)
    model = _global_face_model(msg, context, cfg)
    ds, split, _ = _member(context, cfg, partition, _state_store(msg, context, partition))
    evaluator = GlobalEvaluator(cfg, *(split.subset(ds, role) for role in ("train", "probe", "held_out")))
    sizes = {"probe-images": len(evaluator.probe), "held-out-images": len(evaluator.held_out)}
    return Message(RecordDict({wire.METRICS: MetricRecord({wire.PARTITION: partition, **sizes,
                                                           **evaluator.evaluate(model)})}), reply_to=msg)


@app.query("self_audit")
def self_audit_query(msg: Message, context: Context) -> Message:
    """The member's audit of the final model (its own identity head on the global backbone) on its
    own data (``attacks.self_audit``): its training images against half its held-out images, with
    reference models trained from the run's initial model on the other half. Only numbers go back."""
    cfg, _ = wire.config_from_record(msg.content[wire.CONFIG])
    partition = wire.partition_of(context.node_config, cfg.split.num_clients)
    target = _global_face_model(msg, context, cfg)
    initial = build_model(model_spec(cfg), cfg.seed)
    initial.load_state_dict(wire.record_to_state(msg.content[wire.INITIAL_MODEL]))
    ds, split, store = _member(context, cfg, partition, _state_store(msg, context, partition))
    saved = store.latest_before(cfg.federation.rounds + 1)
    train_data = split.subset(ds, "train")
    if saved is None or saved.state.head is None:
        result: dict = {"skipped": {name: "this member holds no identity head (it never trained, or the task has "
                                          "none)" for name in ATTACKS}, "attacks": {}}
    else:
        classes = identity_classes(train_data.identity)[0]
        head = build_identity_head(model_spec(cfg), classes.size, 0)
        head.load_state_dict(saved.state.head)
        seed = derived_seed(cfg.seed, 0x5A, partition)
        sets = SelfAuditSets.from_split(train_data, split.subset(ds, "held_out"), seed)
        refs = reference_models(initial, sets, cfg, cfg.audit.self_references, seed, saved.state.noise_multiplier)
        result = self_audit(target, head, classes, sets, refs, cfg, seed)
    content = RecordDict({wire.METRICS: MetricRecord({wire.PARTITION: partition}),
                          wire.SELF_AUDIT: ConfigRecord({"json": json.dumps(result)})})
    return Message(content, reply_to=msg)


@app.query("describe")
def describe(msg: Message, context: Context) -> Message:
    """Who this node is: partition id, sample count, and the fingerprint of the data set it
    split (the server refuses to train with a node whose data differs from its manifest); with
    ``data.layout = per-member``, counts of its own data instead, and no fingerprint of it."""
    cfg, _ = wire.config_from_record(msg.content[wire.CONFIG])
    partition = wire.partition_of(context.node_config, cfg.split.num_clients)
    if cfg.data.layout == "per-member":
        ds, split, _ = _member(context, cfg, partition, _state_store(msg, context, partition))
        sizes = counts(split, ds)
        return Message(RecordDict({wire.METRICS: MetricRecord({wire.PARTITION: partition, **sizes})}), reply_to=msg)
    data = local_data(cfg, partition)
    reply = RecordDict({wire.METRICS: MetricRecord({wire.PARTITION: partition, wire.NUM_EXAMPLES: len(data)}),
                        wire.CONFIG: ConfigRecord({"fingerprint": build_dataset(cfg).fingerprint()})})
    return Message(reply, reply_to=msg)

