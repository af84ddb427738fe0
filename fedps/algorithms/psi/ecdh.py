"""ECDH PSI over Curve25519: commutative blinding of hashed ids, both roles the same.

Group: the prime-order subgroup of Curve25519, points as 32-byte
u-coordinates; blinding is X25519 (libsodium's ``crypto_scalarmult`` through
PyNaCl's cffi bindings, or OpenSSL's through ``cryptography`` where that is
faster: :func:`backend`). Hash to curve: RFC 9380 ``encode_to_curve`` for the suite
``curve25519_XMD:SHA-512_ELL2_NU_`` (expand_message_xmd with SHA-512, then
Elligator 2), with our own domain-separation tag. The RFC clears the cofactor
by multiplying by 8; X25519 clamps every secret to a multiple of 8, so
``X25519(k, u(Q)) = u([k/8]·[8]Q)``: each blinding applies a secret scalar to
the RFC's output point, and blindings commute.

Steps (docs/protocols.md, "Private set intersection"), the same for each party
with secret ``a`` and ids ``x``; the peer has ``b`` and ``y``. Each runs per
bucket, in the process serving the bucket (an executor task, or the driver
for a small run), over the bucket's partition of the PSI link:

1. ``H(x)^a`` for each of my ids of the bucket, in a private random order (kept in ``mine``)
2. send them to the peer (stream ``ecdh_single``)
3. receive the peer's ``H(y)^b``
4. raise them to ``a``: ``H(y)^(ab)``
5. if the peer learns the result: send those back in the order received (stream ``ecdh_double``)
6. if I learn the result: receive my ``H(x)^(ab)``, in my order
7. my ids whose ``H(x)^(ab)`` is among the ``H(y)^(ab)`` (kept in ``matched``)

Incremental PSI (:mod:`fedps.algorithms.psi.incremental`): with a persistent
secret, steps 1 and 4 take the points of ids and of peer points seen in an
earlier run of the epoch from its cache and compute only the others; the
metric counts (``blinded_own``, ``blinded_peer``) say how many were computed.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any, Callable, Iterable

import gmpy2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from nacl._sodium import ffi as _ffi, lib as _lib

from fedps.algorithms.psi.ids import ID
from fedps.algorithms.psi.storage import Folder
from fedps.algorithms.psi.stream import (BucketIO, Stream, cache_gone, check_stamp, from_matrix, is_in,
                                         keep_cache, plain as _plain, set_digest, to_matrix, with_seq)
from fedps.errors import CryptoError, ProtocolError

log = logging.getLogger(__name__)

DST = b"fedps-psi-v1-with-curve25519_XMD:SHA-512_ELL2_NU_"
POINT_BYTES = 32
SINGLE = Stream("ecdh_single", "either", "other", POINT_BYTES)
DOUBLE = Stream("ecdh_double", "either", "other", POINT_BYTES)
#: Incremental PSI: what each party kept of the last run (two digests), then only the changes.
BASE = Stream("ecdh_base", "either", "other", 2 * POINT_BYTES)
SINGLE_ADD = Stream("ecdh_single_add", "either", "other", POINT_BYTES)
DROP = Stream("ecdh_drop", "either", "other", POINT_BYTES)
DOUBLE_ADD = Stream("ecdh_double_add", "either", "other", POINT_BYTES)

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
    """X25519: the point raised to the (clamped) secret (one point of :func:`blind_all`)."""
    return blind_all(secret, [point], 1)[0].tobytes()


def blind_all(secret: bytes, points: Iterable[bytes], count: int) -> np.ndarray:
    """X25519 of ``count`` points with one secret, into one ``(count, 32)`` array.

    Both implementations give the same bytes (RFC 7748) and refuse a point
    of low order (an all-zero result); the faster one on this CPU is used
    (:func:`backend`).
    """
    return _BLIND[backend()](secret, points, count)


def _blind_sodium(secret: bytes, points: Iterable[bytes], count: int) -> np.ndarray:
    """libsodium's ``crypto_scalarmult``, called directly with one output buffer (without
    PyNaCl's per-call checks and allocations)."""
    out = _ffi.new("unsigned char[]", POINT_BYTES * count)
    scalar = _ffi.from_buffer(secret)
    multiply = _lib.crypto_scalarmult
    seen = 0
    for point in points:
        if seen == count:
            raise CryptoError(f"expected {count} points, got more")
        if len(point) != POINT_BYTES or multiply(out + POINT_BYTES * seen, scalar, point) != 0:
            raise CryptoError(f"refused curve point {seen}: not 32 bytes, or of low order")
        seen += 1
    if seen != count:
        raise CryptoError(f"expected {count} points, got {seen}")
    return np.frombuffer(_ffi.buffer(out), dtype=np.uint8).reshape(count, POINT_BYTES).copy()


def _blind_openssl(secret: bytes, points: Iterable[bytes], count: int) -> np.ndarray:
    """OpenSSL's X25519 through ``cryptography`` (its assembly for CPUs with ADX/BMI2), one
    public-key object per point."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

    key = X25519PrivateKey.from_private_bytes(secret)
    load, exchange = X25519PublicKey.from_public_bytes, key.exchange
    out = bytearray(POINT_BYTES * count)
    seen = 0
    for point in points:
        if seen == count:
            raise CryptoError(f"expected {count} points, got more")
        try:
            if len(point) != POINT_BYTES:
                raise ValueError
            out[POINT_BYTES * seen:POINT_BYTES * (seen + 1)] = exchange(load(point))
        except ValueError:   # OpenSSL refuses an all-zero shared value: a point of low order
            raise CryptoError(f"refused curve point {seen}: not 32 bytes, or of low order") from None
        seen += 1
    if seen != count:
        raise CryptoError(f"expected {count} points, got {seen}")
    return np.frombuffer(out, dtype=np.uint8).reshape(count, POINT_BYTES)


_BLIND = {"sodium": _blind_sodium, "openssl": _blind_openssl}
#: ``sodium`` or ``openssl`` forces one X25519 implementation (both give the same bytes).
BACKEND_ENV = "FEDPS_X25519"
_chosen: list[str] = []


def backend() -> str:
    """The X25519 implementation this process uses: ``FEDPS_X25519`` if set, else the faster of the
    two in a calibration of a few milliseconds at first use (OpenSSL's wins by about a quarter on
    CPUs where its ADX code runs, libsodium's elsewhere: docs/benchmarks.md, "PSI")."""
    if not _chosen:
        forced = os.environ.get(BACKEND_ENV, "").strip().lower()
        if forced:
            if forced not in _BLIND:
                raise CryptoError(f"{BACKEND_ENV} must be one of {sorted(_BLIND)}, got {forced!r}")
            _chosen.append(forced)
        else:
            _chosen.append(_calibrate())
        log.debug("psi: X25519 through %s", _chosen[0])
    return _chosen[0]


def _calibrate(points: int = 400) -> str:
    import time

    secret = new_secret()
    sample = [encode_to_curve(str(i).encode()) for i in range(points)]
    best: dict[str, float] = {}
    for _ in range(2):   # the better of two rounds each, alternated
        for name, fn in _BLIND.items():
            started = time.thread_time()   # this thread's CPU: other threads may be busy (two parties, tasks)
            fn(secret, sample, points)
            elapsed = time.thread_time() - started
            best[name] = min(best.get(name, elapsed), elapsed)
    return min(best, key=best.__getitem__)


def serve(secret: bytes, i_learn: bool, peer_learns: bool,
          cache: Folder | None = None) -> Callable[[BucketIO], None]:
    """The steps of one bucket, for :mod:`fedps.algorithms.psi.tasks`.

    ``cache`` (incremental PSI, :mod:`fedps.algorithms.psi.incremental`): the
    folder of the sets kept from earlier runs under the same ``secret``. The
    two tasks of the bucket first swap digests of what each kept (``ecdh_base``);
    where both kept the same view of the last run, only the changes are sent
    (:func:`_serve_changes`), else the whole sets are, and only ids and peer
    points not found in the cache are blinded. Either way the cache is updated
    with this run's sets (ids removed since are dropped).
    """
    def run(io: BucketIO) -> None:
        stamp = check_stamp(io, cache) if cache is not None else ""
        own, seen = _cached(cache, "own", io.bucket), _cached(cache, "peer", io.bucket)
        if cache is not None:
            base = io.kept("base", lambda: pa.table({"value": [_base(own, seen, i_learn)]}))
            io.send(BASE, base.column("value"))
            theirs = to_matrix(io.recv(BASE), BASE.width)
            mine = to_matrix(base.column("value"), BASE.width)
            if len(theirs) == 1 and _same_view(mine[0], theirs[0]):
                io.stats["changes_only"] = 1
                return _serve_changes(io, secret, i_learn, peer_learns, cache, own, seen, stamp)
        _serve_sets(io, secret, i_learn, peer_learns, cache, own, seen, stamp)
    return run


def _serve_sets(io: BucketIO, secret: bytes, i_learn: bool, peer_learns: bool, cache: Folder | None,
                own: pa.Table | None, seen: pa.Table | None, stamp: str) -> None:
    """Steps 1-7 over the whole sets (every run without a cache, and a cached run whose views differ);
    ``own`` and ``seen``: the cache's sets, whose points are reused."""

    def blind_mine() -> pa.Table:   # only when no earlier serving kept it; the crypto alone is timed
        ids = io.ids()
        with io.crypto():
            return _hash_and_blind(secret, ids, io.stats, own)

    mine = io.kept("mine", blind_mine)                                          # 1
    io.send(SINGLE, mine.column("value"))                                       # 2
    peer_single = io.recv(SINGLE)                                               # 3
    io.stats["peer_ids"] = len(peer_single)
    with io.crypto():
        peer_double = _raise(secret, peer_single, io.stats, seen)              # 4
    if peer_learns:
        io.send(DOUBLE, peer_double)                                            # 5
    mine_double = None
    if i_learn:
        mine_double = io.recv(DOUBLE)                                           # 6
        if len(mine_double) != mine.num_rows:
            raise ProtocolError(f"the peer returned {len(mine_double)} points for bucket {io.bucket}, "
                                f"where {mine.num_rows} were sent")
    if cache is not None:   # before `matched`, which ends the bucket: a restart serves it again
        kept = {"id": mine.column("id"), "value": mine.column("value")}
        keep_cache(cache, io.bucket, stamp,
                   own=pa.table(kept if mine_double is None else {**kept, "double": mine_double}),
                   peer=pa.table({"id": peer_single, "value": peer_double}))
    if i_learn:
        keep = is_in(mine_double, peer_double, POINT_BYTES)                     # 7
        io.save("matched", pa.table({"id": mine.column("id").filter(pa.array(keep))}))


def _serve_changes(io: BucketIO, secret: bytes, i_learn: bool, peer_learns: bool, cache: Folder,
                   own: pa.Table | None, seen: pa.Table | None, stamp: str) -> None:
    """The steps over what changed since the last run, both parties holding the same view of it.

    Each party sends the single points of its added ids (``ecdh_single_add``, in its private
    order) and those of its removed ids (``ecdh_drop``, sorted); the peer raises the added ones
    and sends their doubles back (``ecdh_double_add``). Each side's view of the peer's set is the
    kept one, less the dropped points, plus the added: the same sets as a run from scratch, so
    the same intersection. Every step is a set operation, so serving the bucket again after a
    restart (the cache already updated, or not) gives the same result.
    """
    if own is None or seen is None:   # kept when this job first served the bucket, gone since
        raise cache_gone(io.bucket, cache)
    staged = io.staged_ids()   # the whole set, unordered: only the added ids need their private order
    ids = _plain(staged.column(ID)).cast(pa.string())
    known = _plain(own.column("id")).cast(pa.string())
    own = own.set_column(own.schema.get_field_index("id"), "id", known)

    def added() -> pa.Table:   # only when no earlier serving kept it
        new = _plain(io.in_private_order(staged.filter(pc.invert(pc.is_in(ids, value_set=known)))).column("id"))
        with io.crypto():
            points = blind_all(secret, (encode_to_curve(i.encode()) for i in new.to_pylist()), len(new))
        io.stats["blinded_own"] = len(new)
        return with_seq({"id": new, "value": from_matrix(points)})

    def removed() -> pa.Table:
        gone = own.filter(pc.invert(pc.is_in(own.column("id"), value_set=ids)))
        return gone.select(["value"]).sort_by([("value", "ascending")])   # a set: its order says nothing

    add, drop = io.kept("add", added), io.kept("drop", removed)
    io.send(SINGLE_ADD, add.column("value"))
    io.send(DROP, drop.column("value"))
    peer_add, peer_drop = io.recv(SINGLE_ADD), io.recv(DROP)
    io.stats["peer_ids_added"], io.stats["peer_ids_dropped"] = len(peer_add), len(peer_drop)
    with io.crypto():
        peer_add_double = _raise(secret, peer_add, io.stats, None)
    if peer_learns:
        io.send(DOUBLE_ADD, peer_add_double)
    add_double = None
    if i_learn:
        add_double = io.recv(DOUBLE_ADD)
        if len(add_double) != add.num_rows:
            raise ProtocolError(f"the peer returned {len(add_double)} points for bucket {io.bucket}, "
                                f"where {add.num_rows} were sent")
    # the peer's set: the kept one less its dropped and its added points (a restart may find them kept)
    changed = pa.concat_arrays([_plain(peer_drop), _plain(peer_add)])
    stay = seen.filter(pc.invert(pc.is_in(seen.column("id"), value_set=changed)))
    peer = pa.concat_tables([stay.select(["id", "value"]),
                             pa.table({"id": _plain(peer_add), "value": _plain(peer_add_double)})])
    # mine: the kept rows of ids still here and not added again, plus the added ones
    still = own.filter(pc.and_(pc.is_in(own.column("id"), value_set=ids),
                               pc.invert(pc.is_in(own.column("id"), value_set=_plain(add.column("id"))))))
    columns = ["id", "value"] + (["double"] if add_double is not None else [])
    fresh = {"id": add.column("id"), "value": add.column("value")}
    if add_double is not None:
        fresh["double"] = add_double
    mine = pa.concat_tables([still.select(columns), pa.table(fresh).select(columns)])
    io.stats["peer_ids"] = peer.num_rows
    keep_cache(cache, io.bucket, stamp, own=mine, peer=peer)
    if i_learn:
        keep = is_in(mine.column("double"), peer.column("value"), POINT_BYTES)
        io.save("matched", pa.table({"id": mine.column("id").filter(pa.array(keep))}))


def _base(own: pa.Table | None, seen: pa.Table | None, i_learn: bool) -> bytes:
    """What this party kept of the last run, as two digests: of its own single points and of the
    peer's. A party that cannot serve the changes (nothing kept, or no doubles of its own ids where
    it learns the result) sends random bytes, which match nothing."""
    if own is None or seen is None or i_learn and "double" not in own.column_names:
        return os.urandom(BASE.width)
    return set_digest(own.column("value"), POINT_BYTES) + set_digest(seen.column("id"), POINT_BYTES)


def _same_view(mine: np.ndarray, theirs: np.ndarray) -> bool:
    """Whether each party kept the other's points as the other kept them (mine: own | peer's)."""
    half = POINT_BYTES
    return bool(np.array_equal(mine[:half], theirs[half:]) and np.array_equal(mine[half:], theirs[:half]))


def _cached(cache: Folder | None, name: str, bucket: int) -> pa.Table | None:
    """Kept by an earlier run: my ids, their points (and their doubles where I learn the result),
    or the peer's points and their doubles."""
    return None if cache is None else cache.child(name, f"bucket={bucket}").read_table()


def _reuse(keys: pa.Array, cached: pa.Table | None, width: int,
           compute: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, int]:
    """The value of each key: from ``cached`` where found, else ``compute(indices)``; and how many computed."""
    out = np.empty((len(keys), width), dtype=np.uint8)
    if cached is None or not cached.num_rows or not len(keys):
        missing = np.arange(len(keys))
    else:
        import pyarrow.compute as pc

        known = cached.column("id").combine_chunks()
        at = pc.index_in(keys, value_set=known)
        found = at.is_valid().to_numpy(zero_copy_only=False)
        missing = np.flatnonzero(~found)
        if found.any():
            values = cached.column("value").combine_chunks().take(at.filter(at.is_valid()))
            out[np.flatnonzero(found)] = to_matrix(values, width)
    if len(missing):
        out[missing] = compute(missing)
    return out, len(missing)


def _hash_and_blind(secret: bytes, ids: pa.Table, stats: dict[str, int], own: pa.Table | None = None) -> pa.Table:
    column = ids.column("id").combine_chunks() if ids.num_rows else pa.array([], pa.string())
    texts = column.to_pylist() if own is None or not own.num_rows else None

    def compute(where: np.ndarray) -> np.ndarray:
        values = texts if texts is not None and len(where) == len(column) else column.take(pa.array(where)).to_pylist()
        return blind_all(secret, (encode_to_curve(i.encode()) for i in values), len(values))

    matrix, blinded = _reuse(column, own, POINT_BYTES, compute)
    stats["blinded_own"] = blinded
    return with_seq({"id": column, "value": from_matrix(matrix)})


def _raise(secret: bytes, peer_single: pa.Array, stats: dict[str, int], seen: pa.Table | None) -> pa.Array:
    """Step 4: the peer's points raised to my secret (those seen in an earlier run: kept)."""
    singles = to_matrix(peer_single, POINT_BYTES)

    def compute(where: np.ndarray) -> np.ndarray:
        chosen = singles[where]
        return blind_all(secret, chosen.view(f"V{POINT_BYTES}").ravel().tolist(), len(chosen))

    keys = peer_single.combine_chunks() if isinstance(peer_single, pa.ChunkedArray) else peer_single
    matrix, blinded = _reuse(keys, seen, POINT_BYTES, compute)
    stats["blinded_peer"] = blinded
    return from_matrix(matrix)


def setup(run: Any, saved: dict[str, Any] | None) -> dict[str, Any]:
    """The party's secret: the one of the run this party resumes, its persistent key's, or fresh."""
    if saved:
        return saved
    persistent = getattr(run, "persistent", None)
    if persistent:   # incremental PSI: the epoch's secret and the folder of its cached sets
        return {"secret": persistent["secret"], "cache": persistent["cache"]}
    return {"secret": new_secret().hex()}


def server(run: Any, state: dict[str, Any]) -> Callable[[BucketIO], None]:
    cache = Folder.at(state["cache"]) if state.get("cache") else None
    return serve(bytes.fromhex(state["secret"]), run.params.learns(run.role),
                 run.params.learns(run.peer_role), cache)
