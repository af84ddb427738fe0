"""Checkpoints: kill the shard actors, restore, and get the same model bit for bit."""

from __future__ import annotations

import json
import os
import uuid

import numpy as np
import pytest

from fedps.errors import DataError
from fedps.ps import InitConfig, OptimizerConfig, ParameterServer, PSConfig, TableSpec
from fedps.ps import checkpoint

TABLES = (
    TableSpec("emb", width=4, optimizer=OptimizerConfig("adam", l2=0.01), initializer=InitConfig("normal", seed=1)),
    TableSpec("lr", width=1, dtype="float64", optimizer=OptimizerConfig("ftrl", l1=0.1, learning_rate=0.5)),
)


@pytest.fixture
def servers(ray_address):
    started: list[ParameterServer] = []

    def start(config: PSConfig) -> ParameterServer:
        server = ParameterServer.start(config)
        started.append(server)
        return server

    yield start
    for server in reversed(started):   # a restarted server first: the one it replaced waits for its names
        server.stop()


def _config(root: str, name: str, **settings) -> PSConfig:
    return PSConfig(name, TABLES, num_shards=2, checkpoint_dir=root, **settings)


def _train(server: ParameterServer, steps: range) -> None:
    """Gradients are a function of the step only, so two runs push the same thing."""
    for step in steps:
        rng = np.random.default_rng(step)
        keys = rng.integers(0, 2**40, size=300)
        server.table("emb").push(keys, rng.normal(size=(300, 4)), worker=0)
        server.table("lr").push(keys[:200], rng.normal(size=200), worker=1)
        server.end_step()


def _model(server: ParameterServer) -> dict[str, tuple]:
    return {spec.name: server.table(spec.name).dump() for spec in TABLES}


def _assert_identical(a: dict, b: dict) -> None:
    for name in a:
        (keys_a, w_a, s_a), (keys_b, w_b, s_b) = a[name], b[name]
        assert keys_a.tobytes() == keys_b.tobytes()
        assert w_a.tobytes() == w_b.tobytes()
        assert s_a.keys() == s_b.keys() and all(s_a[k].tobytes() == s_b[k].tobytes() for k in s_a)


def test_restore_after_killing_the_shards_gives_identical_rows_and_state(servers, tmp_path):
    config = _config(str(tmp_path), f"ck-{uuid.uuid4().hex[:8]}")
    server = servers(config)
    _train(server, range(3))
    uri = server.checkpoint()
    saved = _model(server)
    server.stop()  # ray.kill on every shard actor

    restarted = servers(config)
    assert restarted.restore() == 3
    _assert_identical(saved, _model(restarted))
    assert uri.endswith("step-000000000003") and saved["emb"][2]["t"].max() >= 1


def test_a_resumed_run_ends_bit_for_bit_like_one_that_never_stopped(servers, tmp_path):
    whole = servers(_config(str(tmp_path / "whole"), f"ck-{uuid.uuid4().hex[:8]}"))
    _train(whole, range(6))

    config = _config(str(tmp_path / "crashy"), f"ck-{uuid.uuid4().hex[:8]}", checkpoint_every=2)
    crashy = servers(config)
    _train(crashy, range(5))  # checkpoints after steps 2 and 4, then dies in step 5
    crashy.table("emb").push([1, 2, 3], np.ones((3, 4)))
    crashy.stop()

    resumed = servers(config)
    assert resumed.restore() == 4
    _train(resumed, range(4, 6))
    _assert_identical(_model(whole), _model(resumed))


def test_a_half_written_checkpoint_is_ignored(servers, tmp_path):
    config = _config(str(tmp_path), f"ck-{uuid.uuid4().hex[:8]}")
    server = servers(config)
    _train(server, range(2))
    server.checkpoint()
    saved = _model(server)
    _train(server, range(2, 3))
    server.checkpoint()
    # A crash while writing step 3 on a store without atomic renames: a folder without a manifest.
    os.remove(tmp_path / "step-000000000003" / "manifest.json")
    # A crash mid-write, before the rename.
    debris = tmp_path / "_tmp-step-000000000004-0123456789ab" / "emb"
    debris.mkdir(parents=True)
    (debris / "shard-00000.parquet.tmp").write_bytes(b"PAR1 truncated")
    # A manifest whose files did not all arrive.
    (tmp_path / "step-000000000005").mkdir()
    manifest = json.loads((tmp_path / "step-000000000002" / "manifest.json").read_text())
    manifest["step"] = 5
    (tmp_path / "step-000000000005" / "manifest.json").write_text(json.dumps(manifest))

    assert checkpoint.complete_steps(str(tmp_path)) == [2]
    _train(server, range(3, 4))
    assert server.restore() == 2
    _assert_identical(saved, _model(server))
    with pytest.raises(DataError, match="no complete checkpoint of step 3"):
        server.restore(3)


def test_the_last_two_checkpoints_are_kept_and_a_named_one_restores(servers, tmp_path):
    server = servers(_config(str(tmp_path), f"ck-{uuid.uuid4().hex[:8]}", checkpoint_every=1))
    _train(server, range(2))
    at_two = _model(server)
    _train(server, range(2, 4))
    assert checkpoint.complete_steps(str(tmp_path)) == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000000003", "step-000000000004"]
    _train(server, range(4, 5))
    assert server.restore(4) == 4 and server.step == 4
    with pytest.raises(DataError, match="step 2"):
        server.restore(2)
    assert at_two["lr"][0].size > 0


def test_restore_into_a_different_number_of_shards_keeps_every_row(servers, tmp_path):
    config = _config(str(tmp_path), f"ck-{uuid.uuid4().hex[:8]}")
    server = servers(config)
    _train(server, range(2))
    server.checkpoint()
    saved = _model(server)
    wider = PSConfig(f"ck-{uuid.uuid4().hex[:8]}", TABLES, num_shards=3, checkpoint_dir=str(tmp_path))
    resharded = servers(wider)
    resharded.restore()
    _assert_identical(saved, _model(resharded))


def test_restore_refuses_a_table_whose_layout_changed(servers, tmp_path):
    server = servers(_config(str(tmp_path), f"ck-{uuid.uuid4().hex[:8]}"))
    server.checkpoint()
    changed = (TableSpec("emb", width=8), TABLES[1])
    other = servers(PSConfig(f"ck-{uuid.uuid4().hex[:8]}", changed, num_shards=2, checkpoint_dir=str(tmp_path)))
    with pytest.raises(DataError, match="table emb"):
        other.restore()
