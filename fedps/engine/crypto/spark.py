"""Running crypto work over Spark partitions.

Each partition rebuilds its ``Encryptor``/``Decryptor`` once per Python worker
(cached by key and settings, since a fixed-base table takes a while to build)
and ships ciphertexts back as ``CipherVector.to_bytes`` blobs, never pickled
ints. pyspark is imported only inside the functions that need a session.
Private-key material (``p``, ``q``) reaches executors only when the key
owner asks for CRT encryption or for decryption there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from phe import paillier

from fedps.engine.crypto.cipher import Decryptor, Encryptor
from fedps.engine.crypto.encoding import DEFAULT_FIXED, FixedPoint
from fedps.engine.crypto.keys import PrivateKey, PublicKey
from fedps.engine.crypto.matrix import DEFAULT_X_FIXED, xt_d
from fedps.engine.crypto.vector import CipherVector
from fedps.errors import CryptoError

log = logging.getLogger(__name__)

_WORKER_CACHE: dict[tuple[Any, ...], Any] = {}


def _public(n: int) -> PublicKey:
    return paillier.PaillierPublicKey(n)


def _worker_encryptor(n: int, pq: tuple[int, int] | None, exponent_bits: int | None) -> Encryptor:
    key = ("enc", n, pq, exponent_bits)
    if key not in _WORKER_CACHE:
        pub = _public(n)
        priv = None if pq is None else paillier.PaillierPrivateKey(pub, *pq)
        _WORKER_CACHE[key] = Encryptor(pub, private_key=priv, exponent_bits=exponent_bits)
    return _WORKER_CACHE[key]


def _worker_decryptor(n: int, pq: tuple[int, int]) -> Decryptor:
    key = ("dec", n, pq)
    if key not in _WORKER_CACHE:
        _WORKER_CACHE[key] = Decryptor(paillier.PaillierPrivateKey(_public(n), *pq))
    return _WORKER_CACHE[key]


def run_partitions(spark: Any, func: Callable[[Any], Any], payloads: Sequence[Any]) -> list[Any]:
    """Apply ``func`` to each payload, one Spark partition per payload, results in order."""
    if not payloads:
        return []
    rdd = spark.sparkContext.parallelize(list(enumerate(payloads)), len(payloads))
    results = rdd.map(lambda item: (item[0], func(item[1]))).collect()
    return [r for _, r in sorted(results, key=lambda kv: kv[0])]


def _split(values: np.ndarray, partitions: int) -> list[np.ndarray]:
    if partitions < 1:
        raise CryptoError(f"partitions must be >= 1, got {partitions}")
    return [part for part in np.array_split(values, partitions) if len(part)]


def _default_partitions(spark: Any) -> int:
    return int(spark.sparkContext.defaultParallelism)


def encrypt_on_spark(
    spark: Any,
    values: np.ndarray,
    public_key: PublicKey,
    *,
    private_key: PrivateKey | None = None,
    fixed: FixedPoint = DEFAULT_FIXED,
    exponent_bits: int | None = None,
    partitions: int | None = None,
) -> CipherVector:
    """``Encryptor.encrypt`` spread over partitions (CRT when ``private_key`` is given)."""
    n = int(public_key.n)
    pq = None if private_key is None else (int(private_key.p), int(private_key.q))
    parts = _split(np.asarray(values, dtype=np.float64).ravel(), partitions or _default_partitions(spark))

    def work(chunk: np.ndarray) -> bytes:
        return _worker_encryptor(n, pq, exponent_bits).encrypt(chunk, fixed).to_bytes()

    blobs = run_partitions(spark, work, parts)
    return CipherVector.concat([CipherVector.from_bytes(b, public_key) for b in blobs])


def decrypt_on_spark(spark: Any, vector: CipherVector, private_key: PrivateKey,
                     partitions: int | None = None) -> np.ndarray:
    """``Decryptor.decrypt`` of an unpacked vector spread over partitions."""
    if vector.layout is not None or vector.masked:
        raise CryptoError("decrypt_on_spark takes unpacked, unmasked vectors")
    n, pq = int(private_key.public_key.n), (int(private_key.p), int(private_key.q))
    count = partitions or _default_partitions(spark)
    bounds = np.array_split(np.arange(len(vector.ciphertexts)), count)
    blobs = [vector.take(idx).to_bytes() for idx in bounds if len(idx)]

    def work(blob: bytes) -> np.ndarray:
        dec = _worker_decryptor(n, pq)
        return dec.decrypt(CipherVector.from_bytes(blob, dec.public_key))

    parts = run_partitions(spark, work, blobs)
    return np.concatenate(parts) if parts else np.zeros(0)


def xt_d_on_spark(spark: Any, x: Any, d: CipherVector, fixed: FixedPoint = DEFAULT_X_FIXED,
                  partitions: int | None = None) -> CipherVector:
    """``X^T [[d]]`` with rows split over partitions and the partial sums added."""
    n = int(d.public_key.n)
    count = partitions or _default_partitions(spark)
    rows = np.array_split(np.arange(d.length), count)
    payloads = [(x[idx[0]:idx[-1] + 1], d.take(idx).to_bytes()) for idx in rows if len(idx)]

    def work(item: tuple[Any, bytes]) -> bytes:
        part, blob = item
        return xt_d(part, CipherVector.from_bytes(blob, _public(n)), fixed).to_bytes()

    partials = [CipherVector.from_bytes(b, d.public_key) for b in run_partitions(spark, work, payloads)]
    total = partials[0]
    for p in partials[1:]:
        total = total + p
    rows_total = d.length
    return total.with_ciphertexts(total.ciphertexts, bound=d.bound * rows_total * fixed.bound)
