"""CKKS-encrypted weighted sums: what clients encrypt, what the server adds, what clients decrypt.

A client multiplies its flattened update by its sample count n (the only multiplication, done
in plaintext: with one data level, a ciphertext-plaintext product would exceed the scale),
appends n itself as a *canary* slot, and packs the vector into N/2-slot ciphertexts (one per
chunk, not per layer, so that a 64-value bias does not cost a whole ciphertext). The server
parses each client's ciphertexts with the public context, checks their number and sizes, and
adds them into one running sum, client by client, so its memory holds one client's ciphertexts
and the accumulator whatever the number of clients. Clients decrypt the sum, check that the
canary slot decrypts to the total sample count the server announced in plaintext (a key
mismatch decrypts to noise instead of raising), and divide.

On the wire a list of ciphertexts is two arrays: the concatenated serialisations (uint8) and
their lengths (int64), which travel in a Flower ArrayRecord like any other tensor.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tenseal as ts

CANARY_TOLERANCE = 1e-4
"""Relative tolerance of the canary check (CKKS error at scale 2^40 is about 1e-9)."""


class CiphertextError(ValueError):
    """Ciphertext bytes that do not parse, do not fit the expected layout, or decrypt wrongly."""


@dataclass
class Ciphertexts:
    """Serialised CKKS vectors as two arrays: concatenated bytes and each vector's length."""

    blob: np.ndarray
    lengths: np.ndarray

    @classmethod
    def pack(cls, parts: Sequence[bytes]) -> Ciphertexts:
        lengths = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
        return cls(np.frombuffer(b"".join(parts), dtype=np.uint8).copy(), lengths)

    @property
    def nbytes(self) -> int:
        return int(self.blob.nbytes + self.lengths.nbytes)

    def split(self, who: str) -> list[bytes]:
        """The serialised vectors; raises CiphertextError when the framing is inconsistent."""
        blob, lengths = np.asarray(self.blob), np.asarray(self.lengths)
        if blob.dtype != np.uint8 or blob.ndim != 1:
            raise CiphertextError(f"{who}: ciphertext blob must be 1-D uint8, got {blob.dtype} {blob.shape}")
        if lengths.dtype != np.int64 or lengths.ndim != 1:
            raise CiphertextError(f"{who}: ciphertext lengths must be 1-D int64, got {lengths.dtype} {lengths.shape}")
        total = sum(lengths.tolist())  # Python ints: an int64 sum of hostile lengths can wrap around
        if (lengths <= 0).any() or total != blob.size:
            raise CiphertextError(f"{who}: ciphertext lengths (sum {total}) do not frame the "
                                  f"{blob.size} bytes received (truncated or corrupt payload)")
        raw = blob.tobytes()
        ends = np.cumsum(lengths)
        return [raw[e - n:e] for n, e in zip(lengths.tolist(), ends.tolist(), strict=True)]


def slot_count(ctx: ts.Context) -> int:
    return ctx.seal_context().data.first_context_data().parms().poly_modulus_degree() // 2


def chunk_sizes(n_values: int, slots: int) -> list[int]:
    """Slots used by each ciphertext for ``n_values`` values plus the canary."""
    total = n_values + 1
    return [min(slots, total - i * slots) for i in range(math.ceil(total / slots))]


def encrypt_weighted(ctx: ts.Context, values: np.ndarray, weight: int) -> Ciphertexts:
    """Encrypt ``weight * values`` and the canary ``weight`` with a client's secret context."""
    if weight <= 0:
        raise ValueError(f"encrypt_weighted: weight must be > 0, got {weight}")
    x = np.concatenate([np.asarray(values, dtype=np.float64).ravel() * weight, [float(weight)]])
    slots = slot_count(ctx)
    return Ciphertexts.pack([ts.ckks_vector(ctx, x[i:i + slots]).serialize() for i in range(0, x.size, slots)])


# The protobuf fields of a serialised CKKSVector (tenseal 0.3.18, pinned exactly): 1 the slot
# count, 2 a SEAL ciphertext, 3 the vector's scale (a double). TenSEAL accepts messages without a
# ciphertext (adding one to a sum segfaults), with several (decrypting them fails to allocate), or
# whose scale differs from the ciphertext's (adding fails half-way through a client's vectors, after
# part of it joined the sum), so the layout is checked before TenSEAL sees the bytes.
_VECTOR_FIELDS = {1: 2, 2: 2, 3: 1}  # field number -> protobuf wire type (2 length-delimited, 1 64-bit)


def _varint(raw: bytes, i: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 70, 7):
        if i >= len(raw):
            raise ValueError("truncated varint")
        value, i = value | (raw[i] & 0x7F) << shift, i + 1
        if raw[i - 1] < 0x80:
            return value, i
    raise ValueError("varint longer than 10 bytes")


def _layout_problem(raw: bytes, scale: float) -> str | None:
    """Why ``raw`` is not one CKKSVector message with exactly one of each field at ``scale`` (None if it is)."""
    counts = dict.fromkeys(_VECTOR_FIELDS, 0)
    vector_scale = math.nan
    i = 0
    try:
        while i < len(raw):
            tag, i = _varint(raw, i)
            number, wire = tag >> 3, tag & 7
            if _VECTOR_FIELDS.get(number) != wire:
                return f"has an unexpected protobuf field {number} of wire type {wire}"
            n, i = _varint(raw, i) if wire == 2 else (8, i)
            if i + n > len(raw):
                return "is truncated"
            if number == 3:
                (vector_scale,) = struct.unpack("<d", raw[i:i + n])
            counts[number] += 1
            i += n
    except ValueError as exc:
        return f"is not a CKKS vector ({exc})"
    if any(c != 1 for c in counts.values()):
        return (f"holds {counts[2]} ciphertexts, {counts[1]} slot counts and {counts[3]} scales, expected one of "
                "each")
    if vector_scale != scale:  # TenSEAL adds only vectors of exactly equal scales
        return f"declares scale {vector_scale!r}, expected {scale!r}"
    return None


def parse(ctx: ts.Context, ct: Ciphertexts, n_values: int, who: str) -> list[ts.CKKSVector]:
    """Deserialise a client's ciphertexts and check that they fit ``n_values`` values + canary."""
    parts = ct.split(who)
    sizes = chunk_sizes(n_values, slot_count(ctx))
    if len(parts) != len(sizes):
        raise CiphertextError(f"{who}: {len(parts)} ciphertexts, expected {len(sizes)} for {n_values} values")
    vectors = []
    scale = ctx.global_scale
    for i, (raw, size) in enumerate(zip(parts, sizes, strict=True)):
        problem = _layout_problem(raw, scale)
        if problem:
            raise CiphertextError(f"{who}: ciphertext {i} {problem}")
        try:
            v = ts.ckks_vector_from(ctx, raw)
            cts = v.ciphertext()
        except (ValueError, RuntimeError, TypeError, MemoryError) as exc:
            raise CiphertextError(f"{who}: ciphertext {i} does not parse ({exc})") from None
        if len(cts) != 1 or cts[0].size() != 2:  # a fresh (or summed) ciphertext has two polynomials
            raise CiphertextError(f"{who}: ciphertext {i} holds {len(cts)} SEAL ciphertexts, expected one of "
                                  f"2 polynomials")
        if v.size() != size or cts[0].scale != scale:
            raise CiphertextError(f"{who}: ciphertext {i} has {v.size()} slots at scale "
                                  f"{cts[0].scale!r}, expected {size} at {scale!r}")
        vectors.append(v)
    return vectors


class EncryptedSum:
    """Running sum of clients' encrypted weighted updates, built with a public context."""

    def __init__(self, ctx: ts.Context, n_values: int) -> None:
        self.ctx = ctx
        self.n_values = n_values
        self.parts: list[ts.CKKSVector] | None = None
        self.total_weight = 0

    def add(self, vectors: list[ts.CKKSVector], weight: int) -> None:
        """Add one client's parsed ciphertexts in place (no second accumulator is ever allocated;
        ``copy()`` would also duplicate the context). The first client's vectors become the sum."""
        if self.parts is None:
            self.parts = vectors
        else:
            for acc, v in zip(self.parts, vectors, strict=True):
                acc.add_(v)
        self.total_weight += weight

    def serialize(self) -> Ciphertexts:
        if self.parts is None:
            raise ValueError("EncryptedSum: nothing was added")
        return Ciphertexts.pack([v.serialize() for v in self.parts])


def decrypt_mean(ctx: ts.Context, ct: Ciphertexts, n_values: int, total_weight: int, who: str) -> np.ndarray:
    """Decrypt an encrypted weighted sum and divide by ``total_weight`` (the announced total).

    Raises CiphertextError when the canary slot does not decrypt to ``total_weight``: one of the
    summed ciphertexts was made with another key, or this holder's key is not the clients'.
    """
    if not ctx.has_secret_key():
        raise CiphertextError(f"{who}: decrypting needs the secret context; this one is public")
    x = np.concatenate([np.asarray(v.decrypt(), dtype=np.float64) for v in parse(ctx, ct, n_values, who)])
    canary = x[-1]
    if not abs(canary - total_weight) <= CANARY_TOLERANCE * max(1.0, float(total_weight)):
        raise CiphertextError(f"{who}: the canary slot decrypts to {canary:.6g}, expected the total sample count "
                              f"{total_weight}: the aggregate was encrypted with another key than this one")
    return x[:-1] / total_weight
