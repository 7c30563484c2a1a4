"""Members that hold their own images (``data.layout = per-member``): each reads only its own
folder, splits it itself, evaluates the global model on its held-out part and audits the final
model on its own data; the server reads no member's file and hears only counts and numbers.

The simulation runs as a ``facefl run`` subprocess with the test-only file-open audit
(``tests/open_audit/sitecustomize.py``), so that the server's process (which runs the ServerApp)
can be told apart from the Ray workers that run the ClientApps.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support.members import IMAGES_PER_MEMBER, MEMBERS, PER_MEMBER, set_args, write_consortium
from support.members import overrides as as_overrides
from support.processes import open_audit_env, read_open_audit

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_consortium(tmp_path_factory.mktemp("consortium"))


def facefl_run(tmp: Path, data_path: Path, he_keys: Path | None = None,
               **extra: object) -> tuple[subprocess.CompletedProcess[str], Path]:
    """``facefl run`` of ``PER_MEMBER`` (and ``extra`` keys, dotted with ``__``; with ``he_keys``
    encrypted) on ``data_path`` in a subprocess, with its own data cache and client state under
    ``tmp`` and every file it (or a Ray worker) opens logged to tmp/open.log."""
    env = {**os.environ, **open_audit_env(tmp / "open.log", os.environ), "OMP_NUM_THREADS": "1",
           "FACEFL_CACHE": str(tmp / "cache"), "FACEFL_CLIENT_STATE": str(tmp / "state")}
    dotted = {k.replace("__", "."): v for k, v in extra.items()}
    args = set_args({**PER_MEMBER, "data.path": str(data_path), **dotted})
    keys = ["--he-keys", str(he_keys)] if he_keys is not None else []
    proc = subprocess.run([sys.executable, "-m", "workflow.cli", "--no-progress", "run", *args, *keys, "--out",
                           str(tmp / "runs")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc, tmp


def _server_pid(tmp: Path) -> int:
    """The pid of the ``facefl run`` process: the first one to log (it starts Ray and its workers)."""
    return read_open_audit(tmp / "open.log")[0].pid


@pytest.mark.timeout(900)
def test_members_train_and_evaluate_on_their_own_folders(consortium: Path, tmp_path: Path) -> None:
    from common.he.keys import KeyParams, write_keys

    keys = tmp_path / "keys"
    write_keys(keys, KeyParams())
    proc, tmp = facefl_run(tmp_path, consortium, he_keys=keys, mote__share_gallery=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    from common.runs.rundir import RunDir

    run = RunDir(next((tmp / "runs").iterdir()))
    events = run.read_metrics()
    rounds = [e for e in events if e.get("event") == "round"]
    assert [r["round"] for r in rounds] == [1, 2]
    # Encrypted: the server can evaluate nothing, not even on public data; the members, who decrypt
    # the global model themselves, give the run its learning curve.
    for r in rounds:  # federated evaluation in every round, from every member, weighted by counts
        assert r["encrypted"] and "verification_auc" not in r
        members = r["members_evaluation"]["members"]
        assert [int(m["partition-id"]) for m in members] == list(range(MEMBERS))
        assert all(m["probe-images"] > 0 and m["held-out-images"] > 0 for m in members)
        weights = [m["probe-images"] for m in members]
        assert r["members_verification_auc"] == pytest.approx(
            np.average([m["verification_auc"] for m in members], weights=weights))
        assert 0.0 <= r["members_attribute_accuracy"] <= 1.0
    assert (Path(run.path) / "models" / "final.safetensors").is_file()  # decrypted by the key holder
    assert "members' verif. AUC" in proc.stdout

    # Each member's self-audit, beside its accounted epsilon: numbers computed at the member.
    audited = json.loads((Path(run.path) / "audit" / "self-audit.json").read_text())
    assert sorted(audited["members"]) == [str(k) for k in range(MEMBERS)] and not audited["failures"]
    for result in audited["members"].values():
        assert result["accounted_epsilon"] > 0 and result["members"] > 0 and result["nonmembers"] > 0
        assert set(result["attacks"]) == {"loss", "lira-offline"}
        assert all(0 <= a["auc"] <= 1 and a["empirical_epsilon"] >= 0 for a in result["attacks"].values())
    assert "self-audit attack" in proc.stdout

    # MOTE at the member: galleries kept at the site, MOTE-vs-templates numbers sent.
    mote = json.loads((Path(run.path) / "mote" / "members-evaluation.json").read_text())
    assert sorted(mote["members"]) == [str(k) for k in range(MEMBERS)]
    for e in mote["members"].values():
        assert set(e["methods"]) == {"templates", "MOTE b=0.50"} and e["probes"] > 0
    assert set(mote["weighted_by_probes"]["MOTE b=0.50"]) >= {"auc"}
    assert not list((Path(run.path) / "mote").glob("gallery-*"))  # kept at the members (tests/test_deploy_members.py)
    enrollment = json.loads((Path(run.path) / "mote" / "enrollment.json").read_text())
    assert all(set(map(type, c["references"].values())) == {int} for c in enrollment["per_client"])

    # The report shows all of it, and finds nothing missing in a run without a manifest.
    from common.report.html import write_report

    page = write_report(run.path).read_text()
    assert "Self-audit: each member attacked" in page and 'class="problem"' not in page

    # What the members told the server: counts only.
    described = next(e for e in events if e.get("event") == "members")["members"]
    assert sorted(described) == [str(k) for k in range(MEMBERS)]
    for counts in described.values():
        assert all(isinstance(v, int) for v in counts.values())
        assert counts["train-images"] + counts["held-out-images"] + counts["probe-images"] == IMAGES_PER_MEMBER
    assert not (Path(run.path) / "manifest.json").exists()

    # The server's process opened no file of any member; the members' ClientApps did.
    entries = read_open_audit(tmp / "open.log")
    server = _server_pid(tmp)
    member_files = [e for e in entries if e.kind == "open" and e.detail.startswith(str(consortium))]
    assert not [e for e in member_files if e.pid == server], "the server opened a member's file"
    assert {e.pid for e in member_files} - {server}, "no ClientApp opened a member file: is the audit active?"

    # No file name or sample id of a member's data reaches the run directory.
    names = {p.relative_to(p.parents[1]).as_posix() for p in consortium.rglob("*.png")}
    written = b"".join(f.read_bytes() for f in Path(run.path).rglob("*") if f.is_file())
    assert names and not [n for n in names if n.encode() in written]


@pytest.mark.timeout(600)
def test_a_member_without_readable_data_is_named_before_training(consortium: Path, tmp_path: Path) -> None:
    broken = tmp_path / "consortium"
    shutil.copytree(consortium, broken)
    for f in (broken / "member-01").iterdir():  # member 1's folder holds no image any more
        shutil.rmtree(f) if f.is_dir() else f.unlink()
    proc, tmp = facefl_run(tmp_path, broken)
    assert proc.returncode != 0
    assert "client 1" in proc.stderr and "cannot read its data" in proc.stderr, proc.stderr[-3000:]
    from common.runs.rundir import RunDir

    events = [e for r in (tmp / "runs").iterdir() for e in RunDir(r).read_metrics()]
    assert not [e for e in events if e.get("event") in ("round", "pretrain")]
    # No member trained: no client state of any round exists.
    assert not list((tmp / "state").rglob("round-*"))


@pytest.mark.parametrize(("overrides", "key"), [
    (["data.source=synthfaces"], "data.layout"),
    (["audit.canaries=8"], "audit.canaries"),
    (["mote.kde_population=aux"], "mote.kde_population"),
])
def test_what_needs_the_servers_view_of_all_the_data_is_refused(overrides: list[str], key: str) -> None:
    from common.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=key):
        load_config(None, as_overrides(PER_MEMBER) + overrides)


def test_public_evaluation_is_for_per_member_runs_only() -> None:
    from common.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="evaluation.public"):
        load_config(None, ["evaluation.public=synthfaces"])


def test_a_member_split_is_disjoint_keeps_its_data_and_names_a_change(consortium: Path, tmp_path: Path) -> None:
    from common.data.sources.imagefolder import load_imagefolder
    from common.split.member import MemberSplit, counts, split_member

    ds = load_imagefolder(consortium / "member-00", image_size=32)
    split = split_member(ds, probe_fraction=0.25, held_out_fraction=0.25, seed=7)
    roles = [set(getattr(split, r)) for r in ("train", "held_out", "probe")]
    assert sum(map(len, roles)) == len(ds) and set.union(*roles) == set(ds.sample_ids.tolist())
    probe_ids = set(split.subset(ds, "probe").identity.tolist())
    assert len(probe_ids) == 2 and not probe_ids & set(split.subset(ds, "train").identity.tolist())
    assert split == split_member(ds, 0.25, 0.25, seed=7) != split_member(ds, 0.25, 0.25, seed=8)
    split.save(tmp_path / "split.json")
    assert MemberSplit.load(tmp_path / "split.json") == split
    assert set(counts(split, ds).values()) and all(isinstance(v, int) for v in counts(split, ds).values())
    other = load_imagefolder(consortium / "member-01", image_size=32)
    with pytest.raises(ValueError, match="data changed since its split"):
        split.subset(other, "train")
