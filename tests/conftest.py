"""Shared fixtures: one thread for torch, a private data cache, and a tiny SynthFaces data set.

Everything torch-heavy in the suite runs on the 32 px data set below with a small model, so that
the whole suite stays well under a few minutes on two shared CPU cores.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _single_torch_thread() -> Iterator[None]:
    """Other processes share the 2 cores: avoid oversubscribing them with intra-op threads. Tests
    that call the ``facefl`` entry point in this process register it as a facefl process, whose
    thread count would then follow the load (``common.train.threads``): FACEFL_THREADS pins it to
    the same one thread, which the bit-for-bit replays of client training in this process need."""
    import torch

    from common.train.threads import THREADS_ENV

    torch.set_num_threads(1)
    old = os.environ.get(THREADS_ENV)
    os.environ[THREADS_ENV] = "1"
    yield
    if old is None:
        os.environ.pop(THREADS_ENV, None)
    else:
        os.environ[THREADS_ENV] = old


@pytest.fixture(scope="session", autouse=True)
def _private_data_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Generated data sets are cached on disk by ``build_dataset``: keep that cache out of $HOME."""
    path = tmp_path_factory.mktemp("facefl-cache")
    old = os.environ.get("FACEFL_CACHE")
    os.environ["FACEFL_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("FACEFL_CACHE", None)
    else:
        os.environ["FACEFL_CACHE"] = old


SMALL_IDENTITIES = 20
SMALL_IMAGES = 8
SMALL_SIZE = 32


@pytest.fixture(scope="session")
def synth_small():
    """20 identities x 8 images of 32 px (160 samples). Shared: tests must not modify it."""
    from common.data.sources.synthfaces.generator import SynthConfig, generate

    ds = generate(SynthConfig(num_identities=SMALL_IDENTITIES, images_per_identity=SMALL_IMAGES,
                              image_size=SMALL_SIZE, seed=0))
    ds.images.setflags(write=False)  # a test that modifies the shared data fails loudly
    return ds


@pytest.fixture(scope="session")
def synth_open_set():
    """40 identities x 8 images of 32 px: the first 24 identities train, the last 16 are unseen."""
    from common.data.sources.synthfaces.generator import SynthConfig, generate

    ds = generate(SynthConfig(num_identities=40, images_per_identity=8, image_size=SMALL_SIZE, seed=0))
    ds.images.setflags(write=False)
    return ds


@pytest.fixture()
def tiny_spec():
    """A model small enough to train in a fraction of a second per epoch on 32 px faces."""
    from common.nn.face_model import ModelSpec

    return ModelSpec(width=8, blocks=(1, 1), embedding_dim=16, image_size=SMALL_SIZE, attribute_head=True)


@pytest.fixture
def server_task(monkeypatch):
    """The task identity a running ServerApp process has (messages are built against it)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


@pytest.fixture(scope="session")
def he_contexts(tmp_path_factory: pytest.TempPathFactory):
    """One default CKKS key set for the session: (key directory, secret context, public
    context, fingerprint), as a client and the server each load theirs."""
    from common.he.keys import (
        PUBLIC_FILE,
        SECRET_FILE,
        KeyParams,
        load_public_context,
        load_secret_context,
        write_keys,
    )

    root = tmp_path_factory.mktemp("he-keys")
    write_keys(root, KeyParams())
    public, fingerprint = load_public_context(root / PUBLIC_FILE)
    return root, load_secret_context(root / SECRET_FILE), public, fingerprint


@pytest.fixture
def link(monkeypatch: pytest.MonkeyPatch):
    """Flower's in-memory SuperLink state and grid with three registered nodes, set up the way
    ``flwr.simulation`` sets them up (run_simulation._main_loop, vce_api._register_nodes); the
    ServerApp's task identity is that run's. Returns (grid, state, {partition: node})."""
    import secrets

    from flwr.common.constant import (
        HEARTBEAT_INTERVAL_INF,
        NOOP_ACCOUNT_NAME,
        NOOP_FLWR_AID,
        SUPERLINK_NODE_ID,
    )
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    run_id = state.create_run(None, None, None, {}, NOOP_FEDERATION_ID, None, NOOP_FLWR_AID, "serverapp")
    (run,) = state.get_run_info(run_ids=[run_id])
    nodes = {}
    for partition in range(3):
        nodes[partition] = state.create_node(NOOP_FLWR_AID, NOOP_ACCOUNT_NAME, secrets.token_bytes(32),
                                             heartbeat_interval=HEARTBEAT_INTERVAL_INF)
        state.acknowledge_node_heartbeat(node_id=nodes[partition], heartbeat_interval=HEARTBEAT_INTERVAL_INF)
    grid = InMemoryGrid(factory)
    grid.set_run(run)
    for attr, value in (("_run_id", run_id), ("_task_id", run.primary_task_id), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    return grid, state, nodes
