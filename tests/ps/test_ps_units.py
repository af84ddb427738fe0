"""Parameter-server pieces that need no Ray: config, keys, storage, merging, buffers."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from fedps.errors import ConfigError, DataError, ProtocolError
from fedps.ps.config import InitConfig, OptimizerConfig, PSConfig, TableSpec
from fedps.ps.keys import as_keys, as_rows, initial_values, shard_of
from fedps.ps.optimizers import learning_rate
from fedps.ps.sync import Clocks, StepBuffer, merge
from fedps.ps.table import DenseRows, SparseRows


@pytest.mark.parametrize(
    "make, key",
    [
        (lambda: OptimizerConfig(name="rmsprop"), "optimizer.name"),
        (lambda: OptimizerConfig(learning_rate=0.0), "optimizer.learning_rate"),
        (lambda: OptimizerConfig(l1=-1.0), "optimizer.l1"),
        (lambda: OptimizerConfig(beta2=1.0), "optimizer.beta2"),
        (lambda: OptimizerConfig(schedule="cosine"), "optimizer.schedule"),
        (lambda: InitConfig(kind="xavier"), "initializer.kind"),
        (lambda: TableSpec("t", width=0), "width"),
        (lambda: TableSpec("t", dim=2**63 + 1), "dim"),
        (lambda: TableSpec("t", kind="dense", dim=2**40), "dense"),
        (lambda: TableSpec("t", optimizer=OptimizerConfig("ftrl"), initializer=InitConfig("normal")), "ftrl"),
        (lambda: PSConfig("p", (TableSpec("t"),), num_shards=0), "ps.num_shards"),
        (lambda: PSConfig("p", (TableSpec("t"), TableSpec("t"))), "duplicate"),
        (lambda: PSConfig("p", (TableSpec("t"),), staleness=2), "ps.num_workers"),
        (lambda: PSConfig("p", (TableSpec("t"),), checkpoint_every=5), "ps.checkpoint_dir"),
        (lambda: PSConfig("bad name", (TableSpec("t"),)), "ps.name"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(make, key):
    with pytest.raises(ConfigError, match=key):
        make()


def test_config_errors_survive_pickling():
    try:
        PSConfig("p", (TableSpec("t"),), num_shards=0)
    except ConfigError as exc:
        again = pickle.loads(pickle.dumps(exc))
    assert isinstance(again, ConfigError) and "num_shards" in str(again)


def test_keys_are_checked():
    assert as_keys([1, 2**62], 2**63).dtype == np.int64
    with pytest.raises(DataError, match="range"):
        as_keys([-1], 2**63)
    with pytest.raises(DataError, match="range"):
        as_keys([10], 10)
    with pytest.raises(DataError, match="integers"):
        as_keys([1.5], 10)
    with pytest.raises(DataError, match="1-D"):
        as_keys([[1]], 10)
    with pytest.raises(DataError, match="shape"):
        as_rows(np.ones((2, 3)), 2, 2, np.dtype("float32"))
    with pytest.raises(DataError, match="finite"):
        as_rows([np.nan], 1, 1, np.dtype("float32"))


def test_routing_spreads_keys_evenly_and_dense_tables_use_modulo():
    keys = np.arange(100_000, dtype=np.int64) * 7919
    counts = np.bincount(shard_of(keys, TableSpec("t"), 4), minlength=4)
    assert counts.min() > 24_000
    dense = TableSpec("d", kind="dense", dim=100)
    assert np.array_equal(shard_of(np.arange(6), dense, 4), [0, 1, 2, 3, 0, 1])


def test_initialiser_is_a_function_of_seed_key_and_column():
    keys = np.array([5, 2**62 + 3, 5], dtype=np.int64)
    normal = InitConfig("normal", scale=1.0, seed=7)
    a = initial_values(keys, normal, 3, np.dtype("float64"))
    assert np.array_equal(a, initial_values(keys[::-1], normal, 3, np.dtype("float64"))[::-1])
    assert np.array_equal(a[0], a[2]) and a[0, 0] != a[0, 1]
    assert not np.array_equal(a, initial_values(keys, InitConfig("normal", scale=1.0, seed=8), 3, np.dtype("float64")))
    many = initial_values(np.arange(200_000, dtype=np.int64), normal, 1, np.dtype("float64"))
    assert abs(many.mean()) < 0.01 and abs(many.std() - 1.0) < 0.01
    uniform_init = InitConfig("uniform", scale=0.5)
    uniform = initial_values(np.arange(100_000, dtype=np.int64), uniform_init, 2, np.dtype("float32"))
    assert uniform.min() >= -0.5 and uniform.max() < 0.5 and abs(uniform.mean()) < 0.01


def test_sparse_rows_find_insert_and_export_in_key_order():
    rows = SparseRows(TableSpec("t", width=2, optimizer=OptimizerConfig("adagrad", initial_accumulator=0.5)))
    first = rows.slots(np.array([30, 10, 20], dtype=np.int64)[np.argsort([30, 10, 20])])
    assert list(first) == [0, 1, 2]
    assert list(rows.find(np.array([20, 25, 10, 31], dtype=np.int64))) == [1, -1, 0, -1]
    rows.slots(np.arange(5000, dtype=np.int64) * 5 + 1)  # grows past the initial capacity
    keys, weights, state = rows.export()
    assert rows.count == 5003 and np.all(np.diff(keys) > 0)
    assert weights.shape == (5003, 2) and np.all(state["accumulator"] == 0.5)


def test_dense_rows_hold_every_row_of_their_shard():
    rows = DenseRows(TableSpec("d", kind="dense", dim=10, initializer=InitConfig("constant", value=2.0)), 1, 3)
    keys, weights, _ = rows.export()
    assert list(keys) == [1, 4, 7] and np.all(weights == 2.0)
    assert list(rows.find(np.array([7, 1]))) == [2, 0]


def test_merge_sums_equal_keys():
    keys, grads = merge(np.array([5, 1, 5, 3, 1]), np.arange(5.0).reshape(-1, 1))
    assert list(keys) == [1, 3, 5] and list(grads[:, 0]) == [5.0, 3.0, 2.0]


def test_step_buffer_orders_by_worker_and_replaces_repeated_pushes():
    buffer = StepBuffer()
    buffer.add(0, 1, 0, np.array([1]), np.array([[1.0]]))
    buffer.add(0, 0, 0, np.array([2]), np.array([[2.0]]))
    buffer.add(0, 1, 0, np.array([3]), np.array([[3.0]]))  # a retried task
    keys, grads = buffer.take(0)
    assert list(keys) == [2, 3] and list(grads[:, 0]) == [2.0, 3.0]
    assert buffer.take(0) is None


def test_clocks_track_the_slowest_worker():
    clocks = Clocks(2)
    clocks.finish(0, 0)
    assert clocks.slowest() == 0 and not clocks.everyone_finished(0)
    clocks.finish(1, 0)
    assert clocks.everyone_finished(0)
    with pytest.raises(ProtocolError, match="worker 2"):
        clocks.finish(2, 0)


def test_learning_rate_schedules():
    assert learning_rate(OptimizerConfig(learning_rate=0.1), 50) == 0.1
    exp = OptimizerConfig(learning_rate=0.1, schedule="exponential", decay_rate=0.5, decay_steps=10)
    assert learning_rate(exp, 20) == pytest.approx(0.025)
    inv = OptimizerConfig(learning_rate=0.1, schedule="inverse_time", decay_rate=1.0, decay_steps=10)
    assert learning_rate(inv, 10) == pytest.approx(0.05)
