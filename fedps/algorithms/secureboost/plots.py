"""The report's plots: loss per tree, the validation ROC, and this party's feature importance."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_plots(folder: Path, rounds: list[dict], summary=None, importance: dict | None = None) -> list[Path]:
    """``loss.png``, ``roc.png`` (guest, binary, with a validation split) and ``importance.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if rounds:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([r["tree"] for r in rounds], [r["train_loss"] for r in rounds], marker="o", label="training")
        if "valid_loss" in rounds[0]:
            ax.plot([r["tree"] for r in rounds], [r["valid_loss"] for r in rounds], marker="s", label="validation")
        ax.set_xlabel("round")
        ax.set_ylabel("loss")
        ax.legend()
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
    if importance:
        names = sorted(importance, key=lambda n: importance[n]["splits"])[-20:]
        fig, ax = plt.subplots(figsize=(5, 0.3 * len(names) + 1.2))
        ax.barh(names, [importance[n]["splits"] for n in names])
        ax.set_xlabel("splits")
        ax.set_title("feature importance (this party's features)")
        fig.tight_layout()
        fig.savefig(folder / "importance.png", dpi=100)
        plt.close(fig)
        written.append(folder / "importance.png")
    return written
