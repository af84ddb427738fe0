"""Joint batch prediction with a trained model, for rows that passed through PSI.

Each party scores the aligned rows with its own part of the model; the hosts
send their scores ``u_hk`` to the guest, who writes ``predictions.csv`` (its
ids, the joint log-odds and the probability). The guest learns the hosts'
scores on these rows, which is the point of the job; hosts learn nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from fedps.algorithms.hetero_lr.metrics import sigmoid
from fedps.algorithms.hetero_lr.trainer import PartyData
from fedps.errors import DataError
from fedps.messaging.tags import Message, Scope

ROWS = Message("predict_rows", "host", "guest", dict)
SCORES = Message("predict_u", "host", "guest", np.ndarray)


def own_scores(model_path: Path, data: PartyData) -> np.ndarray:
    """``X·w (+ b)`` with this party's saved model; refuses a model of other features."""
    try:
        model = json.loads(Path(model_path).read_text())
    except FileNotFoundError:
        raise DataError(f"model {model_path} does not exist: train first (job.params.model)") from None
    intercept = model.get("intercept") or 0.0
    if data.sparse:
        keys = np.asarray(model.get("feature_ids", []), dtype=np.int64)
        weights = dict(zip(keys.tolist(), model["weights"]))
        w = np.array([weights.get(int(k), 0.0) for k in data.feature_keys])
        return np.asarray(data.x @ w).ravel() + intercept
    if model.get("features") != data.feature_names:
        raise DataError(f"model {model_path} was trained on features {model.get('features')} but the data "
                        f"has {data.feature_names}")
    return data.x @ np.asarray(model["weights"]) + intercept


def predict(me: str, guest: str, hosts: list[str], channels: dict, data: PartyData, model_path: Path,
            job: str, output_dir: Path) -> dict:
    """Run this party's side; the guest returns a summary and writes ``predictions.csv``."""
    scope = Scope(job, "predict")
    u = own_scores(model_path, data)
    if me != guest:
        channels[guest].send(scope.tag(ROWS.name), {"rows": len(u), "digest": data.digest()})
        channels[guest].send(scope.tag(SCORES.name), u)
        return {"rows": len(u)}
    for host in hosts:
        theirs = ROWS.check(channels[host].recv(scope.tag(ROWS.name)))
        if theirs != {"rows": len(u), "digest": data.digest()}:
            raise DataError(f"{host} scored {theirs.get('rows')} rows that are not the guest's {len(u)} rows "
                            "in the same order; predict on the output of one PSI run")
        u = u + SCORES.check(channels[host].recv(scope.tag(SCORES.name)))
    ids = data.ids if data.ids is not None else data.row_keys
    path = output_dir / "predictions.csv"
    pd.DataFrame({"id": ids, "score": u, "probability": sigmoid(u)}).to_csv(path, index=False)
    return {"rows": len(u), "predictions": str(path)}
