"""SecureBoost on the executor runtime, parties as threads of one process.

Real parts: the session's local Spark (barrier stages per tree), local Ray
(each party's accumulator), the embedded broker (driver channels and
per-partition links), and the real Paillier crypto at 512 bits. The trees
must equal the plaintext reference on the joined rows, split for split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedps.algorithms.secureboost import reference
from fedps.algorithms.secureboost.local import run_in_threads
from fedps.algorithms.secureboost.params import SBParams
from fedps.engine.layout import build_layout, read_partition

DATA = Path(__file__).parents[2].parent / "shared" / "data"
PARTITIONS = 4


def lay_out(spark, tmp: Path, files: dict[str, Path]) -> dict:
    return {name: build_layout(spark, str(path), folder=str(tmp / "layout" / name), partitions=PARTITIONS,
                               id_column="id", label_column="y" if name == "guest" else None)
            for name, path in files.items()}


def joined(layouts: dict) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    parts = {name: [read_partition(layout, p) for p in range(PARTITIONS)] for name, layout in layouts.items()}
    x = {name: np.vstack([r.x for r in rows]) for name, rows in parts.items()}
    y = np.concatenate([r.y for r in parts["guest"]])
    keys = np.concatenate([r.row_keys for r in parts["guest"]])
    return x, y, keys


def assert_same_trees(results: dict, model: reference.ReferenceModel, names: list[str]) -> None:
    guest = results["guest"].model
    assert len(guest["trees"]) == len(model.trees)
    for ours, theirs in zip(guest["trees"], model.trees):
        assert ours["class"] == theirs["class"]
        expected = {str(n): spec for n, spec in theirs["nodes"].items()}
        assert set(ours["nodes"]) == set(expected)
        for n, spec in ours["nodes"].items():
            if "leaf" in spec:
                assert spec["leaf"] == expected[n]["leaf"]
            else:
                assert (spec["party"], spec["split"]) == (expected[n]["party"], expected[n]["split"])
                assert spec["gain"] == expected[n]["gain"]
    for name in names:
        assert results[name].model["splits"] == model.tables[name].to_json()


def test_federated_trees_equal_the_reference(tmp_path, spark, ray_address, make_parties, job_id):
    files = {"guest": DATA / "breast_hetero_guest.csv", "host": DATA / "breast_hetero_host.csv"}
    layouts = lay_out(spark, tmp_path, files)
    params = SBParams(trees=2, max_depth=3, max_bin=16, key_bits=512, partitions=PARTITIONS, tasks=1,
                      validation_fraction=0.2, colsample_bytree=0.8, subsample=0.9)
    configs = make_parties("guest", "host", recv_timeout_s=120)
    results = run_in_threads(job_id, configs, layouts, {"guest": params, "host": params}, tmp_path / "out", spark)
    errors = {n: r.error for n, r in results.items() if r.error is not None}
    assert not errors, errors
    x, y, keys = joined(layouts)
    bins = {name: results[name].trainer.plan.bins for name in layouts}
    model = reference.train({name: (bins[name], x[name]) for name in layouts}, y, keys, params)
    assert_same_trees(results, model, ["guest", "host"])
    assert any(spec.get("party") == "host" for tree in model.trees for spec in tree["nodes"].values())
    final = results["guest"].state.metrics[-1]
    assert final["valid_auc"] > 0.9
