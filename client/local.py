"""One client's work, independent of Flower: pick its data, train locally, account for privacy.

The ClientApp (client/app.py) only decodes messages, keeps ``ClientState`` in the node's
``context.state`` and calls these functions, so they can be tested without a federation.
``StateStore`` persists that state on the node's disk after every round, so that it outlives
the process (a resumed run is a new Flower run whose ``context.state`` starts empty).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from common.config import Config
from common.data.cache import build_dataset
from common.data.dataset import FaceDataset
from common.nn.checkpoint import load_checkpoint, save_checkpoint
from common.runs.io import atomic_write_json, read_json
from common.runs.layout import CLIENT_MOTE_FILE, CLIENT_STATE_FILE, client_state_dir, client_state_file
from common.split.build import build_manifest
from common.split.canaries import canary_plan, client_training_data
from common.train.dp import History, fresh_noise_seed, spent_epsilon, total_steps
from common.train.local_round import ClientState, derived_seed, reproducible_noise_seed, train_round

log = logging.getLogger(__name__)

ALLOW_REPRODUCIBLE_NOISE_NODE_CONFIG = "allow-reproducible-noise"
ALLOW_REPRODUCIBLE_NOISE_ENV = "FACEFL_ALLOW_REPRODUCIBLE_NOISE"
"""Set by the operator of a node (or by facefl's simulation engine) to let this client derive its DP
noise from the run seed when a run asks for ``dp.reproducible_noise``."""


def update_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a released model (key, dtype, shape and bytes of every tensor, in key order)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def _append_steps(history: History, sigma: float, q: float, steps: int) -> History:
    """``history`` plus ``steps`` steps at (sigma, q), merged into the last entry as Opacus does."""
    out: History = [(float(s), float(r), int(n)) for s, r, n in history]
    if steps > 0:
        if out and out[-1][:2] == (sigma, q):
            out[-1] = (sigma, q, out[-1][2] + steps)
        else:
            out.append((sigma, q, steps))
    return out


@dataclass
class SavedRound:
    """A client's state after one round, as persisted, and the digests of the updates it
    released in that round (more than one only if a re-run released a different update)."""

    server_round: int
    state: ClientState
    released: list[str]
    noise_seed: int | None = None  # the round's secret DP noise seed (never sent; None: reproducible or no DP)


_RUN_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class StateStore:
    """One client's ``ClientState`` of one run on this node's disk: ``round-NNN.safetensors``
    per round it trained in, holding the identity head as tensors and, as JSON metadata, the DP
    accountant history, the noise multiplier and the digests of the released updates. Each file
    is written atomically (all of a round or nothing) and only the newest two are kept: the
    state a re-run of the newest round starts from, and the newest."""

    def __init__(self, directory: str | os.PathLike[str], run_key: str, partition: int) -> None:
        self.directory = Path(directory)
        self.run_key = run_key
        self.partition = partition

    @classmethod
    def for_client(cls, root: str | os.PathLike[str], run_key: str, partition: int) -> StateStore:
        """``<root>/<run key>/client-<partition>``; the run key comes from the server and must
        be a plain name, so that no server can make a client write outside ``root``."""
        if not _RUN_KEY.fullmatch(run_key) or ".." in run_key:
            raise ValueError(f"run key {run_key!r} from the server: expected a plain directory name")
        return cls(Path(root) / run_key / client_state_dir(partition), run_key, partition)

    def path(self, server_round: int) -> Path:
        return self.directory / client_state_file(server_round)

    def rounds(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        return sorted(int(m.group(1)) for f in self.directory.iterdir() if (m := CLIENT_STATE_FILE.fullmatch(f.name)))

    def load(self, server_round: int) -> SavedRound:
        path = self.path(server_round)
        head, meta = load_checkpoint(path)
        expected = {"run_key": self.run_key, "partition": self.partition, "round": server_round}
        if {k: meta.get(k) for k in expected} != expected:
            found = {k: meta.get(k) for k in expected}
            raise ValueError(f"{path}: holds the state of {found}, expected {expected}")
        try:
            history: History = [(float(s), float(q), int(n)) for s, q, n in meta["history"]]
            state = ClientState(head=head or None, dp_history=history, noise_multiplier=float(meta["noise_multiplier"]),
                                reweight_counts=meta.get("reweight_counts"),
                                histogram_noise=float(meta.get("histogram_noise", 0.0)))
            seed = meta.get("noise_seed")
            return SavedRound(server_round, state, [str(d) for d in meta["released"]],
                              None if seed is None else int(seed))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: malformed client state ({type(exc).__name__}: {exc})") from None

    def latest_before(self, server_round: int) -> SavedRound | None:
        """The state this client's next training starts from when it trains ``server_round``."""
        earlier = [r for r in self.rounds() if r < server_round]
        return self.load(earlier[-1]) if earlier else None

    def save(self, saved: SavedRound) -> None:
        """Write the round's state, then drop all but it and the newest state before it."""
        st = saved.state
        save_checkpoint(self.path(saved.server_round), st.head or {}, {
            "run_key": self.run_key, "partition": self.partition, "round": saved.server_round,
            "history": st.dp_history, "noise_multiplier": st.noise_multiplier, "released": saved.released,
            "noise_seed": saved.noise_seed, "reweight_counts": st.reweight_counts,
            "histogram_noise": st.histogram_noise})
        before = [r for r in self.rounds() if r < saved.server_round]
        for r in before[:-1]:
            self.path(r).unlink(missing_ok=True)

    def mote_seed(self) -> int | None:
        """The secret MOTE noise seed this client used when it enrolled in this run before, if it did."""
        path = self.directory / CLIENT_MOTE_FILE
        return int(read_json(path)["noise_seed"]) if path.is_file() else None

    def record_mote_release(self, noise_seed: int, digest: str) -> int:
        """Persist the MOTE seed and the digest of the galleries just released; returns how many
        different releases this client made in this run. An enrollment re-sent after a server
        crash reuses the seed (``mote_seed``), so it releases the same galleries, which tell
        nothing new and cost nothing (the digest shows it); a different release is a second use
        of the mechanism, and the ledger charges every one."""
        path = self.directory / CLIENT_MOTE_FILE
        released = [str(d) for d in read_json(path)["released"]] if path.is_file() else []
        if digest not in released:
            released.append(digest)
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"run_key": self.run_key, "partition": self.partition, "noise_seed": noise_seed,
                                 "released": released})
        return len(released)

    def noise_seed(self, server_round: int) -> int | None:
        """The secret noise seed this client used when it trained ``server_round`` before, if it did."""
        return self.load(server_round).noise_seed if server_round in self.rounds() else None

    def record_round(self, server_round: int, base_steps: int, trained: ClientState, digest: str,
                     noise_seed: int | None = None) -> ClientState:
        """Persist the state after training ``server_round`` and return the state whose DP
        history the client reports (and keeps).

        Why a re-run may replace a round instead of adding to it: when the server dies after
        this client trained round t but before it committed t, the resumed run sends round t
        again. The client then trains from the same state (its saved state before t), the same
        global model, the same seed (derived from run seed, round and partition) and the same
        secret noise seed (kept here, ``noise_seed``), and local training is deterministic in
        these, Opacus' noise included. So the re-run releases a bit-identical update: the same output
        of the same mechanism on the same randomness, which tells an observer nothing the first
        release did not, and costs no extra privacy. The round's steps are then counted once.
        That argument holds only if the update really is identical, which the SHA-256 of the
        released model (``update_digest``) checks: if it differs (another thread count, library
        version or global model), the re-run is a second release and both are charged, the
        earlier round's history plus this run's steps, with a warning.
        """
        earlier = self.load(server_round) if server_round in self.rounds() else None
        saved = SavedRound(server_round, trained, [digest], noise_seed)
        if earlier is not None and digest in earlier.released:
            kept = dataclasses.replace(trained, dp_history=earlier.state.dp_history)
            saved = SavedRound(server_round, kept, earlier.released, noise_seed)
        elif earlier is not None:
            steps = total_steps(trained.dp_history) - base_steps
            sigma, q = (trained.dp_history[-1][0], trained.dp_history[-1][1]) if trained.dp_history else (0.0, 0.0)
            log.warning("client %d: round %d was trained before and released a different update (digest %s..., now "
                        "%s...); both releases are charged: %d more DP steps", self.partition, server_round,
                        earlier.released[-1][:12], digest[:12], steps)
            both = dataclasses.replace(trained, dp_history=_append_steps(earlier.state.dp_history, sigma, q, steps))
            saved = SavedRound(server_round, both, [*earlier.released, digest], noise_seed)
        self.save(saved)
        return saved.state


def local_data(cfg: Config, partition: int) -> FaceDataset:
    """This client's member samples, from the same manifest the server wrote, followed by the
    canaries it trains with their flipped labels (``audit.canaries``; the same plan the server
    recorded in canaries.json, derived from the same seed)."""
    ds = build_dataset(cfg)
    manifest = build_manifest(cfg, ds)
    return client_training_data(ds, manifest, canary_plan(cfg, ds, manifest), partition)


def noise_seed_for(cfg: Config, partition: int, server_round: int, store: StateStore | None,
                   allow_reproducible: bool) -> int | None:
    """The seed of this round's DP noise and sampling (None without DP).

    By default a secret of this client: fresh OS entropy, or, when the round is trained again
    after a server crash, the secret it used the first time (kept on this node), so that the re-run
    releases the same update. ``dp.reproducible_noise`` derives it from the run seed instead, which
    the server knows: a client refuses that unless its operator allowed it (``allow_reproducible``).
    """
    if cfg.dp.mode == "off":
        return None
    if cfg.dp.reproducible_noise:
        _refuse_reproducible_unless(allow_reproducible, partition)
        return reproducible_noise_seed(cfg, server_round, partition)
    earlier = store.noise_seed(server_round) if store is not None else None
    return fresh_noise_seed() if earlier is None else earlier


def mote_noise_seed(cfg: Config, partition: int, allow_reproducible: bool, earlier: int | None = None) -> int | None:
    """The seed of this client's MOTE DP noise and record sampling (None without MOTE DP): the
    secret it used for this run before (``earlier``), else fresh OS entropy; under
    ``dp.reproducible_noise`` (if allowed), derived from the run seed."""
    if not cfg.mote.dp_enabled():
        return None
    if cfg.dp.reproducible_noise:
        _refuse_reproducible_unless(allow_reproducible, partition)
        return derived_seed(cfg.seed, partition, 0xE5)
    return fresh_noise_seed() if earlier is None else earlier


def _refuse_reproducible_unless(allowed: bool, partition: int) -> None:
    if not allowed:
        raise ValueError(f"client {partition}: dp.reproducible_noise = true would let the server, which sets "
                         "the run seed, predict this client's DP noise; refused. For research runs, allow it on "
                         f"this node with node config {ALLOW_REPRODUCIBLE_NOISE_NODE_CONFIG}=true")


def local_train(cfg: Config, partition: int, server_round: int, global_state: dict[str, torch.Tensor],
                state: ClientState, store: StateStore | None = None, allow_reproducible_noise: bool = False,
                data: FaceDataset | None = None) -> tuple[dict[str, torch.Tensor], ClientState, dict[str, float | int]]:
    """This client's round (``common.train.local_round.train_round``) on ``data`` (default: its
    member samples of the server's manifest, ``local_data``), with its secret noise seed; with a
    ``store``, the new state is persisted (``StateStore.record_round``) before it is reported, and
    its reported epsilon is the one the store kept."""
    noise_seed = noise_seed_for(cfg, partition, server_round, store, allow_reproducible_noise)
    base_steps = total_steps(state.dp_history)
    data = local_data(cfg, partition) if data is None else data
    weights, new_state, report = train_round(cfg, data, partition, server_round, global_state, state, noise_seed)
    if store is not None:
        secret = None if cfg.dp.reproducible_noise else noise_seed
        new_state = store.record_round(server_round, base_steps, new_state, update_digest(weights), secret)
        if cfg.dp.mode != "off":
            report.update({"epsilon": spent_epsilon(cfg.dp.accountant, new_state.dp_history, cfg.dp.delta),
                           "total-steps": total_steps(new_state.dp_history)})
    return weights, new_state, report
