"""One client's round of local training on given data: the recipe every client follows, and
that an audit's reference federations replay (``attacks.federated_references``), so that a
reference model is trained exactly the way the audited one was.

What is here needs no Flower, no node and no disk: ``client.local`` adds where the data and the
secret noise seed come from and what the node keeps between rounds (``StateStore``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from common.config import Config
from common.data.dataset import GENDER_NAMES, FaceDataset
from common.nn.build import build_identity_head, build_model, model_spec
from common.train.dp import History, noise_for, poisson_sample_rate, spent_epsilon, steps_per_epoch, total_steps
from common.train.fairness import noisy_cell_counts, reweight, sensitive_attribute, weight_bound, weights_from_counts
from common.train.finetune import restrict_training
from common.train.identity_dp import identity_sample_rate, identity_steps_per_epoch, num_identities
from common.train.loop import identity_classes, target_labels, train

log = logging.getLogger(__name__)

REWEIGHT_MECHANISM = "Gaussian histogram of (sensitive value, label) counts, L2 sensitivity 1, released once"
@dataclass
class ClientState:
    """What a client keeps between rounds: its identity head and DP history (never sent; the
    history is reported), and under DP reweighting the noisy (sensitive, label) histogram its
    weights come from, released once (``histogram_noise`` > 0: charged to ``dp_history``)."""

    head: dict[str, torch.Tensor] | None = None
    dp_history: History = field(default_factory=list)
    noise_multiplier: float = 0.0
    reweight_counts: list[list[float]] | None = None
    histogram_noise: float = 0.0
    # DP's unit ("sample" or "identity", common.train.identity_dp.DP_UNITS) and the largest number
    # of images of one identity in the client's training data (a count only: the ledger's group-
    # privacy bound of a sample-level epsilon). Both are set by ``local_train`` every round.
    unit: str = "sample"
    largest_identity_images: int = 0

    def privacy_json(self, reproducible_noise: bool = False) -> str:
        """What the client reports to the ledger: its accountant history, its noise multiplier, its
        DP unit and the image count of its largest identity, whether its noise was reproducible from
        the run seed (then the server could predict it), and the mechanism its reweighting histogram
        was released with (its cost is in the history)."""
        d: dict[str, object] = {"history": self.dp_history, "noise_multiplier": self.noise_multiplier,
                                "reproducible_noise": reproducible_noise, "unit": self.unit,
                                "largest_identity_images": self.largest_identity_images}
        if self.histogram_noise > 0:
            d["reweighting"] = {"mechanism": REWEIGHT_MECHANISM, "noise_multiplier": self.histogram_noise}
        return json.dumps(d)

    def local_json(self) -> str:
        """Everything but the head, for this node's own memory (never sent)."""
        return json.dumps({"history": self.dp_history, "noise_multiplier": self.noise_multiplier,
                           "reweight_counts": self.reweight_counts, "histogram_noise": self.histogram_noise})

    @classmethod
    def from_local_json(cls, text: str, head: dict[str, torch.Tensor] | None) -> ClientState:
        d = json.loads(text)
        return cls(head=head, dp_history=[tuple(h) for h in d["history"]],
                   noise_multiplier=float(d["noise_multiplier"]), reweight_counts=d.get("reweight_counts"),
                   histogram_noise=float(d.get("histogram_noise", 0.0)))


def derived_seed(*parts: int) -> int:
    """A 31-bit seed derived from (run seed, round, client, ...) so every stream is distinct."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def reproducible_noise_seed(cfg: Config, server_round: int, partition: int) -> int:
    """The noise seed of a client's round under ``dp.reproducible_noise``: derived from the run seed,
    so the server (and an auditor replaying the run) can reproduce it."""
    return derived_seed(cfg.seed, server_round, partition, 0xD9)


def release_reweight_histogram(cfg: Config, data: FaceDataset, state: ClientState, noise_seed: int) -> ClientState:
    """Under DP-SGD, reweighting may not read the private data outside the accountant: the
    (sensitive value, label) counts its weights come from are released once, with Gaussian noise
    (``fairness.histogram_noise``), and that release is charged to the client's accountant history
    as one step at sampling rate 1. The noise draws from the round's secret noise seed."""
    sensitive = sensitive_attribute(data, cfg.fairness.sensitive)
    n_sensitive = len(GENDER_NAMES) if cfg.fairness.sensitive == "gender" else len(data.group_names)
    sigma = cfg.fairness.histogram_noise
    counts = noisy_cell_counts(sensitive, target_labels(data, cfg.train.attribute), n_sensitive, sigma,
                               np.random.default_rng([noise_seed, 0x4157]))
    return dataclasses.replace(state, reweight_counts=counts.tolist(), histogram_noise=sigma,
                               dp_history=[*state.dp_history, (sigma, 1.0, 1)])


def fairness_terms(cfg: Config, data: FaceDataset,
                   state: ClientState) -> tuple[np.ndarray | None, tuple[float, np.ndarray] | None]:
    """The trainer's ``sample_weight`` and ``mixup`` for the configured fairness intervention
    (none, reweight, fair_mixup). Under DP, reweighting takes its frequencies from the released
    noisy histogram (``release_reweight_histogram``), so no sample's weight depends on another, and
    the weights are scaled to at most 1: DP-SGD multiplies each clipped gradient by its weight."""
    sensitive = sensitive_attribute(data, cfg.fairness.sensitive)
    if cfg.fairness.method == "reweight":
        labels = target_labels(data, cfg.train.attribute)
        if cfg.dp.mode != "off":  # scaled to <= 1: under DP they weight the clipped gradients
            counts = np.asarray(state.reweight_counts)
            return weights_from_counts(sensitive, labels, counts) / weight_bound(counts), None
        return reweight(sensitive, labels), None
    if cfg.fairness.method == "fair_mixup":
        return None, (cfg.fairness.lam, sensitive)
    return None, None


def dp_sampling(cfg: Config, data: FaceDataset) -> tuple[float, int]:
    """The Poisson rate q of DP-SGD on ``data`` and its steps per epoch. ``dp.unit = sample``:
    Opacus' rate over images, 1 / ceil(n / batch_size), and int(1 / q) steps; ``dp.unit =
    identity``: the rate of each identity, min(1, batch_size / (dp.max_images_per_identity x
    identities)), and ceil(1 / q) steps (``common.train.identity_dp``). The loop samples with the
    same q, and the noise is calibrated for ``federation.rounds`` x ``local_epochs`` epochs of it."""
    if cfg.dp.mode != "off" and cfg.dp.unit == "identity":
        n, cap = num_identities(data.identity), cfg.dp.max_images_per_identity
        batch = cfg.train.batch_size
        return identity_sample_rate(n, batch, cap), identity_steps_per_epoch(n, batch, cap)
    q = poisson_sample_rate(len(data), cfg.train.batch_size)
    return q, steps_per_epoch(q)


def largest_identity_images(data: FaceDataset) -> int:
    """The largest number of images of one identity in ``data`` (0 when empty)."""
    return int(np.unique(data.identity, return_counts=True)[1].max()) if len(data) else 0


def train_round(cfg: Config, data: FaceDataset, partition: int, server_round: int,
                global_state: dict[str, torch.Tensor], state: ClientState, noise_seed: int | None,
                ) -> tuple[dict[str, torch.Tensor], ClientState, dict[str, float | int]]:
    """Train the global model on ``data`` for ``federation.local_epochs`` epochs: one client's round.

    DP noise is calibrated once, at the client's first round, for the steps of every round it
    could take part in, so that its epsilon over the whole run never exceeds the target (a state
    that already carries a noise multiplier keeps it); the accountant history carries over, so
    the reported epsilon composes over all rounds. ``noise_seed`` seeds DP-SGD's noise and
    sampling (None without DP). Returns the trained weights, the new state and the metrics the
    client reports.
    """
    if noise_seed is not None and cfg.fairness.method == "reweight" and state.reweight_counts is None:
        state = release_reweight_histogram(cfg, data, state, noise_seed)
    spec = model_spec(cfg)
    model = build_model(spec, cfg.seed)
    model.load_state_dict(global_state)
    head = None
    if cfg.train.task in ("identity", "both"):
        head = build_identity_head(spec, identity_classes(data.identity)[0].size, derived_seed(cfg.seed, 7, partition))
        if state.head is not None:
            head.load_state_dict(state.head)
    restrict_training(model, cfg.federation.trainable)
    q, per_epoch = dp_sampling(cfg, data)
    steps_per_round = cfg.federation.local_epochs * per_epoch
    planned = cfg.federation.rounds * steps_per_round
    if cfg.dp.mode != "off" and state.noise_multiplier <= 0:
        state.noise_multiplier = noise_for(cfg.dp, q, planned, spent=state.dp_history)
        log.info("client %d: DP noise multiplier %.4f for %d planned steps at q=%.4f", partition,
                 state.noise_multiplier, planned, q)
    sample_weight, mixup = fairness_terms(cfg, data, state)
    start = time.perf_counter()
    outcome = train(model, data, cfg.train, cfg.dp, seed=derived_seed(cfg.seed, server_round, partition),
                    epochs=cfg.federation.local_epochs, head=head, noise_multiplier=state.noise_multiplier,
                    dp_history=state.dp_history, sample_weight=sample_weight, mixup=mixup,
                    schedule=((server_round - 1) * steps_per_round, planned), noise_seed=noise_seed,
                    desc=f"client {partition} round {server_round}")
    new_state = dataclasses.replace(state, head=head.state_dict() if head is not None else None,
                                    dp_history=outcome.dp_history or [], unit=cfg.dp.unit,
                                    largest_identity_images=largest_identity_images(data))
    report: dict[str, float | int] = {
        "num-examples": len(data), "partition-id": partition, "train-loss": outcome.loss, "steps": outcome.steps,
        "seconds": time.perf_counter() - start, "samples-per-second": outcome.samples_per_second,
    }
    if cfg.dp.mode != "off":
        report.update({"epsilon": spent_epsilon(cfg.dp.accountant, new_state.dp_history, cfg.dp.delta),
                       "noise-multiplier": state.noise_multiplier, "sample-rate": q, "delta": cfg.dp.delta,
                       "total-steps": total_steps(new_state.dp_history)})
    return model.state_dict(), new_state, report
