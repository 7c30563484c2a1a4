"""Members holding their own images on the deployment engine: 1 SuperLink + 3 SuperNodes on
loopback, each SuperNode pointed at its own ImageFolder (different identities) by its node config,
the ServerApp given no data path at all.

The run must finish with the members' evaluation in every round and their self-audit; no
server-side process (SuperLink, its SuperExec, the ServerApp) may open a file of any member
(``tests/open_audit``), and no file name of a member's data may reach the server (its run
directory, or the SuperLink's database that stores the messages). With the reproducible-noise
switch on every node, the deployment gives the same final model as the simulation engine on the
same folders and seed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from support.flower import Deployment, require_completed, start_deployment, submit_run, wait_for_run
from support.members import MEMBERS, PER_MEMBER, overrides, write_consortium
from support.processes import open_audit_env, read_open_audit, tagged

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def consortium(tmp_path: Path) -> Path:
    return write_consortium(tmp_path / "consortium")


@pytest.fixture()
def deployment(tmp_path: Path, consortium: Path):
    node_config = {i: (f"partition-id={i} num-partitions={MEMBERS} data-path='{consortium / f'member-{i:02d}'}' "
                       f"data-source='imagefolder' state-dir='{tmp_path / f'state-{i}'}' "
                       "allow-reproducible-noise=true") for i in range(MEMBERS)}
    dep = start_deployment(tmp_path, MEMBERS, node_config=node_config, cache=tmp_path / "cache",
                           extra_env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
                           superlink_env=open_audit_env(tmp_path / "server-open.log", os.environ),
                           node_env=open_audit_env(tmp_path / "node-open.log", os.environ))
    try:
        yield dep
    finally:
        left = dep.stop(timeout=10.0)
        assert not (tagged(dep.tag) | left), "processes left after teardown"


def _final_model(run: Path) -> dict[str, torch.Tensor]:
    from common.nn.checkpoint import load_checkpoint

    return load_checkpoint(run / "models" / "final.safetensors")[0]


@pytest.mark.timeout(900)
def test_members_keep_their_data_on_the_deployment_engine(deployment: Deployment, consortium: Path,
                                                            tmp_path: Path) -> None:
    from common.config import load_config
    from workflow.simulation import simulate

    values = {**PER_MEMBER, "dp.reproducible_noise": True}
    run_id = submit_run(deployment, ROOT, {**values, "output-dir": str(tmp_path / "runs")})
    require_completed(deployment, run_id, wait_for_run(deployment, run_id, timeout=600.0))
    (run,) = (tmp_path / "runs").glob("run-*")
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rounds = [e for e in events if e["event"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert len(r["members_evaluation"]["members"]) == MEMBERS and not r["members_evaluation"]["failures"]
        assert 0 <= r["members_verification_auc"] <= 1
        assert 0 <= r["verification_auc"] <= 1  # the server's own evaluation, on public data (evaluation.public)
    self_audit = json.loads((run / "audit" / "self-audit.json").read_text())
    assert sorted(self_audit["members"]) == [str(i) for i in range(MEMBERS)] and not self_audit["failures"]
    assert not (run / "manifest.json").exists()
    # MOTE at the members, galleries shared (mote.share_gallery, the research default) and merged.
    assert (run / "mote" / "gallery-b0.50.safetensors").is_file()
    mote = json.loads((run / "mote" / "members-evaluation.json").read_text())
    assert sorted(mote["members"]) == [str(i) for i in range(MEMBERS)]
    for i in range(MEMBERS):  # and each member kept its own galleries in its state directory
        assert [p.parent.parent.name for p in (tmp_path / f"state-{i}").rglob("gallery-b0.50.safetensors")] == \
            [f"client-{i}"]

    # No server-side process opened a member's file, though the audit hook ran in each of them;
    # the ClientApps read their own folders.
    server = read_open_audit(tmp_path / "server-open.log")
    assert {"flower-superlink", "flower-superexec", "flwr-serverapp"} <= {e.program for e in server}
    assert not [e for e in server if str(consortium) in e.detail], "a server-side process opened member data"
    nodes = read_open_audit(tmp_path / "node-open.log")
    assert any(e.program == "flwr-clientapp" and str(consortium) in e.detail for e in nodes)

    # No file name of a member's images reached the server: neither its run directory nor the
    # SuperLink's database, which holds the messages.
    # (The database also holds the app bundle, whose docs name example files such as 00003/001.png:
    # names that occur in the app's own files are not evidence.)
    app = b"".join(f.read_bytes() for f in (tmp_path / "flwr-home" / "apps").rglob("*") if f.is_file())
    names = {n for p in consortium.rglob("*.png") if (n := p.relative_to(p.parents[1]).as_posix()).encode() not in app}
    seen = b"".join(f.read_bytes() for f in [*run.rglob("*"), *tmp_path.glob("state.db*")] if f.is_file())
    assert len(names) > 50 and not [n for n in names if n.encode() in seen]

    # The simulation engine on the same folders and seed trains the same model.
    cfg = load_config(None, overrides({**values, "data.path": str(consortium)}))
    sim_run, status = simulate(cfg, tmp_path / "sim", progress=False)
    assert status["status"] == "finished", status
    deployed, simulated = _final_model(run), _final_model(Path(sim_run.path))
    assert deployed.keys() == simulated.keys()
    for key in deployed:
        assert torch.equal(deployed[key], simulated[key]), key
