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
    """Weights of one party: ``features`` columns, plus an intercept for the guest."""

    def __init__(self, name: str, features: int, params: LRParams, intercept: bool,
                 checkpoint_dir: str = "", namespace: str = "fedps") -> None:
        self.features, self.intercept = features, intercept
        optimizer = dict(name=params.optimizer, learning_rate=params.learning_rate,
                         schedule=params.schedule, decay_rate=params.decay_rate,
                         decay_steps=params.decay_steps)
        tables = [TableSpec("w", kind="dense", dim=max(1, features), dtype="float64",
                            optimizer=OptimizerConfig(l1=params.l1, l2=params.l2, **optimizer))]
        if intercept:
            tables.append(TableSpec("bias", kind="dense", dim=1, dtype="float64",
                                    optimizer=OptimizerConfig(**optimizer)))
        self.config = PSConfig(name=name, tables=tuple(tables), num_shards=1 if features < 4096 else 2,
                               namespace=namespace, checkpoint_dir=checkpoint_dir)
        self.server = ParameterServer.start(self.config)
        self._keys = np.arange(self.features, dtype=np.int64)

    def weights(self) -> tuple[np.ndarray, float]:
        """Current feature weights and intercept."""
        w = self.server.table("w").pull(self._keys)[:, 0] if self.features else np.zeros(0)
        b = float(self.server.table("bias").pull(np.zeros(1, dtype=np.int64))[0, 0]) if self.intercept else 0.0
        return w, b

    def scores(self, x: np.ndarray) -> np.ndarray:
        """``u = X·w (+ b)``."""
        w, b = self.weights()
        return x @ w + b

    def step(self, gradient: np.ndarray) -> int:
        """Push a batch-mean gradient (features, then the intercept) and end the step."""
        if self.features:
            self.server.table("w").push(self._keys, gradient[: self.features].reshape(-1, 1))
        if self.intercept:
            self.server.table("bias").push(np.zeros(1, dtype=np.int64), gradient[self.features:].reshape(1, 1))
        return self.server.end_step()

    def checkpoint(self) -> int:
        self.server.checkpoint()
        return self.server.step

    def restore(self, step: int) -> None:
        self.server.restore(step)

    def stop(self) -> None:
        self.server.stop()
