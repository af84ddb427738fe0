"""Sending results back to a key's owner: compress, mask, re-randomise.

``compress`` folds ``k`` one-value ciphertexts into one by shifting and adding
(``C = prod c_j^(2^(j*slot_bits))``), so the owner decrypts ``k`` times fewer.
``add_mask`` adds to every plaintext a uniform mask ``mask_bits`` (>= 40) wider
than the plaintext's value, by multiplying with a *fresh encryption* of the
mask, which is also the re-randomisation the protocol rules demand. The owner
decrypts exact masked integers (one per ciphertext); only the sender, who
keeps the ``Mask``, can remove it and unpack the slots.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import gmpy2
import numpy as np
from gmpy2 import mpz

from fedps.engine.crypto.cipher import Encryptor
from fedps.engine.crypto.encoding import MIN_MASK_BITS, PackingLayout, decode_ints
from fedps.engine.crypto.keys import check_bound, check_same_key
from fedps.engine.crypto.vector import CipherVector
from fedps.errors import CryptoError


def compress(vector: CipherVector, layout: PackingLayout | None = None) -> CipherVector:
    """Pack a one-value-per-ciphertext vector into ``layout`` (default: as many slots as fit).

    The default layout reserves room for a 40-bit mask; pass a layout with
    ``mask_bits=0`` only for results the owner may see in the clear.
    """
    if vector.layout is not None or vector.masked:
        raise CryptoError("only unpacked, unmasked vectors can be compressed")
    key_bits = vector.public_key.n.bit_length()
    layout = layout or PackingLayout.for_bound(key_bits, vector.bound)
    if vector.bound > layout.value_bound:
        raise CryptoError(f"values may reach 2^{vector.bound.bit_length()}, slots hold {layout.value_bits} bits")
    layout.check_fits(key_bits)
    nsq, shift = vector.nsquare, mpz(1) << layout.slot_bits
    cts, k = vector.ciphertexts, layout.slots
    out = []
    for start in range(0, len(cts), k):
        group = cts[start:start + k]
        acc = group[-1]
        for c in reversed(group[:-1]):
            acc = gmpy2.powmod(acc, shift, nsq) * c % nsq
        out.append(acc)
    return vector.with_ciphertexts(out, layout=layout)


@dataclass(frozen=True)
class Mask:
    """The sender's secret: one mask per ciphertext, plus what is needed to undo it."""

    values: tuple[int, ...] = field(repr=False)
    layout: PackingLayout | None
    length: int
    frac_bits: int
    bound: int

    def remove_exact(self, masked: Sequence[int]) -> list[int]:
        """Exact integers from the owner's ``decrypt_exact`` of the masked vector."""
        if len(masked) != len(self.values):
            raise CryptoError(f"{len(masked)} masked plaintexts for a mask of {len(self.values)}")
        plains = [int(x) - r for x, r in zip(masked, self.values)]
        if self.layout is None:
            out = plains
        else:
            # A wrong mask leaves a (mask_bits + packed width)-bit error: the packed
            # value then falls outside its width except with probability ~2^-mask_bits.
            width = 1 << (self.layout.slots * self.layout.slot_bits)
            if any(abs(p) >= width for p in plains):
                raise CryptoError("unmasked plaintext exceeds its packed width: "
                                  "the decryption does not belong to this mask")
            out = [v for p in plains for v in self.layout.unpack(p)][:self.length]
        if any(abs(v) > self.bound for v in out):
            raise CryptoError("unmasked value exceeds its bound: the decryption does not belong to this mask")
        return out

    def remove(self, masked: Sequence[int]) -> np.ndarray:
        """Decoded float64 values from the owner's ``decrypt_exact`` of the masked vector."""
        return decode_ints(self.remove_exact(masked), self.frac_bits)


def add_mask(
    vector: CipherVector, encryptor: Encryptor, randbits: Callable[[int], int] | None = None
) -> tuple[CipherVector, Mask]:
    """Mask every plaintext and re-randomise; returns the vector to send and the mask to keep.

    Each plaintext ``V`` (a value, or a packed integer) gets ``V + R`` with
    ``R`` uniform below ``2^(bits(V) + mask_bits)``, added as a fresh
    encryption of ``R``. ``randbits`` draws the masks (default
    ``secrets.randbits``); a protocol that must replay a step after a crash
    passes a keyed, deterministic one so the replayed masks match. The
    re-randomisation stays fresh either way.
    """
    if vector.masked:
        raise CryptoError("vector is already masked")
    check_same_key(encryptor.public_key, vector.fingerprint)
    layout = vector.layout
    if layout is None:
        bits = max(1, vector.bound.bit_length()) + MIN_MASK_BITS
        check_bound(vector.public_key, 1 << (bits + 1), "masked vector")
    elif layout.mask_bits == 0:
        raise CryptoError("the packing layout reserves no mask bits: plan it with mask_bits >= 40")
    else:
        bits = layout.mask_range_bits
    draw = randbits or secrets.randbits
    masks = [draw(bits) for _ in vector.ciphertexts]
    nsq = vector.nsquare
    out = [c * m % nsq for c, m in zip(vector.ciphertexts, encryptor.raw.encrypt(masks))]
    mask = Mask(tuple(masks), layout, vector.length, vector.frac_bits, vector.bound)
    return vector.with_ciphertexts(out, masked=True), mask


def seal_for_owner(
    vector: CipherVector,
    encryptor: Encryptor,
    layout: PackingLayout | None = None,
    randbits: Callable[[int], int] | None = None,
) -> tuple[CipherVector, Mask]:
    """Compress (when unpacked), mask and re-randomise a result bound for the key's owner."""
    packed = compress(vector, layout) if vector.layout is None else vector
    return add_mask(packed, encryptor, randbits)

