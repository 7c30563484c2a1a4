"""The app on Flower's deployment engine over TLS: 1 SuperLink + 3 SuperNodes as real processes
on 127.0.0.1, ``flwr run`` with DP-SGD and HE on, 2 rounds and MOTE enrollment; then the run
directory is checked.

Transport and admission: certificates come from the real ``docker/gen-certs.sh``; the SuperLink
serves TLS and runs with SuperNode authentication (``--enable-supernode-auth``), each SuperNode's
public key registered with ``flwr supernode register`` before it starts. A SuperNode with an
unregistered key and one that does not trust the CA are both refused.

Keys: the SuperNodes get the CKKS secret context through their node config; the ServerApp gets
only the public context (run config ``he.public_context``), stores only encrypted checkpoints, and
a key holder decrypts the final model with ``facefl keys decrypt-model``. An audit hook
(``tests/open_audit/sitecustomize.py``) logs every file each process opens, server side
(SuperLink, its SuperExec, the ServerApp) and node side in separate logs: the server side must
never have opened the secret key, the ClientApps must have.

Everything lives under tmp_path: FLWR_HOME (connection config, installed FABs), the SuperLink's
state database, certificates, keys, the data cache and the run directory. Runtime dependency
installation is off. Every process is stopped by PID (and process group) in the fixture's
teardown, and the test checks that none is left. See docs/deploy.md for the same commands by hand.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import time
from pathlib import Path

import pytest
from support.flower import (
    Deployment,
    require_completed,
    start_deployment,
    submit_run,
    wait_for_run,
)
from support.keys import gen_certs, write_supernode_key
from support.processes import (
    LOOPBACK,
    AuditEntry,
    cmdline,
    open_audit_env,
    port_open,
    read_open_audit,
    tagged,
)

from common.nn.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
NODES = 3
ROUNDS = 2

# The brief's tiny federation, plus a tiny model on 32 px faces to keep the test fast. 8 images per
# identity: with 3 clients and 6, a client's members hold only 4 embeddings of one gender from
# identities with two or more, and its MOTE gender KDE (which needs 5) cannot be fitted.
OVERRIDES = {
    "split.num_clients": NODES,
    "federation.min_train_clients": NODES,
    "federation.min_available_clients": NODES,
    "federation.rounds": ROUNDS,
    "federation.local_epochs": 1,
    "federation.round_timeout": 300.0,
    "data.identities": 24,
    "data.images_per_identity": 8,
    "data.image_size": 32,
    "model.width": 8,
    "model.blocks": "1,1",
    "model.embedding_dim": 16,
    "dp.mode": "sample",
    "mote.epochs": 10,
    "mote.balancing_factors": "0.5",
}


@pytest.fixture()
def keys(tmp_path: Path) -> Path:
    from common.he.keys import KeyParams, write_keys

    write_keys(tmp_path / "keys", KeyParams())
    return tmp_path / "keys"


SERVER_AUDIT = "server-open.log"  # files opened by the SuperLink, its SuperExec and the ServerApp
NODE_AUDIT = "node-open.log"  # files opened by the SuperNodes, their SuperExecs and the ClientApps


@pytest.fixture()
def deployment(tmp_path: Path, keys: Path):
    from common.he.keys import SECRET_FILE

    node_config = {i: f"partition-id={i} num-partitions={NODES} he-secret-context='{keys / SECRET_FILE}'"
                   for i in range(NODES)}
    tls = gen_certs(tmp_path / "certs")
    # One intra-op thread per process: several ClientApps train at once on two shared cores.
    dep = start_deployment(tmp_path, NODES, node_config=node_config, cache=tmp_path / "cache",
                           extra_env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
                           tls=tls, supernode_auth=True,
                           superlink_env=open_audit_env(tmp_path / SERVER_AUDIT, os.environ),
                           node_env=open_audit_env(tmp_path / NODE_AUDIT, os.environ))
    try:
        yield dep
    finally:
        left = dep.stop(timeout=10.0)
        stragglers = tagged(dep.tag) | left
        assert not stragglers, "processes left after teardown: " + "; ".join(
            f"{pid} {cmdline(pid)[:160]}" for pid in sorted(stragglers))
        for port in [dep.superlink_port]:
            assert not port_open(port), f"port {port} still open after teardown"


def peer_certificate(port: int, ca: Path) -> dict:
    """TLS handshake with the SuperLink, verifying its certificate against ``ca`` for 127.0.0.1."""
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection((LOOPBACK, port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=LOOPBACK) as tls:
        return tls.getpeercert()


def opened(entries: list[AuditEntry], target: Path) -> list[AuditEntry]:
    """Entries that opened ``target``: by path, by resolved path, or by inode (a hard link), or
    that ran a command naming it."""
    real = os.path.realpath(target)

    def same(e: AuditEntry) -> bool:
        return e.kind == "open" and os.path.exists(e.detail) and os.path.samefile(e.detail, target)

    return [e for e in entries if str(target) in e.detail or real in e.detail or same(e)]


@pytest.mark.timeout(900)
def test_flwr_run_on_deployment_engine(deployment: Deployment, tmp_path: Path, keys: Path, capsys) -> None:
    from common.he.keys import PUBLIC_FILE, SECRET_FILE
    from workflow.cli import main

    started = time.monotonic()
    pyproject = (ROOT / "pyproject.toml").read_bytes()
    out = tmp_path / "runs"
    assert deployment.tls is not None

    # The SuperLink's single port speaks TLS with the gen-certs.sh certificate for 127.0.0.1.
    cert = peer_certificate(deployment.superlink_port, deployment.tls.ca)
    assert ("IP Address", LOOPBACK) in cert["subjectAltName"], cert
    assert "insecure" not in (tmp_path / "flwr-home" / "config.toml").read_text()

    # Two SuperNodes that must be refused, started now and checked after the run (each exits
    # within seconds; the retry bounds only cap a wrong outcome): one signs with a key that was
    # never registered, one does not trust the CA.
    rogue_key, _ = write_supernode_key(tmp_path / "rogue" / "supernode")
    bounded = ["--max-retries", "2", "--max-wait-time", "30"]
    unregistered = deployment.start_supernode("probe-unregistered", f"partition-id=0 num-partitions={NODES}",
                                              auth_key=rogue_key, probe=True, extra_args=bounded)
    untrusting = deployment.start_supernode("probe-no-ca", f"partition-id=0 num-partitions={NODES}",
                                            trust_ca=False, probe=True, extra_args=bounded)

    # A run whose ServerApp fails: `flwr run` still exits 0 (submit_run checks that), only
    # `flwr list` tells. Submitted first, it fails while the real run goes on.
    bad_id = submit_run(deployment, ROOT, {**OVERRIDES, "dp.mode": "bogus", "output-dir": str(tmp_path / "bad")})
    run_id = submit_run(deployment, ROOT, {**OVERRIDES, "output-dir": str(out), "he.enabled": True,
                                           "he.public_context": str(keys / PUBLIC_FILE)})
    info = wait_for_run(deployment, run_id, timeout=600.0)
    require_completed(deployment, run_id, info)
    run_seconds = time.monotonic() - started
    bad = wait_for_run(deployment, bad_id, timeout=60.0)
    assert bad["status"] == "finished:failed", bad
    assert "dp.mode" in bad.get("status-details", ""), bad

    # Both rogue SuperNodes gave up at once (Flower's exit code 305, "Failed to initialize the
    # connection to the SuperLink"), each for its own reason; the SuperLink knows only the three
    # registered nodes.
    assert unregistered.wait_exit(60) != 0 and "Failed to activate SuperNode" in unregistered.log_tail()
    assert untrusting.wait_exit(60) != 0 and "CERTIFICATE_VERIFY_FAILED" in untrusting.log_tail()
    nodes = deployment.nodes()
    assert len(nodes) == NODES and all(n["status"] == "online" for n in nodes), nodes

    # flwr run migrates a legacy [tool.flwr.federations] block by rewriting pyproject.toml: there
    # is none, and the project file must stay untouched.
    assert (ROOT / "pyproject.toml").read_bytes() == pyproject, "flwr run modified pyproject.toml"
    # The FAB was installed into the throwaway FLWR_HOME.
    assert any((tmp_path / "flwr-home" / "apps").glob("facefl.facefl.*")), "FAB not installed in FLWR_HOME"

    runs = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(runs) == 1, f"expected one run directory under {out}, found {[p.name for p in runs]}"
    run = runs[0]

    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "finished", status
    assert status["rounds_completed"] == ROUNDS, status
    assert (run / "config.toml").is_file()

    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["fingerprint"] and len(manifest["clients"]) == NODES

    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rounds = [e for e in events if e["event"] == "round"]
    assert [e["round"] for e in rounds] == list(range(1, ROUNDS + 1)), events
    for e in rounds:
        assert sorted(c["partition"] for c in e["clients"]) == list(range(NODES)), e
        assert not e["failures"], e

    privacy = json.loads((run / "privacy.json").read_text())
    assert sorted(privacy["clients"]) == [str(p) for p in range(NODES)], privacy
    for pid, entry in privacy["clients"].items():
        assert entry["epsilon"] > 0 and entry["steps"] > 0, (pid, entry)
        # the accountant's history survived between rounds in the SuperNode's context.state
        assert entry["rounds"] == list(range(1, ROUNDS + 1)), (pid, entry)
    assert privacy["max_epsilon"] == pytest.approx(max(e["epsilon"] for e in privacy["clients"].values()))

    # The server stored only encrypted checkpoints; a key holder decrypts the final model.
    assert sorted(p.name for p in (run / "models").iterdir()) == (
        ["final.he.safetensors", "initial.safetensors"]  # the initial model is public
        + [f"round-{r:03d}.he.safetensors" for r in range(1, ROUNDS + 1)])
    assert all(e["encrypted"] and "verification_auc" not in e for e in rounds)
    assert main(["keys", "decrypt-model", str(run), "--key", str(keys / SECRET_FILE)]) == 0
    assert "verification_auc" in capsys.readouterr().out
    state, meta = load_checkpoint(run / "models" / "final.safetensors")
    assert state and meta["round"] == ROUNDS and meta["decrypted_from"] == "final.he.safetensors", meta
    # MOTE enrollment ran on the SuperNodes (each decrypted the final backbone itself).
    enrollment = json.loads((run / "mote" / "enrollment.json").read_text())
    assert enrollment["clients"] == NODES and not enrollment["failures"] and enrollment["identities"] > 0
    assert (run / "mote" / "gallery-b0.50.safetensors").is_file()

    # No server-side process ever opened the secret key, though the audit hook ran in each of them
    # (it saw the ServerApp open the public context); the ClientApps did open it.
    server = read_open_audit(tmp_path / SERVER_AUDIT)
    assert {"flower-superlink", "flower-superexec", "flwr-serverapp"} <= {e.program for e in server}, \
        sorted({e.program for e in server})
    assert any(e.program == "flwr-serverapp" for e in opened(server, keys / PUBLIC_FILE)), "hook missed the ServerApp"
    leaks = opened(server, keys / SECRET_FILE)
    assert not leaks, f"server side opened the secret key: {leaks[:5]}"
    node_side = read_open_audit(tmp_path / NODE_AUDIT)
    assert any(e.program == "flwr-clientapp" for e in opened(node_side, keys / SECRET_FILE)), \
        "no ClientApp opened the secret key: the audit would not have seen the server do it either"

    print(f"\ndeployment run {run_id}: {info['status']} in {run_seconds:.1f} s "
          f"(Flower elapsed {info.get('elapsed', 0):.1f} s)")
