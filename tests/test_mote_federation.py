"""MOTE enrollment as a federated phase, and ``facefl evaluate`` on its galleries.

One real simulation (tiny model, 2 clients, HE on so that the clients decrypt the final backbone
themselves before enrolling): every member identity is enrolled exactly once, by the client that
holds it, one gallery per balancing factor; the evaluation refuses to run before a key holder
decrypted the model, then reports MOTE and templates side by side with a threshold whose FMR
never exceeds 1e-3, and the gender-inference attack on both galleries.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from sim_runs import TINY, simulated_run

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                         "ignore::FutureWarning")]

FACTORS = (0.0, 0.5, 1.0)
MOTE_RUN = tuple(o for o in TINY if o != "mote.enabled=false") + (
    "split.num_clients=2", "federation.min_train_clients=2", "federation.min_available_clients=2",
    "data.identities=40", "data.images_per_identity=8", "federation.local_epochs=1", "federation.rounds=2",
    "dp.mode=off", "mote.epochs=10", "mote.references=2", f"mote.balancing_factors={','.join(map(str, FACTORS))}")


def test_enrolling_client_and_references_follow_the_manifest(synth_small) -> None:
    from common.config import SplitSettings, load_config
    from common.mote.enrollment import client_references, enrolling_client, references
    from common.split.manifest import make_manifest

    cfg = load_config(None, ["mote.references=2"])
    manifest = make_manifest(synth_small, SplitSettings(num_clients=3, partition="iid"), 1)
    owner = enrolling_client(manifest, synth_small)
    refs = references(manifest, synth_small, cfg)
    assert set(owner) == set(refs) == set(synth_small.identity[manifest.role_mask(synth_small, "member")].tolist())
    probes = np.flatnonzero(manifest.role_mask(synth_small, "probe"))
    for ident, pos in refs.items():
        client_pos = manifest.client_indices(synth_small, owner[ident])
        mine = client_pos[synth_small.identity[client_pos] == ident]
        np.testing.assert_array_equal(pos, mine[:2])  # the owner's first two images of the identity
        counts = [int((synth_small.identity[manifest.client_indices(synth_small, c)] == ident).sum()) for c in range(3)]
        assert counts[owner[ident]] == max(counts) and owner[ident] == counts.index(max(counts))
        assert not np.isin(pos, probes).any()
    for client in range(3):
        assert set(client_references(manifest, synth_small, cfg, client)) == {i for i, c in owner.items() if c == client}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    from common.he.keys import KeyParams, write_keys

    root = tmp_path_factory.mktemp("mote-keys")
    write_keys(root, KeyParams())
    return root


@pytest.fixture(scope="module")
def mote_run(tmp_path_factory, keys):
    from common.he.keys import PUBLIC_FILE, SECRET_FILE

    return simulated_run(tmp_path_factory, MOTE_RUN + ("he.enabled=true", f"he.public_context={keys / PUBLIC_FILE}"),
                         tag="mote", he_secret=keys / SECRET_FILE)[0]


@pytest.mark.timeout(300)
def test_every_member_identity_is_enrolled_once_per_balancing_factor(mote_run) -> None:
    from common.config import load_config
    from common.data.cache import build_dataset
    from common.mote.gallery import MoteGallery
    from common.split.manifest import Manifest

    cfg = load_config(mote_run.path / "config.toml")
    ds = build_dataset(cfg)
    manifest = Manifest.load(mote_run.path / "manifest.json")
    members = np.unique(ds.identity[manifest.role_mask(ds, "member")])
    info = json.loads((mote_run.path / "mote" / "enrollment.json").read_text())
    assert info["failures"] == [] and info["clients"] == 2 and info["identities"] == members.size
    per_client = [set(c["identities"]) for c in info["per_client"]]
    assert per_client[0].isdisjoint(per_client[1]) and per_client[0] | per_client[1] == set(members.tolist())
    for b in FACTORS:
        gallery = MoteGallery.load(mote_run.path / "mote" / f"gallery-b{b:.2f}.safetensors")
        np.testing.assert_array_equal(gallery.identity_ids, members)
        np.testing.assert_array_equal(gallery.balancing_factor, np.full(members.size, b))
        assert gallery.dim == cfg.model.embedding_dim
    assert [e for e in mote_run.read_metrics() if e["event"] == "enroll"][0]["identities"] == members.size


@pytest.mark.timeout(300)
def test_evaluate_reports_mote_and_templates(mote_run, keys, capsys) -> None:
    from common.he.keys import SECRET_FILE
    from workflow.cli import main

    assert main(["evaluate", str(mote_run.path)]) == 2  # encrypted run: the model must be decrypted first
    assert "decrypt-model" in capsys.readouterr().err
    assert main(["keys", "decrypt-model", str(mote_run.path), "--key", str(keys / SECRET_FILE)]) == 0
    assert main(["evaluate", str(mote_run.path)]) == 0
    out = capsys.readouterr().out
    assert "templates" in out and "MOTE b=0.50" in out
    report = json.loads((mote_run.path / "mote" / "evaluation.json").read_text())
    names = {"templates"} | {f"MOTE b={b:.2f}" for b in FACTORS}
    assert set(report["methods"]) == set(report["gender_inference"]) == names
    for name, r in report["methods"].items():
        assert r["fmr"] <= 1e-3 and 0 <= r["fnmr"] <= 1 and 0 <= r["auc"] <= 1, name
        assert set(r["gender"]) == {"female", "male"} and 0 <= r["fdr"] <= 1 and r["igarbe"] <= 1, name
        assert r["n_genuine"] > 0 and r["n_impostor"] > r["n_genuine"], name
        leak = report["gender_inference"][name]
        assert 0 <= leak["balanced_accuracy"] <= 1 and leak["n_male"] + leak["n_female"] == report["enrolled"]
    assert (mote_run.path / "mote" / "roc.png").stat().st_size > 1000

    from attacks.audit import AuditSettings, run_audit
    from attacks.registry import MOTE_ATTACKS

    audit = run_audit(mote_run.path, AuditSettings(attacks=("centroid", *MOTE_ATTACKS), max_per_class=40, n_boot=0))
    assert audit["update_level"]["available"] is False and "encrypted sum" in audit["update_level"]["reason"]
    found = {(a["target"], a["name"]): a for a in audit["attacks"]}
    pair = "MOTE pair b=0.50 + b=0.00"  # b = 0 and b = 1 are equally skewed: the lower one is taken
    assert set(found) == {("global model (final)", "centroid"), (pair, "fd-mia-score"), (pair, "fd-mia-lira")} | {
        (f"MOTE gallery b={b}", n) for b in ("0.50", "0.00") for n in ("mote-score", "mote-lira")}
    # 2 references per person: each identity model was trained on exactly those embeddings, so
    # they score above the same person's other photos.
    assert found[("MOTE gallery b=0.50", "mote-score")]["auc"] > 0.6
    assert audit["mote_audited"]["members"] == audit["mote_audited"]["nonmembers"] > 10
    scores = np.load(mote_run.path / "audit" / "scores.npz")
    per_client = json.loads((mote_run.path / "mote" / "enrollment.json").read_text())["per_client"]
    refs = {sid for c in per_client for ids in c["references"].values() for sid in ids}
    ids = scores["mote_sample_ids"]
    assert set(ids[scores["mote_is_member"]].tolist()) <= refs and not set(ids[~scores["mote_is_member"]]) & refs


def test_mote_audit_set_pairs_references_with_the_same_peoples_other_photos(synth_small) -> None:
    from attacks.mote_audit import MoteAuditSet

    ds = synth_small
    refs = {int(i): np.flatnonzero(ds.identity == i)[:1] for i in np.unique(ds.identity)[:6]}
    candidates = np.arange(len(ds))
    audited = MoteAuditSet.draw(refs, candidates, ds, seed=3, max_per_class=4)
    m, o = audited.positions[audited.is_member], audited.positions[~audited.is_member]
    assert m.size == o.size == 4 and set(m.tolist()) <= {int(r[0]) for r in refs.values()}
    np.testing.assert_array_equal(ds.identity[m], ds.identity[o])  # pairs of one person
    assert not set(m.tolist()) & set(o.tolist())
    again = MoteAuditSet.draw(refs, candidates, ds, seed=3, max_per_class=4)
    np.testing.assert_array_equal(again.positions, audited.positions)  # seeded
