"""The coordinator's job folder: per-round metrics (``rounds.json``), the model, and plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from fedps.algorithms.fedavg.model import ModelSpec
from fedps.algorithms.fedavg.params import FedAvgParams


def round_record(result: Any) -> dict[str, Any]:
    """One line of ``rounds.json``: who took part, rows, time, and the validation metrics of theta_r."""
    return {"round": result.round, "participants": result.participants, "dropped": result.dropped,
            "training_rows": result.samples, "seconds": round(result.seconds, 3),
            "validation_of_model_before_round": clean(result.evaluation)}


def clean(values: dict[str, float]) -> dict[str, float | None]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in values.items()}


def write_rounds(folder: Path, rounds: list[dict]) -> Path:
    path = folder / "rounds.json"
    path.write_text(json.dumps(rounds, indent=1))
    return path


def write_model(folder: Path, params: FedAvgParams, features: list[str], theta: np.ndarray) -> Path:
    """``model.npz`` (the parameters) and ``model.json`` (what they mean)."""
    np.savez(folder / "model.npz", theta=theta)
    (folder / "model.json").write_text(json.dumps({"model": params.model, "hidden": params.hidden,
                                                   "features": list(features), "parameters": int(theta.size)},
                                                  indent=1))
    return folder / "model.npz"


def load_model(folder: Path) -> tuple[ModelSpec, list[str], np.ndarray]:
    """The model a job wrote into ``folder``: its spec, feature names and parameters."""
    meta = json.loads((Path(folder) / "model.json").read_text())
    theta = np.load(Path(folder) / "model.npz")["theta"]
    return ModelSpec(meta["model"], len(meta["features"]), meta["hidden"]), meta["features"], theta


def plot(folder: Path, rounds: list[dict], final: dict[str, float]) -> Path | None:
    """``metrics.png``: sample-weighted validation AUC and loss after each round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r["round"], r["validation_of_model_before_round"]) for r in rounds if r["round"] > 0]
    points.append((len(rounds), final))
    xs = [x for x, _ in points]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for axis, key in ((left, "auc"), (right, "loss")):
        axis.plot(xs, [m.get(key) if m.get(key) is not None else np.nan for _, m in points], marker="o")
        axis.set_xlabel("rounds done")
        axis.set_title(f"validation {key} (sample-weighted)")
    figure.tight_layout()
    path = folder / "metrics.png"
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path
