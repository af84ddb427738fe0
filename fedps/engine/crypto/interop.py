"""Interoperation with ``phe``: vectors to and from ``EncryptedNumber`` lists.

``phe`` encodes ``mantissa * 16^exponent`` per value; a vector has one binary
scale. Mixed exponents are aligned to the finest one by multiplying the
coarser ciphertexts by powers of 16, which keeps the plaintexts exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import gmpy2
from gmpy2 import mpz
from phe import paillier

from fedps.engine.crypto.encoding import DEFAULT_FIXED, FixedPoint
from fedps.engine.crypto.keys import PublicKey, check_same_key, fingerprint
from fedps.engine.crypto.vector import CipherVector
from fedps.errors import CryptoError

_BASE_BITS = 4  # phe's EncodedNumber.BASE == 16


def to_phe(vector: CipherVector) -> list[paillier.EncryptedNumber]:
    """One ``phe`` ``EncryptedNumber`` per value (unpacked, unmasked vectors only)."""
    if vector.layout is not None or vector.masked:
        raise CryptoError("only unpacked, unmasked vectors convert to phe numbers")
    frac = -(-vector.frac_bits // _BASE_BITS) * _BASE_BITS
    aligned = vector.rescale(frac)
    exponent = -frac // _BASE_BITS
    return [paillier.EncryptedNumber(vector.public_key, int(c), exponent) for c in aligned.ciphertexts]


def from_phe(
    numbers: Sequence[paillier.EncryptedNumber], public_key: PublicKey, fixed: FixedPoint = DEFAULT_FIXED
) -> CipherVector:
    """A vector from ``phe`` numbers; ``fixed.int_bits`` declares their range.

    Numbers with different exponents are brought to the finest one (and at
    least to integer scale), so the result's ``frac_bits`` may exceed
    ``fixed.frac_bits``.
    """
    for num in numbers:
        check_same_key(public_key, fingerprint(num.public_key), "phe number")
    if not numbers:
        return CipherVector(public_key, [], 0, fixed.frac_bits, 0)
    low = min(min(num.exponent for num in numbers), 0)
    nsq = mpz(public_key.nsquare)
    cts = []
    for num in numbers:
        c = mpz(num.ciphertext(be_secure=False))
        step = num.exponent - low
        cts.append(gmpy2.powmod(c, mpz(16) ** step, nsq) if step else c)
    frac = -low * _BASE_BITS
    return CipherVector(public_key, cts, len(cts), frac, 1 << (fixed.int_bits + frac))
