"""The report's plots: training loss per epoch, and the validation ROC from its score summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np


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
