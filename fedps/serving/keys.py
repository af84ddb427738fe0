"""Row keys: the 32-byte keyed hash that names a row between the parties.

The same hash the data layout gives a row (:mod:`fedps.engine.layout`):
``psi_hash`` of PSI output is HMAC-SHA256 of the canonical id under the PSI's
order key; for files with shared ids it is SHA-256 of the canonical id. So
``id_hash = "hmac"`` with the PSI's order key in ``id_key_file`` gives every
id its ``psi_hash``, and ``"sha256"`` the key of an aligned file's row.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path
from typing import Callable, Sequence

from fedps.engine.layout import canonical_id
from fedps.errors import ConfigError, DataError

KEY_BYTES = 32


def load_id_key(path: str) -> bytes:
    """The id key: 32 or more raw bytes, or their hex text; a file others can read is refused."""
    file = Path(path)
    try:
        mode, data = file.stat().st_mode, file.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"serving.id_key_file {file} does not exist") from None
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"serving.id_key_file {file} is accessible by other users "
                          f"(mode {stat.S_IMODE(mode):o}); run `chmod 600 {file}`")
    text = data.strip()
    try:
        key = bytes.fromhex(text.decode()) if text and all(c in b"0123456789abcdefABCDEF" for c in text) else data
    except (UnicodeDecodeError, ValueError):
        key = data
    if len(key) < 16:
        raise ConfigError(f"serving.id_key_file {file} holds {len(key)} bytes; an id key needs at least 16")
    return key


def hasher(id_hash: str, key: bytes | None = None) -> Callable[[str], bytes]:
    """The function from a raw id to its row key."""
    if id_hash == "sha256":
        return lambda value: hashlib.sha256(canonical_id(value).encode()).digest()
    if id_hash == "hmac" and key:
        return lambda value: hmac.new(key, canonical_id(value).encode(), hashlib.sha256).digest()
    raise ConfigError(f"unknown id hash {id_hash!r} (serving.id_hash), or no key for it")


def split_keys(blob: bytes, what: str = "keys") -> list[bytes]:
    """Concatenated 32-byte row keys as a list; DataError if the length is not a multiple of 32."""
    if len(blob) % KEY_BYTES:
        raise DataError(f"{what} must be 32-byte row keys concatenated, got {len(blob)} bytes")
    if len(blob) == KEY_BYTES:
        return [blob]
    return [blob[i:i + KEY_BYTES] for i in range(0, len(blob), KEY_BYTES)]


def keys_of(ids: Sequence[str], hash_id: Callable[[str], bytes]) -> list[bytes]:
    """Row keys of raw ids; an empty id is refused by position."""
    out = []
    for i, value in enumerate(ids):
        if not value.strip():
            raise DataError(f"id {i} of the request is empty")
        out.append(hash_id(value))
    return out
