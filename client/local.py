"""One client's work, independent of Flower: pick its data, train locally, account for privacy.

The ClientApp (client/app.py) only decodes messages, keeps ``ClientState`` in the node's
``context.state`` and calls these functions, so they can be tested without a federation.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from common.builders import (
    build_dataset,
    build_identity_head,
    build_manifest,
    build_model,
    model_spec,
)
from common.config import Config
from common.data.dataset import FaceDataset
from common.fairness import reweight, sensitive_attribute
from common.privacy.dp import (
    History,
    noise_for,
    poisson_sample_rate,
    spent_epsilon,
    steps_per_epoch,
    total_steps,
)
from common.training import identity_classes, target_labels, train

log = logging.getLogger(__name__)


@dataclass
class ClientState:
    """What a client keeps between rounds and never sends: its identity head and DP history."""

    head: dict[str, torch.Tensor] | None = None
    dp_history: History = field(default_factory=list)
    noise_multiplier: float = 0.0

    def privacy_json(self) -> str:
        return json.dumps({"history": self.dp_history, "noise_multiplier": self.noise_multiplier})

    @classmethod
    def from_privacy_json(cls, text: str, head: dict[str, torch.Tensor] | None) -> ClientState:
        d = json.loads(text)
        return cls(head=head, dp_history=[tuple(h) for h in d["history"]], noise_multiplier=float(d["noise_multiplier"]))


def derived_seed(*parts: int) -> int:
    """A 31-bit seed derived from (run seed, round, client, ...) so every stream is distinct."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def local_data(cfg: Config, partition: int) -> FaceDataset:
    """This client's member samples, from the same manifest the server wrote."""
    ds = build_dataset(cfg)
    manifest = build_manifest(cfg, ds)
    return ds.subset(manifest.client_indices(ds, partition))


def fairness_args(cfg: Config, data: FaceDataset) -> dict[str, object]:
    """The trainer's arguments for the configured fairness intervention (none, reweight, fair_mixup)."""
    sensitive = sensitive_attribute(data, cfg.fairness.sensitive)
    if cfg.fairness.method == "reweight":
        return {"sample_weight": reweight(sensitive, target_labels(data, cfg.train.attribute))}
    if cfg.fairness.method == "fair_mixup":
        return {"mixup": (cfg.fairness.lam, sensitive)}
    return {}


def local_train(cfg: Config, partition: int, server_round: int, global_state: dict[str, torch.Tensor],
                state: ClientState) -> tuple[dict[str, torch.Tensor], ClientState, dict[str, float | int]]:
    """Train the global model on this client's data for ``federation.local_epochs`` epochs.

    DP noise is calibrated once, at the client's first round, for the steps of every round it
    could take part in, so that its epsilon over the whole run never exceeds the target; the
    accountant history carries over, so the reported epsilon composes over all rounds.
    """
    data = local_data(cfg, partition)
    spec = model_spec(cfg)
    model = build_model(spec, cfg.seed)
    model.load_state_dict(global_state)
    head = None
    if cfg.train.task in ("identity", "both"):
        head = build_identity_head(spec, identity_classes(data.identity)[0].size, derived_seed(cfg.seed, 7, partition))
        if state.head is not None:
            head.load_state_dict(state.head)
    q = poisson_sample_rate(len(data), cfg.train.batch_size)
    steps_per_round = cfg.federation.local_epochs * steps_per_epoch(q)
    planned = cfg.federation.rounds * steps_per_round
    if cfg.dp.mode != "off" and state.noise_multiplier <= 0:
        state.noise_multiplier = noise_for(cfg.dp, q, planned)
        log.info("client %d: DP noise multiplier %.4f for %d planned steps at q=%.4f", partition,
                 state.noise_multiplier, planned, q)
    start = time.perf_counter()
    outcome = train(model, data, cfg.train, cfg.dp, seed=derived_seed(cfg.seed, server_round, partition),
                    epochs=cfg.federation.local_epochs, head=head, noise_multiplier=state.noise_multiplier,
                    dp_history=state.dp_history, **fairness_args(cfg, data),
                    schedule=((server_round - 1) * steps_per_round, planned),
                    desc=f"client {partition} round {server_round}")
    new_state = ClientState(head=head.state_dict() if head is not None else None,
                            dp_history=outcome.dp_history or [], noise_multiplier=state.noise_multiplier)
    report: dict[str, float | int] = {
        "num-examples": len(data), "partition-id": partition, "train-loss": outcome.loss, "steps": outcome.steps,
        "seconds": time.perf_counter() - start, "samples-per-second": outcome.samples_per_second,
    }
    if cfg.dp.mode != "off":
        report.update({"epsilon": spent_epsilon(cfg.dp.accountant, new_state.dp_history, cfg.dp.delta),
                       "noise-multiplier": state.noise_multiplier, "sample-rate": q, "delta": cfg.dp.delta,
                       "total-steps": total_steps(new_state.dp_history)})
    return model.state_dict(), new_state, report
