"""Sparse tables on real shards: memory follows touched rows, untouched keys, routing, errors."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from fedps.errors import DataError, PeerError
from fedps.ps import InitConfig, OptimizerConfig, ParameterServer, PSConfig, TableRef, TableSpec, connect
from fedps.ps.keys import initial_values


TABLES = (
    TableSpec("lr", width=1, dim=2**62, optimizer=OptimizerConfig("sgd")),
    TableSpec("emb", width=4, initializer=InitConfig("uniform", scale=0.05, seed=42), optimizer=OptimizerConfig("adam")),
    TableSpec("w2", width=2, optimizer=OptimizerConfig("sgd", learning_rate=1.0)),
    TableSpec("small", dim=1000),
)


@pytest.fixture(scope="module")
def server(ray_address):
    """One PS for the module (shard actors are slow to start); each test uses its own table."""
    started = ParameterServer.start(PSConfig(f"tab-{uuid.uuid4().hex[:8]}", TABLES, num_shards=3))
    yield started
    started.stop()


def test_huge_table_memory_follows_touched_rows(server):
    table = server.table("lr")
    before = table.stats()
    keys = np.unique(np.random.default_rng(0).integers(0, 2**62, size=100_000))
    table.push(keys, np.ones(keys.size, dtype=np.float32))
    server.end_step()
    after = table.stats()
    rows = sum(s["rows"] for s in after)
    stored = sum(s["nbytes"] for s in after)
    row_bytes = 8 + 8 + 4  # key, slot, one float32 weight
    assert rows == keys.size
    assert stored <= 1.6 * rows * row_bytes
    rss_growth = sum(a["rss"] - b["rss"] for a, b in zip(after, before))
    assert rss_growth < 64 * 2**20, f"shard processes grew {rss_growth / 2**20:.0f} MiB for 100k rows"
    np.testing.assert_allclose(table.pull(keys[:5])[:, 0], -0.01)


def test_untouched_keys_read_their_initial_values_without_being_stored(server):
    init = server.config.table("emb").initializer
    table = server.table("emb")
    keys = np.array([7, 2**62, 123456789, 7], dtype=np.int64)
    pulled = table.pull(keys)
    np.testing.assert_array_equal(pulled, initial_values(keys, init, 4, np.dtype("float32")))
    np.testing.assert_array_equal(pulled[0], pulled[3])
    assert sum(s["rows"] for s in table.stats()) == 0
    np.testing.assert_array_equal(table.pull(keys), pulled)  # the same on every read


def test_pull_keeps_the_callers_order_across_shards(server):
    table = server.table("w2")
    keys = np.arange(1000, dtype=np.int64) * 1_000_003
    table.push(keys, -np.stack([keys, -keys], axis=1).astype(np.float32) / 1e9)
    server.end_step()
    shuffled = np.random.default_rng(1).permutation(keys)
    pulled = table.pull(shuffled)
    np.testing.assert_allclose(pulled[:, 0], shuffled / 1e9, rtol=1e-6)
    assert {s["rows"] > 250 for s in table.stats()} == {True}


def test_bad_input_is_refused_with_data_errors(server):
    table = server.table("small")
    with pytest.raises(DataError, match="range"):
        table.pull([5, 1000])
    with pytest.raises(DataError, match="shape"):
        table.push([1, 2], np.ones((3, 1)))
    assert table.pull([]).shape == (0, 1)


def test_clients_find_tables_by_name(server, ray_address):
    ref = server.ref("emb")
    assert (ref.ps_name, ref.table, ref.namespace, ref.address) == (server.config.name, "emb", "fedps", ray_address)
    client = connect(ref)
    assert client is ref.client() and len(client.shards) == 3 and client.spec.width == 4
    with pytest.raises(DataError, match="no table"):
        server.table("nope")
    with pytest.raises(PeerError, match="no shards"):
        connect(TableRef("missing-ps", "w", "fedps", ray_address))


def test_a_client_finds_replaced_shards_again(ray_address):
    config = PSConfig(f"tab-{uuid.uuid4().hex[:8]}", (TableSpec("w", initializer=InitConfig("constant", value=3.0)),))
    server = ParameterServer.start(config)
    client = connect(server.ref("w"))
    server.stop()
    server = ParameterServer.start(config)  # a restarted job: new actors under the same names
    try:
        np.testing.assert_array_equal(client.pull([1, 2])[:, 0], [3.0, 3.0])
    finally:
        server.stop()
