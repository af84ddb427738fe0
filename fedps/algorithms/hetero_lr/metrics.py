"""Binary-classification metrics from scores (the tests' exact oracle), and the report's plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def sigmoid(u: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(u, -500, 500)))


def roc_curve(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    order = np.argsort(-p, kind="mergesort")
    y, p = y[order], p[order]
    distinct = np.r_[np.flatnonzero(np.diff(p)), y.size - 1]
    tps = np.cumsum(y)[distinct]
    fps = (distinct + 1) - tps
    positives, negatives = max(tps[-1], 1), max(fps[-1], 1)
    return np.r_[0.0, fps / negatives], np.r_[0.0, tps / positives]


def classification_metrics(y: np.ndarray, u: np.ndarray) -> dict[str, float]:
    """AUC, KS, accuracy, F1 and log loss of scores ``u`` (log-odds) against labels ``y``."""
    y = np.asarray(y, dtype=np.float64)
    p = sigmoid(np.asarray(u, dtype=np.float64))
    fpr, tpr = roc_curve(y, p)
    predicted = p >= 0.5
    tp = float(np.sum(predicted & (y == 1)))
    precision = tp / max(float(predicted.sum()), 1.0)
    recall = tp / max(float((y == 1).sum()), 1.0)
    eps = 1e-15
    return {
        "auc": float(np.trapezoid(tpr, fpr)),
        "ks": float(np.max(tpr - fpr)),
        "accuracy": float(np.mean(predicted == (y == 1))),
        "f1": 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall),
        "log_loss": float(-np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps))),
        "rows": int(y.size),
    }


def write_plots(folder: Path, losses: list[float], summary=None) -> list[Path]:
    """``loss.png`` (loss per epoch) and ``roc.png`` (validation ROC); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if losses:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(range(1, len(losses) + 1), losses, marker="o")
        ax.set_xlabel("epoch")
        ax.set_ylabel("training loss (Taylor, encrypted)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / "loss.png", dpi=100)
        plt.close(fig)
        written.append(folder / "loss.png")
    if summary is not None and summary.rows:
        fpr, tpr = summary.roc()
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot(fpr, tpr, label=f"AUC {np.trapezoid(tpr, fpr):.4f}")
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(folder / "roc.png", dpi=100)
        plt.close(fig)
        written.append(folder / "roc.png")
    return written
