"""Paillier key pairs (``phe`` objects), fingerprints and plaintext ranges.

Keys are plain ``phe.paillier`` keys (``g = n + 1``), so everything the crypto
layer produces decrypts with ``phe`` and the other way round.
"""

from __future__ import annotations

import hashlib
import logging

from phe import paillier

from fedps.errors import ConfigError, CryptoError

log = logging.getLogger(__name__)

DEFAULT_KEY_BITS = 2048
MIN_KEY_BITS = 512

PublicKey = paillier.PaillierPublicKey
PrivateKey = paillier.PaillierPrivateKey


def generate_keypair(bits: int = DEFAULT_KEY_BITS) -> tuple[PublicKey, PrivateKey]:
    """Generate a ``phe`` key pair with an ``bits``-bit modulus (2048 by default)."""
    if bits < MIN_KEY_BITS or bits % 8:
        raise ConfigError(f"key bits must be a multiple of 8 and >= {MIN_KEY_BITS}, got {bits}")
    if bits < DEFAULT_KEY_BITS:
        log.warning("generating a %d-bit Paillier key: fine for tests, too small for real data", bits)
    return paillier.generate_paillier_keypair(n_length=bits)


def fingerprint(public_key: PublicKey) -> bytes:
    """SHA-256 of the modulus ``n`` as minimal big-endian bytes."""
    n = int(public_key.n)
    return hashlib.sha256(n.to_bytes((n.bit_length() + 7) // 8, "big")).digest()


def ciphertext_width(public_key: PublicKey) -> int:
    """Bytes of one ciphertext on the wire: the byte length of ``n^2``."""
    return (int(public_key.nsquare).bit_length() + 7) // 8


def max_plain(public_key: PublicKey) -> int:
    """Largest absolute signed plaintext that decodes unambiguously (``phe``'s ``max_int``)."""
    return int(public_key.max_int)


def check_bound(public_key: PublicKey, bound: int, what: str) -> None:
    """Raise ``CryptoError`` when values up to ``bound`` in absolute value would overflow."""
    if bound > max_plain(public_key):
        raise CryptoError(
            f"{what} would overflow the plaintext space: |value| may reach 2^{bound.bit_length()}"
            f" but a {public_key.n.bit_length()}-bit key holds only 2^{max_plain(public_key).bit_length()};"
            " use a smaller scale, fewer additions or a larger key"
        )


def check_same_key(expected: PublicKey, got_fingerprint: bytes, what: str = "ciphertext vector") -> None:
    """Refuse material made under another key, naming both fingerprints."""
    want = fingerprint(expected)
    if got_fingerprint != want:
        raise CryptoError(
            f"{what} is under key {got_fingerprint.hex()[:16]}…, expected key {want.hex()[:16]}…;"
            " it was encrypted for another party or another job"
        )
