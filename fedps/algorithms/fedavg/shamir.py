"""Shamir secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

A secret ``s`` (an integer below 2^256) is the constant term of a random
polynomial of degree ``t - 1``; the share of party ``x`` (``x = 1..n``) is the
polynomial's value at ``x``. Any ``t`` shares give ``s`` back by Lagrange
interpolation at 0; ``t - 1`` shares are uniformly distributed whatever ``s``
is, so they say nothing about it. Coefficients come from ``secrets``.
"""

from __future__ import annotations

import secrets

from fedps.errors import CryptoError

#: The Mersenne prime 2^521 - 1: larger than any 32-byte secret.
PRIME = (1 << 521) - 1
SECRET_BYTES = 32


def split(secret: bytes, xs: list[int], threshold: int) -> dict[int, int]:
    """Shares of ``secret`` for the points ``xs`` (distinct, 1 <= x < PRIME); any ``threshold`` recover it."""
    if len(secret) != SECRET_BYTES:
        raise CryptoError(f"Shamir sharing takes {SECRET_BYTES}-byte secrets, got {len(secret)} bytes")
    if not 1 <= threshold <= len(xs):
        raise CryptoError(f"threshold {threshold} must be between 1 and the number of shares {len(xs)}")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise CryptoError("share points must be distinct and in 1..PRIME-1")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: _evaluate(coefficients, x) for x in xs}


def combine(shares: dict[int, int], threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares ``{x: y}`` (uses the first ``threshold`` by x)."""
    if len(shares) < threshold:
        raise CryptoError(f"{len(shares)} shares cannot recover a secret shared with threshold {threshold}")
    points = sorted(shares.items())[:threshold]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                numerator = numerator * (-xj) % PRIME
                denominator = denominator * (xi - xj) % PRIME
        secret = (secret + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * SECRET_BYTES):
        raise CryptoError("the shares do not belong to one 32-byte secret (a share was altered or mixed up)")
    return secret.to_bytes(SECRET_BYTES, "big")


def _evaluate(coefficients: list[int], x: int) -> int:
    value = 0
    for c in reversed(coefficients):
        value = (value * x + c) % PRIME
    return value
