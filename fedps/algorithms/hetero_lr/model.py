"""A party's part of the model, kept in its own parameter server.

Feature weights live in a dense table ``w`` (regularised by ``l1``/``l2``); the
guest's intercept in a table ``bias`` of its own, never regularised (as in
scikit-learn). The optimizer runs on the shards; the protocol only pushes
batch-mean gradients and ends each step at the barrier.
"""

from __future__ import annotations

import numpy as np

from fedps.algorithms.hetero_lr.params import LRParams
from fedps.ps.config import OptimizerConfig, PSConfig, TableSpec
from fedps.ps.server import ParameterServer


class PartyModel:
    """Weights of one party: ``features`` columns, plus an intercept for the guest.

    ``sparse``: feature ids are hashed int64 keys (up to 2^63) and a row of the
    table exists only once a batch touched it; ``features`` is then unused.
    """

    def __init__(self, name: str, features: int, params: LRParams, intercept: bool,
                 checkpoint_dir: str = "", namespace: str = "fedps", sparse: bool = False) -> None:
        self.features, self.intercept, self.sparse = features, intercept, sparse
        optimizer = dict(name=params.optimizer, learning_rate=params.learning_rate,
                         schedule=params.schedule, decay_rate=params.decay_rate,
                         decay_steps=params.decay_steps)
        shape = {"kind": "sparse"} if sparse else {"kind": "dense", "dim": max(1, features)}
        tables = [TableSpec("w", dtype="float64", optimizer=OptimizerConfig(l1=params.l1, l2=params.l2, **optimizer),
                            **shape)]
        if intercept:
            tables.append(TableSpec("bias", kind="dense", dim=1, dtype="float64",
                                    optimizer=OptimizerConfig(**optimizer)))
        self.config = PSConfig(name=name, tables=tuple(tables), num_shards=2 if sparse or features >= 4096 else 1,
                               namespace=namespace, checkpoint_dir=checkpoint_dir)
        self.server = ParameterServer.start(self.config)
        self._keys = np.arange(self.features, dtype=np.int64)

    def weights(self, keys: np.ndarray | None = None) -> tuple[np.ndarray, float]:
        """Current weights of ``keys`` (default: every dense feature) and the intercept."""
        keys = self._keys if keys is None else keys
        w = self.server.table("w").pull(keys)[:, 0] if len(keys) else np.zeros(0)
        b = float(self.server.table("bias").pull(np.zeros(1, dtype=np.int64))[0, 0]) if self.intercept else 0.0
        return w, b

    def scores(self, x, keys: np.ndarray | None = None) -> np.ndarray:
        """``u = X·w (+ b)``; for sparse ``X`` its columns are the feature ids ``keys``."""
        w, b = self.weights(keys)
        return np.asarray(x @ w).ravel() + b

    def step(self, gradient: np.ndarray, keys: np.ndarray | None = None) -> int:
        """Push a batch-mean gradient (features, then the intercept) and end the step."""
        keys = self._keys if keys is None else keys
        if len(keys):
            self.server.table("w").push(keys, gradient[: len(keys)].reshape(-1, 1))
        if self.intercept:
            self.server.table("bias").push(np.zeros(1, dtype=np.int64), gradient[len(keys):].reshape(1, 1))
        return self.server.end_step()

    def stored_rows(self) -> int:
        """Rows the PS holds for the feature table (touched rows, for a sparse model)."""
        return sum(int(s["rows"]) for s in self.server.table("w").stats())

    def dump(self) -> tuple[np.ndarray, np.ndarray]:
        """Every stored feature row: ``(keys, weights)``."""
        keys, weights, _ = self.server.table("w").dump()
        return keys, weights[:, 0]

    def checkpoint(self) -> int:
        self.server.checkpoint()
        return self.server.step

    def restore(self, step: int) -> None:
        self.server.restore(step)

    def stop(self) -> None:
        self.server.stop()
