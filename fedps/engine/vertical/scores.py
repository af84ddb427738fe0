"""Validation metrics from score histograms, so no driver ever holds per-row scores.

Each task adds its validation rows to a :class:`ScoreSummary` (counts of
positives and negatives per bin of the predicted probability, plus exact
sums for accuracy, F1 and log loss); the driver merges the tasks' summaries.
AUC and KS from 2^16 bins differ from the exact ones only through ties
inside a bin (counted as half), which is below 10^-4 on the data sets here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

BINS = 1 << 16


def sigmoid(u: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(u, -500, 500)))


@dataclass
class ScoreSummary:
    positives: np.ndarray = field(default_factory=lambda: np.zeros(BINS, dtype=np.int64))
    negatives: np.ndarray = field(default_factory=lambda: np.zeros(BINS, dtype=np.int64))
    true_positive: int = 0       # predicted p >= 0.5 and y = 1
    predicted_positive: int = 0
    correct: int = 0
    log_loss_sum: float = 0.0

    def add(self, y: np.ndarray, u: np.ndarray) -> None:
        y = np.asarray(y, dtype=np.float64)
        p = sigmoid(np.asarray(u, dtype=np.float64))
        bins = np.minimum((p * BINS).astype(np.int64), BINS - 1)
        self.positives += np.bincount(bins[y == 1], minlength=BINS)
        self.negatives += np.bincount(bins[y != 1], minlength=BINS)
        predicted = p >= 0.5
        self.true_positive += int(np.sum(predicted & (y == 1)))
        self.predicted_positive += int(predicted.sum())
        self.correct += int(np.sum(predicted == (y == 1)))
        eps = 1e-15
        self.log_loss_sum += float(-np.sum(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps)))

    def merge(self, other: ScoreSummary) -> ScoreSummary:
        self.positives += other.positives
        self.negatives += other.negatives
        self.true_positive += other.true_positive
        self.predicted_positive += other.predicted_positive
        self.correct += other.correct
        self.log_loss_sum += other.log_loss_sum
        return self

    @property
    def rows(self) -> int:
        return int(self.positives.sum() + self.negatives.sum())

    def roc(self) -> tuple[np.ndarray, np.ndarray]:
        """False and true positive rates, thresholds from high to low bins."""
        tps = np.cumsum(self.positives[::-1])
        fps = np.cumsum(self.negatives[::-1])
        keep = np.r_[np.flatnonzero((self.positives[::-1] + self.negatives[::-1]) > 0)]
        tps, fps = tps[keep], fps[keep]
        pos, neg = max(int(self.positives.sum()), 1), max(int(self.negatives.sum()), 1)
        return np.r_[0.0, fps / neg], np.r_[0.0, tps / pos]

    def metrics(self) -> dict[str, float]:
        rows = self.rows
        if rows == 0:
            return {}
        fpr, tpr = self.roc()
        precision = self.true_positive / max(self.predicted_positive, 1)
        recall = self.true_positive / max(int(self.positives.sum()), 1)
        return {
            "auc": float(np.trapezoid(tpr, fpr)),
            "ks": float(np.max(tpr - fpr)),
            "accuracy": self.correct / rows,
            "f1": 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall),
            "log_loss": self.log_loss_sum / rows,
            "rows": rows,
        }
