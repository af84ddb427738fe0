"""Encrypting and decrypting whole vectors, plain or packed.

``Encryptor`` wraps a DJN fixed-base obfuscator (CRT tables when it is given
the private key, i.e. when the key owner encrypts); ``Decryptor`` does batch
CRT decryption. Neither calls ``phe`` per value.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from fedps.engine.crypto.encoding import DEFAULT_FIXED, MIN_MASK_BITS, FixedPoint, PackingLayout, decode_ints
from fedps.engine.crypto.fast import DEFAULT_WINDOW, Obfuscator, RawDecryptor, RawEncryptor
from fedps.engine.crypto.keys import PrivateKey, PublicKey, check_same_key, fingerprint
from fedps.engine.crypto.vector import CipherVector
from fedps.errors import CryptoError

log = logging.getLogger(__name__)


class Encryptor:
    """Encrypts numpy arrays under ``public_key`` with fresh DJN randomness.

    Pass ``private_key`` when the key owner encrypts: the fixed-base tables
    are then kept modulo ``p^2`` and ``q^2`` (CRT). ``exponent_bits`` below
    half the modulus length is the short-exponent opt-in (see docs/protocols.md).
    """

    def __init__(
        self,
        public_key: PublicKey,
        *,
        private_key: PrivateKey | None = None,
        exponent_bits: int | None = None,
        window: int = DEFAULT_WINDOW,
    ) -> None:
        if private_key is not None and private_key.public_key.n != public_key.n:
            raise CryptoError("private key does not belong to this public key")
        self.public_key = public_key
        obf = Obfuscator(public_key, private_key=private_key, exponent_bits=exponent_bits, window=window)
        self.raw = RawEncryptor(public_key, obf)
        log.debug("encryptor ready: key %s, crt=%s, exponent %d bits, window %d",
                  fingerprint(public_key).hex()[:12], obf.uses_crt, obf.exponent_bits, window)

    def encrypt(self, values: np.ndarray | Sequence[float], fixed: FixedPoint = DEFAULT_FIXED) -> CipherVector:
        """One ciphertext per value."""
        ints = fixed.encode(values)
        return CipherVector(self.public_key, self.raw.encrypt(ints), len(ints), fixed.frac_bits, fixed.bound)

    def encrypt_packed(
        self, values: np.ndarray | Sequence[float], layout: PackingLayout, fixed: FixedPoint = DEFAULT_FIXED
    ) -> CipherVector:
        """``layout.slots`` consecutive values per ciphertext (a 2-D array: one row each)."""
        arr = np.asarray(values, dtype=np.float64)
        if arr.ndim == 2:
            if arr.shape[1] != layout.slots:
                raise CryptoError(f"rows of {arr.shape[1]} values do not match {layout.slots} slots")
            arr = arr.ravel()
        ints = fixed.encode(arr)
        k = layout.slots
        plains = [layout.pack(ints[i:i + k]) for i in range(0, len(ints), k)]
        return CipherVector(self.public_key, self.raw.encrypt(plains), len(ints), fixed.frac_bits,
                            fixed.bound, layout)

    def encrypt_ints(self, ints: Sequence[int], bound: int, frac_bits: int = 0) -> CipherVector:
        """Encrypt exact integers with a declared ``bound`` on their absolute value."""
        if any(abs(int(v)) > bound for v in ints):
            raise CryptoError(f"an integer exceeds the declared bound 2^{int(bound).bit_length()}")
        return CipherVector(self.public_key, self.raw.encrypt([int(v) for v in ints]), len(ints), frac_bits, bound)

    def rerandomize(self, vector: CipherVector) -> CipherVector:
        """Multiply every ciphertext by a fresh encryption of zero."""
        check_same_key(self.public_key, vector.fingerprint)
        return vector.with_ciphertexts(self.raw.rerandomize(vector.ciphertexts))


class Decryptor:
    """Batch CRT decryption of ciphertext vectors under ``private_key``."""

    def __init__(self, private_key: PrivateKey) -> None:
        self.public_key = private_key.public_key
        self.raw = RawDecryptor(private_key)

    def decrypt_exact(self, vector: CipherVector) -> list[int]:
        """Exact signed integers: one per value, or one per ciphertext for a masked vector.

        A masked vector's plaintexts are returned whole (value plus mask);
        the sender's ``Mask.remove`` takes them, unmasks and unpacks.
        """
        check_same_key(self.public_key, vector.fingerprint)
        plains = self.raw.decrypt(vector.ciphertexts, _plain_bound(vector))
        if vector.layout is None or vector.masked:
            return plains
        out: list[int] = []
        for p in plains:
            out.extend(vector.layout.unpack(p))
        return out[:vector.length]

    def decrypt(self, vector: CipherVector) -> np.ndarray:
        """Decoded float64 values; a masked vector is refused (use ``decrypt_exact``)."""
        if vector.masked:
            raise CryptoError("vector is masked: decrypt_exact it and let the sender remove the mask")
        ints = self.decrypt_exact(vector)
        if any(abs(v) > vector.bound for v in ints):
            raise CryptoError("decrypted value exceeds the vector's declared bound: overflow or tampering")
        return decode_ints(ints, vector.frac_bits)


def _plain_bound(vector: CipherVector) -> int | None:
    """A bound on ``|plaintext|`` when one is known to be small, else ``None``."""
    if vector.layout is not None:
        return None
    if vector.masked:
        return 1 << (max(1, vector.bound.bit_length()) + MIN_MASK_BITS + 1)
    return vector.bound
