"""Masked sums: with several hosts the guest learns only the sum of their parts.

Every pair of hosts ``(a, b)`` shares a key that no one else can compute: a
static X25519 agreement between their Ed25519 identities (converted to X25519
keys, as libsodium does), through HKDF-SHA256. For one request, each host
encodes its partial scores in fixed point (``round(u * 2^40)`` mod 2^64) and
adds, for every other host of the request, a mask stream drawn from the pair's
key, the model version, the request id and the list of hosts (SHAKE-256):
plus for the host whose name sorts first, minus for the other. The masks cancel
in the sum of all the hosts' parts and nowhere else: one part alone, or the
sum of fewer than all, is uniform mod 2^64 to the guest.

A host refuses a request whose host list is not its configured set (a guest
asking for a subset would learn that subset's sum, then a host's part by
difference), and a request id it has already answered (the same masks over
other rows or another model would leak differences).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedps.errors import DataError

FRAC_BITS = 40
_LIMIT = float(2 ** (63 - FRAC_BITS - 1))   # |u| below 2^22: the sum of many hosts stays in range
_SEEN = 100_000


def pair_key(identity: Ed25519PrivateKey, me: str, peer: str, pinned: Ed25519PublicKey) -> bytes:
    """The mask key of hosts ``me`` and ``peer`` (both compute the same)."""
    from nacl import bindings

    seed = identity.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                  serialization.NoEncryption())
    _, secret = bindings.crypto_sign_seed_keypair(seed)
    theirs = pinned.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    shared = bindings.crypto_scalarmult(bindings.crypto_sign_ed25519_sk_to_curve25519(secret),
                                        bindings.crypto_sign_ed25519_pk_to_curve25519(theirs))
    first, second = sorted([me, peer])
    return HKDF(hashes.SHA256(), 32, b"fedps/serving/mask/v1", f"{first}|{second}".encode()).derive(shared)


def _stream(key: bytes, version: str, request_id: str, hosts: Sequence[str], rows: int) -> np.ndarray:
    context = b"".join(len(p).to_bytes(2, "big") + p for p in
                       (version.encode(), request_id.encode(), ",".join(hosts).encode()))
    return np.frombuffer(hashlib.shake_256(key + context).digest(8 * rows), dtype="<u8")


def encode(u: np.ndarray) -> np.ndarray:
    """Fixed point mod 2^64 (DataError for a score out of range)."""
    if not np.all(np.abs(u) < _LIMIT):
        raise DataError("a partial score is beyond ±2^22 or not finite: it cannot be masked")
    return np.round(u * 2.0 ** FRAC_BITS).astype(np.int64).view(np.uint64)


def unmask(parts: Sequence[np.ndarray]) -> np.ndarray:
    """The sum of every host's masked part, decoded."""
    total = np.zeros(len(parts[0]), dtype=np.uint64)
    for part in parts:
        total = total + np.asarray(part, dtype=np.uint64)
    return total.view(np.int64) / 2.0 ** FRAC_BITS


class Masker:
    """One host's side of masked sums with the other hosts of ``hosts``."""

    def __init__(self, me: str, hosts: Sequence[str], keys: Mapping[str, bytes]) -> None:
        self.me, self.hosts, self.keys = me, tuple(sorted(hosts)), dict(keys)
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def fresh(self, request_id: str) -> bool:
        """True the first time a request id is seen (among the last 100,000)."""
        with self._lock:
            if request_id in self._seen:
                return False
            self._seen[request_id] = None
            if len(self._seen) > _SEEN:
                self._seen.popitem(last=False)
        return True

    def mask(self, u: np.ndarray, version: str, request_id: str) -> np.ndarray:
        out = encode(u)
        for peer in self.hosts:
            if peer == self.me:
                continue
            m = _stream(self.keys[peer], version, request_id, self.hosts, len(u))
            out = out + m if self.me < peer else out - m
        return out
