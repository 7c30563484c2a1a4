"""Reference models trained the way the audited model was (``--reference-recipe target``).

LiRA's premise (Carlini et al. 2022, Sec. IV) is that the reference models are drawn from the
same training distribution as the target: same architecture, data distribution *and training
algorithm*. A federated target with DP-SGD is not what a central, non-private run produces, and
"DP lowers LiRA" would then partly measure that mismatch. Each reference here replays the target's
recipe as recorded in its run directory: FedAvg (``common.train.fedavg``) over the same number of
clients, partitioned by the run's own split scheme, for the same rounds with the same client
sampling, each client running the very round every client of the run ran
(``common.train.local_round.train_round``: local epochs, optimiser, schedule, fairness intervention,
DP-SGD with the target's clipping norm and, per client, the noise multiplier and Poisson sampling
rate that client recorded in the privacy ledger), from the run's public initial model. The reference's own
seed replaces the run seed; its DP noise is fresh OS entropy unless the run used
``dp.reproducible_noise``. HE changes nothing here: the encrypted sum decrypts to the same FedAvg
up to CKKS rounding.

Sampling rate: a reference client's data is not the target client's size, so it keeps the target
client's rate q (and with it the steps per epoch and, with sigma, the privacy of each step) by
sampling its own data with the expected batch that gives q there (``client_config``). On the
target client's own data that is the target's q exactly, and the whole recipe, weights included,
is the target's: the tests check it bit for bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from common.config import Config
from common.data.dataset import FaceDataset
from common.nn.build import build_model, load_model, model_spec
from common.nn.face_model import FaceModel
from common.runs.io import read_json
from common.runs.rundir import RunDir
from common.split.manifest import attribute_values
from common.split.partition import assign_clients
from common.train.dp import fresh_noise_seed
from common.train.fedavg import sample_partitions, weighted_average
from common.train.identity_dp import num_identities
from common.train.local_round import ClientState, reproducible_noise_seed, train_round


@dataclass(frozen=True)
class TargetRecipe:
    """What a run's training did, as its run directory records it."""

    cfg: Config
    initial_state: dict[str, torch.Tensor] | None  # the public initial global model (None: the seeded init)
    noise_multipliers: Mapping[int, float]  # per partition, from the ledger ({} without DP)
    sample_rates: Mapping[int, float] = dataclasses.field(default_factory=dict)  # per partition, from the ledger

    @classmethod
    def of_run(cls, run: RunDir, cfg: Config) -> TargetRecipe:
        initial = initial_state(run)
        sigmas: dict[int, float] = {}
        rates: dict[int, float] = {}
        if cfg.dp.mode != "off":
            if not run.privacy_path.exists():
                raise ValueError(f"{run.privacy_path}: a DP run without its privacy ledger; the target recipe needs "
                                 "each client's noise multiplier")
            clients = read_json(run.privacy_path).get("clients", {})
            sigmas = {int(p): float(c["noise_multiplier"]) for p, c in clients.items()}
            rates = {int(p): float(c["sample_rate"]) for p, c in clients.items() if float(c["sample_rate"]) > 0}
        return cls(cfg, initial, sigmas, rates)

    def key(self) -> dict[str, object]:
        """Everything the recipe depends on, for a cache key."""
        sigmas = {str(k): v for k, v in sorted(self.noise_multipliers.items())}
        rates = {str(k): v for k, v in sorted(self.sample_rates.items())}
        return {"config": self.cfg.to_dict(), "noise_multipliers": sigmas, "sample_rates": rates}

    def client_config(self, cfg: Config, partition: int, data: FaceDataset) -> Config:
        """``cfg`` with the expected batch that samples ``data`` at the target client's recorded
        Poisson rate (``local_round.dp_sampling``'s inverse): ceil(n / (1/q)) images per batch
        (``dp.unit = sample``), q x max_images_per_identity x identities (``identity``). Unchanged
        without DP or without a recorded rate."""
        q = self.sample_rates.get(partition)
        if cfg.dp.mode == "off" or q is None or not len(data):
            return cfg
        if cfg.dp.unit == "identity":
            batch = round(q * cfg.dp.max_images_per_identity * num_identities(data.identity))
        else:
            batch = -(-len(data) // round(1 / q))
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=max(1, batch)))


def initial_state(run: RunDir) -> dict[str, torch.Tensor] | None:
    """The run's public initial global model (seeded init + public pretraining), when recorded:
    where every reference starts, whichever recipe trains it."""
    return load_model(run.initial_model)[0].state_dict() if run.initial_model.exists() else None


def reference_clients(cfg: Config, data: FaceDataset, seed: int) -> list[FaceDataset]:
    """A reference's training data cut into the run's number of clients by the run's partition scheme."""
    split = cfg.split
    attribute = attribute_values(data, split.partition_attribute) if split.partition == "attribute" else None
    owner = assign_clients(data.identity, attribute, scheme=split.partition, num_clients=split.num_clients,
                           alpha=split.alpha, min_samples=1, seed=seed)
    return [data.subset(np.flatnonzero(owner == c)) for c in range(split.num_clients)]


def federated_model(recipe: TargetRecipe, clients: Sequence[FaceDataset], seed: int) -> FaceModel:
    """One model trained by the recipe on ``clients`` (partition ids 0..K-1), with ``seed`` in place
    of the run seed: given the run's own client data and seed, under ``dp.reproducible_noise``, it is
    the run's final global model."""
    cfg = dataclasses.replace(recipe.cfg, seed=int(seed))
    fed = cfg.federation
    model = build_model(model_spec(cfg), cfg.seed)
    if recipe.initial_state is not None:
        model.load_state_dict(recipe.initial_state)
    states = {p: ClientState(noise_multiplier=recipe.noise_multipliers.get(p, 0.0)) for p in range(len(clients))}
    global_state = model.state_dict()
    for rnd in range(1, fed.rounds + 1):
        updates = []
        for p in sample_partitions(cfg.seed, rnd, list(states), fed.fraction_train, fed.min_train_clients):
            weights, states[p], _ = train_round(recipe.client_config(cfg, p, clients[p]), clients[p], p, rnd,
                                                global_state, states[p], _noise_seed(cfg, rnd, p))
            updates.append((len(clients[p]), {k: v.detach().numpy() for k, v in weights.items()}))
        global_state = {k: torch.from_numpy(v) for k, v in weighted_average(updates).items()}
    model.load_state_dict(global_state)
    model.eval()
    return model


def _noise_seed(cfg: Config, server_round: int, partition: int) -> int | None:
    """A client's noise seed in the replay: as the run's clients derived it under reproducible noise
    (``client.local.noise_seed_for``), fresh entropy otherwise."""
    if cfg.dp.mode == "off":
        return None
    return reproducible_noise_seed(cfg, server_round, partition) if cfg.dp.reproducible_noise else fresh_noise_seed()
