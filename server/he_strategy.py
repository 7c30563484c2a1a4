"""FedAvg over CKKS-encrypted updates: the server adds ciphertexts it cannot read.

Each client sends its plaintext share (the entries the selective-encryption mask leaves in the
clear) and the encryption of ``n * update`` for the rest, with its key fingerprint and sample
count in plaintext. The server checks the fingerprint against its public context's, parses and
checks every ciphertext of one client, adds them to the running sum and lets them go before the
next client's, so the memory of the aggregation does not grow with the number of clients. The
result, handed back to the clients in the next round, is the encrypted sum, the total sample
count (so clients can divide after decrypting) and the weighted mean of the plaintext share.
"""

from __future__ import annotations

import logging

import numpy as np
import tenseal as ts
from flwr.app import ArrayRecord, ConfigRecord, Message

from common import wire
from common.config import Config
from common.he.ckks import Ciphertexts, EncryptedSum, chunk_sizes, parse, slot_count
from common.he.keys import load_public_context
from common.he.selection import (
    EncryptionLayout,
    fisher_diagonal,
    top_fraction_mask,
)
from common.nn.face_model import FaceModel
from common.runs.io import atomic_write_json
from common.runs.rundir import RunDir
from common.train.fedavg import weighted_average
from common.train.pretraining import Pretrained
from server.strategy import ClientReply, FaceFedAvg, StrategySettings, record

log = logging.getLogger(__name__)

HEADER_BYTES = 4096
"""Room for the TenSEAL / SEAL headers of one ciphertext, and for the npy header of the blob."""


class KeyMismatchError(RuntimeError):
    """A client encrypted with another key and the run is configured to fail on it."""


def ciphertext_max_bytes(ctx: ts.Context) -> int:
    """An upper bound of one serialised CKKS vector under ``ctx``: 2 polynomials of N coefficients
    for each prime of the first data level, 8 bytes each, plus headers (N = 4096, [60, 49]:
    65,675 bytes for 65,536 of coefficients; SEAL's compression only makes it smaller)."""
    data = ctx.seal_context().data.first_context_data()
    return 2 * data.parms().poly_modulus_degree() * (data.chain_index() + 1) * 8 + HEADER_BYTES


class EncryptedReply(ClientReply):
    """A client's encrypted update, parsed with the server's public context and checked."""

    def __init__(self, msg: Message, partition: int, ctx: ts.Context, server_fingerprint: str,
                 layout: EncryptionLayout, max_ciphertext_bytes: int, examples: int | None = None) -> None:
        """``max_ciphertext_bytes``: the most the layout's ciphertexts can take, checked before
        the payload is decoded."""
        super().__init__(msg, partition, examples)
        meta = record(msg.content, "config", wire.HE_META, self.who)
        theirs = str(meta[wire.FINGERPRINT])
        if theirs != server_fingerprint:
            raise KeyMismatchError(f"{self.who}: HE key fingerprint {theirs[:16]}... differs from the server's "
                                   f"{server_fingerprint[:16]}...: this node holds another secret key")
        payload = record(msg.content, "array", wire.HE_PAYLOAD, self.who)
        if "ciphertext" in payload and (size := len(payload["ciphertext"].data)) > max_ciphertext_bytes:
            raise ValueError(f"{self.who}: {size} bytes of ciphertext, the layout's {layout.n_encrypted} encrypted "
                             f"values take at most {max_ciphertext_bytes}")
        self.plain, ct = wire.record_to_payload(payload, self.who)
        if self.plain.shape != (layout.n_plain,) or self.plain.dtype != np.float32 or not np.isfinite(self.plain).all():
            raise ValueError(f"{self.who}: plaintext share must be {layout.n_plain} finite float32 values, "
                             f"got {self.plain.dtype} of shape {self.plain.shape}")
        self.vectors = parse(ctx, ct, layout.n_encrypted, self.who)


class HEFedAvg(FaceFedAvg):
    """``FaceFedAvg`` whose aggregate is an encrypted weighted sum plus a plaintext mean."""

    def __init__(self, settings: StrategySettings, *, ctx: ts.Context, key_fingerprint: str, layout: EncryptionLayout,
                 on_key_mismatch: str) -> None:
        super().__init__(settings)
        if ctx.has_secret_key():
            raise ValueError("HEFedAvg: the server's context must not hold the secret key")
        self.ctx = ctx
        self.fingerprint = key_fingerprint
        self.layout = layout
        self.on_key_mismatch = on_key_mismatch
        self.total_weight = 0  # of the current encrypted global model (0: it is still plaintext)
        ciphertexts = len(chunk_sizes(layout.n_encrypted, slot_count(ctx)))
        self.max_ciphertext_bytes = ciphertexts * ciphertext_max_bytes(ctx) + HEADER_BYTES
        self._sum: EncryptedSum | None = None
        self._plain: list[tuple[int, np.ndarray]] = []

    def model_content(self, arrays: ArrayRecord) -> dict[str, ArrayRecord | ConfigRecord]:
        """The mask, the key fingerprint and the global model: plaintext before the first
        aggregation (the public pretrained model), the encrypted sum and its total weight after."""
        content = {wire.HE_MASK: wire.numpy_to_record({"mask": self.layout.mask.astype(np.uint8)}),
                   wire.HE_META: ConfigRecord({wire.FINGERPRINT: self.fingerprint, wire.TOTAL_WEIGHT: self.total_weight})}
        content[wire.HE_PAYLOAD if self.total_weight else wire.ARRAYS] = arrays
        return content

    def start_aggregation(self) -> None:
        self._sum = EncryptedSum(self.ctx, self.layout.n_encrypted)
        self._plain = []

    def valid_update_bytes(self) -> int:
        """The size of a valid encrypted update: the plaintext share and the layout's ciphertexts."""
        return 4 * self.layout.n_plain + self.max_ciphertext_bytes

    def accept(self, msg: Message, partition: int) -> ClientReply:
        try:
            reply = EncryptedReply(msg, partition, self.ctx, self.fingerprint, self.layout, self.max_ciphertext_bytes,
                                   self.examples.get(partition))
        except KeyMismatchError as exc:
            if self.on_key_mismatch == "fail":
                raise
            raise ValueError(str(exc)) from None
        assert self._sum is not None
        self._sum.add(reply.vectors, reply.num_examples)
        self._plain.append((reply.num_examples, reply.plain))
        del reply.vectors  # the sum holds what is needed; this client's ciphertexts can go
        return reply

    def combine(self) -> ArrayRecord:
        assert self._sum is not None
        plain = weighted_average([(n, {"plain": values}) for n, values in self._plain])["plain"]
        ct: Ciphertexts = self._sum.serialize()
        self._sum, self._plain, self.total_weight = None, [], self._sum.total_weight
        return wire.payload_to_record(plain, ct)


def he_strategy(cfg: Config, model: FaceModel, pretrained: Pretrained | None, run: RunDir,
                settings: StrategySettings) -> HEFedAvg:
    """The HE strategy for this run; records in ``he.json`` what the server can and cannot see."""
    ctx, key_fingerprint = load_public_context(cfg.he.public_context)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    layout = EncryptionLayout.for_state(state)
    criterion = "all"
    if cfg.he.encrypt_fraction < 1:
        assert pretrained is not None  # Config.validate requires public data for selection
        sensitivity = fisher_diagonal(model, pretrained.head, pretrained.public, cfg)
        layout = EncryptionLayout.for_state(state, top_fraction_mask(layout, sensitivity, cfg.he.encrypt_fraction))
        criterion = "fisher-diagonal on public data"
    strategy = HEFedAvg(settings, ctx=ctx, key_fingerprint=key_fingerprint, layout=layout,
                        on_key_mismatch=cfg.he.on_key_mismatch)
    atomic_write_json(run.he_path, {
        "fingerprint": strategy.fingerprint, "encrypt_fraction": cfg.he.encrypt_fraction, "criterion": criterion,
        "values": int(layout.mask.size), "encrypted": layout.n_encrypted, "plaintext": layout.n_plain,
        "server_sees": "the plaintext share of each client's update, sample counts, metrics and privacy "
                       "histories; the encrypted share only as a sum" if layout.n_plain else
                       "sample counts, metrics and privacy histories; every parameter only as an encrypted sum",
        "tensors": layout.visibility()})
    log.info("HE: %d of %d values encrypted (key %s...)", layout.n_encrypted, layout.mask.size, strategy.fingerprint[:16])
    return strategy
