"""The arithmetic of secure aggregation (Bonawitz et al., CCS 2017, double masking).

Party ``u`` sends ``y_u = q(x_u) + PRG(b_u) + sum_v sign(u, v) * PRG(s_uv)``
in the ring of integers mod 2^64, where

- ``q`` is fixed point with ``frac_bits`` fractional bits (:func:`quantise`),
- ``b_u`` is a fresh 32-byte self-mask seed of ``u`` for the round,
- ``s_uv`` is derived from the X25519 agreement of ``u``'s and ``v``'s round
  mask keys, so ``u`` and ``v`` add the same stream with opposite signs
  (``+`` for the party whose name sorts first) and it cancels in the sum.

Each PRG is AES-256 in counter mode under a key derived by HKDF-SHA256 from the
seed and a label that names the job, round and pair, so no stream is reused.
Shares of ``b_u`` and of ``u``'s mask private key are Shamir shares
(:mod:`.shamir`), sealed for each holder with ChaCha20-Poly1305 under a key
from a second X25519 agreement (the round's share keys).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedps.errors import CryptoError, DataError

RING_BITS = 64
_RAW = serialization.Encoding.Raw


def _derive(secret: bytes, label: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label.encode()).derive(secret)


_CHUNK = 1 << 17   # values per PRG block: the stream is added in place, 1 MiB at a time


def _encryptor(seed: bytes, label: str):
    return Cipher(algorithms.AES(_derive(seed, label)), modes.CTR(bytes(16))).encryptor()


def prg(seed: bytes, label: str, length: int) -> np.ndarray:
    """``length`` pseudo-random uint64 values from ``seed`` (AES-256-CTR keyed by HKDF(seed, label))."""
    out = np.zeros(length, dtype=np.uint64)
    add_prg(out, seed, label)
    return out


def add_prg(target: np.ndarray, seed: bytes, label: str, negate: bool = False) -> None:
    """``target += PRG(seed, label)`` (or ``-=``) mod 2^64, in place, without a second full-size array."""
    encryptor = _encryptor(seed, label)
    zeros = bytes(8 * min(_CHUNK, target.size))
    for start in range(0, target.size, _CHUNK):
        stop = min(start + _CHUNK, target.size)
        block = np.frombuffer(encryptor.update(zeros[: 8 * (stop - start)]), dtype=np.uint64)
        if negate:
            target[start:stop] -= block
        else:
            target[start:stop] += block


def quantise(values: np.ndarray, frac_bits: int, bound: float) -> np.ndarray:
    """Fixed point: ``round(v * 2^frac_bits)`` as two's complement uint64; DataError beyond ``bound``."""
    if not np.all(np.isfinite(values)):
        raise DataError("the update holds NaN or infinite values; lower the learning rate")
    biggest = float(np.max(np.abs(values))) if values.size else 0.0
    if biggest > bound:
        raise DataError(f"an update value {biggest:.4g} exceeds the fixed-point bound {bound:.4g}; "
                        "lower params.frac_bits or the learning rate")
    return np.rint(values * float(1 << frac_bits)).astype(np.int64).view(np.uint64)


def dequantise(values: np.ndarray, frac_bits: int) -> np.ndarray:
    """Inverse of :func:`quantise` (one new float64 array, divided in place)."""
    out = values.view(np.int64).astype(np.float64)
    out /= float(1 << frac_bits)
    return out


def dequantise_in_place(values: np.ndarray, frac_bits: int) -> np.ndarray:
    """:func:`dequantise` into the memory of ``values`` (uint64), returned as float64; no second array."""
    if values.dtype != np.uint64 or not values.flags.c_contiguous:
        raise DataError(f"dequantise_in_place needs a contiguous uint64 vector, got {values.dtype}")
    signed, out = values.view(np.int64), values.view(np.float64)
    for start in range(0, values.size, _CHUNK):   # each block converted through a small temporary
        out[start:start + _CHUNK] = signed[start:start + _CHUNK]
    out /= float(1 << frac_bits)
    return out


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def agree(private: bytes, public: bytes) -> bytes:
    try:
        return X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:
        raise CryptoError(f"bad X25519 key in secure aggregation: {exc}") from None


@dataclass(frozen=True)
class RoundSecrets:
    """One party's fresh secrets for one round: share key, mask key, self-mask seed."""

    share_key: bytes
    mask_key: bytes
    self_seed: bytes = field(default_factory=lambda: os.urandom(32))

    @classmethod
    def fresh(cls) -> RoundSecrets:
        return cls(private_bytes(X25519PrivateKey.generate()), private_bytes(X25519PrivateKey.generate()))

    def public(self) -> tuple[bytes, bytes]:
        """``(share public key, mask public key)``."""
        return (public_bytes(X25519PrivateKey.from_private_bytes(self.share_key)),
                public_bytes(X25519PrivateKey.from_private_bytes(self.mask_key)))


def _mask_label(job: str, round_: int, a: str, b: str) -> str:
    first, second = sorted((a, b))
    return f"fedps.fedavg.mask/{job}/{round_}/{first}/{second}"


def self_label(job: str, round_: int, party: str) -> str:
    return f"fedps.fedavg.self/{job}/{round_}/{party}"


def add_pair_mask(target: np.ndarray, mask_private: bytes, peer_public: bytes, job: str, round_: int,
                  me: str, peer: str) -> None:
    """Add the pair's stream as ``me`` adds it: ``+PRG`` if ``me`` sorts before ``peer``, else ``-PRG``."""
    add_prg(target, agree(mask_private, peer_public), _mask_label(job, round_, me, peer), negate=me > peer)


def mask(update: np.ndarray, secrets_: RoundSecrets, peers: dict[str, bytes], job: str, round_: int,
         me: str) -> np.ndarray:
    """``y_u``: the quantised update plus the self mask and every pair mask with ``peers`` (mask public keys)."""
    masked = update.copy()
    add_prg(masked, secrets_.self_seed, self_label(job, round_, me))
    for peer in sorted(peers):
        add_pair_mask(masked, secrets_.mask_key, peers[peer], job, round_, me, peer)
    return masked


def share_cipher(share_private: bytes, peer_public: bytes, job: str, round_: int) -> ChaCha20Poly1305:
    return ChaCha20Poly1305(_derive(agree(share_private, peer_public), f"fedps.fedavg.shares/{job}/{round_}"))


def seal_share(cipher: ChaCha20Poly1305, sender: str, receiver: str, job: str, round_: int,
               self_share: int, key_share: int) -> bytes:
    """Sealed ``(sender, receiver, share of b, share of the mask key)``; only ``receiver`` opens it."""
    aad = f"{job}/{round_}/{sender}/{receiver}".encode()
    nonce = os.urandom(12)
    body = self_share.to_bytes(66, "big") + key_share.to_bytes(66, "big")
    return nonce + cipher.encrypt(nonce, body, aad)


def open_share(cipher: ChaCha20Poly1305, sender: str, receiver: str, job: str, round_: int,
               sealed: bytes) -> tuple[int, int]:
    aad = f"{job}/{round_}/{sender}/{receiver}".encode()
    try:
        body = cipher.decrypt(sealed[:12], sealed[12:], aad)
    except InvalidTag:
        raise CryptoError(f"the shares {sender} sent to {receiver} in round {round_} do not open") from None
    return int.from_bytes(body[:66], "big"), int.from_bytes(body[66:], "big")


def remove_masks(total: np.ndarray, *, survivors: list[str], dropped: list[str],
                 self_shares: dict[str, dict[int, int]], key_shares: dict[str, dict[int, int]],
                 mask_publics: dict[str, bytes], threshold: int, job: str, round_: int) -> np.ndarray:
    """The plain sum of the survivors' quantised updates from the sum of their masked ones (in place).

    ``self_shares[v]`` holds at least ``threshold`` Shamir shares ``{x: y}`` of
    survivor ``v``'s self-mask seed; ``key_shares[v]`` the same of dropped
    party ``v``'s mask private key, whose pair masks with the survivors are
    still in the sum. A recovered key must match the public key ``v`` sent.
    """
    from fedps.algorithms.fedavg import shamir

    for v in survivors:
        add_prg(total, shamir.combine(self_shares[v], threshold), self_label(job, round_, v), negate=True)
    for v in dropped:
        private = shamir.combine(key_shares[v], threshold)
        if public_bytes(X25519PrivateKey.from_private_bytes(private)) != mask_publics[v]:
            raise CryptoError(f"the shares of {v}'s mask key do not recover the key it announced; "
                              "a party sent a wrong share")
        for u in survivors:
            # u added sign(u, v) * PRG(s_uv); v's view of the same pair has the opposite sign.
            add_pair_mask(total, private, mask_publics[u], job, round_, v, u)
    return total
