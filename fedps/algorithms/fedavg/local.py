"""A party's local training and evaluation on its own Spark executors.

The party's rows are laid out by :mod:`fedps.engine.layout` in ``N``
partitions; a row is a validation row when ``row_key mod 1000`` falls below
``1000 * validation_fraction`` (``row_key`` is a keyed hash of the id, so the
split is fixed and random). Each round runs two Spark jobs over the
partitions: one scores the validation rows with the global model, one trains.
A task never returns a validation row's score or label: it adds its rows to a
:class:`~fedps.engine.vertical.scores.ScoreSummary` (2^16-bin histograms of
the score per label, exact sums for accuracy and log loss), and the driver
merges the tasks' summaries (DESIGN.md, "Executor runtime"). The AUC is
therefore binned: it differs from the exact one only through ties inside a
bin of width 2^-16 in probability.

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

from fedps.algorithms.fedavg.model import ModelSpec, train
from fedps.algorithms.fedavg.params import FedAvgParams
from fedps.engine.layout import Layout, read_partition
from fedps.engine.vertical.scores import ScoreSummary

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
                index: int, partitions: Iterator[int]) -> Iterator[tuple[ScoreSummary, int, np.ndarray]]:
    """Summarise the validation rows' scores under the round's global model, then train E epochs from it."""
    partitions = list(partitions)
    vx, vy = _rows(layout, partitions, params.validation_fraction, validation=True)
    summary = ScoreSummary()
    if len(vy):
        summary.add(vy, spec.log_odds(theta, vx))
    del vx, vy
    x, y = _rows(layout, partitions, params.validation_fraction, validation=False)
    if not len(y) or seed is None:   # no training rows, or the final evaluation
        yield summary, 0, theta
        return
    trained = train(spec, theta, x, y, epochs=params.local_epochs, batch_size=params.batch_size,
                    learning_rate=params.learning_rate, l2=params.l2, mu=params.fedprox_mu,
                    seed=seed * 7919 + index)
    yield summary, len(y), trained


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
        """Metrics of the validation rows, merged from the tasks' summaries; the same Spark job trains
        from ``theta`` for round ``round_``."""
        tasks = 1 if self.mode == "single" else self.tasks
        self._seed = self._round_seed(round_) if round_ is not None else None
        layout, spec, params, seed = self.layout, self.spec, self.params, self._seed
        results = self._run(tasks, lambda i, it: _round_task(layout, spec, theta, params, seed, i, it))
        summary = ScoreSummary()
        for part, _, _ in results:
            summary.merge(part)
        rows = sum(r[1] for r in results)
        self._trained = (theta, rows, sum(r[1] * r[2] for r in results) / rows if rows else theta)
        return summary_metrics(summary)

    def train(self, theta: np.ndarray, round_: int) -> tuple[int, np.ndarray]:
        """E local epochs from ``theta`` (run by the round's :meth:`evaluate`, which the protocol calls first)."""
        if self._trained is None or self._trained[0] is not theta or self._seed != self._round_seed(round_):
            self.evaluate(theta, round_)
        _, rows, trained = self._trained
        self._trained = None
        return rows, trained

    def _round_seed(self, round_: int) -> int:
        return self.params.seed * 100_003 + round_


#: Probabilities are clipped to [_EPS, 1 - _EPS] before the logit, so 0 and 1 stay finite.
_EPS = 1e-15


def probability_log_odds(p: np.ndarray) -> np.ndarray:
    """``log(p / (1 - p))`` of clipped probabilities: finite for every p in [0, 1]."""
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1.0 - _EPS)
    return np.log(p) - np.log1p(-p)


def summary_metrics(summary: ScoreSummary) -> dict[str, float]:
    """What a party reports of its validation rows: rows, binned AUC and KS, log loss, accuracy.

    AUC and KS are NaN when one class is missing; everything is NaN without rows.
    """
    rows = summary.rows
    if rows == 0:
        return {"rows": 0, "auc": float("nan"), "ks": float("nan"), "loss": float("nan"),
                "accuracy": float("nan")}
    metrics = summary.metrics()
    both = summary.positives.sum() > 0 and summary.negatives.sum() > 0
    return {"rows": int(rows), "auc": metrics["auc"] if both else float("nan"),
            "ks": metrics["ks"] if both else float("nan"), "loss": float(metrics["log_loss"]),
            "accuracy": float(metrics["accuracy"])}


def evaluate_scores(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """:func:`summary_metrics` of rows held in memory (probabilities of label 1)."""
    summary = ScoreSummary()
    if len(labels):
        summary.add(np.asarray(labels), probability_log_odds(probabilities))
    return summary_metrics(summary)

