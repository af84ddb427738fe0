"""RSA blind-signature PSI: the key holder signs blinded ids, the other side unblinds.

Hashes: ``FDH(x)`` is a full-domain hash into Z_n: SHAKE-256 over a domain
tag, the modulus and the canonical id, ``|n| + 128`` bits long, reduced mod n
(bias below 2^-128). ``T(s)`` is SHA-256 over another domain tag and the
signature as ``|n|``-byte big-endian. The key holder signs with CRT (gmpy2).

Steps (docs/protocols.md, "Private set intersection"); the *signer* holds the
key (``params.rsa_key_holder``), the *requester* is the other party:

1. signer: a fresh RSA key; sends the public key ``(n, e)``
2. signer, executors: tags ``T(FDH(y)^d)`` of its own ids
   requester, executors: ``r^e * FDH(x) mod n`` for each id, ``r`` fresh and kept
3. requester -> signer: the blinded values (stream ``rsa_blinded``)
4. signer, executors: their signatures ``r * FDH(x)^d``; -> requester in the same order
   (stream ``rsa_signed``)
5. signer -> requester: its tags (stream ``rsa_tags``)
6. requester, executors: unblind, check ``s^e = FDH(x)``, tag, and match within each bucket
7. if the signer learns the result: requester -> signer: the matched tags (stream
   ``rsa_matched``), which the signer maps to its own ids
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import gmpy2
import numpy as np
import pyarrow as pa
from cryptography.hazmat.primitives.asymmetric import rsa as rsa_keys

from fedps.algorithms.psi.buckets import numbered
from fedps.algorithms.psi.stream import PsiRun, Stream, check_same_counts, from_matrix, to_matrix
from fedps.errors import CryptoError, ProtocolError
from fedps.messaging.tags import Message

log = logging.getLogger(__name__)

FDH_TAG = b"fedps-psi-v1-rsa-fdh"
TAG_TAG = b"fedps-psi-v1-rsa-tag"
TAG_BYTES = 32
PUBLIC_KEY = Message("rsa_public_key", "signer", "requester", dict)
TAGS = Stream("rsa_tags", "signer", "requester", TAG_BYTES)
MATCHED = Stream("rsa_matched", "requester", "signer", TAG_BYTES)


def blinded_stream(width: int) -> Stream:
    return Stream("rsa_blinded", "requester", "signer", width)


def signed_stream(width: int) -> Stream:
    return Stream("rsa_signed", "signer", "requester", width)


@dataclass(frozen=True)
class PublicKey:
    n: int
    e: int

    @property
    def width(self) -> int:
        return (self.n.bit_length() + 7) // 8

    def fdh(self, canonical_id: str) -> Any:
        """Full-domain hash of an id into Z_n."""
        digest = hashlib.shake_256(FDH_TAG + self.n.to_bytes(self.width, "big") + canonical_id.encode())
        return gmpy2.mpz(int.from_bytes(digest.digest(self.width + 16), "big")) % self.n


@dataclass(frozen=True)
class PrivateKey:
    public: PublicKey
    p: int
    q: int
    dp: int
    dq: int
    q_inv: int

    @classmethod
    def generate(cls, bits: int) -> PrivateKey:
        numbers = rsa_keys.generate_private_key(65537, bits).private_numbers()
        return cls(PublicKey(numbers.public_numbers.n, numbers.public_numbers.e),
                   numbers.p, numbers.q, numbers.dmp1, numbers.dmq1, numbers.iqmp)

    def sign(self, m: Any) -> Any:
        """``m^d mod n`` by CRT."""
        p, q = gmpy2.mpz(self.p), gmpy2.mpz(self.q)
        sp = gmpy2.powmod(m % p, self.dp, p)
        sq = gmpy2.powmod(m % q, self.dq, q)
        return sq + q * (self.q_inv * (sp - sq) % p)


def tag(signature: Any, width: int) -> bytes:
    return hashlib.sha256(TAG_TAG + int(signature).to_bytes(width, "big")).digest()


def _matrix(values: list[bytes], width: int) -> pa.Array:
    return from_matrix(np.frombuffer(b"".join(values), dtype=np.uint8).reshape(len(values), width))


def _col(batch: pa.RecordBatch, name: str) -> pa.Array:
    return batch.column(batch.schema.get_field_index(name))


def _blind(key: PublicKey) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        n, w = gmpy2.mpz(key.n), key.width
        for batch, seq in numbered(batches):
            blinded, inverses = [], []
            for canonical_id in _col(batch, "id").to_pylist():
                r = gmpy2.mpz(int.from_bytes(os.urandom(w + 16), "big")) % n
                inverses.append(int(gmpy2.invert(r, n)).to_bytes(w, "big"))
                blinded.append(int(gmpy2.powmod(r, key.e, n) * key.fdh(canonical_id) % n).to_bytes(w, "big"))
            yield pa.RecordBatch.from_arrays(
                [_col(batch, "bucket"), pa.array(seq), _col(batch, "id"), _matrix(blinded, w),
                 _matrix(inverses, w)], names=["bucket", "seq", "id", "value", "r_inv"])
    return run


def _sign(key: PrivateKey) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        w, n = key.public.width, key.public.n
        for batch in batches:
            signed = []
            for row in to_matrix(_col(batch, "value"), w):
                m = int.from_bytes(row.tobytes(), "big")
                if not 0 < m < n:
                    raise ProtocolError("a blinded value is not in Z_n")
                signed.append(int(key.sign(gmpy2.mpz(m))).to_bytes(w, "big"))
            yield pa.RecordBatch.from_arrays([_col(batch, "bucket"), _col(batch, "seq"), _matrix(signed, w)],
                                             names=["bucket", "seq", "value"])
    return run


def _own_tags(key: PrivateKey) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        w = key.public.width
        for batch, seq in numbered(batches):
            tags = [tag(key.sign(key.public.fdh(i)), w) for i in _col(batch, "id").to_pylist()]
            yield pa.RecordBatch.from_arrays([_col(batch, "bucket"), pa.array(seq), _col(batch, "id"),
                                              _matrix(tags, TAG_BYTES)], names=["bucket", "seq", "id", "value"])
    return run


def _unblind(key: PublicKey) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        n, w = gmpy2.mpz(key.n), key.width
        for batch in batches:
            tags = []
            ids = _col(batch, "id").to_pylist()
            signed, inverses = to_matrix(_col(batch, "value"), w), to_matrix(_col(batch, "r_inv"), w)
            for canonical_id, s_row, r_row in zip(ids, signed, inverses):
                s = gmpy2.mpz(int.from_bytes(s_row.tobytes(), "big")) * int.from_bytes(r_row.tobytes(), "big") % n
                if gmpy2.powmod(s, key.e, n) != key.fdh(canonical_id):
                    raise ProtocolError("the key holder returned a wrong signature")
                tags.append(tag(s, w))
            yield pa.RecordBatch.from_arrays([_col(batch, "bucket"), _col(batch, "id"), _matrix(tags, TAG_BYTES)],
                                             names=["bucket", "id", "value"])
    return run


MINE_BLINDED = "bucket int, seq long, id string, value binary, r_inv binary"
MINE_TAGS = "bucket int, seq long, id string, value binary"
VALUES = "seq long, value binary, bucket int"
SIGNED = "bucket int, seq long, value binary"
OWN_TAGS = "id string, value binary, bucket int"


def intersect(run: PsiRun, mine: Any) -> Any:
    """Run RSA PSI; returns a DataFrame of my canonical ids in the intersection (``id``), or None."""
    if run.role == run.params.rsa_key_holder:
        return _signer(run, mine)
    return _requester(run, mine)


def _signer(run: PsiRun, mine: Any) -> Any:
    with run.step("1_key"):
        key = PrivateKey.generate(run.params.rsa_bits)
        public = {"n": format(key.public.n, "x"), "e": key.public.e}
        run.channel.send(run.scope.tag(PUBLIC_KEY.name), PUBLIC_KEY.check(public))
    with run.step("2_own_tags"):
        run.write(mine.mapInArrow(_own_tags(key), MINE_TAGS), "mine")
    with run.step("3_recv_blinded"):
        run.stats["peer_ids"] = run.recv(blinded_stream(key.public.width), "peer_blinded")
    with run.step("4_sign"):
        run.write(run.read("peer_blinded", VALUES).mapInArrow(_sign(key), SIGNED), "peer_signed")
        run.send(signed_stream(key.public.width), "peer_signed")
    with run.step("5_send_tags"):
        run.send(TAGS, "mine")
    if not run.params.learns(run.role):
        return None
    with run.step("7_recv_matched"):
        run.recv(MATCHED, "matched")
    matched = run.read("matched", VALUES).select("bucket", "value")
    return run.read("mine", MINE_TAGS).join(matched, ["bucket", "value"], "left_semi").select("id")


def _requester(run: PsiRun, mine: Any) -> Any:
    with run.step("1_key"):
        raw = PUBLIC_KEY.check(run.channel.recv(run.scope.tag(PUBLIC_KEY.name), timeout=run.wait_s))
        key = _check_public(raw, run.params.rsa_bits)
    with run.step("2_blind"):
        run.write(mine.mapInArrow(_blind(key), MINE_BLINDED), "mine")
    with run.step("3_send_blinded"):
        run.send(blinded_stream(key.width), "mine")
    with run.step("4_recv_signed"):
        run.recv(signed_stream(key.width), "mine_signed")
    with run.step("5_recv_tags"):
        run.stats["peer_ids"] = run.recv(TAGS, "peer_tags")
    with run.step("6_unblind_and_match"):
        check_same_counts(run, "mine", "mine_signed")
        signed = run.read("mine_signed", VALUES)
        joined = run.read("mine", MINE_BLINDED).drop("value").join(signed, ["bucket", "seq"])
        run.write(joined.mapInArrow(_unblind(key), "bucket int, id string, value binary"), "mine_tags")
        theirs = run.read("peer_tags", VALUES).select("bucket", "value")
        matched = run.read("mine_tags", OWN_TAGS).join(theirs, ["bucket", "value"], "left_semi")
    if run.params.learns(run.peer_role):
        with run.step("7_send_matched"):
            ordered = (matched.select("bucket", "value").repartition(run.params.buckets, "bucket")
                       .sortWithinPartitions("bucket", "value"))
            run.write(ordered.mapInArrow(_numbered_values, SIGNED), "matched")
            run.send(MATCHED, "matched")
    return matched.select("id")


def _numbered_values(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    for batch, seq in numbered(batches):
        yield pa.RecordBatch.from_arrays([_col(batch, "bucket"), pa.array(seq), _col(batch, "value")],
                                         names=["bucket", "seq", "value"])


def _check_public(raw: dict, bits: int) -> PublicKey:
    try:
        key = PublicKey(int(raw["n"], 16), int(raw["e"]))
    except (KeyError, TypeError, ValueError):
        raise ProtocolError("the key holder's RSA public key is malformed") from None
    if key.n.bit_length() != bits or key.e < 3 or key.e % 2 == 0 or key.e.bit_length() > 32:
        raise CryptoError(f"the key holder's RSA key has {key.n.bit_length()} bits and e = {key.e}; "
                          f"expected {bits} bits (job.params.rsa_bits) and a small odd e")
    return key
