"""SecureBoost quality against XGBoost (tree_method="hist"), same settings, on the shared data sets.

The federated trees equal ``fedps.algorithms.secureboost.reference`` split for
split (tests/secureboost), so this script trains the reference on the joined
rows (bins from the same per-partition sketch merge the parties use) and
XGBoost on the same rows, and compares held-out quality:

    .venv/bin/python bench/secureboost_quality.py [--data ../shared/data]

Prints one markdown table row per data set (docs/benchmarks.md, "SecureBoost quality").
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fedps.algorithms.secureboost import reference
from fedps.algorithms.secureboost.binning import merge, sketch
from fedps.algorithms.secureboost.params import SBParams

CASES = [
    # name, id column, label column, objective, num_class, trees, depth, max_bin
    ("breast", "id", "y", "binary:logistic", 0, 10, 3, 32),
    ("default_credit", "id", "y", "binary:logistic", 0, 5, 5, 32),
    ("vehicle_scale", "id", "y", "multi:softmax", 4, 10, 3, 32),
    ("motor", "idx", "motor_speed", "reg:squarederror", 0, 20, 4, 32),
    ("student", "id", "y", "reg:squarederror", 0, 20, 3, 32),
]


def load(folder: Path, name: str, id_column: str, label: str):
    guest = pd.read_csv(folder / f"{name}_hetero_guest.csv")
    host = pd.read_csv(folder / f"{name}_hetero_host.csv").set_index(id_column).loc[guest[id_column]]
    return (guest.drop(columns=[id_column, label]).to_numpy(float), host.to_numpy(float),
            guest[label].to_numpy(float))


def run_case(folder: Path, case) -> dict:
    import xgboost as xgb
    from sklearn.metrics import accuracy_score, roc_auc_score

    name, id_column, label, kind, classes, trees, depth, max_bin = case
    xg, xh, y = load(folder, name, id_column, label)
    rng = np.random.default_rng(0)
    test = rng.random(len(y)) < 0.3
    params = SBParams(objective=kind, num_class=classes, trees=trees, max_depth=depth, max_bin=max_bin,
                      learning_rate=0.3, reg_lambda=1.0, min_child_weight=1.0, key_bits=2048)
    parties = {}
    for party, x in (("guest", xg), ("host", xh)):
        names = tuple(f"{party}{j}" for j in range(x.shape[1]))
        parties[party] = (merge([sketch(x[~test])], names, max_bin, int((~test).sum()), party), x[~test])
    started = time.perf_counter()
    model = reference.train(parties, y[~test], np.arange(int((~test).sum())), params)
    seconds = time.perf_counter() - started
    base = float(np.mean(y[~test])) if kind == "reg:squarederror" else 0.0
    ours = reference.predict(model, {"guest": xg[test], "host": xh[test]}, base, params.classes)
    settings = {"tree_method": "hist", "max_bin": max_bin, "max_depth": depth, "eta": 0.3, "lambda": 1.0,
                "min_child_weight": 1.0, "nthread": 1, "base_score": 0.5 if kind == "binary:logistic" else base}
    if kind == "multi:softmax":
        settings.update(objective="multi:softprob", num_class=classes, base_score=0.5)
    else:
        settings["objective"] = kind
    x = np.hstack([xg, xh])
    booster = xgb.train(settings, xgb.DMatrix(x[~test], label=y[~test]), trees)
    theirs = booster.predict(xgb.DMatrix(x[test]))
    if kind == "binary:logistic":
        metric, a, b = "AUC", roc_auc_score(y[test], ours[:, 0]), roc_auc_score(y[test], theirs)
    elif kind == "multi:softmax":
        metric, a, b = "accuracy", accuracy_score(y[test], ours.argmax(1)), accuracy_score(y[test], theirs.argmax(1))
    else:
        metric = "RMSE"
        a, b = float(np.sqrt(np.mean((ours[:, 0] - y[test]) ** 2))), float(np.sqrt(np.mean((theirs - y[test]) ** 2)))
    return {"data": name, "metric": metric, "fedps": a, "xgboost": b, "rows": len(y), "trees": trees,
            "depth": depth, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(Path(__file__).parents[1].parent / "shared" / "data"))
    args = parser.parse_args()
    print("| data | rows | trees x depth | metric | fedps | XGBoost hist | difference |")
    print("|---|---|---|---|---|---|---|")
    for case in CASES:
        r = run_case(Path(args.data), case)
        diff = r["fedps"] - r["xgboost"]
        rel = f" ({100 * diff / r['xgboost']:+.1f}%)" if r["metric"] == "RMSE" else ""
        print(f"| {r['data']} | {r['rows']} | {r['trees']} x {r['depth']} | {r['metric']} | {r['fedps']:.4f} "
              f"| {r['xgboost']:.4f} | {diff:+.4f}{rel} |")


if __name__ == "__main__":
    main()
