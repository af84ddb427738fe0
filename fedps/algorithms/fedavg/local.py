"""A party's local training and evaluation on its own Spark executors.

The party's rows are laid out by :mod:`fedps.engine.layout` in ``N``
partitions; a row is a validation row when ``row_key mod 1000`` falls below
``1000 * validation_fraction`` (``row_key`` is a keyed hash of the id, so the
split is fixed and random). Each round runs two Spark jobs over the
partitions: one scores the validation rows with the global model, one trains.

Training runs in one of two ways (``params.executor_mode``):

- ``single``: one executor task reads every partition and runs E epochs of
  mini-batch SGD over all the party's rows, as a central run would;
- ``parallel``: each of ``T = min(N, slots)`` tasks runs E epochs on its own
  partitions from the same global model, and the party averages the ``T``
  models weighted by their rows (a FedAvg step inside the party).

``auto`` picks ``single`` below ``params.single_below_rows`` training rows
(see docs/benchmarks.md, "FedAvg", for where the switch pays).
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import numpy as np

from fedps.algorithms.fedavg.model import ModelSpec, auc, log_loss, train
from fedps.algorithms.fedavg.params import FedAvgParams
from fedps.engine.layout import Layout, read_partition

log = logging.getLogger(__name__)


def validation_mask(row_keys: np.ndarray, fraction: float) -> np.ndarray:
    return (row_keys % 1000) < int(round(1000 * fraction))


def _rows(layout: Layout, partitions: Iterator[int], fraction: float, validation: bool) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for p in partitions:
        rows = read_partition(layout, p)
        keep = validation_mask(rows.row_keys, fraction) == validation
        xs.append(np.asarray(rows.x)[keep])
        ys.append(rows.y[keep])
    if not xs:
        return np.zeros((0, len(layout.feature_names))), np.zeros(0)
    return np.concatenate(xs), np.concatenate(ys)


def _round_task(layout: Layout, spec: ModelSpec, theta: np.ndarray, params: FedAvgParams, seed: int | None,
                index: int, partitions: Iterator[int]) -> Iterator[tuple[np.ndarray, np.ndarray, int, np.ndarray]]:
    """Score the validation rows with the round's global model, then train E epochs from it."""
    partitions = list(partitions)
    vx, vy = _rows(layout, partitions, params.validation_fraction, validation=True)
    scores = spec.scores(theta, vx) if len(vy) else np.zeros(0)
    x, y = _rows(layout, partitions, params.validation_fraction, validation=False)
    if not len(y) or seed is None:   # no training rows, or the final evaluation
        yield scores, vy, 0, theta
        return
    trained = train(spec, theta, x, y, epochs=params.local_epochs, batch_size=params.batch_size,
                    learning_rate=params.learning_rate, l2=params.l2, mu=params.fedprox_mu,
                    seed=seed * 7919 + index)
    yield scores, vy, len(y), trained


class SparkData:
    """:class:`fedps.algorithms.fedavg.protocol.LocalData` over a party's laid-out rows."""

    def __init__(self, spark: Any, layout: Layout, params: FedAvgParams) -> None:
        self.spark, self.layout, self.params = spark, layout, params
        self.features = tuple(layout.feature_names)
        self.spec = ModelSpec(params.model, len(self.features), params.hidden)
        slots = max(1, int(spark.sparkContext.defaultParallelism))
        self.tasks = min(layout.partitions, slots)
        keys = np.concatenate([read_partition(layout, p).row_keys for p in range(layout.partitions)]) \
            if layout.rows < 2_000_000 else None
        self.train_rows = int((~validation_mask(keys, params.validation_fraction)).sum()) if keys is not None \
            else int(layout.rows * (1 - params.validation_fraction))
        mode = params.executor_mode
        if mode == "auto":
            mode = "single" if self.train_rows < params.single_below_rows else "parallel"
        self.mode = mode
        self._trained: tuple[np.ndarray, int, np.ndarray] | None = None
        self._seed: int | None = None
        log.info("fedavg: %d training rows in %d partitions; local training %s", self.train_rows,
                 layout.partitions, "on one executor" if mode == "single" else f"in {self.tasks} parallel tasks")

    def _run(self, tasks: int, function: Any) -> list[Any]:
        rdd = self.spark.sparkContext.parallelize(range(self.layout.partitions), tasks)
        return rdd.mapPartitionsWithIndex(function).collect()

    def evaluate(self, theta: np.ndarray, round_: int | None = None) -> dict[str, float]:
        """Scores of the validation rows; the same Spark job trains from ``theta`` for round ``round_``."""
        tasks = 1 if self.mode == "single" else self.tasks
        self._seed = self._round_seed(round_) if round_ is not None else None
        layout, spec, params, seed = self.layout, self.spec, self.params, self._seed
        results = self._run(tasks, lambda i, it: _round_task(layout, spec, theta, params, seed, i, it))
        scores = np.concatenate([r[0] for r in results])
        labels = np.concatenate([r[1] for r in results])
        rows = sum(r[2] for r in results)
        self._trained = (theta, rows, sum(r[2] * r[3] for r in results) / rows if rows else theta)
        return evaluate_scores(scores, labels)

    def train(self, theta: np.ndarray, round_: int) -> tuple[int, np.ndarray]:
        """E local epochs from ``theta`` (run by the round's :meth:`evaluate`, which the protocol calls first)."""
        if self._trained is None or self._trained[0] is not theta or self._seed != self._round_seed(round_):
            self.evaluate(theta, round_)
        _, rows, trained = self._trained
        self._trained = None
        return rows, trained

    def _round_seed(self, round_: int) -> int:
        return self.params.seed * 100_003 + round_


def evaluate_scores(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"rows": int(len(labels)), "auc": auc(scores, labels), "loss": log_loss(scores, labels),
            "accuracy": float(np.mean((scores >= 0.5) == (labels == 1))) if len(labels) else float("nan")}

