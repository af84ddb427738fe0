"""Spark executors reach the shards by name through the local Ray, like the driver does."""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest

from fedps.ps import InitConfig, OptimizerConfig, ParameterServer, PSConfig, TableRef, TableSpec


@pytest.fixture
def server(ray_address):
    spec = TableSpec("emb", width=3, optimizer=OptimizerConfig("adagrad"), initializer=InitConfig("normal", seed=9))
    started = ParameterServer.start(PSConfig(f"spark-{uuid.uuid4().hex[:8]}", (spec,), num_shards=2))
    yield started
    started.stop()


def _pull_in_task(ref: TableRef, step: int):
    """Runs in a Spark Python worker: join Ray once, pull, push this partition's gradients."""

    def task(index: int, rows):
        import ray

        joined_before = ray.is_initialized()
        keys = np.array([key for key in rows], dtype=np.int64)
        client = ref.client()
        assert ref.client() is client, "the client is cached in the Python worker"
        pulled = client.pull(keys)
        client.push(keys, np.full((keys.size, 3), index + 1.0), step=step, worker=index)
        yield {"pid": os.getpid(), "joined_before": joined_before, "keys": keys, "rows": pulled}

    return task


def test_executor_pulls_equal_driver_pulls_and_executor_pushes_land(spark, server, monkeypatch):
    table = server.table("emb")
    keys = np.random.default_rng(4).integers(0, 2**62, size=400)
    table.push(keys[:200], np.random.default_rng(5).normal(size=(200, 3)))
    server.end_step()
    ref = server.ref("emb")
    # Python workers of this test's own (Spark keeps one pool per environment): an idle worker lives a
    # minute, and one that an earlier test joined to Ray would be joined already in the first pass
    monkeypatch.setitem(spark.sparkContext.environment, "FEDPS_TEST_WORKERS", uuid.uuid4().hex)
    rdd = spark.sparkContext.parallelize(keys.tolist(), 2)

    first = rdd.mapPartitionsWithIndex(_pull_in_task(ref, step=1)).collect()
    pulled = {int(k): row for part in first for k, row in zip(part["keys"], part["rows"])}
    driver = table.pull(keys)
    assert np.array_equal(np.array([pulled[int(k)] for k in keys]), driver)

    server.end_step()  # the barrier after the executors' pushes
    after = table.pull(keys)
    moved = np.abs(after - driver).sum(axis=1) > 0
    assert moved.all(), "every key was pushed by one of the two partitions"

    second = rdd.mapPartitionsWithIndex(_pull_in_task(ref, step=2)).collect()
    seen = {part["pid"] for part in first}
    reused = [part for part in second if part["pid"] in seen]
    assert all(part["joined_before"] for part in reused), "a reused Python worker keeps its Ray connection"
    assert all(not part["joined_before"] for part in first)
    again = {int(k): row for part in second for k, row in zip(part["keys"], part["rows"])}
    assert np.array_equal(np.array([again[int(k)] for k in keys]), after)
