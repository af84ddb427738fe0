"""A party's validation metrics come from per-task score histograms, never from per-row scores on the driver.

The oracle is scikit-learn's exact AUC and log loss on the same rows; the
binned AUC (2^16 bins) may differ only through ties inside one bin.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import log_loss, roc_auc_score

from fedps.algorithms.fedavg.local import SparkData, _round_task, evaluate_scores, summary_metrics, validation_mask
from fedps.algorithms.fedavg.model import ModelSpec, train
from fedps.algorithms.fedavg.params import FedAvgParams
from fedps.engine.vertical.scores import ScoreSummary

DATA = Path(__file__).parents[2] / "data"


def tie_bound(summary: ScoreSummary) -> float:
    """The most binning can move the AUC: a positive and a negative in one bin count half, not 0 or 1."""
    pairs = float(summary.positives.sum()) * float(summary.negatives.sum())
    return 0.5 * float(np.sum(summary.positives * summary.negatives)) / pairs + 1e-12


def _breast() -> tuple[np.ndarray, np.ndarray]:
    frame = pd.concat([pd.read_csv(DATA / "breast_homo_guest.csv"), pd.read_csv(DATA / "breast_homo_host.csv")])
    return frame.drop(columns=["id", "y"]).to_numpy(float), frame["y"].to_numpy(float)


def test_merged_partition_summaries_give_the_exact_metrics_within_the_bin_tolerance():
    x, y = _breast()
    spec = ModelSpec("lr", x.shape[1])
    theta = train(spec, spec.initial(0), x[:200], y[:200], epochs=2, batch_size=32, learning_rate=0.05)
    merged = ScoreSummary()
    for rows in np.array_split(np.arange(200, len(y)), 3):     # three tasks' validation rows
        part = ScoreSummary()
        part.add(y[rows], spec.log_odds(theta, x[rows]))
        merged.merge(part)
    metrics = summary_metrics(merged)
    p = spec.scores(theta, x[200:])
    assert metrics["rows"] == len(y) - 200
    assert abs(metrics["auc"] - roc_auc_score(y[200:], p)) <= max(tie_bound(merged), 1e-4)
    assert metrics["loss"] == np.float64(metrics["loss"]) and abs(metrics["loss"] - log_loss(y[200:], p)) < 1e-9
    assert metrics["accuracy"] == np.mean((p >= 0.5) == (y[200:] == 1))
    assert 0.0 < metrics["ks"] <= 1.0


def test_probabilities_of_zero_and_one_stay_finite_and_one_class_has_no_auc():
    got = evaluate_scores(np.array([0.0, 1e-300, 0.3, 0.7, 1.0]), np.array([0, 0, 1, 0, 1]))
    assert np.isfinite(got["loss"]) and got["rows"] == 5
    assert got["auc"] == roc_auc_score([0, 0, 1, 0, 1], [0.0, 1e-300, 0.3, 0.7, 1.0])   # no two in one bin
    alone = evaluate_scores(np.array([0.2, 0.9]), np.array([1, 1]))
    assert np.isnan(alone["auc"]) and np.isnan(alone["ks"]) and alone["accuracy"] == 0.5
    assert evaluate_scores(np.zeros(0), np.zeros(0))["rows"] == 0


def test_spark_evaluation_merges_task_summaries_to_the_exact_metrics(spark, tmp_path):
    from fedps.engine.layout import build_layout, read_partition

    params = FedAvgParams(executor_mode="parallel", partitions=2, validation_fraction=0.3)
    layout = build_layout(spark, str(DATA / "breast_homo_guest.csv"), folder=str(tmp_path / "layout"),
                          partitions=2, id_column="id", label_column="y")
    data = SparkData(spark, layout, params)
    spec = data.spec
    theta = np.random.default_rng(2).normal(0, 0.2, spec.size)
    # what one task hands back: a summary, a row count and a model, nothing per row
    task = list(_round_task(layout, spec, theta, params, 5, 0, iter([0])))
    assert len(task) == 1 and isinstance(task[0][0], ScoreSummary) and task[0][2].shape == (spec.size,)
    metrics = data.evaluate(theta, 0)
    parts = [read_partition(layout, p) for p in range(layout.partitions)]
    keep = [validation_mask(p.row_keys, params.validation_fraction) for p in parts]
    vx = np.concatenate([np.asarray(p.x)[k] for p, k in zip(parts, keep)])
    vy = np.concatenate([p.y[k] for p, k in zip(parts, keep)])
    p = spec.scores(theta, vx)
    oracle = ScoreSummary()
    oracle.add(vy, spec.log_odds(theta, vx))
    assert metrics["rows"] == len(vy) > 20
    assert abs(metrics["auc"] - roc_auc_score(vy, p)) <= tie_bound(oracle)
    assert abs(metrics["loss"] - log_loss(vy, p)) < 1e-9
