"""The member's self-audit (attacks/self_audit.py): it finds membership in a model that memorised
the member's training images, and nothing in one that never saw the member's images."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import DPConfig, load_config
from common.data.sources.synthfaces.generator import SynthConfig, generate
from common.nn.build import build_identity_head, build_model, model_spec
from common.train.loop import identity_classes, train

# 16 identities x 12 images at 32 px: 4 train, 4 held out, 4 that only the "never saw" model trains on.
CFG = load_config(None, ["data.image_size=32", "model.width=8", "model.blocks=1,1", "model.embedding_dim=16",
                         "train.batch_size=16", "federation.rounds=1", "federation.local_epochs=10",
                         "federation.trainable=all", "train.task=identity"])


@pytest.fixture(scope="module")
def member():
    ds = generate(SynthConfig(num_identities=16, images_per_identity=12, image_size=32, seed=5))
    rank = np.zeros(len(ds), int)
    for ident in np.unique(ds.identity):
        own = np.flatnonzero(ds.identity == ident)
        rank[own] = np.random.default_rng(int(ident)).permutation(own.size)
    return {name: ds.subset(np.flatnonzero((rank >= lo) & (rank < lo + 4)))
            for name, lo in (("train", 0), ("held_out", 4), ("elsewhere", 8))}


def _trained_on(data, epochs: int, seed: int = 0):
    model = build_model(model_spec(CFG), CFG.seed)
    head = build_identity_head(model.spec, identity_classes(data.identity)[0].size, seed)
    train(model, data, CFG.train, DPConfig(mode="off"), seed=seed, epochs=epochs, head=head)
    return model, head


def _audit(member, target):
    from attacks.self_audit import SelfAuditSets, reference_models, self_audit

    sets = SelfAuditSets.from_split(member["train"], member["held_out"], seed=1)
    initial = build_model(model_spec(CFG), CFG.seed)
    refs = reference_models(initial, sets, CFG, count=2, seed=3)
    classes = identity_classes(member["train"].identity)[0]
    return self_audit(*target, classes, sets, refs, CFG, seed=0, n_boot=300)


def test_an_overfit_model_is_caught(member) -> None:
    result = _audit(member, _trained_on(member["train"], epochs=60))
    assert result["members"] == 64 and result["nonmembers"] == 32 and result["reference_images"] == 32
    assert result["attacks"]["loss"]["auc"] > 0.7
    assert result["attacks"]["lira-offline"]["auc"] > 0.7
    assert result["attacks"]["loss"]["empirical_epsilon"] > 0


def test_a_model_that_never_saw_the_member_is_not(member) -> None:
    # Trained as long on other images of the same people: neither audited set was seen.
    result = _audit(member, _trained_on(member["elsewhere"], epochs=60))
    for name, attack in result["attacks"].items():
        lo, hi = attack["ci95"]["auc"]
        assert lo <= 0.5 <= hi, (name, attack["auc"], lo, hi)
        assert attack["empirical_epsilon"] == 0.0


def test_only_numbers_leave_the_member(member) -> None:
    import json

    result = _audit(member, _trained_on(member["train"], epochs=2))
    text = json.dumps(result)
    ids = np.concatenate([member[k].sample_ids for k in ("train", "held_out")])
    assert not [s for s in ids if s in text]
    strings = [v for v in _leaves(result) if isinstance(v, str)]
    assert set(strings) <= {"one image"}  # no free text from the data either


def _leaves(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _leaves(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _leaves(v)
    else:
        yield obj


def test_one_held_out_image_per_identity_leaves_the_loss_attack(member) -> None:
    from attacks.self_audit import SelfAuditSets, reference_models, self_audit

    held_out = member["held_out"]
    first = np.flatnonzero(np.r_[True, held_out.identity[1:] != held_out.identity[:-1]])
    sets = SelfAuditSets.from_split(member["train"], held_out.subset(first), seed=1)
    assert len(sets.reference) == 0 and len(sets.nonmembers) == 16
    refs = reference_models(build_model(model_spec(CFG), CFG.seed), sets, CFG, count=2, seed=3)
    target = _trained_on(member["train"], epochs=60)
    result = self_audit(*target, identity_classes(member["train"].identity)[0], sets, refs, CFG, seed=0, n_boot=100)
    assert set(result["attacks"]) == {"loss"} and "two held-out images" in result["skipped"]["lira-offline"]
    assert result["attacks"]["loss"]["n_nonmembers"] == 16
