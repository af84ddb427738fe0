"""SecureBoost's encrypted histograms: packed (g, h), host-side bin sums, sealing, opening.

The flow, one tree level at a time (docs/protocols.md, "SecureBoost histograms:
packing and what they reveal")::

    packer = GHPacker(pub, rows_max, private_key=priv)          # guest, same settings on the host
    blob = packer.encrypt(g, h).to_bytes()                      # guest task -> host task
    part = build_histograms(CipherVector.from_bytes(blob, pub), bins, node_of_row, nodes, n_bins)
    hist = part.add(other_part)                                 # host: partials added, never sent
    other = parent.subtract(hist, nodes=siblings)               # host: sibling trick
    perm = BinPermutation.draw(hist.nodes, hist.n_bins, rng)    # host keeps it
    sealed = hist.seal(perm).to_bytes()                         # host -> guest
    sums = open_histograms(Decryptor(priv), SealedHistograms.from_bytes(sealed, pub), packer)
    G, H = sums[node][feature]                                  # guest picks splits
    perm.true_bin(node, feature, position)                      # host: the chosen threshold

Encoding. ``g`` and ``h`` are rounded to multiples of ``2^-precision_bits``
(``|g| <= g_bound``, ``0 <= h <= h_bound``, declared) and packed as signed
slots of one plaintext (``PackingLayout``, no mask room: the guest may see the
sums): slot ``2c`` holds class ``c``'s g, slot ``2c + 1`` its h, as many classes
per plaintext as fit, more plaintexts per row when they do not. Every slot has
headroom for a sum over ``rows_max`` rows, so bin sums and their cumulative sums
(at most a node's rows) never carry into the next slot; negative g sums borrow
and are undone by the layer's signed unpacking. Sums are exact: the decoded G is
exactly the sum of the rounded g's (error to the float sum at most
``rows * 2^-(precision_bits + 1)``).

Sealing. Per node and host feature of ``B`` bins (the last one is the missing
bin, possibly empty): the ``B - 1`` prefix sums over the non-missing bins in the
true bin order (entry ``b`` = bins ``0..b``), shown in an order shuffled by the
host's ``BinPermutation``, then the missing bin's own sum. The entries of a
node are packed by shift-and-add under encryption, as many per ciphertext as
the key holds, and every sealed ciphertext is re-randomised.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import gmpy2
import numpy as np
from gmpy2 import mpz

from fedps.engine.crypto import CipherVector, Decryptor, Encryptor, PackingLayout, PrivateKey, PublicKey
from fedps.engine.crypto.keys import check_same_key, fingerprint
from fedps.errors import CryptoError, DataError

DEFAULT_PRECISION_BITS = 24
_WIRE_VERSION = 1
_ENCRYPTORS: dict[tuple[Any, ...], Encryptor] = {}
_ONE = mpz(1)


def _encryptor(public_key: PublicKey, private_key: PrivateKey | None = None,
               exponent_bits: int | None = None) -> Encryptor:
    """One cached ``Encryptor`` per key and settings in this process (tables take a while)."""
    pq = None if private_key is None else (int(private_key.p), int(private_key.q))
    key = (int(public_key.n), pq, exponent_bits)
    if key not in _ENCRYPTORS:
        _ENCRYPTORS[key] = Encryptor(public_key, private_key=private_key, exponent_bits=exponent_bits)
    return _ENCRYPTORS[key]


class GHPacker:
    """Fixed-point packing of each row's (g, h) (per class) into plaintexts, and decoding of sums.

    ``rows_max`` bounds the rows any sum may cover (a node's rows); ``classes``
    is 1 for binary and regression objectives, ``k`` for softmax (per-class g, h
    of a row packed together, ``classes_per_plain`` per plaintext,
    ``plains_per_row`` plaintexts per row). ``g_bound``/``h_bound`` declare
    ``|g| <= g_bound`` and ``0 <= h <= h_bound`` (1 and 1 cover logistic and
    softmax; regression passes its own). ``private_key`` (the guest owns the
    key) makes encryption use CRT tables; ``exponent_bits`` is the layer's
    short-exponent opt-in. Raises ``CryptoError`` naming the cause when one
    (g, h) pair with this headroom does not fit the key. Picklable: a Spark
    task rebuilds (and caches) its encryptor.
    """

    def __init__(self, public_key: PublicKey, rows_max: int, precision_bits: int = DEFAULT_PRECISION_BITS,
                 classes: int = 1, *, g_bound: float = 1.0, h_bound: float = 1.0,
                 private_key: PrivateKey | None = None, exponent_bits: int | None = None) -> None:
        if int(rows_max) < 1:
            raise DataError(f"rows_max must be >= 1, got {rows_max}")
        if not 1 <= int(precision_bits) <= 64:
            raise DataError(f"precision_bits must be in [1, 64], got {precision_bits}")
        if int(classes) < 1:
            raise DataError(f"classes must be >= 1, got {classes}")
        if not (g_bound > 0 and h_bound > 0 and math.isfinite(g_bound) and math.isfinite(h_bound)):
            raise DataError(f"g_bound and h_bound must be positive and finite, got {g_bound}, {h_bound}")
        if private_key is not None and int(private_key.public_key.n) != int(public_key.n):
            raise CryptoError("private key does not belong to this public key")
        self.public_key, self.private_key, self.exponent_bits = public_key, private_key, exponent_bits
        self.rows_max, self.precision_bits, self.classes = int(rows_max), int(precision_bits), int(classes)
        self.g_bound, self.h_bound = float(g_bound), float(h_bound)
        self.row_bound = math.ceil(max(g_bound, h_bound) * 2.0 ** precision_bits)
        value_bits = (self.row_bound * self.rows_max).bit_length()
        key_bits = int(public_key.n).bit_length()
        pair_bits = 2 * (value_bits + 1)
        fit = (key_bits - 3) // pair_bits
        if fit < 1:
            raise CryptoError(
                f"one (g, h) pair needs {pair_bits} bits for sums over rows_max={self.rows_max} rows at"
                f" {precision_bits} fractional bits, more than a {key_bits}-bit key holds;"
                " lower rows_max or precision_bits, or use a larger key")
        self.classes_per_plain = min(fit, self.classes)
        self.plains_per_row = math.ceil(self.classes / self.classes_per_plain)
        self.layout = PackingLayout(slots=2 * self.classes_per_plain, value_bits=value_bits, mask_bits=0)

    def _shaped(self, g: Any, h: Any, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
        g, h = np.asarray(g, dtype=dtype), np.asarray(h, dtype=dtype)
        if self.classes == 1 and g.ndim == 2 and g.shape[1] == 1 and h.shape == g.shape:
            g, h = g[:, 0], h[:, 0]
        want = 1 if self.classes == 1 else 2
        if g.ndim != want or g.shape != h.shape or (want == 2 and g.shape[1] != self.classes):
            raise DataError(f"g and h must both have shape (rows,{'' if want == 1 else f' {self.classes}'}),"
                            f" got {g.shape} and {h.shape}")
        return g.reshape(len(g), -1), h.reshape(len(h), -1)

    def quantize(self, g: Any, h: Any) -> tuple[np.ndarray, np.ndarray]:
        """``round(v * 2^precision_bits)`` of g and h as integers, after checking the declared bounds."""
        g, h = self._shaped(g, h, np.float64)
        if not (np.all(np.isfinite(g)) and np.all(np.isfinite(h))):
            raise DataError("g or h contains NaN or infinite values")
        if g.size and np.max(np.abs(g)) > self.g_bound:
            raise DataError(f"|g| reaches {np.max(np.abs(g)):.6g}, above the declared g_bound={self.g_bound}")
        if h.size and (np.min(h) < 0 or np.max(h) > self.h_bound):
            raise DataError(f"h must lie in [0, h_bound={self.h_bound}], got [{np.min(h):.6g}, {np.max(h):.6g}]")
        g, h = np.rint(np.ldexp(g, self.precision_bits)), np.rint(np.ldexp(h, self.precision_bits))
        if self.row_bound < 2**62:
            return g.astype(np.int64), h.astype(np.int64)
        as_int = np.vectorize(int, otypes=[object])
        return as_int(g), as_int(h)

    def _check_quantized(self, g: Any, h: Any) -> tuple[np.ndarray, np.ndarray]:
        g, h = self._shaped(g, h, np.int64 if self.row_bound < 2**62 else object)
        gmax = math.ceil(self.g_bound * 2.0 ** self.precision_bits)
        hmax = math.ceil(self.h_bound * 2.0 ** self.precision_bits)
        if g.size and (int(np.max(np.abs(g))) > gmax or int(np.min(h)) < 0 or int(np.max(h)) > hmax):
            raise DataError(f"quantized g or h outside |g| <= {gmax}, 0 <= h <= {hmax}"
                            f" (g_bound, h_bound at {self.precision_bits} fractional bits)")
        return g, h

    def encode(self, g: Any, h: Any, quantized: bool = False) -> list[int]:
        """Packed plaintexts, ``plains_per_row`` per row, row after row (row-major).

        ``g``, ``h``: shape ``(rows,)``, or ``(rows, classes)`` for several classes;
        floats, or with ``quantized`` the integers ``round(v * 2^precision_bits)``
        (``quantize`` output, or the same rounding done by the caller).
        """
        gi, hi = self._check_quantized(g, h) if quantized else self.quantize(g, h)
        k, width = self.classes_per_plain, self.layout.slot_bits
        out: list[list[int]] = []
        for j in range(self.plains_per_row):
            part = [0] * len(gi)
            for c in range(j * k, min(self.classes, (j + 1) * k)):
                s = 2 * (c - j * k) * width
                part = [p + (int(a) << s) + (int(b) << (s + width))
                        for p, a, b in zip(part, gi[:, c].tolist(), hi[:, c].tolist())]
            out.append(part)
        if self.plains_per_row == 1:
            return out[0]
        return [v for row in zip(*out) for v in row]

    def encrypt(self, g: Any, h: Any, quantized: bool = False) -> CipherVector:
        """``encode`` then encrypt with fresh randomness: ``plains_per_row`` ciphertexts per row.

        Runs where the rows are (a Spark task); the vector's ``bound`` is one
        row's encoded bound and its layout this packer's ``layout``.
        """
        plains = self.encode(g, h, quantized)
        enc = _encryptor(self.public_key, self.private_key, self.exponent_bits)
        cts = enc.raw.encrypt(plains)
        return CipherVector(self.public_key, cts, len(cts) * self.layout.slots, self.precision_bits,
                            self.row_bound, self.layout)

    def decode_sums(self, ints: Sequence[int], counts: Sequence[int] | None = None,
                    quantized: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(G, H) from decrypted sums of encoded rows, ``plains_per_row`` ints per sum.

        Shapes ``(sums,)``, or ``(sums, classes)`` for several classes; exactly the
        sums of the rounded values: float64, or with ``quantized`` the integer
        sums themselves (int64, or Python ints past 2^62). The signed encoding
        needs no row counts; when ``counts`` (rows per sum) are given, each sum is
        checked against the bounds they imply (``|G| <= count * g_bound``,
        ``0 <= H <= count * h_bound``) and a violation raises ``CryptoError``.
        """
        per = self.plains_per_row
        if len(ints) % per:
            raise CryptoError(f"{len(ints)} plaintexts are not whole sums of {per} plaintexts each")
        lay = self.layout
        flat = np.array([s for v in ints for s in lay.unpack(int(v))], dtype=object).reshape(-1, per * lay.slots)
        gq, hq = self._slot_sums(flat)
        if counts is not None:
            self._check_counts(gq, hq, counts)
        return (gq, hq) if quantized else (self.dequantize(gq), self.dequantize(hq))

    def dequantize(self, sums: np.ndarray) -> np.ndarray:
        """Integer sums back to float64 (``sums * 2^-precision_bits``)."""
        arr = np.asarray(sums)
        return np.ldexp(arr.astype(np.float64), -self.precision_bits)

    def _slot_sums(self, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Integer (G, H) from an object array of slot integers, ``plains_per_row * slots`` per sum."""
        k = self.classes_per_plain
        cols_g = [(c // k) * 2 * k + 2 * (c % k) for c in range(self.classes)]
        if self.row_bound * self.rows_max < 2**62:
            flat = flat.astype(np.int64) if flat.size else np.zeros(flat.shape, dtype=np.int64)
        g, h = flat[:, cols_g], flat[:, [c + 1 for c in cols_g]]
        if self.classes == 1:
            return g[:, 0], h[:, 0]
        return g, h

    def _check_counts(self, g: np.ndarray, h: np.ndarray, counts: Sequence[int]) -> None:
        c = np.asarray(counts, dtype=object).reshape(-1, *([1] * (g.ndim - 1)))
        if c.shape[0] != g.shape[0]:
            raise DataError(f"{c.shape[0]} counts for {g.shape[0]} sums")
        gmax = c * math.ceil(self.g_bound * 2.0 ** self.precision_bits)
        hmax = c * math.ceil(self.h_bound * 2.0 ** self.precision_bits)
        g, h = g.astype(object), h.astype(object)
        if np.any(abs(g) > gmax) or np.any(h < 0) or np.any(h > hmax):
            raise CryptoError("a decrypted sum exceeds what its row count allows: overflow, tampering or wrong counts")

    def describe(self) -> dict[str, int]:
        """The settings both parties must agree on (compare them at setup)."""
        return {"rows_max": self.rows_max, "precision_bits": self.precision_bits, "classes": self.classes,
                "value_bits": self.layout.value_bits, "classes_per_plain": self.classes_per_plain}


def _checked_vector(public_key: PublicKey, head: dict[str, Any], cts: list[mpz]) -> bytes:
    """Header + ciphertexts as bytes: a version byte, the JSON header's length, it, a CipherVector."""
    body = json.dumps(head, sort_keys=True).encode()
    plain_bits = int(public_key.n).bit_length() - 3
    vec = CipherVector(public_key, cts, len(cts), 0, 1 << plain_bits)
    return bytes([_WIRE_VERSION]) + len(body).to_bytes(4, "big") + body + vec.to_bytes()


def _parse_vector(data: bytes, public_key: PublicKey, what: str) -> tuple[dict[str, Any], list[mpz]]:
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) < 6:
        raise CryptoError(f"{what} bytes are empty or not bytes")
    data = bytes(data)
    if data[0] != _WIRE_VERSION:
        raise CryptoError(f"{what} wire version {data[0]} is not supported (expected {_WIRE_VERSION})")
    size = int.from_bytes(data[1:5], "big")
    try:
        head = json.loads(data[5:5 + size])
        if not isinstance(head, dict):
            raise ValueError("header is not an object")
    except ValueError as exc:
        raise CryptoError(f"malformed {what} header: {exc}") from exc
    vec = CipherVector.from_bytes(data[5 + size:], public_key)
    return head, vec.ciphertexts


def _ints(head: dict[str, Any], key: str, what: str, minimum: int = 0) -> list[int]:
    vals = head.get(key)
    if not isinstance(vals, list) or not all(isinstance(v, int) and v >= minimum for v in vals):
        raise CryptoError(f"malformed {what} header: {key!r} must be a list of integers >= {minimum}")
    return vals


def _int(head: dict[str, Any], key: str, what: str, minimum: int = 1) -> int:
    val = head.get(key)
    if not isinstance(val, int) or val < minimum:
        raise CryptoError(f"malformed {what} header: {key!r} must be an integer >= {minimum}")
    return val


def _batch_invert(values: Sequence[mpz], modulus: mpz) -> list[mpz]:
    """Modular inverses of many values with one inversion (Montgomery's trick)."""
    if not values:
        return []
    prefix = [values[0]]
    for v in values[1:]:
        prefix.append(prefix[-1] * v % modulus)
    try:
        inv = gmpy2.invert(prefix[-1], modulus)
    except ZeroDivisionError as exc:
        raise CryptoError("a ciphertext is not invertible modulo n^2: corrupted histogram") from exc
    out = [_ONE] * len(values)
    for i in range(len(values) - 1, 0, -1):
        out[i] = inv * prefix[i - 1] % modulus
        inv = inv * values[i] % modulus
    out[0] = inv
    return out


@dataclass(eq=False)
class EncryptedHistograms:
    """Per (node, feature, bin) encrypted sums of packed (g, h): host-side only.

    ``ciphertexts`` run node by node, feature by feature, bin by bin, and
    ``plains`` ciphertexts per bin (the packer's ``plains_per_row``). ``rows``
    bounds the rows summed into each node (it guards the slots' headroom).
    Partials from a host's tasks are added here and never leave the host;
    only ``seal`` output goes to the guest.
    """

    public_key: PublicKey
    nodes: tuple[int, ...]
    n_bins: tuple[int, ...]
    layout: PackingLayout
    frac_bits: int
    plains: int
    row_bound: int
    rows: tuple[int, ...]
    ciphertexts: list[mpz] = field(repr=False)

    def __post_init__(self) -> None:
        want = len(self.nodes) * sum(self.n_bins) * self.plains
        if len(self.ciphertexts) != want:
            raise CryptoError(f"{len(self.ciphertexts)} ciphertexts for {len(self.nodes)} nodes x"
                              f" {sum(self.n_bins)} bins x {self.plains} plaintexts (= {want})")
        if len(set(self.nodes)) != len(self.nodes) or len(self.rows) != len(self.nodes):
            raise CryptoError("histogram node ids must be unique, with one row count each")
        for node, r in zip(self.nodes, self.rows):
            if r * self.row_bound > self.layout.value_bound:
                raise CryptoError(f"node {node} sums {r} rows, more than the packer's headroom allows"
                                  f" ({self.layout.value_bound // self.row_bound} rows); raise rows_max")

    @property
    def _per_node(self) -> int:
        return sum(self.n_bins) * self.plains

    def _shape(self) -> tuple[Any, ...]:
        return self.n_bins, self.layout, self.frac_bits, self.plains, self.row_bound

    def _same_shape(self, other: EncryptedHistograms, nodes_too: bool = True) -> None:
        check_same_key(self.public_key, fingerprint(other.public_key), "histograms")
        if self._shape() != other._shape() or (nodes_too and self.nodes != other.nodes):
            raise CryptoError("histograms differ in nodes, features, bins or packing; they cannot be combined")

    def add(self, other: EncryptedHistograms) -> EncryptedHistograms:
        """Bin-wise sums of two partials over the same nodes (e.g. two partitions' rows)."""
        self._same_shape(other)
        nsq = mpz(self.public_key.nsquare)
        cts = [a * b % nsq for a, b in zip(self.ciphertexts, other.ciphertexts)]
        rows = tuple(a + b for a, b in zip(self.rows, other.rows))
        return EncryptedHistograms(self.public_key, self.nodes, self.n_bins, self.layout, self.frac_bits,
                                   self.plains, self.row_bound, rows, cts)

    def subtract(self, other: EncryptedHistograms, nodes: Sequence[int] | None = None) -> EncryptedHistograms:
        """Node ``i`` of ``self`` minus node ``i`` of ``other`` (the sibling trick: parent minus sibling).

        ``nodes`` names the result's nodes (default: ``self``'s); row bounds are ``self``'s.
        """
        self._same_shape(other, nodes_too=False)
        if len(self.nodes) != len(other.nodes):
            raise CryptoError(f"cannot subtract {len(other.nodes)} nodes from {len(self.nodes)}")
        names = tuple(int(v) for v in (self.nodes if nodes is None else nodes))
        if len(names) != len(self.nodes):
            raise CryptoError(f"{len(names)} node ids for {len(self.nodes)} nodes")
        nsq = mpz(self.public_key.nsquare)
        cts = [a * b % nsq for a, b in zip(self.ciphertexts, _batch_invert(other.ciphertexts, nsq))]
        return EncryptedHistograms(self.public_key, names, self.n_bins, self.layout, self.frac_bits,
                                   self.plains, self.row_bound, self.rows, cts)

    def select(self, nodes: Sequence[int]) -> EncryptedHistograms:
        """The histograms of ``nodes`` only, in that order."""
        where = {n: i for i, n in enumerate(self.nodes)}
        missing = [n for n in nodes if n not in where]
        if missing:
            raise CryptoError(f"nodes {missing} are not in these histograms (nodes {list(self.nodes)})")
        k = self._per_node
        cts = [c for n in nodes for c in self.ciphertexts[where[n] * k:(where[n] + 1) * k]]
        return EncryptedHistograms(self.public_key, tuple(int(n) for n in nodes), self.n_bins, self.layout,
                                   self.frac_bits, self.plains, self.row_bound,
                                   tuple(self.rows[where[n]] for n in nodes), cts)

    @staticmethod
    def concat(parts: Sequence[EncryptedHistograms]) -> EncryptedHistograms:
        """Histograms of disjoint node sets joined into one."""
        if not parts:
            raise CryptoError("nothing to concatenate")
        first = parts[0]
        for p in parts[1:]:
            first._same_shape(p, nodes_too=False)
        return EncryptedHistograms(first.public_key, tuple(n for p in parts for n in p.nodes), first.n_bins,
                                   first.layout, first.frac_bits, first.plains, first.row_bound,
                                   tuple(r for p in parts for r in p.rows),
                                   [c for p in parts for c in p.ciphertexts])

    def to_bytes(self) -> bytes:
        """Version, header (nodes, bins, packing, row bounds) and the ciphertexts (host-internal)."""
        head = {"kind": "histograms", "nodes": list(self.nodes), "n_bins": list(self.n_bins),
                "slots": self.layout.slots, "value_bits": self.layout.value_bits, "frac_bits": self.frac_bits,
                "plains": self.plains, "row_bound": self.row_bound, "rows": list(self.rows)}
        return _checked_vector(self.public_key, head, self.ciphertexts)

    @classmethod
    def from_bytes(cls, data: bytes, public_key: PublicKey) -> EncryptedHistograms:
        """Parse ``to_bytes`` output, refusing another key or malformed input."""
        what = "encrypted histograms"
        head, cts = _parse_vector(data, public_key, what)
        if head.get("kind") != "histograms":
            raise CryptoError(f"malformed {what}: not a histogram record")
        layout = PackingLayout(_int(head, "slots", what), _int(head, "value_bits", what), 0)
        return cls(public_key, tuple(_ints(head, "nodes", what)), tuple(_ints(head, "n_bins", what, 1)), layout,
                   _int(head, "frac_bits", what, 0), _int(head, "plains", what), _int(head, "row_bound", what),
                   tuple(_ints(head, "rows", what)), cts)

    def seal(self, permutation: BinPermutation, cumulative: Sequence[bool] | None = None) -> SealedHistograms:
        """What goes to the guest: shuffled prefix sums, packed, re-randomised.

        Per node and feature of ``B`` bins: the ``B - 1`` cumulative sums of the
        non-missing bins in true order, shown in ``permutation``'s order
        (position ``k`` holds cumulative entry ``permutation.true_bin(node, f, k)``),
        then the missing bin's sum. As many entries per ciphertext as the key
        holds (shift-and-add under encryption); each ciphertext re-randomised.
        A feature whose ``cumulative`` flag is False (a categorical one) shows its
        bins' own sums instead of prefix sums, shuffled alike.
        """
        permutation.check(self.nodes, self.n_bins)
        nsq = mpz(self.public_key.nsquare)
        per_ct = units_per_ciphertext(self.public_key, self.layout)
        shift = mpz(1) << (self.layout.slots * self.layout.slot_bits)
        k, P = self._per_node, self.plains
        out: list[mpz] = []
        for i, node in enumerate(self.nodes):
            block = self.ciphertexts[i * k:(i + 1) * k]
            units: list[mpz] = []
            start = 0
            for f, B in enumerate(self.n_bins):
                prefix = cumulative is None or cumulative[f]
                for p in range(P):
                    cum, acc = [], _ONE
                    for b in range(B - 1):
                        acc = acc * block[(start + b) * P + p] % nsq if prefix else block[(start + b) * P + p]
                        cum.append(acc)
                    shown = [cum[j] for j in permutation.order(node, f)] + [block[(start + B - 1) * P + p]]
                    units.append(shown)
                start += B
            # units[f * P + p][position] -> entry order: feature, position, plain
            flat: list[mpz] = []
            for f, B in enumerate(self.n_bins):
                for pos in range(B):
                    flat.extend(units[f * P + p][pos] for p in range(P))
            for s in range(0, len(flat), per_ct):
                group = flat[s:s + per_ct]
                acc = group[-1]
                for c in reversed(group[:-1]):
                    acc = gmpy2.powmod(acc, shift, nsq) * c % nsq
                out.append(acc)
        out = _encryptor(self.public_key).raw.rerandomize(out)
        return SealedHistograms(self.public_key, self.nodes, self.n_bins, self.layout, self.frac_bits,
                                self.plains, per_ct, out)


def units_per_ciphertext(public_key: PublicKey, layout: PackingLayout) -> int:
    """How many packed (g, h) sums of ``layout`` one sealed ciphertext holds."""
    return max(1, (int(public_key.n).bit_length() - 3) // (layout.slots * layout.slot_bits))


def build_histograms(row_ciphers: CipherVector, bins: np.ndarray, node_of_row: np.ndarray,
                     nodes: Sequence[int], n_bins: Sequence[int]) -> EncryptedHistograms:
    """Encrypted sums per (node, feature, bin) of the rows of one task (host side).

    ``row_ciphers``: ``GHPacker.encrypt`` output for these rows (``plains_per_row``
    ciphertexts per row, in row order). ``bins``: int array rows x features,
    feature ``f``'s values in ``[0, n_bins[f])``, the last bin being its
    missing bin. ``node_of_row``: node id per row, -1 for rows in no node being
    built. ``nodes``: the node ids to build (a node with no rows here gets
    encryptions of zero). Rows are grouped by bin, so each (row, feature) costs
    one multiplication modulo ``n^2``.
    """
    if row_ciphers.layout is None or row_ciphers.masked:
        raise CryptoError("row ciphertexts must be GHPacker.encrypt output (packed, unmasked)")
    bins = np.asarray(bins)
    node_of_row = np.asarray(node_of_row)
    n_bins = tuple(int(b) for b in n_bins)
    nodes = tuple(int(n) for n in nodes)
    if bins.ndim != 2 or not np.issubdtype(bins.dtype, np.integer):
        raise DataError(f"bins must be a 2-D integer array (rows x features), got {bins.dtype} {bins.shape}")
    rows, features = bins.shape
    if len(n_bins) != features or any(b < 1 for b in n_bins):
        raise DataError(f"n_bins must give >= 1 bin for each of the {features} features, got {list(n_bins)}")
    if rows and (bins.min(axis=0) < 0).any() or rows and (bins.max(axis=0) >= np.array(n_bins)).any():
        bad = int(np.flatnonzero((bins.min(axis=0) < 0) | (bins.max(axis=0) >= np.array(n_bins)))[0])
        raise DataError(f"feature {bad} has a bin index outside [0, {n_bins[bad]})")
    if node_of_row.shape != (rows,) or not np.issubdtype(node_of_row.dtype, np.integer):
        raise DataError(f"node_of_row must be an integer array of {rows} node ids, got {node_of_row.shape}")
    if len(set(nodes)) != len(nodes) or any(n < 0 for n in nodes):
        raise DataError(f"nodes must be distinct non-negative ids, got {list(nodes)}")
    cts = row_ciphers.ciphertexts
    if rows == 0 or len(cts) % rows:
        if rows or cts:
            raise CryptoError(f"{len(cts)} row ciphertexts for {rows} rows")
    plains = len(cts) // rows if rows else 1
    nsq = mpz(row_ciphers.public_key.nsquare)
    by_plain = [cts[p::plains] for p in range(plains)]
    out: list[mpz] = []
    counts: list[int] = []
    for node in nodes:
        idx = np.flatnonzero(node_of_row == node)
        counts.append(len(idx))
        sub = bins[idx]
        for f, B in enumerate(n_bins):
            col = sub[:, f]
            order = idx[np.argsort(col, kind="stable")]
            ends = np.cumsum(np.bincount(col, minlength=B)).tolist()
            sums: list[list[mpz]] = []
            for cp in by_plain:
                members = [cp[i] for i in order.tolist()]
                sums.append(_segment_products(members, ends, nsq))
            out.extend(s for per_bin in zip(*sums) for s in per_bin)
    return EncryptedHistograms(row_ciphers.public_key, nodes, n_bins, row_ciphers.layout,
                               row_ciphers.frac_bits, plains, row_ciphers.bound, tuple(counts), out)


def _segment_products(values: list[mpz], ends: Sequence[int], modulus: mpz) -> list[mpz]:
    """Products of consecutive segments ``values[ends[b-1]:ends[b]]`` modulo ``modulus``."""
    out = []
    start = 0
    for end in ends:
        if end == start:
            out.append(_ONE)
            continue
        acc = values[start]
        for i in range(start + 1, end):
            acc = acc * values[i] % modulus
        out.append(acc)
        start = end
    return out


@dataclass(frozen=True)
class BinPermutation:
    """The host's secret bin order per node and feature: ``order(node, f)[k]`` is the
    true cumulative entry (bin index) shown at position ``k``. Draw a fresh one
    per tree level and keep it (checkpoint ``to_json``); never send it."""

    orders: Mapping[int, tuple[tuple[int, ...], ...]]

    @classmethod
    def draw(cls, nodes: Sequence[int], n_bins: Sequence[int], rng: np.random.Generator) -> BinPermutation:
        """Uniform independent permutations of the ``n_bins[f] - 1`` non-missing prefix sums."""
        return cls({int(n): tuple(tuple(int(v) for v in rng.permutation(max(0, int(b) - 1))) for b in n_bins)
                    for n in nodes})

    def order(self, node: int, feature: int) -> tuple[int, ...]:
        try:
            return self.orders[int(node)][int(feature)]
        except (KeyError, IndexError) as exc:
            raise DataError(f"no bin permutation for node {node}, feature {feature}") from exc

    def true_bin(self, node: int, feature: int, position: int) -> int:
        """The bin ``b`` behind shown position ``position``: the split is "bin <= b goes left"."""
        order = self.order(node, feature)
        if not 0 <= int(position) < len(order):
            raise DataError(f"position {position} is not a threshold of node {node}, feature {feature}"
                            f" (0..{len(order) - 1})")
        return order[int(position)]

    def check(self, nodes: Sequence[int], n_bins: Sequence[int]) -> None:
        for n in nodes:
            for f, b in enumerate(n_bins):
                if sorted(self.order(n, f)) != list(range(int(b) - 1)):
                    raise DataError(f"bin permutation of node {n}, feature {f} is not a permutation of"
                                    f" its {int(b) - 1} prefix sums")

    def to_json(self) -> str:
        return json.dumps({str(n): [list(o) for o in orders] for n, orders in self.orders.items()})

    @classmethod
    def from_json(cls, text: str) -> BinPermutation:
        raw = json.loads(text)
        return cls({int(n): tuple(tuple(int(v) for v in o) for o in orders) for n, orders in raw.items()})


@dataclass(frozen=True, eq=False)
class SealedHistograms:
    """What the host sends the guest: per node, ``units_per_ct`` packed entries per ciphertext.

    Entries run feature by feature, ``n_bins[f]`` positions each (shuffled
    prefix sums, then the missing bin), ``plains`` plaintexts per position.
    """

    public_key: PublicKey
    nodes: tuple[int, ...]
    n_bins: tuple[int, ...]
    layout: PackingLayout
    frac_bits: int
    plains: int
    units_per_ct: int
    ciphertexts: list[mpz] = field(repr=False)

    @property
    def per_node(self) -> int:
        """Sealed ciphertexts per node."""
        return math.ceil(sum(self.n_bins) * self.plains / self.units_per_ct)

    def __post_init__(self) -> None:
        if len(self.ciphertexts) != len(self.nodes) * self.per_node:
            raise CryptoError(f"{len(self.ciphertexts)} sealed ciphertexts for {len(self.nodes)} nodes"
                              f" of {self.per_node} each")
        if self.units_per_ct * self.layout.slots * self.layout.slot_bits > int(self.public_key.n).bit_length() - 3:
            raise CryptoError("sealed packing does not fit the key")

    def to_bytes(self) -> bytes:
        head = {"kind": "sealed", "nodes": list(self.nodes), "n_bins": list(self.n_bins),
                "slots": self.layout.slots, "value_bits": self.layout.value_bits, "frac_bits": self.frac_bits,
                "plains": self.plains, "units_per_ct": self.units_per_ct}
        return _checked_vector(self.public_key, head, self.ciphertexts)

    @classmethod
    def from_bytes(cls, data: bytes, public_key: PublicKey) -> SealedHistograms:
        what = "sealed histograms"
        head, cts = _parse_vector(data, public_key, what)
        if head.get("kind") != "sealed":
            raise CryptoError(f"malformed {what}: not a sealed histogram record")
        layout = PackingLayout(_int(head, "slots", what), _int(head, "value_bits", what), 0)
        return cls(public_key, tuple(_ints(head, "nodes", what)), tuple(_ints(head, "n_bins", what, 1)), layout,
                   _int(head, "frac_bits", what, 0), _int(head, "plains", what), _int(head, "units_per_ct", what),
                   cts)


class BinSums(NamedTuple):
    """One node's sums for one host feature (guest side).

    ``G[:-1]``, ``H[:-1]``: the cumulative sums of the non-missing bins, in the
    host's shuffled order; ``G[-1]``, ``H[-1]``: the missing bin's sums. Shape
    ``(n_bins,)``, or ``(n_bins, classes)`` for several classes.
    """

    G: np.ndarray
    H: np.ndarray


def open_histograms(decryptor: Decryptor, sealed: SealedHistograms, packer: GHPacker,
                    quantized: bool = False) -> dict[int, list[BinSums]]:
    """Decrypt and unpack sealed histograms: per node id, per host feature, ``BinSums``.

    Float64 sums, or with ``quantized`` the exact integer sums of the rounded
    g and h (what ``GHPacker.quantize`` makes of them).
    """
    check_same_key(decryptor.public_key, fingerprint(sealed.public_key), "sealed histograms")
    if (sealed.layout, sealed.frac_bits, sealed.plains) != (packer.layout, packer.precision_bits,
                                                            packer.plains_per_row):
        raise CryptoError("sealed histograms were packed with other settings than this GHPacker;"
                          " both parties must use the same rows_max, precision_bits and classes")
    plains = decryptor.raw.decrypt(sealed.ciphertexts)
    slots = sealed.layout.slots
    entries = sum(sealed.n_bins)
    units = entries * sealed.plains
    per, m = sealed.per_node, sealed.units_per_ct
    big = PackingLayout(slots * m, sealed.layout.value_bits, 0)
    out: dict[int, list[BinSums]] = {}
    for i, node in enumerate(sealed.nodes):
        vals: list[int] = []
        for j, p in enumerate(plains[i * per:(i + 1) * per]):
            count = min(m, units - j * m) * slots
            vals.extend(big.unpack(p, count))
        flat = np.array(vals, dtype=object).reshape(entries, sealed.plains * slots)
        g, h = packer._slot_sums(flat)
        if not quantized:
            g, h = packer.dequantize(g), packer.dequantize(h)
        bounds = np.cumsum((0,) + sealed.n_bins)
        out[int(node)] = [BinSums(g[a:b], h[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return out
