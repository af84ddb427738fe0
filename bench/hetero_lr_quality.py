"""Vertical LR model quality against scikit-learn trained centrally on the same rows.

    .venv/bin/python bench/hetero_lr_quality.py [--data breast default_credit] [--bits 1024]

For each data set: 30% of the aligned rows are held out (the job's validation
split); fedps trains guest + host with DEFAULT settings (nothing tuned: automatic
batch size, Adam with an inverse-time schedule, per-party standardisation,
label DP at the default budget) as threads over the embedded broker;
scikit-learn's LogisticRegression (default C, on standardised features) trains
on all features of the same training rows. Both are scored by test AUC; the
plaintext reference of the job's maths (``protocol.plaintext_training``) is
printed beside them. Decryption is exact, so the key size does not change the
model: 1024-bit keys keep this run short.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedps.algorithms.hetero_lr.local import run_in_threads  # noqa: E402
from fedps.algorithms.hetero_lr.params import LRParams  # noqa: E402
from fedps.engine.config import SparkConfig  # noqa: E402
from fedps.engine.layout import build_layout  # noqa: E402
from fedps.engine.session import start_ray, start_spark  # noqa: E402
from fedps.engine.vertical.plan import validation_rows  # noqa: E402
from fedps.messaging.broker import EmbeddedBroker  # noqa: E402
from fedps.messaging.config import ChannelConfig, KafkaConfig  # noqa: E402
from fedps.messaging.identity import generate_identity  # noqa: E402

SETTINGS: dict[str, dict] = {"breast": {}, "default_credit": {}}   # the defaults: nothing tuned


def files(name: str) -> tuple[Path, Path]:
    pick = lambda f: ROOT / "data" / f if (ROOT / "data" / f).exists() else Path("/work/shared/data") / f  # noqa: E731
    return pick(f"{name}_hetero_guest.csv"), pick(f"{name}_hetero_host.csv")


def one(name: str, bits: int, servers: str, folder: Path, spark) -> dict:
    import pandas as pd
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from fedps.engine.layout import id_digest

    guest_file, host_file = files(name)
    sources = {"guest": guest_file, "host": host_file}
    layouts = {n: build_layout(spark, str(path), folder=str(folder / name / "layout" / n), partitions=4,
                               label_column="y" if n == "guest" else None) for n, path in sources.items()}
    # one task per party: both parties share this process's local[2] Spark
    params = LRParams(key_bits=bits, validation_fraction=0.3, tasks=1, **SETTINGS[name])
    keys = {n: generate_identity(folder / name / f"{n}.key") for n in sources}
    configs = {n: ChannelConfig(KafkaConfig(bootstrap_servers=servers), str(folder / name / f"{n}.key"),
                                {p: keys[p] for p in sources if p != n}, str(folder / name / n)) for n in sources}
    results = run_in_threads(f"q{uuid.uuid4().hex[:10]}", configs, layouts, {n: params for n in sources},
                             folder / name, spark)
    for party, result in results.items():
        if result.error is not None:
            raise SystemExit(f"{party} failed: {result.error!r}")
    federated = results["guest"].metrics["final"]

    guest = pd.read_csv(guest_file)
    host = pd.read_csv(host_file).set_index("id").loc[guest["id"]]
    row_keys = np.array([int.from_bytes(id_digest(str(i))[:8], "big") >> 1 for i in guest["id"]], dtype=np.int64)
    valid = validation_rows(row_keys, 0.3, params.seed)
    x = np.hstack([guest.drop(columns=["id", "y"]).to_numpy(dtype=float), host.to_numpy(dtype=float)])
    y = guest["y"].to_numpy(dtype=float)
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from fedps.algorithms.hetero_lr.protocol import plaintext_training

    central = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(x[~valid], y[~valid])
    central_auc = roc_auc_score(y[valid], central.decision_function(x[valid]))
    xg, xh = guest.drop(columns=["id", "y"]).to_numpy(dtype=float), host.to_numpy(dtype=float)
    plain = plaintext_training({"guest": xg, "host": xh}, y, ~valid, params)
    plain_auc = roc_auc_score(y[valid], plain.scores({"guest": xg[valid], "host": xh[valid]}))
    return {"data": name, "train_rows": int((~valid).sum()), "test_rows": int(valid.sum()),
            **{k: SETTINGS[name][k] for k in SETTINGS[name]},
            "fedps_test_auc": round(federated["auc"], 4), "sklearn_test_auc": round(float(central_auc), 4),
            "plaintext_reference_auc": round(float(plain_auc), 4), "epsilon": results["guest"].state.epsilon,
            "difference": round(federated["auc"] - float(central_auc), 4),
            "fedps_ks": round(federated["ks"], 4), "loss_per_epoch": [round(v, 4) for v in results["guest"].state.losses]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["breast", "default_credit"])
    parser.add_argument("--bits", type=int, default=1024)
    args = parser.parse_args()
    start_ray()
    spark = start_spark(SparkConfig(master="local[2]"))
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as folder:
        report = [one(name, args.bits, broker.bootstrap_servers, Path(folder), spark) for name in args.data]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
