"""``docker/gen-certs.sh``: the CA and SuperLink certificate the TLS deployment and the compose
files rely on. Checks the chain, the names a SuperNode dials, key permissions, a real TLS handshake
with Python's ssl (what Flower's httpx client uses), and that the script never overwrites or
half-writes anything."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography import x509
from support.keys import GEN_CERTS, Tls
from support.processes import LOOPBACK

FILES = ["ca.crt", "ca.key", "server.key", "server.pem"]


def gen(out: Path, *sans: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(GEN_CERTS), str(out), *sans], check=False, text=True, capture_output=True,
                          timeout=60, stdin=subprocess.DEVNULL, env=env)


def names(cert_path: Path) -> list[str]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [f"DNS:{n}" for n in sans.get_values_for_type(x509.DNSName)] + \
        [f"IP:{ip}" for ip in sans.get_values_for_type(x509.IPAddress)]


def handshake(tls: Tls, hostname: str) -> dict:
    """Serve server.pem/server.key on a loopback port and connect to it, trusting only ca.crt and
    checking ``hostname`` against the certificate; the peer certificate the client saw."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tls.cert, tls.key)
    client_ctx = ssl.create_default_context(cafile=str(tls.ca))
    with socket.create_server((LOOPBACK, 0)) as listener:
        listener.settimeout(10)

        def accept() -> None:
            conn, _ = listener.accept()
            # a client that rejects the certificate aborts the handshake: the client side reports it
            with conn, contextlib.suppress(ssl.SSLError), server_ctx.wrap_socket(conn, server_side=True) as tls_conn:
                tls_conn.recv(1)

        server = threading.Thread(target=accept, daemon=True)
        server.start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=10) as raw, \
                    client_ctx.wrap_socket(raw, server_hostname=hostname) as conn:
                peer = conn.getpeercert()
                conn.sendall(b"x")
        finally:
            server.join(10)
    return peer


@pytest.mark.timeout(60)
def test_writes_a_ca_and_a_server_certificate_that_tls_accepts(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    res = gen(out, "coordinator.example.org", "IP:10.0.0.5", "192.168.1.2")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == FILES  # no temp files, no serial file left
    for key in ("ca.key", "server.key"):
        assert stat.S_IMODE((out / key).stat().st_mode) == 0o600, key
    assert names(out / "server.pem") == ["DNS:superlink", "DNS:localhost", "DNS:coordinator.example.org",
                                         "IP:127.0.0.1", "IP:10.0.0.5", "IP:192.168.1.2"]
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server.verify_directly_issued_by(ca)

    tls = Tls(out)
    for host in ("127.0.0.1", "localhost", "superlink", "coordinator.example.org"):
        assert handshake(tls, host)["subject"] == ((("commonName", "superlink"),),)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(tls, "elsewhere.example.org")


@pytest.mark.timeout(60)
def test_refuses_to_overwrite_and_leaves_nothing_on_bad_input(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    out.mkdir()
    (out / "server.key").write_text("an operator's real key")
    res = gen(out)
    assert res.returncode != 0 and "refusing to overwrite" in res.stderr and "server.key" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["server.key"]
    assert (out / "server.key").read_text() == "an operator's real key"

    bad = gen(tmp_path / "bad", "two names")
    assert bad.returncode != 0 and "extra SAN 'two names'" in bad.stderr
    assert not (tmp_path / "bad").exists()

    usage = gen(tmp_path / "unused", env={**os.environ, "DAYS": "0"})
    assert usage.returncode != 0 and "DAYS" in usage.stderr
    no_dir = subprocess.run(["bash", str(GEN_CERTS)], check=False, text=True, capture_output=True, timeout=60)
    assert no_dir.returncode != 0 and "usage:" in no_dir.stderr
