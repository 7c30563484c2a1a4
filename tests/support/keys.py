"""Keys for deployment-engine tests: TLS certificates from the project's ``docker/gen-certs.sh``
and SuperNode authentication key pairs.

Facts this relies on (Flower 1.41, verified; see docs/deploy.md):
- TLS: ``flower-superlink --ssl-ca-certfile --ssl-certfile --ssl-keyfile`` (certificates from
  ``docker/gen-certs.sh``), ``flower-supernode --root-certificates CA``, ``root-certificates`` in
  the CLI connection. A SuperNode that does not trust the CA gives up at once ("SSL/TLS handshake
  error detected", "CERTIFICATE_VERIFY_FAILED"); the ``flwr`` CLI only says "Connection to the
  SuperLink is unavailable" for a wrong CA, no CA or ``insecure = true``.
- SuperNode authentication: ``flower-superlink --enable-supernode-auth`` (TLS only) accepts only
  SuperNodes whose EC public key was registered with ``flwr supernode register KEY.pub CONNECTION``;
  each SuperNode signs its requests with ``--auth-supernode-private-key KEY`` (OpenSSH format, a
  NIST curve). An unregistered SuperNode exits: "[code: 2004] Failed to activate SuperNode.".
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GEN_CERTS = ROOT / "docker" / "gen-certs.sh"


@dataclass(frozen=True)
class Tls:
    """The files ``docker/gen-certs.sh`` writes into one directory."""

    dir: Path

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def cert(self) -> Path:
        return self.dir / "server.pem"

    @property
    def key(self) -> Path:
        return self.dir / "server.key"


def gen_certs(out: Path, *extra_sans: str, timeout: float = 60.0) -> Tls:
    """Run the project's real ``docker/gen-certs.sh OUT [SAN ...]`` (CA + SuperLink certificate)."""
    res = subprocess.run(["bash", str(GEN_CERTS), str(out), *extra_sans], check=False, text=True,
                         capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise RuntimeError(f"{GEN_CERTS} {out} -> exit {res.returncode}\n{res.stderr}")
    return Tls(out)


def write_supernode_key(stem: Path) -> tuple[Path, Path]:
    """A SuperNode authentication key pair: ``stem`` (private, 0600) and ``stem.pub``, EC P-384 in
    OpenSSH format, what ``ssh-keygen -t ecdsa -b 384 -N "" -f stem`` writes and what
    ``flower-supernode --auth-supernode-private-key`` / ``flwr supernode register`` read."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    stem.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(stem, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                  serialization.NoEncryption()))
    pub = stem.with_name(stem.name + ".pub")
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                  serialization.PublicFormat.OpenSSH) + b"\n")
    return stem, pub
