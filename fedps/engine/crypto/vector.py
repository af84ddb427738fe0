"""The ciphertext vector: the crypto layer's contract with every other layer.

A ``CipherVector`` carries the public key's fingerprint (SHA-256 of ``n``), the
fixed-point scale (``frac_bits``), a declared bound on every value, the packing
layout (``None`` means one value per ciphertext) and the ciphertexts. On the
wire (``to_bytes``) it is a version byte followed by an Arrow IPC stream with
one ``FixedSizeBinary`` column of big-endian ciphertexts (width = bytes of
``n^2``) and the header in the schema metadata. ``messaging`` never looks
inside; ``from_bytes`` refuses another key, another version or malformed input.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import gmpy2
import numpy as np
import pyarrow as pa
from gmpy2 import mpz

from fedps.engine.crypto.encoding import FixedPoint, PackingLayout
from fedps.engine.crypto.keys import PublicKey, check_bound, check_same_key, ciphertext_width, fingerprint
from fedps.errors import CryptoError

WIRE_VERSION = 1
_META_KEY = b"fedps.crypto"


@dataclass(frozen=True, eq=False)
class CipherVector:
    """``length`` encrypted fixed-point values under ``public_key``.

    ``bound`` is a declared (data-independent) limit on the absolute encoded
    integer of every value; operations update it and refuse to overflow.
    A ``masked`` vector holds value-plus-mask and only decrypts to exact ints.
    """

    public_key: PublicKey
    ciphertexts: list[mpz] = field(repr=False)
    length: int
    frac_bits: int
    bound: int
    layout: PackingLayout | None = None
    masked: bool = False

    def __post_init__(self) -> None:
        if len(self.ciphertexts) != math.ceil(self.length / self.slots):
            raise CryptoError(f"{len(self.ciphertexts)} ciphertexts cannot hold {self.length} values"
                              f" at {self.slots} per ciphertext")
        if self.layout is not None:
            self.layout.check_fits(self.public_key.n.bit_length())
            if not self.masked and self.bound > self.layout.value_bound:
                raise CryptoError(f"packed slot overflow: values may reach 2^{self.bound.bit_length()} but slots"
                                  f" hold {self.layout.value_bits} bits; declare more additions in the layout")
        elif not self.masked:
            check_bound(self.public_key, self.bound, "ciphertext vector")

    # ---- shape and identity -------------------------------------------------
    def __len__(self) -> int:
        return self.length

    @property
    def slots(self) -> int:
        return 1 if self.layout is None else self.layout.slots

    @property
    def fingerprint(self) -> bytes:
        return fingerprint(self.public_key)

    @property
    def nsquare(self) -> mpz:
        return mpz(self.public_key.nsquare)

    @property
    def column(self) -> pa.FixedSizeBinaryArray:
        """The ciphertexts as an Arrow ``FixedSizeBinary`` column."""
        width = ciphertext_width(self.public_key)
        buf = b"".join(c.to_bytes(width, "big") for c in self.ciphertexts)
        return pa.Array.from_buffers(pa.binary(width), len(self.ciphertexts), [None, pa.py_buffer(buf)])

    def with_ciphertexts(self, ciphertexts: list[mpz], **changes: object) -> CipherVector:
        """A copy with new ciphertexts (and optionally other fields changed)."""
        return replace(self, ciphertexts=ciphertexts, **changes)

    # ---- homomorphic operations ---------------------------------------------
    def _require_plain_ops(self, other: CipherVector | None = None) -> None:
        if self.masked:
            raise CryptoError("vector is masked: decrypt it with decrypt_exact, no further operations")
        if other is not None:
            check_same_key(self.public_key, other.fingerprint, "right operand")
            other._require_plain_ops()
            if other.length != self.length or other.layout != self.layout:
                raise CryptoError(f"cannot add vectors of shape {self.length}/{self.layout}"
                                  f" and {other.length}/{other.layout}")

    def rescale(self, frac_bits: int) -> CipherVector:
        """The same values at a finer scale (multiply by ``2^(frac_bits - self.frac_bits)``)."""
        shift = frac_bits - self.frac_bits
        if shift < 0:
            raise CryptoError(f"cannot rescale from {self.frac_bits} to fewer fractional bits ({frac_bits})")
        if shift == 0:
            return self
        k, nsq = mpz(1) << shift, self.nsquare
        return self.with_ciphertexts([gmpy2.powmod(c, k, nsq) for c in self.ciphertexts],
                                     frac_bits=frac_bits, bound=self.bound << shift)

    def __add__(self, other: CipherVector) -> CipherVector:
        """Element-wise sum; scales are aligned to the finer one first."""
        if not isinstance(other, CipherVector):
            return NotImplemented
        self._require_plain_ops(other)
        frac = max(self.frac_bits, other.frac_bits)
        a, b = self.rescale(frac), other.rescale(frac)
        nsq = self.nsquare
        return a.with_ciphertexts([x * y % nsq for x, y in zip(a.ciphertexts, b.ciphertexts)],
                                  bound=a.bound + b.bound)

    def add_plain(self, values: np.ndarray | Sequence[float], int_bits: int = 16) -> CipherVector:
        """Add a plaintext vector (encoded at this vector's scale, ``|x| < 2^int_bits``)."""
        self._require_plain_ops()
        fixed = FixedPoint(frac_bits=self.frac_bits, int_bits=int_bits)
        ints = fixed.encode(values)
        if len(ints) != self.length:
            raise CryptoError(f"plaintext has {len(ints)} values, vector has {self.length}")
        n, nsq = mpz(self.public_key.n), self.nsquare
        plains = self._group(ints)
        out = [c * (1 + (m % n) * n) % nsq for c, m in zip(self.ciphertexts, plains)]
        return self.with_ciphertexts(out, bound=self.bound + fixed.bound)

    def mul_plain(self, values: np.ndarray | Sequence[float] | float, fixed: FixedPoint | None = None) -> CipherVector:
        """Multiply by plaintext values (element-wise, or one scalar for all).

        Scales add up: the result has ``frac_bits + fixed.frac_bits``. Packed
        vectors take a scalar only (it multiplies every slot).
        """
        self._require_plain_ops()
        fixed = fixed or FixedPoint()
        ks = fixed.encode(np.atleast_1d(values))
        if len(ks) == 1:
            ks = ks * len(self.ciphertexts)
        elif self.layout is not None or len(ks) != self.length:
            raise CryptoError(f"need 1 or {self.length} multipliers for this vector, got {len(ks)}")
        nsq = self.nsquare
        out = [gmpy2.powmod(c, k, nsq) for c, k in zip(self.ciphertexts, ks)]
        return self.with_ciphertexts(out, frac_bits=self.frac_bits + fixed.frac_bits,
                                     bound=self.bound * fixed.bound)

    def sum(self) -> CipherVector:
        """Sum of all ciphertexts: one value, or slot-wise sums for a packed vector."""
        self._require_plain_ops()
        nsq, acc = self.nsquare, mpz(1)
        for c in self.ciphertexts:
            acc = acc * c % nsq
        return self.with_ciphertexts([acc], length=min(self.length, self.slots),
                                     bound=self.bound * len(self.ciphertexts))

    def take(self, indices: Sequence[int]) -> CipherVector:
        """The ciphertexts at ``indices`` (value indices when unpacked, rows when packed)."""
        idx = [int(i) for i in indices]
        filled = [min(self.slots, self.length - i * self.slots) for i in idx]
        if any(f < self.slots for f in filled[:-1]):
            raise CryptoError("a partly filled packed ciphertext can only be taken last")
        length = sum(filled)
        return self.with_ciphertexts([self.ciphertexts[i] for i in idx], length=length)

    def _group(self, ints: list[int]) -> list[int]:
        if self.layout is None:
            return ints
        k = self.layout.slots
        return [self.layout.pack(ints[i:i + k]) for i in range(0, len(ints), k)]

    @staticmethod
    def concat(parts: Sequence[CipherVector]) -> CipherVector:
        """Join unpacked vectors (or packed ones whose lengths fill whole ciphertexts)."""
        if not parts:
            raise CryptoError("nothing to concatenate")
        first = parts[0]
        for p in parts[1:]:
            check_same_key(first.public_key, p.fingerprint, "concatenated vector")
            if (p.frac_bits, p.layout, p.masked) != (first.frac_bits, first.layout, first.masked):
                raise CryptoError("concatenated vectors differ in scale, layout or masking")
        if any(p.length % first.slots for p in parts[:-1]):
            raise CryptoError("only the last packed vector may have a partly filled ciphertext")
        cts = [c for p in parts for c in p.ciphertexts]
        return first.with_ciphertexts(cts, length=sum(p.length for p in parts),
                                      bound=max(p.bound for p in parts))

    # ---- wire form ----------------------------------------------------------
    def _header(self) -> dict[str, object]:
        lay = self.layout
        return {"fingerprint": self.fingerprint.hex(), "length": self.length, "frac_bits": self.frac_bits,
                "bound": str(self.bound), "masked": self.masked,
                "layout": None if lay is None else [lay.slots, lay.value_bits, lay.mask_bits]}

    def to_bytes(self) -> bytes:
        """Version byte + Arrow IPC stream (header in schema metadata)."""
        schema = pa.schema([pa.field("c", pa.binary(ciphertext_width(self.public_key)), nullable=False)],
                           metadata={_META_KEY: json.dumps(self._header()).encode()})
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, schema) as writer:
            writer.write_batch(pa.record_batch([self.column], schema=schema))
        return bytes([WIRE_VERSION]) + sink.getvalue().to_pybytes()

    @classmethod
    def from_bytes(cls, data: bytes, public_key: PublicKey) -> CipherVector:
        """Parse ``to_bytes`` output, refusing another key, version or malformed input."""
        return _parse(data, public_key)


def _parse(data: bytes, public_key: PublicKey) -> CipherVector:
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) < 2:
        raise CryptoError("ciphertext vector bytes are empty or not bytes")
    if data[0] != WIRE_VERSION:
        raise CryptoError(f"ciphertext vector wire version {data[0]} is not supported (expected {WIRE_VERSION})")
    try:
        table = pa.ipc.open_stream(pa.py_buffer(bytes(data[1:]))).read_all()
        head = json.loads(table.schema.metadata[_META_KEY])
        fp = bytes.fromhex(head["fingerprint"])
        lay = head["layout"]
        layout = None if lay is None else PackingLayout(*(int(v) for v in lay))
        length, frac, bound, masked = int(head["length"]), int(head["frac_bits"]), int(head["bound"]), head["masked"]
    except CryptoError:
        raise
    except Exception as exc:  # pyarrow, json and key errors all mean the same thing here
        raise CryptoError(f"malformed ciphertext vector: {exc}") from exc
    check_same_key(public_key, fp)
    width = ciphertext_width(public_key)
    if table.num_columns != 1 or table.schema.field(0).type != pa.binary(width) or table.column(0).null_count:
        raise CryptoError(f"malformed ciphertext vector: expected one fixed_size_binary[{width}] column")
    raw = b"".join(chunk.buffers()[1].to_pybytes()[chunk.offset * width:(chunk.offset + len(chunk)) * width]
                   for chunk in table.column(0).chunks)
    nsq = mpz(public_key.nsquare)
    cts = [mpz.from_bytes(raw[i:i + width], "big") for i in range(0, len(raw), width)]
    if any(not 0 < c < nsq for c in cts):
        raise CryptoError("malformed ciphertext vector: a ciphertext is outside (0, n^2)")
    if not isinstance(masked, bool) or frac < 0 or bound < 0 or length < 0:
        raise CryptoError("malformed ciphertext vector header")
    return CipherVector(public_key, cts, length, frac, bound, layout, masked)
