"""Vertical LR with default settings lands within 0.01 test AUC of scikit-learn on the same rows.

The job's maths in plaintext (``protocol.plaintext_training``: automatic
batch size and LR schedule, each party's own standardisation, the default
label-DP noise, the PS's optimizer) on the vertical splits of breast and
default_credit, against scikit-learn's ``LogisticRegression`` (standardised
features, default C) trained on the same training rows; both are scored on
the job's validation rows (``validation_rows``, what ``export_validation``
writes per party). The runtime computes the same maths under encryption
(test_hetero_lr_protocol.py, test_hetero_lr_runtime.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedps.algorithms.hetero_lr.params import LRParams
from fedps.algorithms.hetero_lr.protocol import plaintext_training
from fedps.engine.layout import id_digest
from fedps.engine.vertical.plan import validation_rows

ROOT = Path(__file__).parents[2]
FOLDERS = (ROOT / "data", ROOT.parent / "shared" / "data")


def vertical(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Guest features, host features (aligned), labels, and the layout's row keys."""
    for folder in FOLDERS:
        if (folder / f"{name}_hetero_guest.csv").exists():
            guest = pd.read_csv(folder / f"{name}_hetero_guest.csv")
            host = pd.read_csv(folder / f"{name}_hetero_host.csv").set_index("id").loc[guest["id"]]
            keys = np.array([int.from_bytes(id_digest(str(i))[:8], "big") >> 1 for i in guest["id"]],
                            dtype=np.int64)
            return (guest.drop(columns=["id", "y"]).to_numpy(float), host.to_numpy(float),
                    guest["y"].to_numpy(float), keys)
    pytest.skip(f"{name}: no vertical split in {', '.join(map(str, FOLDERS))}")


def central_auc(x: np.ndarray, y: np.ndarray, train: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    central = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(x[train], y[train])
    return float(roc_auc_score(y[~train], central.decision_function(x[~train])))


@pytest.mark.parametrize("name", ["breast", "default_credit"])
def test_default_settings_land_within_001_auc_of_scikit_learn(name):
    from sklearn.metrics import roc_auc_score

    xg, xh, y, keys = vertical(name)
    params = LRParams()
    train = ~validation_rows(keys, params.validation_fraction, params.seed)
    reference = central_auc(np.hstack([xg, xh]), y, train)
    aucs = {}
    for label, settings in (("default", params), ("noiseless", LRParams(label_dp=False))):
        run = plaintext_training({"guest": xg, "host": xh}, y, train, settings)
        aucs[label] = roc_auc_score(y[~train], run.scores({"guest": xg[~train], "host": xh[~train]}))
    assert aucs["default"] >= reference - 0.01, (aucs, reference)
    assert aucs["default"] >= aucs["noiseless"] - 0.01, aucs          # the cost of the default label DP
    assert run.batch_size < train.sum() // 2                          # never one batch per epoch


def test_untuned_raw_features_converge_too():
    """Features on wildly different scales (as users have them): standardisation makes them trainable."""
    from sklearn.metrics import roc_auc_score

    xg, xh, y, keys = vertical("breast")
    scales = 10.0 ** np.arange(-3, 3, 6 / xh.shape[1])[: xh.shape[1]]
    xh = xh * scales + 1e3
    train = ~validation_rows(keys, 0.3, 0)
    run = plaintext_training({"guest": xg, "host": xh}, y, train, LRParams())
    auc = roc_auc_score(y[~train], run.scores({"guest": xg[~train], "host": xh[~train]}))
    assert auc >= central_auc(np.hstack([xg, xh]), y, train) - 0.01
