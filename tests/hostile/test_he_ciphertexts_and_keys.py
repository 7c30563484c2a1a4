"""Hostile CKKS ciphertexts (what a client sends the server) and HE key contexts.

See the package docstring for the properties every test checks.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from .conftest import Scratch, fuzz

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")]


N_VALUES = 2100  # 2 ciphertexts of 2048 and 53 slots at N = 4096


@pytest.fixture(scope="module")
def he_setup(he_contexts) -> dict[str, Any]:
    from common.he.ckks import encrypt_weighted

    keys, secret, public, _ = he_contexts
    values = np.random.default_rng(0).normal(size=N_VALUES)
    return {"keys": keys, "secret": secret, "public": public,
            "good": encrypt_weighted(secret, values, 3), "other": encrypt_weighted(secret, values, 5)}


def _proto_fields(raw: bytes) -> dict[int, bytes]:
    """Field number -> encoded field (tag included) of a serialised TenSEAL CKKSVector: 1 the slot
    count, 2 the ciphertext, 3 the scale (a valid vector has exactly these, once each)."""
    from common.he.ckks import _varint

    out, i = {}, 0
    while i < len(raw):
        start = i
        tag, i = _varint(raw, i)
        n, i = _varint(raw, i) if tag & 7 == 2 else (8, i)
        out[tag >> 3] = raw[start:i + n]
        i += n
    return out


@st.composite
def hostile_ciphertexts(draw: st.DrawFn, good: Any) -> tuple[np.ndarray, np.ndarray]:
    """A client's (blob, lengths): one ciphertext bit-flipped, truncated, replaced by random bytes
    or by a crafted protobuf (no ciphertext, two, a lying size field), parts dropped, duplicated
    or swapped, or a length table that lies (negative, zero, int64 sums that wrap around, wrong
    dtype or shape)."""
    parts = list(good.split("good"))
    k = draw(st.integers(0, len(parts) - 1))
    how = draw(st.sampled_from(["flip", "truncate", "random", "proto", "order", "lengths", "dtype"]))
    if how == "flip":
        part = bytearray(parts[k])
        for pos, mask in draw(st.lists(st.tuples(st.integers(0, len(part) - 1), st.integers(1, 255)), min_size=1,
                                       max_size=5)):
            part[pos] ^= mask
        parts[k] = bytes(part)
    elif how == "truncate":
        parts[k] = parts[k][: draw(st.integers(1, len(parts[k]) - 1))]
    elif how == "random":
        parts[k] = draw(st.binary(min_size=1, max_size=300))
    elif how == "proto":
        fields = _proto_fields(parts[k])
        ciphertext, other = fields[2], _proto_fields(parts[1 - k])[2]
        body = draw(st.sampled_from([[], [ciphertext], [ciphertext, ciphertext], [ciphertext, other], [other]]))
        size = draw(st.sampled_from([fields[1], b"\n\x03\xff\xff\x03", b"\n\x01\x00"]))
        scale = draw(st.sampled_from([fields[3], b"", fields[3] * 2, b"\x19" + struct.pack("<d", 2.0**41),
                                      b"\x19" + struct.pack("<d", np.nextafter(2.0**40, 0))]))
        parts[k] = size + b"".join(body) + scale
    elif how == "order":
        parts = draw(st.sampled_from([parts[::-1], parts[:1], parts + parts[-1:], []]))
    if how == "lengths":
        lengths = np.array(draw(st.one_of(
            st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3),
            st.just([2**63 - 1, 2**63 - 1, 2 + sum(map(len, parts))]),  # wraps to the blob's size
            st.just([len(parts[0]) - 10, len(parts[1]) + 10]), st.just([0, sum(map(len, parts))]))), dtype=np.int64)
        blob = np.frombuffer(b"".join(parts), dtype=np.uint8).copy()
        return blob, lengths
    packed = good.pack(parts) if parts else type(good)(np.zeros(0, np.uint8), np.zeros(0, np.int64))
    if how == "dtype":
        return draw(st.sampled_from([(packed.blob.astype(np.int64), packed.lengths),
                                     (packed.blob, packed.lengths.astype(np.int32)),
                                     (packed.blob, packed.lengths.astype(np.float64)),
                                     (packed.blob.reshape(1, -1), packed.lengths)]))
    return packed.blob, packed.lengths


@fuzz(150)
@given(data=st.data())
def test_hostile_ciphertexts_are_refused_naming_the_client(he_setup, data: st.DataObject) -> None:
    """The server parses every client's ciphertexts with its public context before adding them:
    a bad payload is a CiphertextError naming the client. What parses is added to an honest
    client's ciphertexts, and the key holder decrypts the sum or gets a CiphertextError; none of
    it crashes TenSEAL (a vector without ciphertext used to pass and then segfault when added)."""
    from common.he.ckks import (
        CiphertextError,
        Ciphertexts,
        EncryptedSum,
        decrypt_mean,
        parse,
    )

    blob, lengths = data.draw(hostile_ciphertexts(he_setup["good"]), label="payload")
    try:
        vectors = parse(he_setup["public"], Ciphertexts(blob, lengths), N_VALUES, "client 7 (node 9)")
    except CiphertextError as exc:
        event("refused: " + str(exc)[20:50])
        assert str(exc).startswith("client 7 (node 9): "), str(exc)[:300]
        return
    event("parsed")
    total = EncryptedSum(he_setup["public"], N_VALUES)
    total.add(parse(he_setup["public"], he_setup["other"], N_VALUES, "honest"), 5)
    total.add(vectors, 3)
    try:
        mean = decrypt_mean(he_setup["secret"], total.serialize(), N_VALUES, 8, "sum")
    except CiphertextError as exc:
        assert str(exc).startswith("sum: ")
    else:
        assert mean.shape == (N_VALUES,)


def test_length_table_whose_int64_sum_wraps_is_refused(he_setup) -> None:
    """Lengths 2^63-1, 2^63-1, size+2 sum to the blob's size modulo 2^64: the framing used to pass."""
    from common.he.ckks import CiphertextError, Ciphertexts

    blob = he_setup["good"].blob
    lengths = np.array([2**63 - 1, 2**63 - 1, blob.size + 2], dtype=np.int64)
    assert int(lengths.sum()) == blob.size  # what the old check compared
    with pytest.raises(CiphertextError, match="^c: ciphertext lengths"):
        Ciphertexts(blob, lengths).split("c")


def test_vector_without_ciphertext_is_refused_before_tenseal_touches_it(he_setup, tmp_path: Path) -> None:
    """TenSEAL parses a CKKSVector protobuf with a slot count but no ciphertext; adding it to
    a sum segfaults the server (checked in a child process), so ``parse`` must refuse it."""
    from common.he.ckks import CiphertextError, Ciphertexts, parse

    parts = he_setup["good"].split("good")
    empty = [_proto_fields(p)[1] for p in parts]
    with pytest.raises(CiphertextError, match="^client 3: ciphertext 0 holds 0 ciphertexts"):
        parse(he_setup["public"], Ciphertexts.pack(empty), N_VALUES, "client 3")
    script = ("import sys, tenseal as ts; ctx = ts.context_from(open(sys.argv[1], 'rb').read()); "
              "good = ts.ckks_vector_from(ctx, open(sys.argv[2], 'rb').read()); "
              "good.add_(ts.ckks_vector_from(ctx, open(sys.argv[3], 'rb').read()))")
    (tmp_path / "good.bin").write_bytes(parts[0])
    (tmp_path / "empty.bin").write_bytes(empty[0])
    proc = subprocess.run([sys.executable, "-c", script, str(he_setup["keys"] / "public-context.bin"),
                           str(tmp_path / "good.bin"), str(tmp_path / "empty.bin")],
                          capture_output=True, timeout=60, check=False)
    assert proc.returncode != 0  # -11 (SIGSEGV) with tenseal 0.3.18: why the guard exists


@fuzz(40)
@given(data=st.data())
def test_damaged_key_files_name_the_file(he_setup, data: st.DataObject, scratch: Scratch) -> None:
    """A damaged secret or public context (or a public context whose key.json is damaged) is an
    HEKeyError naming the file, or a context of the right kind (secret for clients, public with
    a 64-hex fingerprint for the server)."""
    import tenseal as ts

    from common.he.keys import (
        KEY_INFO_FILE,
        PUBLIC_FILE,
        SECRET_FILE,
        HEKeyError,
        load_public_context,
        load_secret_context,
    )

    directory = scratch.new()
    for name in (SECRET_FILE, PUBLIC_FILE, KEY_INFO_FILE):
        shutil.copy(he_setup["keys"] / name, directory / name)
    target = directory / data.draw(st.sampled_from([SECRET_FILE, PUBLIC_FILE, KEY_INFO_FILE]), label="file")
    raw = bytearray(target.read_bytes())
    how = data.draw(st.sampled_from(["flip", "truncate", "random"]), label="how")
    if how == "flip":
        for pos, mask in data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(1, 255)), min_size=1,
                                            max_size=4)):
            raw[pos] ^= mask
    elif how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        raw = bytearray(data.draw(st.binary(max_size=200)))
    target.write_bytes(bytes(raw))
    for load, path in ((load_secret_context, directory / SECRET_FILE), (load_public_context, directory / PUBLIC_FILE)):
        try:
            got = load(path)
        except HEKeyError as exc:
            assert str(exc).startswith((f"{path}: ", f"{directory / KEY_INFO_FILE}: ")), str(exc)[:300]
        else:
            ctx = got[0] if isinstance(got, tuple) else got
            assert ctx.has_secret_key() == (load is load_secret_context)
            assert isinstance(got, ts.Context) or re.fullmatch("[0-9a-f]{64}", got[1])
            assert ctx.global_scale > 0  # a CKKS context with a scale, usable for encryption


def test_context_without_global_scale_is_refused(tmp_path: Path) -> None:
    """A BFV context, or CKKS without a scale, used to load and fail later on every client's
    ciphertexts with 'no global scale'."""
    import tenseal as ts

    from common.he.keys import HEKeyError, load_secret_context

    path = tmp_path / "secret-context.bin"
    path.write_bytes(ts.context(ts.SCHEME_TYPE.CKKS, 4096, coeff_mod_bit_sizes=[60, 49],
                                encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC).serialize(save_secret_key=True))
    with pytest.raises(HEKeyError, match=re.escape(f"{path}: not a CKKS context with a global scale")):
        load_secret_context(path)
