"""RSA blind-signature PSI: the key holder signs blinded ids, the other side unblinds.

Hashes: ``FDH(x)`` is a full-domain hash into Z_n: SHAKE-256 over a domain
tag, the modulus and the canonical id, ``|n| + 128`` bits long, reduced mod n
(bias below 2^-128). ``T(s)`` is SHA-256 over another domain tag and the
signature as ``|n|``-byte big-endian. The key holder signs with CRT (gmpy2).

Steps (docs/protocols.md, "Private set intersection"); the *signer* holds the
key (``params.rsa_key_holder``), the *requester* is the other party. Step 1
runs in the drivers, over the channel; the others run per bucket, in the
process serving the bucket, over the bucket's partition of the PSI link:

1. signer: a fresh RSA key; sends the public key ``(n, e)``
2. signer: tags ``T(FDH(y)^d)`` of its own ids, in a private order (kept in ``mine``),
   sent to the requester (stream ``rsa_tags``)
   requester: ``r^e * FDH(x) mod n`` for each id, ``r`` fresh and kept (in ``mine``)
3. requester -> signer: the blinded values (stream ``rsa_blinded``)
4. signer: their signatures ``r * FDH(x)^d``; -> requester in the same order
   (stream ``rsa_signed``)
5. requester: receives the signer's tags
6. requester: unblind, check ``s^e = FDH(x)``, tag, and match within the bucket
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

from fedps.algorithms.psi.stream import BucketIO, Stream, from_matrix, is_in, to_matrix, with_seq
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


def _blind(key: PublicKey, ids: pa.Table) -> pa.Table:
    """Requester, step 2: ``r^e * FDH(x)`` for my ids in private order, and ``r^-1``."""
    n, w = gmpy2.mpz(key.n), key.width
    column = ids.column("id")
    blinded, inverses = [], []
    for canonical_id in column.to_pylist():
        r = gmpy2.mpz(int.from_bytes(os.urandom(w + 16), "big")) % n
        inverses.append(int(gmpy2.invert(r, n)).to_bytes(w, "big"))
        blinded.append(int(gmpy2.powmod(r, key.e, n) * key.fdh(canonical_id) % n).to_bytes(w, "big"))
    return with_seq({"id": column, "value": _matrix(blinded, w), "r_inv": _matrix(inverses, w)})


def _sign(key: PrivateKey, blinded: pa.Array) -> pa.Array:
    """Signer, step 4: the requester's blinded values signed, in the order received."""
    w, n = key.public.width, key.public.n
    signed = []
    for row in to_matrix(blinded, w):
        m = int.from_bytes(row.tobytes(), "big")
        if not 0 < m < n:
            raise ProtocolError("a blinded value is not in Z_n")
        signed.append(int(key.sign(gmpy2.mpz(m))).to_bytes(w, "big"))
    return _matrix(signed, w)


def _own_tags(key: PrivateKey, ids: pa.Table) -> pa.Table:
    """Signer, step 2: ``T(FDH(y)^d)`` for my ids in private order."""
    w = key.public.width
    column = ids.column("id")
    tags = [tag(key.sign(key.public.fdh(i)), w) for i in column.to_pylist()]
    return with_seq({"id": column, "value": _matrix(tags, TAG_BYTES)})


def _unblind_and_match(key: PublicKey, mine: pa.Table, signed: pa.Array, peer_tags: pa.Array) -> pa.Table:
    """Requester, step 6: unblind, check and tag my signatures; keep those the signer's tags
    include, as ``(id, value)`` sorted by tag so the order says nothing."""
    n, w = gmpy2.mpz(key.n), key.width
    inverses = to_matrix(mine.column("r_inv"), w)
    tags = []
    for canonical_id, s_row, r_row in zip(mine.column("id").to_pylist(), to_matrix(signed, w), inverses):
        s = gmpy2.mpz(int.from_bytes(s_row.tobytes(), "big")) * int.from_bytes(r_row.tobytes(), "big") % n
        if gmpy2.powmod(s, key.e, n) != key.fdh(canonical_id):
            raise ProtocolError("the key holder returned a wrong signature")
        tags.append(tag(s, w))
    values = _matrix(tags, TAG_BYTES)
    keep = pa.array(is_in(values, peer_tags, TAG_BYTES))
    return pa.table({"id": mine.column("id").filter(keep), "value": values.filter(keep)}).sort_by("value")


def serve_signer(key: PrivateKey, i_learn: bool) -> Callable[[BucketIO], None]:
    def run(io: BucketIO) -> None:
        w = key.public.width
        mine = io.kept("mine", lambda: _own_tags(key, io.ids()))               # 2
        io.send(TAGS, mine.column("value"))
        blinded = io.recv(blinded_stream(w))                                    # 3
        io.stats["peer_ids"] = len(blinded)
        io.send(signed_stream(w), _sign(key, blinded))                          # 4
        if i_learn:
            matched = io.recv(MATCHED)                                          # 7
            keep = is_in(mine.column("value"), matched, TAG_BYTES)
            io.save("matched", pa.table({"id": mine.column("id").filter(pa.array(keep))}))
    return run


def serve_requester(key: PublicKey, signer_learns: bool) -> Callable[[BucketIO], None]:
    def run(io: BucketIO) -> None:
        mine = io.kept("mine", lambda: _blind(key, io.ids()))                   # 2, r kept
        io.send(blinded_stream(key.width), mine.column("value"))                # 3
        signed = io.recv(signed_stream(key.width))                              # 4
        if len(signed) != mine.num_rows:
            raise ProtocolError(f"the key holder returned {len(signed)} signatures for bucket "
                                f"{io.bucket}, where {mine.num_rows} values were sent")
        peer_tags = io.recv(TAGS)                                               # 5
        io.stats["peer_ids"] = len(peer_tags)
        matched = _unblind_and_match(key, mine, signed, peer_tags)              # 6
        if signer_learns:
            io.send(MATCHED, matched.column("value"))                           # 7
        io.save("matched", matched.select(["id"]))
    return run


def setup(run: Any, saved: dict[str, Any] | None) -> dict[str, Any]:
    """Step 1, in the driver: the signer's key (fresh, or the one of the run it resumes)."""
    if saved:
        return saved
    if run.role == run.params.rsa_key_holder:
        key = PrivateKey.generate(run.params.rsa_bits)
        run.channel.send(run.scope.tag(PUBLIC_KEY.name),
                         PUBLIC_KEY.check({"n": format(key.public.n, "x"), "e": key.public.e}))
        return {"private": {name: format(getattr(key, name), "x") for name in ("p", "q", "dp", "dq", "q_inv")},
                "n": format(key.public.n, "x"), "e": key.public.e}
    raw = PUBLIC_KEY.check(run.channel.recv(run.scope.tag(PUBLIC_KEY.name), timeout=run.wait_s))
    key = _check_public(raw, run.params.rsa_bits)
    return {"n": format(key.n, "x"), "e": key.e}


def server(run: Any, state: dict[str, Any]) -> Callable[[BucketIO], None]:
    public = PublicKey(int(state["n"], 16), int(state["e"]))
    if "private" in state:
        values = {name: int(v, 16) for name, v in state["private"].items()}
        return serve_signer(PrivateKey(public, **values), run.params.learns(run.role))
    return serve_requester(public, run.params.learns(run.peer_role))


def _check_public(raw: dict, bits: int) -> PublicKey:
    try:
        key = PublicKey(int(raw["n"], 16), int(raw["e"]))
    except (KeyError, TypeError, ValueError):
        raise ProtocolError("the key holder's RSA public key is malformed") from None
    if key.n.bit_length() != bits or key.e < 3 or key.e % 2 == 0 or key.e.bit_length() > 32:
        raise CryptoError(f"the key holder's RSA key has {key.n.bit_length()} bits and e = {key.e}; "
                          f"expected {bits} bits (job.params.rsa_bits) and a small odd e")
    return key
