"""ECDH PSI over Curve25519: commutative blinding of hashed ids, both roles the same.

Group: the prime-order subgroup of Curve25519, points as 32-byte
u-coordinates; blinding is X25519 (libsodium's ``crypto_scalarmult`` through
PyNaCl). Hash to curve: RFC 9380 ``encode_to_curve`` for the suite
``curve25519_XMD:SHA-512_ELL2_NU_`` (expand_message_xmd with SHA-512, then
Elligator 2), with our own domain-separation tag. The RFC clears the cofactor
by multiplying by 8; X25519 clamps every secret to a multiple of 8, so
``X25519(k, u(Q)) = u([k/8]·[8]Q)``: each blinding applies a secret scalar to
the RFC's output point, and blindings commute.

Steps (docs/protocols.md, "Private set intersection"), the same for each party
with secret ``a`` and ids ``x``; the peer has ``b`` and ``y``:

1. executors: ``H(x)^a`` for each of my ids, per bucket, in a private random order
2. send them to the peer (stream ``ecdh_single``)
3. receive the peer's ``H(y)^b``
4. executors: raise them to ``a``: ``H(y)^(ab)``
5. if the peer learns the result: send those back in the order received (stream ``ecdh_double``)
6. if I learn the result: receive my ``H(x)^(ab)``, in my order
7. executors: my ids whose ``H(x)^(ab)`` is among the ``H(y)^(ab)``, bucket by bucket
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any, Callable, Iterator

import gmpy2
import numpy as np
import pyarrow as pa
from nacl.bindings import crypto_scalarmult

from fedps.algorithms.psi.buckets import numbered
from fedps.algorithms.psi.stream import PsiRun, Stream, check_same_counts, from_matrix, to_matrix
from fedps.errors import CryptoError

log = logging.getLogger(__name__)

DST = b"fedps-psi-v1-with-curve25519_XMD:SHA-512_ELL2_NU_"
POINT_BYTES = 32
SINGLE = Stream("ecdh_single", "either", "other", POINT_BYTES)
DOUBLE = Stream("ecdh_double", "either", "other", POINT_BYTES)

_P = gmpy2.mpz(2**255 - 19)
_A = gmpy2.mpz(486662)  # Curve25519: v^2 = u^3 + A u^2 + u
_Z = 2  # RFC 9380's Elligator 2 constant for curve25519
_L = 48  # bytes per field element: ceil((255 + 128) / 8)


def expand_message_xmd(msg: bytes, dst: bytes, length: int) -> bytes:
    """RFC 9380 section 5.3.1 with SHA-512."""
    if len(dst) > 255 or length > 255 * 64:
        raise CryptoError("expand_message_xmd: DST or output too long")
    dst_prime = dst + bytes([len(dst)])
    b0 = hashlib.sha512(bytes(128) + msg + length.to_bytes(2, "big") + b"\0" + dst_prime).digest()
    block = hashlib.sha512(b0 + b"\x01" + dst_prime).digest()
    out = block
    for i in range(2, -(-length // 64) + 1):
        block = hashlib.sha512(bytes(x ^ y for x, y in zip(b0, block)) + bytes([i]) + dst_prime).digest()
        out += block
    return out[:length]


def map_to_curve_u(field_element: int) -> int:
    """Elligator 2 onto Curve25519 (RFC 9380 section 6.7.1), u-coordinate only."""
    u = gmpy2.mpz(field_element)
    tv = _Z * u * u % _P
    if tv == _P - 1:  # the exceptional case: inv0(0) = 0, so x1 = -A
        tv = gmpy2.mpz(0)
    x1 = -_A * gmpy2.invert(tv + 1, _P) % _P
    gx1 = x1 * (x1 * (x1 + _A) + 1) % _P
    x = x1 if gmpy2.legendre(gx1, _P) >= 0 else (-x1 - _A) % _P
    return int(x)


def encode_to_curve(message: bytes, dst: bytes = DST) -> bytes:
    """The u-coordinate (32 bytes, little-endian) of the Elligator 2 point of ``message``.

    It differs from the RFC's output only by the cofactor 8, which the clamped
    X25519 scalar applies (see the module docstring).
    """
    field_element = int.from_bytes(expand_message_xmd(message, dst, _L), "big") % _P
    return map_to_curve_u(field_element).to_bytes(POINT_BYTES, "little")


def new_secret() -> bytes:
    return os.urandom(32)


def blind(secret: bytes, point: bytes) -> bytes:
    """X25519: the point raised to the (clamped) secret."""
    try:
        return crypto_scalarmult(secret, point)
    except Exception as exc:  # libsodium refuses small-order inputs
        raise CryptoError(f"refused a curve point of low order: {exc}") from None


def _hash_and_blind(secret: bytes) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch, seq in numbered(batches):
            ids = batch.column(batch.schema.get_field_index("id"))
            points = [blind(secret, encode_to_curve(i.encode())) for i in ids.to_pylist()]
            matrix = np.frombuffer(b"".join(points), dtype=np.uint8).reshape(len(points), POINT_BYTES)
            yield pa.RecordBatch.from_arrays(
                [batch.column(batch.schema.get_field_index("bucket")), pa.array(seq), ids,
                 from_matrix(matrix)], names=["bucket", "seq", "id", "value"])
    return run


def _blind_values(secret: bytes) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            matrix = to_matrix(batch.column(batch.schema.get_field_index("value")), POINT_BYTES)
            points = b"".join(blind(secret, row.tobytes()) for row in matrix)
            out = np.frombuffer(points, dtype=np.uint8).reshape(len(matrix), POINT_BYTES)
            yield pa.RecordBatch.from_arrays(
                [batch.column(batch.schema.get_field_index("bucket")),
                 batch.column(batch.schema.get_field_index("seq")), from_matrix(out)],
                names=["bucket", "seq", "value"])
    return run


MINE = "bucket int, seq long, id string, value binary"
VALUES = "seq long, value binary, bucket int"
DOUBLED = "bucket int, seq long, value binary"


def intersect(run: PsiRun, mine: Any) -> Any:
    """Run ECDH PSI; returns a DataFrame of my canonical ids in the intersection (``id``), or
    None when the configuration gives the result to the peer only."""
    secret = new_secret()
    with run.step("1_hash_and_blind"):
        run.write(mine.mapInArrow(_hash_and_blind(secret), MINE), "mine")
    with run.step("2_send_blinded"):
        run.send(SINGLE, "mine")
    with run.step("3_recv_peer_blinded"):
        run.stats["peer_ids"] = run.recv(SINGLE, "peer_single")
    with run.step("4_blind_peer"):
        run.write(run.read("peer_single", VALUES).mapInArrow(_blind_values(secret), DOUBLED),
                  "peer_double")
    if run.params.learns(run.peer_role):
        with run.step("5_send_double"):
            run.send(DOUBLE, "peer_double")
    if not run.params.learns(run.role):
        return None
    with run.step("6_recv_double"):
        run.recv(DOUBLE, "mine_double")
    check_same_counts(run, "mine", "mine_double")
    # 7. (lazy: runs when the output is written) match within each bucket
    doubled = run.read("mine", MINE).select("bucket", "seq", "id").join(
        run.read("mine_double", VALUES), ["bucket", "seq"])
    theirs = run.read("peer_double", VALUES).select("bucket", "value")
    return doubled.join(theirs, ["bucket", "value"], "left_semi").select("id")
