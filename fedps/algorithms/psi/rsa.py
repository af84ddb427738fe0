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

Incremental PSI (:mod:`fedps.algorithms.psi.incremental`): the signer keeps
its key for the epoch (in its key file) and the tags of its ids; the
requester keeps its ids' unblinded tags and blinds and sends only ids
without one (so the signer signs only new ids of either side). The requester
also keeps the signer's tags; where both sides kept the same (``rsa_base``),
the signer sends only the tags added and removed since (``rsa_tags_add``,
``rsa_tags_drop``) instead of all of them (step 2).
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
import pyarrow.compute as pc
from cryptography.hazmat.primitives.asymmetric import rsa as rsa_keys

from fedps.algorithms.psi.storage import Folder
from fedps.algorithms.psi.stream import (BucketIO, Stream, cache_gone, check_stamp, from_matrix, is_in,
                                         keep_cache, plain as _plain, set_digest, to_matrix, with_seq)
from fedps.errors import CryptoError, ProtocolError
from fedps.messaging.tags import Message

log = logging.getLogger(__name__)

FDH_TAG = b"fedps-psi-v1-rsa-fdh"
TAG_TAG = b"fedps-psi-v1-rsa-tag"
TAG_BYTES = 32
PUBLIC_KEY = Message("rsa_public_key", "signer", "requester", dict)
TAGS = Stream("rsa_tags", "signer", "requester", TAG_BYTES)
#: Incremental PSI: a digest of the signer's tags as each side kept them, then only the changes.
BASE = Stream("rsa_base", "either", "other", TAG_BYTES)
TAGS_ADD = Stream("rsa_tags_add", "signer", "requester", TAG_BYTES)
TAGS_DROP = Stream("rsa_tags_drop", "signer", "requester", TAG_BYTES)
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


def _own_tags(key: PrivateKey, ids: pa.Table, stats: dict[str, int] | None = None,
              cached: pa.Table | None = None) -> pa.Table:
    """Signer, step 2: ``T(FDH(y)^d)`` for my ids in private order (those in ``cached``: kept)."""
    w = key.public.width
    column = ids.column("id").combine_chunks() if ids.num_rows else pa.array([], pa.string())
    known = _known(cached, column)
    tags, signed = [], 0
    for i, found in zip(column.to_pylist(), known):
        if found is None:
            found, signed = tag(key.sign(key.public.fdh(i)), w), signed + 1
        tags.append(found)
    if stats is not None:
        stats["blinded_own"] = signed
    return with_seq({"id": column, "value": _matrix(tags, TAG_BYTES)})


def _known(cached: pa.Table | None, column: pa.Array) -> list[bytes | None]:
    """The cached tag of each id of ``column`` (incremental PSI), or None."""
    if cached is None or not cached.num_rows:
        return [None] * len(column)
    table = dict(zip(cached.column("id").to_pylist(), cached.column("value").to_pylist()))
    return [table.get(i) for i in column.to_pylist()]


def _unblind(key: PublicKey, mine: pa.Table, signed: pa.Array) -> pa.Array:
    """Requester, step 6: unblind and check my signatures; their tags, in ``mine``'s order."""
    n, w = gmpy2.mpz(key.n), key.width
    inverses = to_matrix(mine.column("r_inv"), w)
    tags = []
    for canonical_id, s_row, r_row in zip(mine.column("id").to_pylist(), to_matrix(signed, w), inverses):
        s = gmpy2.mpz(int.from_bytes(s_row.tobytes(), "big")) * int.from_bytes(r_row.tobytes(), "big") % n
        if gmpy2.powmod(s, key.e, n) != key.fdh(canonical_id):
            raise ProtocolError("the key holder returned a wrong signature")
        tags.append(tag(s, w))
    return _matrix(tags, TAG_BYTES)


def _match(ids: pa.Array, values: pa.Array, peer_tags: pa.Array) -> pa.Table:
    """My ``(id, tag)`` whose tag the signer's tags include, sorted by tag so the order says nothing."""
    keep = pa.array(is_in(values, peer_tags, TAG_BYTES))
    return pa.table({"id": ids.filter(keep), "value": values.filter(keep)}).sort_by("value")


def _cached(cache: Folder | None, bucket: int, name: str = "own") -> pa.Table | None:
    """Kept by an earlier run: ``own`` (my ids and their tags) or, at the requester, ``peer`` (the
    signer's tags)."""
    return None if cache is None else cache.child(name, f"bucket={bucket}").read_table()


def _keep(cache: Folder | None, bucket: int, stamp: str, **tables: pa.Table) -> None:
    if cache is not None:
        keep_cache(cache, bucket, stamp, **tables)


def _views_agree(io: BucketIO, kept_tags: pa.Table | None) -> bool:
    """Swap ``rsa_base`` (a digest of the signer's tags as this side kept them; random bytes if it
    kept none) and say whether both kept the same set: then the signer sends only its changes."""
    base = io.kept("base", lambda: pa.table({"value": [
        os.urandom(TAG_BYTES) if kept_tags is None else set_digest(kept_tags.column("value"), TAG_BYTES)]}))
    io.send(BASE, base.column("value"))
    theirs = to_matrix(io.recv(BASE), TAG_BYTES)
    same = len(theirs) == 1 and theirs[0].tobytes() == to_matrix(base.column("value"), TAG_BYTES)[0].tobytes()
    if same:
        io.stats["changes_only"] = 1
    return same


def serve_signer(key: PrivateKey, i_learn: bool, cache: Folder | None = None) -> Callable[[BucketIO], None]:
    """``cache`` (incremental PSI): my ids' tags under this same key from earlier runs; where the
    requester kept the same tags of mine, only those added and removed since are sent."""
    def run(io: BucketIO) -> None:
        w = key.public.width
        stamp = check_stamp(io, cache) if cache is not None else ""
        old = _cached(cache, io.bucket)

        def sign_mine() -> pa.Table:   # only when no earlier serving kept it; the crypto alone is timed
            ids = io.ids()
            with io.crypto():
                return _own_tags(key, ids, io.stats, old)

        mine = io.kept("mine", sign_mine)                                       # 2
        if cache is not None and _views_agree(io, old):
            if old is None:   # kept when this job first served the bucket, gone since
                raise cache_gone(io.bucket, cache)
            known = old.column("id").cast(pa.string())
            ids = mine.column("id").cast(pa.string())
            add = io.kept("add", lambda: mine.filter(pc.invert(pc.is_in(ids, value_set=known))).select(["value"]))
            drop = io.kept("drop", lambda: old.filter(pc.invert(pc.is_in(known, value_set=ids)))
                           .select(["value"]).sort_by([("value", "ascending")]))   # a set: its order says nothing
            io.send(TAGS_ADD, add.column("value"))
            io.send(TAGS_DROP, drop.column("value"))
        else:
            io.send(TAGS, mine.column("value"))
        _keep(cache, io.bucket, stamp, own=mine.select(["id", "value"]))
        blinded = io.recv(blinded_stream(w))                                    # 3
        io.stats["peer_ids"] = len(blinded)    # an incremental requester sends only its new ids
        io.stats["blinded_peer"] = len(blinded)
        with io.crypto():
            signed = _sign(key, blinded)                                        # 4
        io.send(signed_stream(w), signed)
        if i_learn:
            matched = io.recv(MATCHED)                                          # 7
            keep = is_in(mine.column("value"), matched, TAG_BYTES)
            io.save("matched", pa.table({"id": mine.column("id").filter(pa.array(keep))}))
    return run


def serve_requester(key: PublicKey, signer_learns: bool, cache: Folder | None = None) -> Callable[[BucketIO], None]:
    """``cache`` (incremental PSI): my ids' unblinded tags under this same key from earlier runs
    (only ids without one are blinded and sent to be signed), and the signer's tags (where the
    signer kept the same, it sends only those added and removed since)."""
    def run(io: BucketIO) -> None:
        stamp = check_stamp(io, cache) if cache is not None else ""
        ids = io.ids()
        column = ids.column("id").combine_chunks() if ids.num_rows else pa.array([], pa.string())
        known = _known(_cached(cache, io.bucket), column)
        theirs = _cached(cache, io.bucket, "peer")
        changes = cache is not None and _views_agree(io, theirs)
        if changes and theirs is None:   # kept when this job first served the bucket, gone since
            raise cache_gone(io.bucket, cache)

        def fresh() -> pa.Table:
            new = [i for i, found in zip(column.to_pylist(), known) if found is None]
            return _blind(key, pa.table({"id": pa.array(new, pa.string())}))

        mine = io.kept("mine", fresh)                                           # 2, r kept
        io.stats["blinded_own"] = mine.num_rows
        io.send(blinded_stream(key.width), mine.column("value"))                # 3
        signed = io.recv(signed_stream(key.width))                              # 4
        if len(signed) != mine.num_rows:
            raise ProtocolError(f"the key holder returned {len(signed)} signatures for bucket "
                                f"{io.bucket}, where {mine.num_rows} values were sent")
        if changes:                                                             # 5
            added = _plain(io.recv(TAGS_ADD)).cast(pa.binary())
            dropped = _plain(io.recv(TAGS_DROP)).cast(pa.binary())
            io.stats["peer_ids_added"], io.stats["peer_ids_dropped"] = len(added), len(dropped)
            kept = _plain(theirs.column("value")).cast(pa.binary())   # less the dropped and the added
            stay = kept.filter(pc.invert(pc.is_in(kept, value_set=pa.concat_arrays([dropped, added]))))
            peer_tags = pa.concat_arrays([stay, added])
        else:
            peer_tags = _plain(io.recv(TAGS))
        io.stats["peer_ids"] = len(peer_tags)
        signed_now = dict(zip(mine.column("id").to_pylist(), _unblind(key, mine, signed).to_pylist()))  # 6
        tags = [signed_now[i] if i in signed_now else found for i, found in zip(column.to_pylist(), known)]
        values = pa.array(tags, pa.binary()) if tags else pa.array([], pa.binary())
        _keep(cache, io.bucket, stamp, own=pa.table({"id": column, "value": values}),
              peer=pa.table({"value": peer_tags}))
        matched = _match(column, values, peer_tags)
        if signer_learns:
            io.send(MATCHED, matched.column("value"))                           # 7
        io.save("matched", matched.select(["id"]))
    return run


def setup(run: Any, saved: dict[str, Any] | None) -> dict[str, Any]:
    """Step 1, in the driver: the signer's key (fresh, the one of the run it resumes, or, in an
    incremental PSI, the epoch's: kept in the signer's key file, its public half in the requester's)."""
    if saved:
        return saved
    persistent = getattr(run, "persistent", None)
    extra = {"cache": persistent["cache"]} if persistent else {}
    if run.role == run.params.rsa_key_holder:
        kept = (persistent or {}).get("rsa")
        # a key file from when this party was the requester holds the public half only: a new key
        if kept and "private" in kept and int(kept["n"], 16).bit_length() == run.params.rsa_bits:
            state = {**kept, "private": dict(kept["private"])}
        else:
            key = PrivateKey.generate(run.params.rsa_bits)
            state = {"private": {name: format(getattr(key, name), "x") for name in ("p", "q", "dp", "dq", "q_inv")},
                     "n": format(key.public.n, "x"), "e": key.public.e}
            if persistent:   # a new key: what was signed under another is of no use
                _new_rsa_key(persistent, state)
        run.channel.send(run.scope.tag(PUBLIC_KEY.name), PUBLIC_KEY.check({"n": state["n"], "e": state["e"]}))
        return {**state, **extra}
    raw = PUBLIC_KEY.check(run.channel.recv(run.scope.tag(PUBLIC_KEY.name), timeout=run.wait_s))
    key = _check_public(raw, run.params.rsa_bits)
    state = {"n": format(key.n, "x"), "e": key.e}
    if persistent and (persistent.get("rsa") or {}).get("n") != state["n"]:
        _new_rsa_key(persistent, state)   # the signer's key changed: my cached tags are void
    return {**state, **extra}


def _new_rsa_key(persistent: dict[str, Any], state: dict[str, Any]) -> None:
    from fedps.algorithms.psi import incremental

    Folder.at(persistent["cache"]).remove()
    incremental.save_key(persistent, {"rsa": state})


def server(run: Any, state: dict[str, Any]) -> Callable[[BucketIO], None]:
    public = PublicKey(int(state["n"], 16), int(state["e"]))
    cache = Folder.at(state["cache"]) if state.get("cache") else None
    if "private" in state:
        values = {name: int(v, 16) for name, v in state["private"].items()}
        return serve_signer(PrivateKey(public, **values), run.params.learns(run.role), cache)
    return serve_requester(public, run.params.learns(run.peer_role), cache)


def _check_public(raw: dict, bits: int) -> PublicKey:
    try:
        key = PublicKey(int(raw["n"], 16), int(raw["e"]))
    except (KeyError, TypeError, ValueError):
        raise ProtocolError("the key holder's RSA public key is malformed") from None
    if key.n.bit_length() != bits or key.e < 3 or key.e % 2 == 0 or key.e.bit_length() > 32:
        raise CryptoError(f"the key holder's RSA key has {key.n.bit_length()} bits and e = {key.e}; "
                          f"expected {bits} bits (job.params.rsa_bits) and a small odd e")
    return key
