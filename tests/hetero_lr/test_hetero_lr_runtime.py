"""Vertical LR on the executor runtime, parties as threads of one process.

Real parts: the session's local Spark (each party's stages are barrier stages
of Spark tasks), the session's local Ray (each party's PS and accumulator),
and the embedded broker (driver channels and per-partition links). The
model must equal the numpy oracle that cuts the same batches from the same
layout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedps.algorithms.hetero_lr.local import run_in_threads
from fedps.algorithms.hetero_lr.params import LRParams
from fedps.engine.layout import build_layout, read_partition
from fedps.engine.vertical.plan import batch_count, partition_batches

DATA = Path(__file__).parents[2] / "data"
PARTITIONS = 4
#: What the numpy oracle computes: plain SGD on the raw features, without label-DP noise (explicitly off).
ORACLE = dict(optimizer="sgd", schedule="constant", standardize=False, label_dp=False)


def lay_out(spark, tmp: Path, files: dict[str, Path], partitions: int = PARTITIONS) -> dict:
    return {name: build_layout(spark, str(path), folder=str(tmp / "layout" / name), partitions=partitions,
                               id_column="id", label_column="y" if name == "guest" else None)
            for name, path in files.items()}


def oracle(layouts: dict, params: LRParams) -> tuple[dict[str, np.ndarray], float, list[float]]:
    """The same mini-batches of the same layout, the same Taylor-gradient descent, in numpy."""
    names = list(layouts)
    n = layouts["guest"].partitions
    parts = {name: [read_partition(layouts[name], p) for p in range(n)] for name in names}
    weights = {name: np.zeros(parts[name][0].x.shape[1]) for name in names}
    bias, losses = 0.0, []
    batches = batch_count(layouts["guest"].rows, params.batch_size, params.validation_fraction)
    for epoch in range(params.epochs):
        plans = [partition_batches(parts["guest"][p].row_keys, seed=params.seed, epoch=epoch, partition=p,
                                   batches=batches, validation_fraction=params.validation_fraction)
                 for p in range(n)]
        batch_losses = []
        for b in range(batches):
            xs = {name: np.vstack([parts[name][p].x[plans[p][b]] for p in range(n)]) for name in names}
            y = np.concatenate([parts["guest"][p].y[plans[p][b]] for p in range(n)])
            u = sum(xs[name] @ weights[name] for name in names) + bias
            d = 0.25 * u + 0.5 - y
            batch_losses.append(np.mean(np.log(2) + (0.5 - y) * u + 0.125 * u ** 2))
            for name in names:
                weights[name] = weights[name] - params.learning_rate * (
                    xs[name].T @ d / len(y) + params.l2 * weights[name])
            bias -= params.learning_rate * float(np.mean(d))
        losses.append(float(np.mean(batch_losses)))
    return weights, bias, losses


def _hostile_rows_topic(servers: str, job: str, sender: str, receiver: str) -> int:
    """Create the per-partition topic early and write junk into two of its partitions; returns how many."""
    import os

    from kafka.admin import KafkaAdminClient, NewTopic

    from attacks import produce

    topic = f"fedps.{job}.{sender}.{receiver}.rows"
    admin = KafkaAdminClient(bootstrap_servers=servers)
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
    admin.close()
    for partition in (1, 3):
        produce(servers, topic, os.urandom(300), partition=partition)
    produce(servers, topic, b"FPS\x01\x01\x00\x02{}" + os.urandom(40), partition=3)
    return 3


def split_host(tmp: Path, hosts: int) -> dict[str, Path]:
    frame = pd.read_csv(DATA / "breast_hetero_host.csv")
    columns = np.array_split([c for c in frame.columns if c != "id"], hosts)
    files = {"guest": DATA / "breast_hetero_guest.csv"}
    for i, cols in enumerate(columns):
        path = tmp / f"host{i + 1}.csv"
        frame[["id", *cols]].to_csv(path, index=False)
        files[f"host{i + 1}"] = path
    return files


@pytest.mark.parametrize("hosts", [1])   # three parties need three slots: see test_hetero_lr_processes
def test_executor_runtime_trains_the_oracles_model(tmp_path, spark, ray_address, make_parties, job_id, hosts):
    files = split_host(tmp_path, hosts)
    layouts = lay_out(spark, tmp_path, files)
    names = list(files)
    params = LRParams(epochs=2, batch_size=96, learning_rate=0.3, l2=0.001, key_bits=512,
                      validation_fraction=0.3, partitions=PARTITIONS, tasks=1, min_batch_ratio=1.0, **ORACLE)
    configs = make_parties(*names, recv_timeout_s=120)
    hostile = _hostile_rows_topic(configs["guest"].kafka.bootstrap_servers, job_id, "host1", "guest")
    results = run_in_threads(job_id, configs, layouts, {n: params for n in names}, tmp_path / "out", spark)
    errors = {n: r.error for n, r in results.items() if r.error is not None}
    assert not errors, errors
    # the records a hostile producer put into the guest's incoming partitions were refused and counted
    assert sum(sum(r.values()) for r in results["guest"].metrics["refused"].values()) == hostile
    weights, bias, losses = oracle(layouts, params)
    for name in names:
        model = results[name].model
        np.testing.assert_allclose(model["weights"], weights[name], rtol=1e-4, atol=1e-6)
    assert results["guest"].model["intercept"] == pytest.approx(bias, rel=1e-4, abs=1e-6)
    np.testing.assert_allclose(results["guest"].state.losses, losses, rtol=1e-4)
    final = results["guest"].state.metrics[-1]
    assert final["rows"] > 100 and 0.9 < final["auc"] <= 1.0


def test_sparse_host_trains_over_hashed_feature_ids(tmp_path, spark, ray_address, make_parties, job_id):
    frame = pd.read_csv(DATA / "breast_hetero_host.csv")
    values = frame.drop(columns=["id"]).to_numpy()
    ids = [(1 << 40) - 7 - 1000 * j for j in range(values.shape[1])]   # hashed ids near 2^40
    lines = [" ".join([str(i), *(f"{ids[j]}:{v:.6g}" for j, v in enumerate(row) if v != 0)])
             for i, row in zip(frame["id"], values)]
    (tmp_path / "host.libsvm").write_text("\n".join(lines) + "\n")
    files = {"guest": DATA / "breast_hetero_guest.csv", "host": tmp_path / "host.libsvm"}
    layouts = lay_out(spark, tmp_path, files)
    assert layouts["host"].sparse
    params = LRParams(epochs=2, batch_size=96, learning_rate=0.3, l2=0.001, key_bits=512, d_noise=0.01,
                      validation_fraction=0.3, partitions=PARTITIONS, tasks=1, min_batch_ratio=1.0, **ORACLE)
    configs = make_parties("guest", "host", recv_timeout_s=120)
    results = run_in_threads(job_id, configs, layouts, {"guest": params, "host": params}, tmp_path / "out", spark)
    assert not {n: r.error for n, r in results.items() if r.error is not None}
    host = results["host"].model
    assert sorted(host["feature_ids"]) == sorted(ids) and len(host["weights"]) == len(ids)
    assert results["guest"].state.metrics[-1]["auc"] > 0.9


def _synthetic(tmp: Path, rows: int) -> dict[str, Path]:
    rng = np.random.default_rng(rows)
    ids = np.arange(rows)
    xg, xh = rng.normal(size=(rows, 4)), rng.normal(size=(rows, 6))
    y = (rng.random(rows) < 1 / (1 + np.exp(-(xg[:, 0] - xh[:, 0])))).astype(int)
    files = {"guest": tmp / f"g{rows}.csv", "host": tmp / f"h{rows}.csv"}
    pd.DataFrame({"id": ids, "y": y, **{f"g{i}": xg[:, i] for i in range(4)}}).to_csv(files["guest"], index=False)
    pd.DataFrame({"id": ids, **{f"h{i}": xh[:, i] for i in range(6)}}).to_csv(files["host"], index=False)
    return files


def test_driver_memory_does_not_grow_with_rows(tmp_path, spark, ray_address, make_parties):
    """Python allocations of the drivers (both parties' threads) at 10x the rows: the rows stay in the tasks."""
    import tracemalloc
    import uuid

    peaks = {}
    configs = make_parties("guest", "host", recv_timeout_s=120)
    for rows in (800, 8000):
        layouts = lay_out(spark, tmp_path / str(rows), _synthetic(tmp_path, rows))
        params = LRParams(epochs=1, batch_size=rows // 4, key_bits=512, validation_fraction=0.2, standardize=False,
                          partitions=PARTITIONS, tasks=1, loss_every=0)
        tracemalloc.start()
        results = run_in_threads(f"t{uuid.uuid4().hex[:12]}", configs, layouts, {"guest": params, "host": params},
                                 tmp_path / "out" / str(rows), spark)
        peaks[rows] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert not {n: r.error for n, r in results.items() if r.error is not None}
    # the same number of batches, 10x the rows per batch: a driver holding rows or per-row
    # ciphertexts would grow ~10x; the bound is generous for CI noise
    assert peaks[8000] < 2.0 * peaks[800], peaks


def test_a_task_retried_by_spark_gives_the_same_model(tmp_path, spark, ray_address, make_parties, monkeypatch):
    import uuid

    from fedps.engine.vertical.stage import FAIL_ONCE_ENV

    files = {"guest": DATA / "breast_hetero_guest.csv", "host": DATA / "breast_hetero_host.csv"}
    layouts = lay_out(spark, tmp_path, files)
    params = LRParams(epochs=1, batch_size=96, learning_rate=0.3, key_bits=512, validation_fraction=0.3,
                      partitions=PARTITIONS, tasks=1, min_batch_ratio=1.0, **ORACLE)
    models = []
    configs = make_parties("guest", "host", recv_timeout_s=120)
    for attempt in ("clean", "retried"):
        if attempt == "retried":
            monkeypatch.setenv(FAIL_ONCE_ENV, str(tmp_path / "failed-once"))
        results = run_in_threads(f"t{uuid.uuid4().hex[:12]}", configs, layouts, {"guest": params, "host": params},
                                 tmp_path / attempt, spark)
        assert not {n: r.error for n, r in results.items() if r.error is not None}
        models.append({n: r.model for n, r in results.items()})
    assert (tmp_path / "failed-once").exists()           # a task did fail, and its stage was run again
    for name in ("guest", "host"):
        np.testing.assert_allclose(models[1][name]["weights"], models[0][name]["weights"], rtol=1e-12)
