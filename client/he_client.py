"""The client's side of encrypted aggregation: decrypt the global model, encrypt the update.

The secret context's path comes from the node configuration (``he-secret-context``, set on the
SuperNode), never from the server. Flower's simulation engine cannot give nodes their own
configuration, so there (one machine plays every role) the path may come from the environment
variable ``FACEFL_HE_SECRET_CONTEXT`` instead.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tenseal as ts
import torch
from flwr.app import ConfigRecord, RecordDict

from common import wire
from common.he.ckks import decrypt_mean, encrypt_weighted
from common.he.keys import fingerprint, load_secret_context
from common.he.selection import EncryptionLayout

SECRET_KEY_NODE_CONFIG = "he-secret-context"
SECRET_KEY_ENV = "FACEFL_HE_SECRET_CONTEXT"


@dataclass
class Encryption:
    """What a client needs to encrypt its reply: its context, key fingerprint and the layout."""

    ctx: ts.Context
    fingerprint: str
    layout: EncryptionLayout


@functools.lru_cache(maxsize=4)
def _load(path: str, mtime: float) -> tuple[ts.Context, str]:
    ctx = load_secret_context(path)
    return ctx, fingerprint(ctx)


def secret_context(node_config: Mapping[str, object]) -> tuple[ts.Context, str]:
    """This node's secret context and key fingerprint (loaded once per file version)."""
    path = str(node_config.get(SECRET_KEY_NODE_CONFIG) or os.environ.get(SECRET_KEY_ENV, ""))
    if not path:
        raise ValueError(f"node config: missing '{SECRET_KEY_NODE_CONFIG}' (he.enabled = true: set "
                         f"--node-config \"{SECRET_KEY_NODE_CONFIG}='/path/secret-context.bin' ...\" on the SuperNode)")
    p = Path(path)
    return _load(str(p.resolve()), p.stat().st_mtime if p.exists() else 0.0)


def decode_global(content: RecordDict, ctx: ts.Context, own_fingerprint: str,
                  template: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], EncryptionLayout]:
    """The global model of this round and the encryption layout, from a server message."""
    meta = content[wire.HE_META]
    theirs = str(meta[wire.FINGERPRINT])
    if theirs != own_fingerprint:
        raise ValueError(f"HE key fingerprint mismatch: the server aggregates under {theirs[:16]}..., this node's "
                         f"secret context is {own_fingerprint[:16]}... (check '{SECRET_KEY_NODE_CONFIG}')")
    shapes = {k: v.numpy() for k, v in template.items()}
    layout = EncryptionLayout.for_state(shapes, wire.record_to_numpy(content[wire.HE_MASK])["mask"])
    if wire.ARRAYS in content.array_records:
        return wire.record_to_state(content[wire.ARRAYS]), layout
    plain, ct = wire.record_to_payload(content[wire.HE_PAYLOAD], "server")
    mean = decrypt_mean(ctx, ct, layout.n_encrypted, int(meta[wire.TOTAL_WEIGHT]), "global model from the server")
    return {k: torch.from_numpy(v) for k, v in layout.merge(mean, plain.astype(np.float64)).items()}, layout


def encode_update(enc: Encryption, state: Mapping[str, torch.Tensor], num_examples: int) -> RecordDict:
    """The reply's encrypted part: plaintext share, ciphertexts of ``n * rest``, fingerprint."""
    secret, plain = enc.layout.split({k: v.detach().cpu().numpy() for k, v in state.items()})
    return RecordDict({wire.HE_PAYLOAD: wire.payload_to_record(plain, encrypt_weighted(enc.ctx, secret, num_examples)),
                       wire.HE_META: ConfigRecord({wire.FINGERPRINT: enc.fingerprint})})
