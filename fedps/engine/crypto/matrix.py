"""``X^T [[d]]``: encrypted matrix-vector products for dense and sparse ``X``.

Every output column is a multi-exponentiation ``prod_i [[d_i]]^(x_ij)`` over the
column's non-zeros, with ``x_ij`` encoded as small fixed-point integers. The
bucket (Pippenger) method costs about one multiplication per non-zero and
window instead of one exponentiation per non-zero; binary features cost one
multiplication per non-zero. A common power of two is factored out of each
column, and negative entries are gathered apart and divided out with one
modular inverse per column (the same plaintext as raising to ``n - |x|``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import gmpy2
import numpy as np
from gmpy2 import mpz

from fedps.engine.crypto.encoding import FixedPoint
from fedps.engine.crypto.keys import check_bound
from fedps.engine.crypto.vector import CipherVector
from fedps.errors import CryptoError

DEFAULT_X_FIXED = FixedPoint(frac_bits=16, int_bits=16)


def multi_exp(bases: Sequence[mpz], exps: Sequence[int], modulus: mpz) -> mpz:
    """``prod bases[i]^exps[i] mod modulus`` for small non-negative exponents."""
    pairs = [(b, e) for b, e in zip(bases, exps) if e]
    if not pairs:
        return mpz(1)
    top = max(e for _, e in pairs).bit_length()
    n = len(pairs)
    if top == 1:
        return _product([b for b, _ in pairs], modulus)
    window, cost = _best_window(n, top)
    if n * (top + top // 4) <= cost:
        return _product([gmpy2.powmod(b, e, modulus) for b, e in pairs], modulus)
    return _bucket(pairs, top, window, modulus)


def _best_window(n: int, bits: int) -> tuple[int, int]:
    costs = [(math.ceil(bits / c) * (n + (2 << c)) + bits, c) for c in range(1, 13)]
    cost, c = min(costs)
    return c, cost


def _product(values: Sequence[mpz], modulus: mpz) -> mpz:
    acc = values[0]
    for v in values[1:]:
        acc = acc * v % modulus
    return acc


def _bucket(pairs: list[tuple[mpz, int]], bits: int, window: int, modulus: mpz) -> mpz:
    mask = (1 << window) - 1
    acc = None
    for shift in range(window * (math.ceil(bits / window) - 1), -1, -window):
        if acc is not None:
            acc = gmpy2.powmod(acc, 1 << window, modulus)
        buckets: list[Any] = [None] * (mask + 1)
        for b, e in pairs:
            d = (e >> shift) & mask
            if d:
                buckets[d] = b if buckets[d] is None else buckets[d] * b % modulus
        running = total = None
        for d in range(mask, 0, -1):
            if buckets[d] is not None:
                running = buckets[d] if running is None else running * buckets[d] % modulus
            if running is not None:
                total = running if total is None else total * running % modulus
        if total is not None:
            acc = total if acc is None else acc * total % modulus
    return mpz(1) if acc is None else acc


def _signed_multi_exp(bases: Sequence[mpz], exps: np.ndarray, modulus: mpz) -> mpz:
    """Multi-exponentiation with signed exponents: positive part / negative part."""
    nz = np.flatnonzero(exps)
    if nz.size == 0:
        return mpz(1)
    vals = exps[nz]
    low = int(np.bitwise_or.reduce(np.abs(vals)))
    twos = (low & -low).bit_length() - 1
    vals = vals >> twos
    pos, neg = vals > 0, vals < 0
    result = multi_exp([bases[i] for i in nz[pos]], vals[pos].tolist(), modulus)
    if neg.any():
        negative = multi_exp([bases[i] for i in nz[neg]], (-vals[neg]).tolist(), modulus)
        result = result * gmpy2.invert(negative, modulus) % modulus
    return gmpy2.powmod(result, 1 << twos, modulus) if twos else result


def _encode_matrix(values: np.ndarray, fixed: FixedPoint) -> np.ndarray:
    if values.size and not np.all(np.isfinite(values)):
        raise CryptoError("X contains NaN or infinite values")
    if values.size and np.max(np.abs(values)) >= 2.0 ** fixed.int_bits:
        raise CryptoError(f"X has a value outside the declared |x| < 2^{fixed.int_bits}")
    if fixed.int_bits + fixed.frac_bits > 62:
        raise CryptoError("X encoding needs int_bits + frac_bits <= 62")
    return np.rint(np.ldexp(values.astype(np.float64), fixed.frac_bits)).astype(np.int64)


def _columns(x: Any, fixed: FixedPoint) -> tuple[int, int, Iterator[tuple[np.ndarray, np.ndarray]]]:
    """(rows, cols, iterator of (row indices, encoded values) per column)."""
    if hasattr(x, "tocsc"):
        csc = x.tocsc()
        rows, cols = csc.shape
        data = _encode_matrix(np.asarray(csc.data), fixed)
        ptr, idx = csc.indptr, csc.indices
        return rows, cols, ((idx[ptr[j]:ptr[j + 1]], data[ptr[j]:ptr[j + 1]]) for j in range(cols))
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise CryptoError(f"X must be 2-D, got shape {arr.shape}")
    enc = _encode_matrix(arr, fixed)
    everything = np.arange(arr.shape[0])
    return arr.shape[0], arr.shape[1], ((everything, enc[:, j]) for j in range(arr.shape[1]))


def xt_d(x: Any, d: CipherVector, fixed: FixedPoint = DEFAULT_X_FIXED) -> CipherVector:
    """``X^T [[d]]`` for a dense array or a scipy sparse matrix ``X`` (rows = ``len(d)``).

    ``fixed`` declares ``X``'s precision and range; the result's scale is
    ``d.frac_bits + fixed.frac_bits`` and its bound ``d.bound * rows * fixed.bound``.
    """
    if d.layout is not None or d.masked:
        raise CryptoError("X^T d needs an unpacked, unmasked [[d]]")
    rows, cols, columns = _columns(x, fixed)
    if rows != d.length:
        raise CryptoError(f"X has {rows} rows but [[d]] has {d.length} values")
    bound = d.bound * rows * fixed.bound
    check_bound(d.public_key, bound, "X^T d")
    nsq, cts = d.nsquare, d.ciphertexts
    out = []
    for idx, vals in columns:
        out.append(_signed_multi_exp([cts[i] for i in idx], vals, nsq))
    return CipherVector(d.public_key, out, cols, d.frac_bits + fixed.frac_bits, bound)
