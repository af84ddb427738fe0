"""Objectives: the first and second derivatives of the loss per row, in numpy.

Margins ``f`` have shape ``(rows, classes)``; so do ``g`` and ``h``. The
guest computes them in its tasks and fixes them to integers with
:func:`quantize` (``precision_bits`` fractional bits) before it encrypts, so
every party (and the plaintext reference) sums the same integers.
"""

from __future__ import annotations

import numpy as np

from fedps.errors import DataError

#: Hessian floor of softmax (as XGBoost's ``multi:softmax``).
EPS = 1e-16


def sigmoid(u: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(u, -500, 500)))


def softmax(f: np.ndarray) -> np.ndarray:
    z = np.exp(f - f.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def base_margin(objective: str, y: np.ndarray, classes: int) -> float:
    """The starting margin: 0 (p = 0.5 or uniform classes) for classification, mean(y) for regression."""
    if objective == "reg:squarederror":
        return float(np.mean(y)) if len(y) else 0.0
    return 0.0


def check_labels(objective: str, y: np.ndarray, classes: int) -> None:
    """DataError naming the problem when the labels cannot train this objective."""
    if objective == "reg:squarederror":
        if len(y) and np.ptp(y) == 0:
            raise DataError("the label column holds one value only; a regression needs varying labels")
        return
    values = np.unique(y)
    if len(values) < 2:
        raise DataError(f"the label column holds one class only ({values.tolist()}); "
                        "a classifier needs at least two classes")
    allowed = np.arange(max(classes, 2))
    if not np.isin(values, allowed).all():
        raise DataError(f"labels must be integers in 0..{len(allowed) - 1}, found {values[:8].tolist()}")


def gradients(objective: str, f: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(g, h)`` of every row and class at margins ``f`` (rows x classes)."""
    if objective == "binary:logistic":
        p = sigmoid(f[:, 0])
        return (p - y).reshape(-1, 1), (p * (1 - p)).reshape(-1, 1)
    if objective == "reg:squarederror":
        return (f[:, 0] - y).reshape(-1, 1), np.ones((len(y), 1))
    p = softmax(f)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y.astype(np.int64)] = 1.0
    return p - onehot, np.maximum(2.0 * p * (1.0 - p), EPS)


def loss(objective: str, f: np.ndarray, y: np.ndarray) -> float:
    """Sum over rows of the loss (log loss, squared error / 2)."""
    if objective == "binary:logistic":
        p = np.clip(sigmoid(f[:, 0]), 1e-15, 1 - 1e-15)
        return float(-np.sum(y * np.log(p) + (1 - y) * np.log(1 - p)))
    if objective == "reg:squarederror":
        return float(0.5 * np.sum((f[:, 0] - y) ** 2))
    p = np.clip(softmax(f), 1e-15, 1.0)
    return float(-np.sum(np.log(p[np.arange(len(y)), y.astype(np.int64)])))


def quantize(values: np.ndarray, bits: int) -> np.ndarray:
    """Fixed-point integers ``round(v * 2^bits)`` (int64)."""
    scaled = np.rint(np.asarray(values, dtype=np.float64) * float(1 << bits))
    if scaled.size and np.max(np.abs(scaled)) >= 2.0 ** 62:
        raise DataError(f"a gradient does not fit {bits} fractional bits; lower job.params.precision_bits")
    return scaled.astype(np.int64)


def dequantize(values: np.ndarray | int, bits: int) -> np.ndarray:
    return np.asarray(values, dtype=np.float64) / float(1 << bits)
