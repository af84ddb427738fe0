"""Raw Paillier on gmpy2 integers: DJN-style fixed-base encryption, batch CRT decryption.

Encryption is ``c = (1 + m n) * h^r mod n^2`` with ``h = (-x^2)^n mod n^2`` for a
random ``x`` (Damgård–Jurik–Nielsen) and a fresh uniform ``r`` of
``exponent_bits`` bits (half the modulus length by default). ``h^r`` comes from a
fixed-base window table, so it costs ``exponent_bits / window`` multiplications
instead of a full ``r^n mod n^2``. The key owner keeps the tables modulo ``p^2``
and ``q^2`` and combines with CRT. Every call draws fresh randomness from
``secrets``; obfuscators are never cached or reused.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Sequence

import gmpy2
from gmpy2 import mpz

from fedps.engine.crypto.keys import PrivateKey, PublicKey, max_plain
from fedps.errors import ConfigError, CryptoError

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 8
MIN_EXPONENT_BITS = 128
_DRAW_CHUNK = 4096  # exponents drawn per batch of randomness


class FixedBaseTable:
    """Powers ``base^(d * 2^(window*i))`` so that ``base^r`` is one product per window."""

    def __init__(self, base: int, modulus: int, exponent_bits: int, window: int = DEFAULT_WINDOW) -> None:
        if not 1 <= window <= 16:
            raise ConfigError(f"window must be in [1, 16], got {window}")
        self.modulus = mpz(modulus)
        self.window = window
        self.exponent_bits = exponent_bits
        self.rows: list[list[mpz]] = []
        step = mpz(base) % self.modulus
        for _ in range(math.ceil(exponent_bits / window)):
            row = [mpz(1), step]
            for _ in range((1 << window) - 2):
                row.append(row[-1] * step % self.modulus)
            self.rows.append(row)
            step = row[-1] * step % self.modulus

    def power(self, digits: Sequence[int]) -> mpz:
        """``base^r`` for ``r`` given as little-endian base-``2^window`` digits."""
        acc = None
        mod = self.modulus
        for row, d in zip(self.rows, digits):
            if d:
                acc = row[d] if acc is None else acc * row[d] % mod
        return mpz(1) if acc is None else acc


def _djn_base(n: mpz, nsquare: mpz) -> mpz:
    """``(-x^2)^n mod n^2`` for a fresh random unit ``x``."""
    while True:
        x = mpz(secrets.randbelow(int(n) - 2) + 2)
        if gmpy2.gcd(x, n) == 1:
            return gmpy2.powmod(n - x * x % n, n, nsquare)


class Obfuscator:
    """Draws fresh obfuscators ``h^r mod n^2`` (with CRT when the private key is given)."""

    def __init__(
        self,
        public_key: PublicKey,
        *,
        private_key: PrivateKey | None = None,
        exponent_bits: int | None = None,
        window: int = DEFAULT_WINDOW,
        base: int | None = None,
    ) -> None:
        self.n, self.nsquare = mpz(public_key.n), mpz(public_key.nsquare)
        half = self.n.bit_length() // 2
        self.exponent_bits = exponent_bits or half
        if self.exponent_bits < MIN_EXPONENT_BITS:
            raise ConfigError(f"exponent_bits must be >= {MIN_EXPONENT_BITS}, got {self.exponent_bits}")
        if self.exponent_bits < half:
            log.info("short DJN exponent (%d < %d bits): relies on the short-exponent assumption",
                     self.exponent_bits, half)
        self.window = window
        self.base = mpz(base) if base is not None else _djn_base(self.n, self.nsquare)
        self._crt = private_key is not None
        if private_key is None:
            self._tables = [FixedBaseTable(self.base, self.nsquare, self.exponent_bits, window)]
        else:
            self._p2, self._q2 = mpz(private_key.p) ** 2, mpz(private_key.q) ** 2
            self._p2_inv = gmpy2.invert(self._p2, self._q2)
            self._tables = [FixedBaseTable(self.base, m, self.exponent_bits, window) for m in (self._p2, self._q2)]
        self._nwin = math.ceil(self.exponent_bits / window)

    @property
    def uses_crt(self) -> bool:
        return self._crt

    def power(self, r: int) -> mpz:
        """``h^r mod n^2`` for a given exponent (tests; protocols use ``draw``)."""
        mask = (1 << self.window) - 1
        return self._combine([(r >> (self.window * i)) & mask for i in range(self._nwin)])

    def draw(self, count: int) -> list[mpz]:
        """``count`` obfuscators, each with its own fresh exponent."""
        out: list[mpz] = []
        for start in range(0, count, _DRAW_CHUNK):
            out.extend(self._combine(d) for d in self._random_digits(min(_DRAW_CHUNK, count - start)))
        return out

    def _random_digits(self, count: int) -> list[Sequence[int]]:
        if self.window == 8:
            nbytes = self._nwin
            top = self.exponent_bits % 8
            raw = bytearray(secrets.token_bytes(nbytes * count))
            out = [raw[i * nbytes:(i + 1) * nbytes] for i in range(count)]
            if top:
                for b in out:
                    b[-1] &= (1 << top) - 1
            return out
        mask = (1 << self.window) - 1
        rs = [secrets.randbits(self.exponent_bits) for _ in range(count)]
        return [[(r >> (self.window * i)) & mask for i in range(self._nwin)] for r in rs]

    def _combine(self, digits: Sequence[int]) -> mpz:
        if not self._crt:
            return self._tables[0].power(digits)
        op, oq = (t.power(digits) for t in self._tables)
        return op + self._p2 * ((oq - op) * self._p2_inv % self._q2)


class RawEncryptor:
    """Encrypts signed integers into raw ciphertexts (mpz) with fresh obfuscators."""

    def __init__(self, public_key: PublicKey, obfuscator: Obfuscator) -> None:
        self.public_key = public_key
        self.n, self.nsquare = mpz(public_key.n), mpz(public_key.nsquare)
        self.max_int = max_plain(public_key)
        self.obfuscator = obfuscator

    def encrypt(self, plains: Sequence[int]) -> list[mpz]:
        """Encrypt signed ints (``|m| <= max_int``); negatives become ``n - |m|``."""
        n, nsq, top = self.n, self.nsquare, self.max_int
        for m in plains:
            if m > top or -m > top:
                raise CryptoError(f"plaintext of {int(m).bit_length()} bits overflows the key's range")
        obf = self.obfuscator.draw(len(plains))
        return [(1 + (m % n) * n) * o % nsq for m, o in zip(plains, obf)]

    def rerandomize(self, ciphertexts: Sequence[mpz]) -> list[mpz]:
        """Multiply each ciphertext by a fresh encryption of zero."""
        nsq = self.nsquare
        return [c * o % nsq for c, o in zip(ciphertexts, self.obfuscator.draw(len(ciphertexts)))]


class RawDecryptor:
    """Batch CRT decryption of raw ciphertexts to signed integers."""

    def __init__(self, private_key: PrivateKey) -> None:
        pk = private_key.public_key
        self.public_key = pk
        self.n, self.nsquare = mpz(pk.n), mpz(pk.nsquare)
        self.max_int = max_plain(pk)
        self.p, self.q = mpz(private_key.p), mpz(private_key.q)
        self.p2, self.q2 = self.p ** 2, self.q ** 2
        g = self.n + 1
        self.hp = gmpy2.invert((gmpy2.powmod(g, self.p - 1, self.p2) - 1) // self.p, self.p)
        self.hq = gmpy2.invert((gmpy2.powmod(g, self.q - 1, self.q2) - 1) // self.q, self.q)
        self.p_inv = gmpy2.invert(self.p, self.q)
        self.small = (self.p, self.p2, self.hp) if self.p < self.q else (self.q, self.q2, self.hq)
        self.half_prime = int(self.small[0]) // 2

    def decrypt(self, ciphertexts: Sequence[int], bound: int | None = None) -> list[int]:
        """Plaintexts as signed ints; a value in phe's overflow gap raises ``CryptoError``.

        With a ``bound`` below ``min(p, q) / 2`` on ``|m|``, the plaintext is
        already determined modulo the smaller prime: half the work.
        """
        if bound is not None and bound < self.half_prime:
            return self._decrypt_small(ciphertexts)
        p, q = self.p, self.q
        xp = gmpy2.powmod_base_list([mpz(c) % self.p2 for c in ciphertexts], p - 1, self.p2)
        xq = gmpy2.powmod_base_list([mpz(c) % self.q2 for c in ciphertexts], q - 1, self.q2)
        out = []
        for a, b in zip(xp, xq):
            mp = (a - 1) // p * self.hp % p
            mq = (b - 1) // q * self.hq % q
            out.append(self._signed(int(mp + p * ((mq - mp) * self.p_inv % q))))
        return out

    def _decrypt_small(self, ciphertexts: Sequence[int]) -> list[int]:
        p, p2, hp = self.small
        xs = gmpy2.powmod_base_list([mpz(c) % p2 for c in ciphertexts], p - 1, p2)
        half = p >> 1
        out = []
        for x in xs:
            m = int((x - 1) // p * hp % p)
            out.append(m - int(p) if m > half else m)
        return out

    def _signed(self, m: int) -> int:
        if m <= self.max_int:
            return m
        if m >= int(self.n) - self.max_int:
            return m - int(self.n)
        raise CryptoError("decrypted value is in the overflow gap: wrong key, corrupted ciphertext or overflow")
