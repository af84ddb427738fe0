"""Keys the two parties agree on, and the keyed-hash bucketing of ids.

Each party sends a fresh random 32-byte share; both derive, with HKDF-SHA256
over the two shares (ordered by party name), a *bucket key* (which bucket an
id falls in) and an *order key* (the sort order of the output). Neither party
alone chooses them, so neither can steer an id of its choice into a bucket of
its choice; the broker never sees the shares (the channel seals them).

Within a bucket each party orders its ids by a keyed hash under a private key
that never leaves it, so the position of a value in a stream says nothing
about the id behind it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedps.algorithms.psi.ids import ID
from fedps.errors import ProtocolError
from fedps.messaging.tags import Message, Scope

SHARE = Message("key_share", "either", "other", np.ndarray)
_SHARE_BYTES = 32


@dataclass(frozen=True)
class PsiKeys:
    bucket: bytes
    order: bytes


def agree_keys(channel: Any, scope: Scope, me: str, peer: str) -> PsiKeys:
    """Exchange random shares with the peer and derive the shared keys."""
    mine = os.urandom(_SHARE_BYTES)
    channel.send(scope.tag(SHARE.name), SHARE.check(np.frombuffer(mine, dtype=np.uint8)))
    theirs = SHARE.check(channel.recv(scope.tag(SHARE.name)))
    if theirs.dtype != np.uint8 or theirs.shape != (_SHARE_BYTES,):
        raise ProtocolError(f"{peer}'s key share is not {_SHARE_BYTES} bytes")
    return derive_keys({me: mine, peer: theirs.tobytes()}, scope.job)


def derive_keys(shares: dict[str, bytes], job: str) -> PsiKeys:
    """HKDF-SHA256 over both parties' shares, ordered by party name."""
    material = b"".join(shares[name] for name in sorted(shares))
    salt = f"fedps/psi/v1/{job}".encode()

    def derive(label: bytes) -> bytes:
        return HKDF(hashes.SHA256(), 32, salt, b"fedps/psi/" + label).derive(material)

    return PsiKeys(bucket=derive(b"bucket"), order=derive(b"order"))


def keyed_hash(key: bytes, canonical_id: str) -> bytes:
    """HMAC-SHA256 of a canonical id."""
    return hmac.new(key, canonical_id.encode(), hashlib.sha256).digest()


def bucket_of(key: bytes, canonical_id: str, buckets: int) -> int:
    return int.from_bytes(keyed_hash(key, canonical_id)[:8], "big") % buckets


def bucketed(frame: Any, bucket_key: bytes, buckets: int) -> Any:
    """``(bucket, _order, id)``: one Spark partition per bucket, each in a private random order.

    ``frame`` has the canonical id column ``_psi_id``. The order key is fresh
    per call and never leaves this party.
    """
    private = os.urandom(32)

    def assign(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            ids = batch.column(0).to_pylist()
            yield pa.RecordBatch.from_arrays(
                [pa.array([bucket_of(bucket_key, i, buckets) for i in ids], pa.int32()),
                 pa.array([keyed_hash(private, i)[:8] for i in ids], pa.binary()),
                 batch.column(0)],
                names=["bucket", "_order", "id"])

    schema = "bucket int, _order binary, id string"
    return (frame.select(ID).mapInArrow(assign, schema)
            .repartition(buckets, "bucket")
            .sortWithinPartitions("bucket", "_order"))


def numbered(batches: Iterator[pa.RecordBatch]) -> Iterator[tuple[pa.RecordBatch, np.ndarray]]:
    """Each batch of a bucketed partition with ``seq``: the row's place within its bucket.

    Rows of one bucket arrive together and in order (see :func:`bucketed`).
    """
    next_seq: dict[int, int] = {}
    for batch in batches:
        buckets = batch.column(batch.schema.get_field_index("bucket")).to_numpy()
        seq = np.empty(len(buckets), dtype=np.int64)
        for row, bucket in enumerate(buckets):
            seq[row] = next_seq.get(bucket, 0)
            next_seq[bucket] = seq[row] + 1
        yield batch, seq
