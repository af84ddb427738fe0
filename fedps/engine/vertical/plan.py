"""Which rows form each batch: fixed slices of every partition, the same at every party.

Both parties hold the same ids in the same order in every partition (the
layout), so they cut the same batches from the same seeds without sending a
single id or row index: the validation rows come from a seeded hash of each
row's key, and each partition's training rows are permuted by a generator
seeded with ``(seed, epoch, partition)`` and cut into the job's batch count.
"""

from __future__ import annotations

import numpy as np


def validation_rows(row_keys: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation rows, from a seeded hash of each row's key (same on every side)."""
    if fraction == 0:
        return np.zeros(len(row_keys), dtype=bool)
    salt = np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)
    h = (np.asarray(row_keys).astype(np.uint64) ^ salt) * np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(31)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(29)
    return (h >> np.uint64(11)).astype(np.float64) / 2.0**53 < fraction


def batch_count(rows: int, batch_size: int, validation_fraction: float) -> int:
    """Batches per epoch, from the aligned row count both parties know."""
    return max(1, int(rows * (1.0 - validation_fraction)) // batch_size)


def partition_batches(row_keys: np.ndarray, *, seed: int, epoch: int, partition: int, batches: int,
                      validation_fraction: float) -> list[np.ndarray]:
    """Row indices of partition ``partition`` in each of the epoch's ``batches`` batches."""
    train = np.flatnonzero(~validation_rows(row_keys, validation_fraction, seed))
    order = train[np.random.default_rng([seed, epoch, partition]).permutation(len(train))]
    return np.array_split(order, batches)


#: Automatic batch size: about this many batches per epoch, within the bounds below.
AUTO_BATCHES, AUTO_MIN, AUTO_MAX = 50, 64, 1024


def auto_batch_size(rows: int, validation_fraction: float, floor: int = 0) -> int:
    """A batch size that grows with the training rows (never one batch per epoch when rows allow).

    About ``rows / AUTO_BATCHES`` rows per batch, at least ``AUTO_MIN`` (and
    ``floor``, e.g. a privacy floor), at most ``AUTO_MAX``, and never more
    than half the training rows when there are at least ``2·AUTO_MIN`` of them.
    """
    train = int(rows * (1.0 - validation_fraction))
    size = min(max(train // AUTO_BATCHES, AUTO_MIN), AUTO_MAX)
    if train >= 2 * AUTO_MIN:
        size = min(size, train // 2)
    return max(1, min(max(size, floor), train)) if train > 0 else max(1, floor)
