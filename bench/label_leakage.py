"""What a curious host learns about the guest's labels from its gradients, before and after label DP.

    .venv/bin/python bench/label_leakage.py [--data default_credit breast] [--seeds 3]

Runs the job's maths in plaintext (``protocol.plaintext_training``, the same
maths the oracle tests check against the encrypted runtime), records what the
host learns per batch (its rows, its ``u_h``, its noised gradient) and runs two
attacks on it (``fedps.engine.vertical.privacy``): per batch the minimum-norm
``d̂ = X_h (X_hᵀX_h)⁺ g`` averaged over epochs, and one least-squares solve over
every batch of every epoch together. Their label AUC on the training rows is
compared with what a model fitted *with the labels* on the host's features
alone reaches. "before": the settings before label DP (plain SGD, raw
features, no noise); "after": the defaults (label DP at the default budget),
with the same batch size and epochs. A second table gives test AUC against
the budget epsilon.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedps.algorithms.hetero_lr.params import LRParams  # noqa: E402
from fedps.algorithms.hetero_lr.protocol import plaintext_training  # noqa: E402
from fedps.engine.layout import id_digest  # noqa: E402
from fedps.engine.vertical.plan import validation_rows  # noqa: E402
from fedps.engine.vertical.privacy import min_norm_label_scores, multi_epoch_label_scores  # noqa: E402

BEFORE = dict(optimizer="sgd", learning_rate=0.15, schedule="constant", decay_rate=1.0, decay_steps=1,
              standardize=False, label_dp=False)
SETTINGS = [(1024, 5), (256, 5), (256, 20), (52, 5), (0, 10)]     # (batch, epochs); 0: automatic (the default)
BUDGETS = [1.0, 2.0, 4.0, 8.0, 16.0, None]


def load(name: str):
    import pandas as pd

    for folder in (ROOT / "data", ROOT.parent / "shared" / "data"):
        if (folder / f"{name}_hetero_guest.csv").exists():
            guest = pd.read_csv(folder / f"{name}_hetero_guest.csv")
            host = pd.read_csv(folder / f"{name}_hetero_host.csv").set_index("id").loc[guest["id"]]
            keys = np.array([int.from_bytes(id_digest(str(i))[:8], "big") >> 1 for i in guest["id"]],
                            dtype=np.int64)
            return (guest.drop(columns=["id", "y"]).to_numpy(float), host.to_numpy(float),
                    guest["y"].to_numpy(float), keys)
    raise SystemExit(f"no vertical split of {name} found")


def auc(y, score) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score))


def leakage(name: str, seeds: int) -> list[str]:
    from sklearn.linear_model import LogisticRegression

    xg, xh, y, keys = load(name)
    train = ~validation_rows(keys, 0.3, 0)
    own = auc(y[train], LogisticRegression(max_iter=5000).fit(xh[train], y[train]).decision_function(xh[train]))
    lines = [f"{name} ({xh.shape[1]} host features; a model fitted with the labels on the host's features "
             f"alone: label AUC {own:.3f})", "",
             "| batch | epochs | before: min-norm | before: all epochs | after: min-norm | after: all epochs "
             "| after: epsilon (delta 1e-5) |", "|---|---|---|---|---|---|---|"]
    for batch, epochs in SETTINGS:
        cells, size, eps = {}, batch, 0.0
        for label, extra in (("before", BEFORE), ("after", {})):
            single, multi = [], []
            for seed in range(seeds):
                params = LRParams(batch_size=batch, epochs=epochs, **extra)
                run = plaintext_training({"guest": xg, "host": xh}, y, train, params, seed=seed, watch="host")
                z = run.transforms["host"].apply(xh)
                single.append(auc(y[train], min_norm_label_scores(run.host_views, z, len(y))[train]))
                multi.append(auc(y[train], multi_epoch_label_scores(run.host_views, z, len(y))[train]))
                size, eps = run.batch_size, run.epsilon
            cells[label] = (np.mean(single), np.mean(multi))
        name_batch = f"{size} (automatic)" if batch == 0 else str(size)
        lines.append(f"| {name_batch} | {epochs} | {cells['before'][0]:.3f} | {cells['before'][1]:.3f} "
                     f"| {cells['after'][0]:.3f} | {cells['after'][1]:.3f} | {eps:.2f} |")
        print(lines[-1], flush=True)
    return lines


def cost(name: str, seeds: int) -> list[str]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    xg, xh, y, keys = load(name)
    train = ~validation_rows(keys, 0.3, 0)
    x = np.hstack([xg, xh])
    central = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(x[train], y[train])
    lines = [f"{name}: test AUC against the label-DP budget (default settings otherwise; scikit-learn on the "
             f"same rows: {auc(y[~train], central.decision_function(x[~train])):.4f})", "",
             "| dp_epsilon (delta 1e-5, 10 epochs) | noise multiplier | test AUC (mean of seeds) | min |",
             "|---|---|---|---|"]
    for budget in BUDGETS:
        params = LRParams(label_dp=False) if budget is None else LRParams(dp_epsilon=budget)
        aucs, sigma = [], 0.0
        for seed in range(seeds):
            run = plaintext_training({"guest": xg, "host": xh}, y, train, params, seed=seed)
            aucs.append(auc(y[~train], run.scores({"guest": xg[~train], "host": xh[~train]})))
            sigma = run.noise_multiplier
        label = "off (no noise)" if budget is None else f"{budget:g}" + (" (default)" if budget == 8.0 else "")
        lines.append(f"| {label} | {sigma:.2f} | {np.mean(aucs):.4f} | {np.min(aucs):.4f} |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["default_credit", "breast"])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    out = []
    for name in args.data:
        out += leakage(name, args.seeds) + [""] + cost(name, args.seeds) + [""]
    print("\n".join(out))


if __name__ == "__main__":
    main()
