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
from typing import Any, Callable

import gmpy2
import numpy as np
import pyarrow as pa
from cryptography.hazmat.primitives.asymmetric import rsa as rsa_keys

from fedps.algorithms.psi.stream import (IDS, PsiRun, Stream, check_same_counts, from_matrix, is_in,
                                         to_matrix)
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


def _blind(key: PublicKey) -> Callable[[int, dict[str, pa.Table]], pa.Table]:
    """Requester, step 2 for one bucket: ``r^e * FDH(x)`` for my ids in private order, and ``r^-1``."""
    def run(bucket: int, tables: dict[str, pa.Table]) -> pa.Table:
        n, w = gmpy2.mpz(key.n), key.width
        ids = tables[IDS].column("id")
        blinded, inverses = [], []
        for canonical_id in ids.to_pylist():
            r = gmpy2.mpz(int.from_bytes(os.urandom(w + 16), "big")) % n
            inverses.append(int(gmpy2.invert(r, n)).to_bytes(w, "big"))
            blinded.append(int(gmpy2.powmod(r, key.e, n) * key.fdh(canonical_id) % n).to_bytes(w, "big"))
        return pa.table({"seq": np.arange(len(ids), dtype=np.int64), "id": ids,
                         "value": _matrix(blinded, w), "r_inv": _matrix(inverses, w)})
    return run


def _sign(key: PrivateKey) -> Callable[[int, dict[str, pa.Table]], pa.Table]:
    """Signer, step 4 for one bucket: the requester's blinded values signed, in the order received."""
    def run(bucket: int, tables: dict[str, pa.Table]) -> pa.Table:
        w, n = key.public.width, key.public.n
        signed = []
        for row in to_matrix(tables["peer_blinded"].column("value"), w):
            m = int.from_bytes(row.tobytes(), "big")
            if not 0 < m < n:
                raise ProtocolError("a blinded value is not in Z_n")
            signed.append(int(key.sign(gmpy2.mpz(m))).to_bytes(w, "big"))
        return pa.table({"seq": np.arange(len(signed), dtype=np.int64), "value": _matrix(signed, w)})
    return run


def _own_tags(key: PrivateKey) -> Callable[[int, dict[str, pa.Table]], pa.Table]:
    """Signer, step 2 for one bucket: ``T(FDH(y)^d)`` for my ids in private order."""
    def run(bucket: int, tables: dict[str, pa.Table]) -> pa.Table:
        w = key.public.width
        ids = tables[IDS].column("id")
        tags = [tag(key.sign(key.public.fdh(i)), w) for i in ids.to_pylist()]
        return pa.table({"seq": np.arange(len(ids), dtype=np.int64), "id": ids,
                         "value": _matrix(tags, TAG_BYTES)})
    return run


def _unblind_and_match(key: PublicKey) -> Callable[[int, dict[str, pa.Table]], pa.Table]:
    """Requester, step 6 for one bucket: unblind, check and tag my signatures; keep those the
    signer's tags include, as ``(seq, id, value)`` sorted by tag so the order says nothing."""
    def run(bucket: int, tables: dict[str, pa.Table]) -> pa.Table:
        n, w = gmpy2.mpz(key.n), key.width
        mine = tables["mine"]
        signed = to_matrix(tables["mine_signed"].column("value"), w)
        inverses = to_matrix(mine.column("r_inv"), w)
        tags = []
        for canonical_id, s_row, r_row in zip(mine.column("id").to_pylist(), signed, inverses):
            s = gmpy2.mpz(int.from_bytes(s_row.tobytes(), "big")) * int.from_bytes(r_row.tobytes(), "big") % n
            if gmpy2.powmod(s, key.e, n) != key.fdh(canonical_id):
                raise ProtocolError("the key holder returned a wrong signature")
            tags.append(tag(s, w))
        values = _matrix(tags, TAG_BYTES)
        keep = pa.array(is_in(values, tables["peer_tags"].column("value"), TAG_BYTES))
        matched = pa.table({"id": mine.column("id").filter(keep), "value": values.filter(keep)})
        matched = matched.sort_by("value")
        return matched.append_column("seq", pa.array(np.arange(matched.num_rows, dtype=np.int64)))
    return run


def _own_matches(bucket: int, tables: dict[str, pa.Table]) -> pa.Table:
    """Signer, step 8 for one bucket: my ids whose tags the requester matched."""
    mine = tables["mine"]
    keep = is_in(mine.column("value"), tables["matched"].column("value"), TAG_BYTES)
    return pa.table({"id": mine.column("id").filter(pa.array(keep))})


def intersect(run: PsiRun) -> Any:
    """Run RSA PSI; returns a DataFrame of my canonical ids in the intersection (``id``), or None."""
    if run.role == run.params.rsa_key_holder:
        return _signer(run)
    return _requester(run)


def _signer(run: PsiRun) -> Any:
    with run.step("1_key"):
        key = PrivateKey.generate(run.params.rsa_bits)
        public = {"n": format(key.public.n, "x"), "e": key.public.e}
        run.channel.send(run.scope.tag(PUBLIC_KEY.name), PUBLIC_KEY.check(public))
    with run.step("2_own_tags"):
        run.map_buckets(_own_tags(key), {IDS: ["id"]}, "mine")
    with run.step("3_recv_blinded"):
        run.stats["peer_ids"] = run.recv(blinded_stream(key.public.width), "peer_blinded")
    with run.step("4_sign"):
        run.map_buckets(_sign(key), {"peer_blinded": ["value"]}, "peer_signed")
        run.send(signed_stream(key.public.width), "peer_signed")
    with run.step("5_send_tags"):
        run.send(TAGS, "mine")
    if not run.params.learns(run.role):
        return None
    with run.step("7_recv_matched"):
        run.recv(MATCHED, "matched")
    with run.step("8_match"):
        run.map_buckets(_own_matches, {"mine": ["id", "value"], "matched": ["value"]}, "matched_ids")
    return run.read("matched_ids", "id string, bucket int").select("id")


def _requester(run: PsiRun) -> Any:
    with run.step("1_key"):
        raw = PUBLIC_KEY.check(run.channel.recv(run.scope.tag(PUBLIC_KEY.name), timeout=run.wait_s))
        key = _check_public(raw, run.params.rsa_bits)
    with run.step("2_blind"):
        run.map_buckets(_blind(key), {IDS: ["id"]}, "mine")
    with run.step("3_send_blinded"):
        run.send(blinded_stream(key.width), "mine")
    with run.step("4_recv_signed"):
        run.recv(signed_stream(key.width), "mine_signed")
    with run.step("5_recv_tags"):
        run.stats["peer_ids"] = run.recv(TAGS, "peer_tags")
    with run.step("6_unblind_and_match"):
        check_same_counts(run, "mine", "mine_signed")
        run.map_buckets(_unblind_and_match(key), {"mine": ["id", "r_inv"], "mine_signed": ["value"],
                                                  "peer_tags": ["value"]}, "matched")
    if run.params.learns(run.peer_role):
        with run.step("7_send_matched"):
            run.send(MATCHED, "matched")
    return run.read("matched", "id string, bucket int").select("id")


def _check_public(raw: dict, bits: int) -> PublicKey:
    try:
        key = PublicKey(int(raw["n"], 16), int(raw["e"]))
    except (KeyError, TypeError, ValueError):
        raise ProtocolError("the key holder's RSA public key is malformed") from None
    if key.n.bit_length() != bits or key.e < 3 or key.e % 2 == 0 or key.e.bit_length() > 32:
        raise CryptoError(f"the key holder's RSA key has {key.n.bit_length()} bits and e = {key.e}; "
                          f"expected {bits} bits (job.params.rsa_bits) and a small odd e")
    return key
