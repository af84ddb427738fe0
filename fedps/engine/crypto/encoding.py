"""Fixed-point encoding of signed floats, and packing of several values per plaintext.

A value ``x`` is encoded as the integer ``round(x * 2^frac_bits)``; the error is
at most ``2^-(frac_bits+1)``. ``int_bits`` declares ``|x| < 2^int_bits``: a value
outside is refused, so every bound the layer tracks comes from declared
parameters and shapes, never from the data (bounds travel in vector headers).

Packing puts ``slots`` signed integers in one plaintext, slot ``j`` at bit
``j * slot_bits``. A slot holds ``value_bits`` of value (already including the
headroom for the declared additions) plus a sign bit. When a layout reserves a
mask (``mask_bits`` >= 40), the plaintext keeps ``mask_bits + 1`` spare bits
above the slots: the whole packed integer is hidden by one uniform mask that
is ``mask_bits`` wider than it (statistical distance below ``2^-mask_bits``
for all slots together), rather than by one mask per slot, which would cost
``mask_bits + 1`` bits in every slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedps.errors import ConfigError, CryptoError

MIN_MASK_BITS = 40
_INT64_SAFE = 2**62


@dataclass(frozen=True)
class FixedPoint:
    """Signed fixed point: ``frac_bits`` of precision, ``|x| < 2^int_bits`` declared."""

    frac_bits: int = 32
    int_bits: int = 16

    def __post_init__(self) -> None:
        if not 0 <= self.frac_bits <= 512:
            raise ConfigError(f"frac_bits must be in [0, 512], got {self.frac_bits}")
        if not 0 <= self.int_bits <= 512:
            raise ConfigError(f"int_bits must be in [0, 512], got {self.int_bits}")

    @property
    def bound(self) -> int:
        """Largest absolute encoded integer a valid value can produce."""
        return 1 << (self.int_bits + self.frac_bits)

    def encode(self, values: np.ndarray | Sequence[float]) -> list[int]:
        """Encode a 1-D array of floats into signed Python ints; out-of-range raises."""
        arr = np.asarray(values, dtype=np.float64).ravel()
        if not np.all(np.isfinite(arr)):
            raise CryptoError("cannot encode NaN or infinite values")
        if arr.size and np.max(np.abs(arr)) >= 2.0**self.int_bits:
            raise CryptoError(
                f"value {np.max(np.abs(arr)):.6g} overflows the declared range |x| < 2^{self.int_bits};"
                " raise int_bits"
            )
        scaled = np.rint(np.ldexp(arr, self.frac_bits))
        if scaled.size == 0 or np.max(np.abs(scaled)) < _INT64_SAFE:
            return scaled.astype(np.int64).tolist()
        return [int(v) for v in scaled]

    def decode(self, ints: Sequence[int]) -> np.ndarray:
        """Decode signed integers with this scale back to float64."""
        return decode_ints(ints, self.frac_bits)


DEFAULT_FIXED = FixedPoint()


def decode_ints(ints: Sequence[int], frac_bits: int) -> np.ndarray:
    """``ints * 2^-frac_bits`` as float64, exact for integers below 2^53."""
    if len(ints) == 0:
        return np.zeros(0)
    if max(abs(int(v)) for v in ints) < _INT64_SAFE:
        return np.ldexp(np.asarray(ints, dtype=np.int64).astype(np.float64), -frac_bits)
    try:
        return np.ldexp(np.array([float(v) for v in ints]), -frac_bits)
    except OverflowError as exc:
        raise CryptoError("decoded value is too large for float64") from exc


def slot_bits_for(value_bits: int) -> int:
    """Width of a slot holding ``value_bits`` of signed value (plus the sign bit)."""
    return value_bits + 1


def capacity(key_bits: int, slot_bits: int, mask_bits: int = 0) -> int:
    """Slots per plaintext, so that packed value plus mask stays below ``2^(key_bits-3)`` (< n/3)."""
    spare = mask_bits + 1 if mask_bits else 0
    return max(0, (key_bits - 3 - spare) // slot_bits)


@dataclass(frozen=True)
class PackingLayout:
    """How signed values share one plaintext: ``slots`` of ``slot_bits`` each.

    ``value_bits`` bounds every slot's value after the declared additions
    (``|v| < 2^value_bits``); ``mask_bits`` (0, or at least 40) is how much
    wider than the packed value the uniform mask is that hides a plaintext
    (statistical distance below ``2^-mask_bits``) when it goes back to the key
    owner; 0 reserves no room, for results the owner may see in the clear.
    """

    slots: int
    value_bits: int
    mask_bits: int = MIN_MASK_BITS

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise ConfigError(f"slots must be >= 1, got {self.slots}")
        if self.value_bits < 1:
            raise ConfigError(f"value_bits must be >= 1, got {self.value_bits}")
        if self.mask_bits and self.mask_bits < MIN_MASK_BITS:
            raise ConfigError(f"mask_bits must be 0 or >= {MIN_MASK_BITS}, got {self.mask_bits}")

    @property
    def slot_bits(self) -> int:
        return slot_bits_for(self.value_bits)

    @property
    def mask_range_bits(self) -> int:
        """A plaintext's mask is uniform below ``2^mask_range_bits``."""
        return self.slots * self.slot_bits + self.mask_bits

    @property
    def value_bound(self) -> int:
        """Largest absolute slot value the layout accepts (before masking)."""
        return (1 << self.value_bits) - 1

    @classmethod
    def plan(
        cls,
        key_bits: int,
        fixed: FixedPoint,
        additions: int,
        *,
        mask_bits: int = MIN_MASK_BITS,
        slots: int | None = None,
    ) -> PackingLayout:
        """Layout for values of ``fixed`` summed ``additions`` times (as many slots as fit)."""
        if additions < 0:
            raise ConfigError(f"additions must be >= 0, got {additions}")
        return cls.for_bound(key_bits, fixed.bound * (additions + 1), mask_bits=mask_bits, slots=slots)

    @classmethod
    def for_bound(
        cls, key_bits: int, bound: int, *, mask_bits: int = MIN_MASK_BITS, slots: int | None = None
    ) -> PackingLayout:
        """Layout whose slots hold any integer with ``|v| <= bound``."""
        value_bits = max(1, int(bound).bit_length())
        fit = capacity(key_bits, slot_bits_for(value_bits), mask_bits)
        if fit < 1:
            raise CryptoError(f"a {value_bits}-bit value with a {mask_bits}-bit mask does not fit a {key_bits}-bit key")
        if slots is not None and not 1 <= slots <= fit:
            raise ConfigError(f"slots must be in [1, {fit}] for this key and precision, got {slots}")
        return cls(slots=slots or fit, value_bits=value_bits, mask_bits=mask_bits)

    def check_fits(self, key_bits: int) -> None:
        """Raise unless ``slots`` of this width fit a ``key_bits`` plaintext."""
        if self.slots > capacity(key_bits, self.slot_bits, self.mask_bits):
            raise CryptoError(f"layout of {self.slots} x {self.slot_bits} bits does not fit a {key_bits}-bit key")

    def pack(self, values: Sequence[int]) -> int:
        """Pack up to ``slots`` signed ints (slot 0 lowest) into one signed int."""
        if len(values) > self.slots:
            raise CryptoError(f"{len(values)} values do not fit {self.slots} slots")
        packed = 0
        for v in reversed(values):
            packed = (packed << self.slot_bits) + int(v)
        return packed

    def unpack(self, packed: int, count: int | None = None) -> list[int]:
        """Split a signed packed integer back into ``count`` signed slot values."""
        width = self.slot_bits
        low, half = (1 << width) - 1, 1 << (width - 1)
        out = []
        for _ in range(self.slots if count is None else count):
            s = packed & low
            if s >= half:
                s -= 1 << width
            out.append(s)
            packed = (packed - s) >> width
        return out
