"""SecureBoost models for serving tests, trained cheaply, and their batch federated prediction.

The trees come from the plaintext reference (``secureboost/reference.py``), which
``tests/secureboost`` checks equal the federated trainer's split for split; they
are written in the trainer's ``model.json`` format (``secureboost.model_json``:
the guest's trees with host/id placeholders and its own split table, the host's
split table alone). The expected scores are the federated prediction's own path
(``secureboost/predict.py``, ``predict_partition``) run for both parties over
in-process transports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fedps.algorithms.secureboost import objective, reference
from fedps.algorithms.secureboost.binning import merge, sketch
from fedps.algorithms.secureboost.params import SBParams

DATA = Path(__file__).parents[2] / "data"


@dataclass
class TreeCase:
    job: str
    ids: list[str]
    xg: np.ndarray
    xh: np.ndarray
    guest_features: list[str]
    host_features: list[str]
    guest: Path        # the guest's output folder
    host: Path         # the host's output folder
    models: dict       # party -> model.json as a dict


def load(data: str, missing_every: int = 0) -> tuple[list[str], pd.DataFrame, pd.DataFrame]:
    guest = pd.read_csv(DATA / f"{data}_hetero_guest.csv")
    host = pd.read_csv(DATA / f"{data}_hetero_host.csv").set_index("id").loc[guest["id"]].reset_index()
    if missing_every:   # some host values missing: their splits' learned default directions matter
        host.loc[::missing_every, host.columns[1]] = np.nan
        host.loc[1::missing_every, host.columns[2]] = np.nan
    return [str(i) for i in guest["id"]], guest, host


def train(folder: Path, job: str, data: str = "breast", missing_every: int = 0,
          categorical: dict[str, tuple[str, ...]] | None = None, **settings) -> TreeCase:
    ids, guest, host = load(data, missing_every)
    gf = [c for c in guest.columns if c not in ("id", "y")]
    hf = [c for c in host.columns if c != "id"]
    xg, xh = guest[gf].to_numpy(np.float64), host[hf].to_numpy(np.float64)
    y = guest["y"].to_numpy(np.float64)
    params = SBParams(**{"trees": 3, "max_depth": 3, "max_bin": 16, "validation_fraction": 0.2, **settings})
    categorical = categorical or {}
    bins = {"guest": merge([sketch(xg)], tuple(gf), params.max_bin, len(xg), "guest", categorical.get("guest", ())),
            "host": merge([sketch(xh)], tuple(hf), params.max_bin, len(xh), "host", categorical.get("host", ()))}
    keys = np.array([int(i) for i in ids], dtype=np.int64)
    model = reference.train({"guest": (bins["guest"], xg), "host": (bins["host"], xh)}, y, keys, params)
    base = objective.base_margin(params.objective, y[reference.training_rows(keys, params)], params.classes)
    trees = [{"class": int(t["class"]), "nodes": {str(n): dict(spec) for n, spec in t["nodes"].items()}}
             for t in model.trees]
    models = {
        "guest": {"party": "guest", "algorithm": "secureboost", "features": gf,
                  "splits": model.tables["guest"].to_json(), "objective": params.objective,
                  "num_class": params.classes, "base_margin": base, "learning_rate": params.learning_rate,
                  "hosts": ["host"], "trees": trees},
        "host": {"party": "host", "algorithm": "secureboost", "features": hf,
                 "splits": model.tables["host"].to_json()}}
    assert any(s.get("party") == "host" for t in trees for s in t["nodes"].values()), "no host split"
    for party, saved in models.items():
        write(folder / job / party, job, saved)
    return TreeCase(job, ids, xg, xh, gf, hf, folder / job / "guest", folder / job / "host", models)


def write(folder: Path, job: str, saved: dict) -> Path:
    (folder / "checkpoint").mkdir(parents=True, exist_ok=True)
    (folder / "model.json").write_text(json.dumps(saved, indent=1))
    (folder / "checkpoint" / "setup.json").write_text(json.dumps({"job": job}))
    return folder


def host_parquet(case: TreeCase, path: Path, drop_last: int = 0) -> Path:
    n = len(case.ids) - drop_last
    pq.write_table(pa.table({"id": case.ids[:n], **{f: case.xh[:n, i] for i, f in enumerate(case.host_features)}}),
                   path)
    return path


def batch_predict(case: TreeCase, xg: np.ndarray, xh: np.ndarray, out: Path) -> pd.DataFrame:
    """The batch federated prediction (predict_partition of both parties) of these rows."""
    from fedps.algorithms.secureboost.predict import PredictPlan, predict_partition
    from serving_helpers import one_partition_envs

    envs = one_partition_envs(case.job, ["guest", "host"], {"guest": xg, "host": xh})
    for me in ("host", "guest"):   # the host only sends: it goes first
        predict_partition(envs[me], PredictPlan(case.job, me, "guest", ("host",), case.models[me], str(out)))
    return pq.read_table(out / "part-00000.parquet").to_pandas()
