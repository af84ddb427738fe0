"""Keys: validation, the key -> shard hash, and the seeded row initialiser.

Everything here is vectorised over numpy arrays of keys; nothing loops over
keys in Python. The hash is SplitMix64's finaliser, so routing and initial
values are the same on every machine, Python version and process.
"""

from __future__ import annotations

import numpy as np

from fedps.errors import DataError
from fedps.ps.config import InitConfig, TableSpec

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
#: Salts that keep the routing hash independent of the initialiser's hash.
_ROUTE_SALT = np.uint64(0x5EED5A17C0FFEE01)
_COLUMN_SALT = np.uint64(0xD1B54A32D192ED03)


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 of a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def as_keys(keys: object, dim: int) -> np.ndarray:
    """``keys`` as a 1-D int64 array, each in ``[0, dim)``; DataError otherwise."""
    array = np.asarray(keys)
    if array.ndim != 1:
        raise DataError(f"keys must be a 1-D array, got shape {array.shape}")
    if array.size == 0:
        return array.astype(np.int64)
    if array.dtype.kind not in "iu":
        raise DataError(f"keys must be integers, got dtype {array.dtype}")
    if array.dtype == np.uint64 and int(array.max()) >= 2**63:
        raise DataError("keys must be below 2**63")
    array = array.astype(np.int64, copy=False)
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= dim:
        raise DataError(f"keys must lie in [0, {dim}), got range [{low}, {high}]")
    return array


def as_rows(values: object, count: int, width: int, dtype: np.dtype) -> np.ndarray:
    """``values`` as a C-contiguous ``(count, width)`` array of ``dtype``."""
    array = np.asarray(values)
    if array.ndim == 1 and width == 1:
        array = array.reshape(-1, 1)
    if array.shape != (count, width):
        raise DataError(f"expected gradients of shape ({count}, {width}), got {array.shape}")
    if array.dtype.kind not in "fiu":
        raise DataError(f"gradients must be numeric, got dtype {array.dtype}")
    array = np.ascontiguousarray(array, dtype=dtype)
    if not np.isfinite(array).all():
        raise DataError("gradients must be finite (found NaN or inf)")
    return array


def shard_of(keys: np.ndarray, spec: TableSpec, num_shards: int) -> np.ndarray:
    """The shard index of each key: a hash for sparse tables, ``key % n`` for dense."""
    if spec.kind == "dense":
        return (keys % num_shards).astype(np.int64)
    hashed = mix64(keys.view(np.uint64) ^ _ROUTE_SALT)
    return (hashed % np.uint64(num_shards)).astype(np.int64)


def _uniform(keys: np.ndarray, seed: int, width: int, stream: int) -> np.ndarray:
    """Uniform doubles in ``[0, 1)`` of shape ``(len(keys), width)``, seeded by key and column."""
    base = mix64(keys.view(np.uint64) ^ mix64(np.array([seed], dtype=np.uint64)))
    with np.errstate(over="ignore"):
        columns = (np.arange(width, dtype=np.uint64) * np.uint64(2) + np.uint64(stream) + np.uint64(1)) * _COLUMN_SALT
        bits = mix64(base[:, None] ^ columns[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


def initial_values(keys: np.ndarray, init: InitConfig, width: int, dtype: np.dtype) -> np.ndarray:
    """The initial rows of ``keys``: the same for a key in every process and run."""
    shape = (keys.size, width)
    if init.kind == "zeros":
        return np.zeros(shape, dtype=dtype)
    if init.kind == "constant":
        return np.full(shape, init.value, dtype=dtype)
    if init.kind == "uniform":
        return ((_uniform(keys, init.seed, width, 0) * 2.0 - 1.0) * init.scale).astype(dtype)
    u1 = 1.0 - _uniform(keys, init.seed, width, 0)  # in (0, 1]
    u2 = _uniform(keys, init.seed, width, 1)
    normal = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    return (normal * init.scale).astype(dtype)
