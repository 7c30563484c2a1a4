"""Every membership attack of the audit, what it aims at and what it needs, defined once.

``ATTACKS`` maps an attack's name (as ``--attacks`` takes it and report.json records it) to an
``Attack``; ``attacks.audit`` runs them, ``workflow.cli`` validates ``--attacks`` against them,
``workflow.sweep`` and ``scripts/make_results.py`` group report entries by them. An attack
applies to a run's model by the outputs it reads (``Output``: the attribute posterior, the
identity embedding) and reports on targets of the kinds in ``targets``
(``common.runs.records.TargetKind``). The order of ``ATTACKS`` is the order in which they are
listed (the audit itself computes each family in its own fixed order).

FD-MIA on a biased + fair pair of attribute models (``--fair``) is not chosen by ``--attacks``:
every attack on the ``pair`` kind runs whenever a fair twin is given.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from common.runs.records import TargetKind

if TYPE_CHECKING:
    from common.config import Config
    from common.nn.face_model import ModelSpec


class Output(StrEnum):
    """A model output an attack reads."""

    ATTRIBUTE = "attribute"  # the binary attribute posterior (train.task = attribute or both)
    EMBEDDING = "embedding"  # the identity embedding, and the MOTE galleries enrolled with it (identity or both)


@dataclass(frozen=True)
class Attack:
    """One attack. ``outputs``: the model outputs that make it applicable (empty: chosen by no
    ``--attacks``, it runs whenever its target exists); ``targets``: the kinds of target it
    reports on. What it needs (on its targets that need it: ``fd-mia-score`` needs references and
    a fair twin on an attribute pair, a gallery pair on the MOTE pair): ``needs_references``,
    reference (shadow) models trained by the auditor; ``needs_fair_twin``, a fair twin run
    (``--fair``); ``white_box``, the model's activations; ``needs_gallery_pair``, a fair
    (b = 0.5) and a skewed MOTE gallery of the run."""

    name: str
    summary: str
    outputs: frozenset[Output]
    targets: tuple[TargetKind, ...]
    needs_references: bool = False
    needs_fair_twin: bool = False
    white_box: bool = False
    needs_gallery_pair: bool = False

    @property
    def on_client_updates(self) -> bool:
        """Also run against each client's own post-round model (plaintext runs)."""
        return TargetKind.CLIENT in self.targets


_A, _E = Output.ATTRIBUTE, Output.EMBEDDING
_ALL = (
    Attack("loss", "minus the sample's loss (Yeom et al. 2018)", frozenset({_A}),
           (TargetKind.GLOBAL, TargetKind.FAIR, TargetKind.CLIENT)),
    Attack("shadow", "an attack model on the reference (shadow) models' outputs (Shokri et al. 2017)",
           frozenset({_A}), (TargetKind.GLOBAL, TargetKind.FAIR), needs_references=True),
    Attack("lira-online", "LiRA, IN and OUT Gaussians (Carlini et al. 2022)", frozenset({_A}),
           (TargetKind.GLOBAL, TargetKind.FAIR, TargetKind.CLIENT), needs_references=True),
    Attack("lira-offline", "LiRA, the one-sided test against the OUT Gaussian", frozenset({_A}),
           (TargetKind.GLOBAL, TargetKind.FAIR), needs_references=True),
    Attack("rmia", "RMIA, the aux samples as population (Zarifzadeh et al. 2024)", frozenset({_A}),
           (TargetKind.GLOBAL, TargetKind.FAIR), needs_references=True),
    Attack("mint-embedding", "MINT's MLP on the embedding alone: the baseline that shows what the activations add",
           frozenset({_A, _E}), (TargetKind.WHITE_BOX,), white_box=True),
    Attack("mint-vanilla", "MINT on the activations' channel summaries (white-box)", frozenset({_A, _E}),
           (TargetKind.WHITE_BOX,), white_box=True),
    Attack("mint-cnn", "MINT, a CNN on the penultimate block's maps (white-box)", frozenset({_A, _E}),
           (TargetKind.WHITE_BOX,), white_box=True),
    Attack("centroid", "cosine of the embedding to the mean of the identity's other photos", frozenset({_E}),
           (TargetKind.GLOBAL, TargetKind.CLIENT)),
    Attack("mote-score", "the logit of the photo's own MOTE identity model", frozenset({_E}),
           (TargetKind.MOTE_GALLERY,), needs_gallery_pair=True),
    Attack("mote-lira", "Gaussians of that logit from a shadow enrollment of aux identities", frozenset({_E}),
           (TargetKind.MOTE_GALLERY,), needs_gallery_pair=True),
    Attack("fd-mia-score", "FD-MIA, an attack model on both models' outputs (Tian et al. 2024)", frozenset({_E}),
           (TargetKind.PAIR, TargetKind.MOTE_PAIR), needs_references=True, needs_fair_twin=True,
           needs_gallery_pair=True),
    Attack("fd-mia-lira", "FD-MIA, bivariate Gaussians over both galleries' logits", frozenset({_E}),
           (TargetKind.MOTE_PAIR,), needs_gallery_pair=True),
    Attack("fd-mia-lira-online", "FD-MIA, bivariate LiRA over both models (online)", frozenset(),
           (TargetKind.PAIR,), needs_references=True, needs_fair_twin=True),
    Attack("fd-mia-lira-offline", "FD-MIA, bivariate LiRA over both models (offline)", frozenset(),
           (TargetKind.PAIR,), needs_references=True, needs_fair_twin=True),
)
ATTACKS: dict[str, Attack] = {a.name: a for a in _ALL}


def model_outputs(cfg: Config, spec: ModelSpec) -> frozenset[Output]:
    """What a run's model offers an attacker: its attribute posterior, its identity embedding."""
    found = set()
    if spec.attribute_head:
        found.add(Output.ATTRIBUTE)
    if cfg.train.task in ("identity", "both"):
        found.add(Output.EMBEDDING)
    return frozenset(found)


def selectable(outputs: Iterable[Output] = tuple(Output)) -> tuple[str, ...]:
    """The attacks ``--attacks`` may choose for a model with these outputs (all outputs: every one)."""
    have = set(outputs)
    return tuple(a.name for a in ATTACKS.values() if a.outputs & have)


def applicable_attacks(cfg: Config, spec: ModelSpec) -> tuple[str, ...]:
    """Every attack that applies to a run's model: by its outputs (attribute posterior, identity
    embedding) and, for MOTE, whether the run enrolls."""
    return selectable(model_outputs(cfg, spec))


def for_target(kind: TargetKind, wanted: Iterable[str] | None = None) -> tuple[str, ...]:
    """The attacks that report on targets of ``kind`` (among ``wanted``, when given), in registry order."""
    keep = None if wanted is None else set(wanted)
    return tuple(a.name for a in ATTACKS.values() if kind in a.targets and (keep is None or a.name in keep))


def check_names(names: Iterable[str]) -> tuple[str, ...]:
    """``names`` (what ``--attacks`` takes) as a tuple; ValueError listing the known attacks when one is
    unknown. Whether they apply to a given run's model is ``attacks.audit.run_audit``'s to check."""
    names = tuple(names)
    known = selectable()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown attack{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(known)} (FD-MIA on a --fair pair always runs)")
    if not names:
        raise ValueError(f"no attack named; known: {', '.join(known)}")
    return names


def described(outputs: Iterable[Output]) -> str:
    """``a, b, c``: the selectable attacks of these outputs, for help texts."""
    return ", ".join(selectable(outputs))


# Groups, for callers that list them: what an attribute model admits; what a MOTE gallery pair does.
ATTRIBUTE_ATTACKS = selectable((Output.ATTRIBUTE,))
MOTE_ATTACKS = tuple(a.name for a in ATTACKS.values() if a.needs_gallery_pair and a.outputs)
REFERENCE_ATTACKS = tuple(a for a in for_target(TargetKind.GLOBAL) if ATTACKS[a].needs_references)


@dataclass(frozen=True)
class Target:
    """What an attack aims at: its name in the report, its kind, its prefix in scores.npz, its ROC
    legend tag; ``partition`` (client updates), ``balancing_factor`` and ``fair`` (MOTE galleries)
    are recorded with each entry."""

    name: str
    kind: TargetKind
    key_prefix: str = ""
    short: str = ""  # "" for the global model
    partition: int | None = None
    balancing_factor: float | None = None
    fair: bool | None = None

    def key(self, attack: str) -> str:
        return self.key_prefix + attack.replace("-", "_")

    def label(self, attack: str) -> str:
        return f"{attack} ({self.short})" if self.short else attack

    def entry_fields(self) -> dict[str, object]:
        """The report entry's description of this target (``common.runs.records.AttackEntry``)."""
        out: dict[str, object] = {"target": self.name, "kind": self.kind}
        for key in ("partition", "balancing_factor", "fair"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out
