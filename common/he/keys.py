"""CKKS key provisioning: one secret context for the clients, one public context for the server.

The clients of a consortium share one CKKS secret key: each encrypts its weighted update with it
and decrypts the aggregate the server returns. The server gets a context without the secret key,
with which it can add ciphertexts but not decrypt them. Addition is all FedAvg needs, so the
default parameters (N = 4096, coefficient moduli [60, 49] bits, scale 2^40, symmetric
encryption) keep a single data level and cost about 8x the float32 bytes (measured in
STACK-NOTES; relinearisation and Galois keys are never generated, since nothing is multiplied
or rotated).

A wrong key fails silently in CKKS (the sum of ciphertexts of two keys decrypts to noise), so
every party carries a *fingerprint* of the key: a domain-separated SHA-256 of the serialised
secret key. The secret key is high-entropy, so its hash reveals nothing about it. A symmetric
public context holds no key material at all (it is the same bytes for every key of the same
parameters), so the server cannot derive the fingerprint: it reads it from ``key.json``, written
beside the public context by ``facefl keys init``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import tenseal as ts

from common.runs.io import atomic_write_bytes, atomic_write_json, read_json

SECRET_FILE = "secret-context.bin"
PUBLIC_FILE = "public-context.bin"
KEY_INFO_FILE = "key.json"


class HEKeyError(ValueError):
    """A key file is missing, malformed, or the wrong kind for its holder; the message names it."""


@dataclass(frozen=True)
class KeyParams:
    """CKKS parameters. ``coeff_bits`` lists the moduli bit sizes; ``scale_bits`` the encoding scale."""

    poly_modulus: int = 4096
    coeff_bits: tuple[int, ...] = (60, 49)
    scale_bits: int = 40

    def validate(self) -> KeyParams:
        if self.poly_modulus not in (4096, 8192, 16384, 32768):
            raise ValueError(f"--poly-modulus: expected 4096, 8192, 16384 or 32768, got {self.poly_modulus}")
        if len(self.coeff_bits) < 2 or any(not 20 <= b <= 60 for b in self.coeff_bits):
            raise ValueError(f"--coeff-bits: expected at least two sizes in 20..60, got {list(self.coeff_bits)}")
        # SEAL's 128-bit security bound on the total modulus for each N.
        limit = {4096: 109, 8192: 218, 16384: 438, 32768: 881}[self.poly_modulus]
        if sum(self.coeff_bits) > limit:
            raise ValueError(f"--coeff-bits: total {sum(self.coeff_bits)} bits exceeds {limit} bits, the 128-bit "
                             f"security bound for poly modulus {self.poly_modulus}")
        if not 20 <= self.scale_bits < min(self.coeff_bits[0], sum(self.coeff_bits[1:])) + 1:
            raise ValueError(f"--scale-bits: expected 20..{min(self.coeff_bits[0], sum(self.coeff_bits[1:]))} "
                             f"for coefficient moduli {list(self.coeff_bits)}, got {self.scale_bits}")
        return self

    @property
    def slots(self) -> int:
        return self.poly_modulus // 2


_FINGERPRINT_DOMAIN = b"facefl-ckks-secret-key-fingerprint-v1\0"


def fingerprint(ctx: ts.Context) -> str:
    """Fingerprint of a secret context's key (clients, key holders)."""
    if not ctx.has_secret_key():
        raise HEKeyError("fingerprint: needs the secret context; the server reads the fingerprint from key.json")
    raw = ctx.serialize(save_public_key=False, save_secret_key=True, save_galois_keys=False, save_relin_keys=False)
    return hashlib.sha256(_FINGERPRINT_DOMAIN + raw).hexdigest()


def _public_bytes(ctx: ts.Context) -> bytes:
    return ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False)


def generate(params: KeyParams) -> ts.Context:
    """A fresh secret CKKS context for addition-only aggregation."""
    params.validate()
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, params.poly_modulus, coeff_mod_bit_sizes=list(params.coeff_bits),
                     encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC)
    ctx.global_scale = 2.0 ** params.scale_bits
    return ctx


def write_keys(out: str | os.PathLike[str], params: KeyParams) -> dict[str, str]:
    """Write the secret context (mode 0600), the public context and key.json into ``out``.

    Refuses to overwrite existing keys: replacing a consortium's key silently would make every
    client's later ciphertexts undecryptable by the others.
    """
    out_dir = Path(out)
    for name in (SECRET_FILE, PUBLIC_FILE, KEY_INFO_FILE):
        if (out_dir / name).exists():
            raise FileExistsError(f"{out_dir / name}: keys already exist here; choose another --out")
    ctx = generate(params)
    secret = ctx.serialize(save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False)
    atomic_write_bytes(out_dir / SECRET_FILE, secret)
    os.chmod(out_dir / SECRET_FILE, 0o600)
    atomic_write_bytes(out_dir / PUBLIC_FILE, _public_bytes(ctx))
    info = {"fingerprint": fingerprint(ctx), **asdict(params), "secret": SECRET_FILE, "public": PUBLIC_FILE}
    atomic_write_json(out_dir / KEY_INFO_FILE, info)
    return info


def _read_context(path: str | os.PathLike[str], what: str) -> ts.Context:
    p = Path(path)
    if not p.is_file():
        raise HEKeyError(f"{p}: {what} not found")
    try:
        ctx = ts.context_from(p.read_bytes())
    except (ValueError, RuntimeError, TypeError, MemoryError) as exc:
        raise HEKeyError(f"{p}: not a TenSEAL context ({str(exc)[:200]})") from None
    except OSError as exc:
        raise HEKeyError(f"{p}: cannot read {what} ({exc.strerror or exc})") from None
    try:
        ctx.global_scale
    except ValueError:
        raise HEKeyError(f"{p}: not a CKKS context with a global scale (make keys with `facefl keys init`)") from None
    return ctx


def load_secret_context(path: str | os.PathLike[str]) -> ts.Context:
    """A client's context; must hold the secret key."""
    ctx = _read_context(path, "HE secret context")
    if not ctx.has_secret_key():
        raise HEKeyError(f"{path}: this context holds no secret key (it is the server's public context; clients "
                        f"need {SECRET_FILE})")
    return ctx


def load_public_context(path: str | os.PathLike[str]) -> tuple[ts.Context, str]:
    """The server's context and the key fingerprint from the ``key.json`` beside it.

    A context that holds a secret key is refused, so the server can never decrypt.
    """
    ctx = _read_context(path, "HE public context")
    if ctx.has_secret_key():
        raise HEKeyError(f"{path}: this context holds the secret key; the server must be given {PUBLIC_FILE} only")
    info_path = Path(path).parent / KEY_INFO_FILE
    try:
        info = read_json(info_path)
        fp = info["fingerprint"]
    except (FileNotFoundError, ValueError, KeyError, TypeError) as exc:
        raise HEKeyError(f"{info_path}: the key fingerprint must sit beside the public context, in {KEY_INFO_FILE} "
                         f"from `facefl keys init` ({exc})") from None
    if not (isinstance(fp, str) and len(fp) == 64 and all(c in "0123456789abcdef" for c in fp)):
        raise HEKeyError(f"{info_path}: 'fingerprint' must be 64 hex digits, got {fp!r}")
    return ctx, fp


def he_overrides(keys_dir: str | os.PathLike[str]) -> list[str]:
    """Configuration overrides that turn HE on with the public context of ``facefl keys init --out DIR``."""
    return ["he.enabled=true", f"he.public_context={(Path(keys_dir) / PUBLIC_FILE).resolve()}"]
