"""GOSS (gradient-based one-side sampling), chosen by the guest alone, exact across partitions.

Per tree, among the rows the tree may use (training rows, after
``subsample``), the guest keeps the ``K = ceil(goss_top_rate * n)`` rows of
largest gradient and a seeded sample of the others, each with probability
``goss_other_rate / (1 - goss_top_rate)``, whose ``g`` and ``h`` it amplifies
by ``(1 - goss_top_rate) / goss_other_rate``. A row's gradient size is
``sum over classes of |quantize(g)|`` (integers: every party and the
reference rank alike); the top rows are those at or above the K-th largest
size (rows tied with it are all kept). Every other row keeps zero ``g`` and
``h``, encrypted like the rest, so hosts cannot tell which rows were sampled.

The K-th largest size over all partitions is found without any driver holding
per-row values: a radix selection, ``DIGIT`` bits per round, in which each
guest task counts its rows per next digit under the prefix chosen so far
(:func:`digit_counts`, summed in the guest's accumulator) and the guest driver
picks the digit (:func:`choose_digit`). The reference finds the same value
with a sort (:func:`kth_largest`).
"""

from __future__ import annotations

import math

import numpy as np

from fedps.algorithms.secureboost import objective
from fedps.engine.vertical.plan import validation_rows

#: Bits of a size decided per round (4096 counts per round and task).
DIGIT = 12


def enabled(params) -> bool:
    return params.goss_top_rate > 0.0


def amplification(params) -> float:
    return (1.0 - params.goss_top_rate) / params.goss_other_rate


def sizes(params, margins: np.ndarray, y: np.ndarray, use: np.ndarray) -> np.ndarray:
    """Integer gradient size per row, -1 for rows the tree may not use."""
    g, _ = objective.gradients(params.objective, margins, y)
    size = np.abs(objective.quantize(g, params.precision_bits)).sum(axis=1)
    return np.where(use, size, -1)


def rounds(size_bits: int) -> int:
    return max(1, math.ceil(size_bits / DIGIT))


def size_bits(params, g_bound: float) -> int:
    """Bits enough for any row's size (``classes * g_bound`` at ``precision_bits``)."""
    return int(math.ceil(math.log2(params.classes * g_bound + 1.0))) + params.precision_bits + 1


def top_count(params, rows: int) -> int:
    return min(rows, max(1, math.ceil(params.goss_top_rate * rows))) if rows else 0


def digit_counts(size: np.ndarray, prefix: int, round_: int, n_rounds: int) -> np.ndarray:
    """Counts per value of digit ``round_`` (most significant first) among rows whose higher digits are ``prefix``."""
    shift = DIGIT * (n_rounds - 1 - round_)
    used = size[size >= 0]
    at = used[(used >> (shift + DIGIT)) == prefix] if round_ else used
    return np.bincount((at >> shift) & ((1 << DIGIT) - 1), minlength=1 << DIGIT).astype(np.int64)


def choose_digit(counts: np.ndarray, prefix: int, k_left: int) -> tuple[int, int]:
    """The digit of the ``k_left``-th largest under ``prefix``; returns ``(new prefix, k left inside it)``."""
    above = np.cumsum(counts[::-1])           # rows with a digit >= d, from the top digit down
    d = len(counts) - 1 - int(np.searchsorted(above, k_left))
    before = int(above[len(counts) - 2 - d]) if d < len(counts) - 1 else 0
    return (prefix << DIGIT) | d, k_left - before


def kth_largest(size: np.ndarray, k: int) -> int:
    used = np.sort(size[size >= 0])
    return int(used[-k]) if k else np.iinfo(np.int64).max


def weights(params, size: np.ndarray, threshold: int, row_keys: np.ndarray, tree: int) -> np.ndarray:
    """Per row: 1 for the top rows, the amplification for the sampled others, 0 for the rest."""
    top = size >= threshold
    rest = (size >= 0) & ~top
    fraction = min(1.0, params.goss_other_rate / (1.0 - params.goss_top_rate))
    sampled = rest & validation_rows(row_keys, fraction, params.seed * 6007 + 15485863 * (tree + 1))
    out = np.zeros(len(size))
    out[top] = 1.0
    out[sampled] = amplification(params)
    return out
