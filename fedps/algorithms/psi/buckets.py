"""Keys the two parties agree on, and the keyed-hash bucketing of ids.

Each party commits to a fresh random 32-byte share (SHA-256 over a domain
tag, the job, its name and the share), and only after it holds the peer's
commitment reveals the share; both derive, with HKDF-SHA256 over the two
shares (ordered by party name), an *order key* and a *bucket key*. The order
key's hash of an id is the output's ``psi_hash``: its sort order, and (a
range of it) the bucket the id falls in, so that each bucket's output is a
contiguous piece of the sorted whole. The bucket key names an incremental
PSI's epoch (:mod:`~fedps.algorithms.psi.incremental`). Neither party alone
chooses them, and the commitment stops the second to reveal from choosing
its share after seeing the first's, so neither can steer an id of its
choice into a bucket of its choice; the broker never sees the shares (the
channel seals them).

Within a bucket each party orders its ids by a keyed hash under a private key
that never leaves it (:func:`private_order`, kept in its resume state so a
restarted party sends the same order), so the position of a value in a
stream says nothing about the id behind it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedps.algorithms.psi.ids import ID
from fedps.errors import ProtocolError
from fedps.messaging.tags import Message, Scope

COMMIT = Message("key_share_commitment", "either", "other", dict)
SHARE = Message("key_share", "either", "other", np.ndarray)
_SHARE_BYTES = 32
_HMAC_BLOCK = 64  # bytes: SHA-256's block


@dataclass(frozen=True)
class PsiKeys:
    bucket: bytes
    order: bytes


def commitment(job: str, party: str, share: bytes) -> str:
    """The hex SHA-256 a party sends before its share."""
    return hashlib.sha256(b"fedps/psi/v1/share-commitment\0" + f"{job}\0{party}\0".encode()
                          + share).hexdigest()


def agree_keys(channel: Any, scope: Scope, me: str, peer: str) -> PsiKeys:
    """Commit to a random share, exchange commitments, then shares, and derive the shared keys."""
    mine = os.urandom(_SHARE_BYTES)
    channel.send(scope.tag(COMMIT.name), COMMIT.check({"sha256": commitment(scope.job, me, mine)}))
    promised = COMMIT.check(channel.recv(scope.tag(COMMIT.name))).get("sha256")
    channel.send(scope.tag(SHARE.name), SHARE.check(np.frombuffer(mine, dtype=np.uint8)))
    theirs = SHARE.check(channel.recv(scope.tag(SHARE.name)))
    if theirs.dtype != np.uint8 or theirs.shape != (_SHARE_BYTES,):
        raise ProtocolError(f"{peer}'s key share is not {_SHARE_BYTES} bytes")
    if not isinstance(promised, str) or not hmac.compare_digest(
            promised, commitment(scope.job, peer, theirs.tobytes())):
        raise ProtocolError(f"{peer}'s key share does not match the commitment it sent first")
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
    """:func:`bucket_of_hash` of the id's keyed hash."""
    return bucket_of_hash(keyed_hash(key, canonical_id), buckets)


def bucket_of_hash(value: bytes, buckets: int) -> int:
    """The first 4 bytes, big-endian, scaled onto ``0..buckets-1``: bucket ``b`` holds one contiguous
    range of hashes, so the buckets in order hold the hashes in order (the output is written a
    bucket at a time, :mod:`~fedps.algorithms.psi.output`)."""
    return (int.from_bytes(value[:4], "big") * buckets) >> 32


def keyed_hash_column(key: bytes, column: Any) -> Any:
    """:func:`keyed_hash` of a string column, computed by Spark (binary, 32 bytes).

    HMAC-SHA256 spelled out with Spark's own ``sha2``, so the ids never pass
    through Python: ``H((K ^ opad) || H((K ^ ipad) || m))`` (RFC 2104).
    """
    from pyspark.sql import functions as F

    if len(key) > _HMAC_BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(_HMAC_BLOCK, b"\0")
    inner = F.unhex(F.lit(bytes(k ^ 0x36 for k in key).hex()))
    outer = F.unhex(F.lit(bytes(k ^ 0x5C for k in key).hex()))
    digest = F.unhex(F.sha2(F.concat(inner, F.encode(column, "UTF-8")), 256))
    return F.unhex(F.sha2(F.concat(outer, digest), 256))


def bucket_of_hash_column(hashed: Any, buckets: int) -> Any:
    """:func:`bucket_of_hash` of a binary column, computed by Spark (first 4 bytes * buckets < 2^48)."""
    from pyspark.sql import functions as F

    first4 = F.conv(F.hex(F.substring(hashed, 1, 4)), 16, 10).cast("long")
    return F.shiftright(first4 * F.lit(buckets), 32).cast("int")


def bucket_column(key: bytes, column: Any, buckets: int) -> Any:
    """:func:`bucket_of` of a string column, computed by Spark."""
    return bucket_of_hash_column(keyed_hash_column(key, column), buckets)


#: Columns the staging adds to a party's rows (``stream.IDS`` in the work folder, by bucket).
BUCKET, HASH = "_psi_bucket", "psi_hash"


def staged(frame: Any, order_key: bytes, buckets: int) -> Any:
    """The party's rows with ``psi_hash`` (the output's keyed hash) and ``_psi_bucket`` (its range
    of that hash).

    ``frame`` has the canonical id column ``_psi_id``. The hash runs in
    Spark's JVM; the rows are staged whole, so that the task serving a bucket
    writes that bucket's output rows itself.
    """
    from pyspark.sql import functions as F

    cores = frame.sparkSession.sparkContext.defaultParallelism
    if frame.rdd.getNumPartitions() < cores:  # one small file is one task: spread the hashing
        frame = frame.repartition(cores)
    frame = frame.withColumn(HASH, keyed_hash_column(order_key, F.col(ID)))
    return frame.select(*(F.col(f"`{c}`") for c in frame.columns if c != BUCKET),
                        bucket_of_hash_column(F.col(HASH), buckets).alias(BUCKET))


def private_order(shuffle_key: bytes, hashes: list[bytes]) -> list[bytes]:
    """A place for each id in an order only this party knows: keyed BLAKE2b of its ``psi_hash``
    (the peer knows the order key, so ``psi_hash`` order is not private; this is)."""
    return [hashlib.blake2b(h, digest_size=16, key=shuffle_key).digest() for h in hashes]
