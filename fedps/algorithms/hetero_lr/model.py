"""A party's part of the model, kept in its own parameter server.

Feature weights live in table ``w`` (dense, or sparse over hashed int64
feature ids; regularised by ``l1``/``l2``); the guest's intercept in a table
``bias`` of its own, never regularised (as in scikit-learn). The optimizer
runs on the shards; the driver pushes batch-mean gradients and ends each
step; executor tasks pull the weights of the step they compute.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedps.algorithms.hetero_lr.params import LRParams
from fedps.algorithms.hetero_lr.protocol import INTERCEPT
from fedps.ps.config import OptimizerConfig, TableSpec

ZERO = np.zeros(1, dtype=np.int64)


def tables(params: LRParams, features: int, intercept: bool, sparse: bool) -> tuple[TableSpec, ...]:
    optimizer = dict(name=params.optimizer, learning_rate=params.learning_rate, schedule=params.schedule,
                     decay_rate=params.decay_rate, decay_steps=params.decay_steps)
    shape = {"kind": "sparse"} if sparse else {"kind": "dense", "dim": max(1, features)}
    specs = [TableSpec("w", dtype="float64", optimizer=OptimizerConfig(l1=params.l1, l2=params.l2, **optimizer),
                       **shape)]
    if intercept:
        specs.append(TableSpec("bias", kind="dense", dim=1, dtype="float64", optimizer=OptimizerConfig(**optimizer)))
    return tuple(specs)


def push(ps: Any, keys: np.ndarray, gradient: np.ndarray) -> int:
    """Push a batch-mean keyed gradient (``INTERCEPT`` is the bias) and end the step."""
    features = keys != INTERCEPT
    if features.any():
        ps.table("w").push(keys[features], gradient[features].reshape(-1, 1))
    if (~features).any():
        ps.table("bias").push(ZERO, gradient[~features].reshape(1, 1))
    return ps.end_step()


def weights(ps: Any, features: int, intercept: bool) -> tuple[np.ndarray, float]:
    """Dense weights of every feature and the intercept (driver; for the report)."""
    w = ps.table("w").pull(np.arange(features, dtype=np.int64))[:, 0] if features else np.zeros(0)
    b = float(ps.table("bias").pull(ZERO)[0, 0]) if intercept else 0.0
    return w, b


def dump(ps: Any, intercept: bool) -> tuple[np.ndarray, np.ndarray, float]:
    """Every stored row of a sparse model: ``(feature ids, weights, intercept)``."""
    keys, w, _ = ps.table("w").dump()
    b = float(ps.table("bias").pull(ZERO)[0, 0]) if intercept else 0.0
    return keys, w[:, 0], b
