"""Step barriers and bounded staleness on real shards."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from fedps.errors import PeerError, ProtocolError
from fedps.ps import OptimizerConfig, ParameterServer, PSConfig, TableSpec


@pytest.fixture
def make_ps(ray_address):
    started: list[ParameterServer] = []

    def make(*tables: TableSpec, **settings) -> ParameterServer:
        server = ParameterServer.start(PSConfig(f"sync-{uuid.uuid4().hex[:8]}", tables, **settings))
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


SGD = OptimizerConfig("sgd", learning_rate=1.0)


@pytest.fixture(scope="module")
def plain(ray_address):
    """A synchronous PS driven by the driver's barrier, shared by the tests that need nothing else."""
    tables = (TableSpec("a", optimizer=SGD), TableSpec("b", optimizer=SGD), TableSpec("w", optimizer=SGD))
    started = ParameterServer.start(PSConfig(f"sync-{uuid.uuid4().hex[:8]}", tables, num_shards=2))
    yield started
    started.stop()


def test_a_step_does_not_depend_on_the_order_pushes_arrive(plain):
    server = plain
    rng = np.random.default_rng(3)
    pushes = [(rng.integers(0, 50, 2000), rng.normal(size=2000).astype(np.float32) * 10.0**w) for w in range(3)]
    for worker in (0, 1, 2):
        server.table("a").push(*pushes[worker], worker=worker)
    for worker in (2, 0, 1):
        server.table("b").push(*pushes[worker], worker=worker)
    keys = np.arange(50)
    assert np.all(server.table("a").pull(keys) == 0.0), "pushes must wait for the end of the step"
    server.end_step()
    assert server.table("a").pull(keys).tobytes() == server.table("b").pull(keys).tobytes()


def test_a_retried_push_replaces_the_first_and_late_pushes_are_refused(plain):
    server = plain
    table = server.table("w")
    table.push([1, 2], [1.0, 1.0], worker=4, seq=0)
    table.push([1, 2], [1.0, 1.0], worker=4, seq=0)  # the same task, run again
    table.push([1], [1.0], worker=4, seq=1)
    server.end_step()
    np.testing.assert_array_equal(table.pull([1, 2])[:, 0], [-2.0, -1.0])
    with pytest.raises(ProtocolError, match="after the step ended"):
        table.push([1], [1.0], step=server.step - 1)


def test_workers_can_end_steps_themselves(make_ps):
    server = make_ps(TableSpec("w", optimizer=SGD), num_shards=2, num_workers=2, wait_timeout_s=30.0)
    table = server.table("w")
    table.push([10, 11], [1.0, 2.0], step=0, worker=0)
    table.finish_step(worker=0, step=0)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(table.pull, [10, 11], step=1)
        time.sleep(0.5)
        assert not waiting.done(), "a pull of step 1 must wait for every worker to finish step 0"
        table.push([10], [3.0], step=0, worker=1)
        table.finish_step(worker=1, step=0)
        np.testing.assert_array_equal(waiting.result(timeout=30)[:, 0], [-4.0, -2.0])
    assert server.sync_step() == 1


def test_bounded_staleness_lets_workers_run_ahead_by_at_most_k_steps(make_ps):
    server = make_ps(TableSpec("w", optimizer=SGD), num_shards=2, staleness=1, num_workers=2, wait_timeout_s=30.0)
    table = server.table("w")
    table.push([5], [1.0], step=0, worker=0)
    np.testing.assert_array_equal(table.pull([5])[:, 0], [-1.0])  # applied at once
    table.finish_step(worker=0, step=0)
    table.pull([5], step=1)  # one step ahead of the slowest worker: allowed
    table.finish_step(worker=0, step=1)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(table.pull, [5], step=2)
        time.sleep(0.5)
        assert not waiting.done(), "two steps ahead of the slowest worker must wait"
        table.finish_step(worker=1, step=0)
        waiting.result(timeout=30)


def test_a_pull_that_waits_too_long_fails_with_a_peer_error(make_ps):
    server = make_ps(TableSpec("w"), num_shards=1, num_workers=1, wait_timeout_s=0.3)
    with pytest.raises(PeerError, match="waited"):
        server.table("w").pull([1], step=3)
