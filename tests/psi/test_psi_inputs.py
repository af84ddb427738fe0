"""Bad input is refused, with the key to change, before any cryptographic work."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from fedps.algorithms.psi import ids, params
from fedps.errors import ConfigError, DataError, PeerError


def _params(path: Path, **values) -> params.PsiParams:
    return params.from_mapping({"input": str(path), **values}, path.parent)


@pytest.mark.parametrize("raw,key", [
    ({"input": "x.csv", "bogus": 1}, "job.params.bogus"),
    ({"input": "x.csv", "buckets": 0}, "job.params.buckets"),
    ({"input": "x.csv", "buckets": "8"}, "job.params.buckets"),
    ({"input": "x.csv", "protocol": "dh"}, "job.params.protocol"),
    ({"input": "x.csv", "protocol": "rsa", "result": "host", "rsa_key_holder": "host"}, "job.params.result"),
    ({"id_column": "id"}, "job.params.input"),
])
def test_bad_params_name_their_key(raw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        params.from_mapping(raw, Path("."))


def test_shared_settings_must_agree():
    mine = params.PsiParams(input="a").agreed_view()
    with pytest.raises(ConfigError, match=r"job\.params\.buckets"):
        params.check_agreement(mine, {**mine, "buckets": 9}, "host")


def test_a_peer_that_buckets_differently_is_refused():
    """A fedps from before the range buckets sends no scheme: it would meet the wrong buckets."""
    from fedps.engine.agreement import differences

    mine = params.PsiParams(input="a").agreed_view()
    older = {key: value for key, value in mine.items() if key != "scheme"}
    with pytest.raises(ConfigError, match=r"buckets ids differently.*before 2"):
        params.check_agreement(mine, older, "host")
    with pytest.raises(ConfigError, match=r"scheme 3, ours 2"):
        params.check_agreement(mine, {**mine, "scheme": 3}, "host")
    lines = differences({"party": "guest", "digest": "a", "settings": mine},
                        {"digest": "b", "settings": older}, "host")
    assert any(line.startswith("the PSI scheme") for line in lines), lines


def test_ids_are_canonicalised(spark, tmp_path):
    path = tmp_path / "ids.csv"
    path.write_text("id,x\n 007,1\n42 ,2\n-0,3\n+5,4\n")
    table = ids.load_ids(spark, _params(path))
    assert table.id_type == "integer"
    assert sorted(r[ids.ID] for r in table.frame.collect()) == ["0", "42", "5", "7"]
    as_text = ids.load_ids(spark, _params(path, id_type="string"))
    assert sorted(r[ids.ID] for r in as_text.frame.collect()) == ["+5", "-0", "007", "42"]
    parquet = tmp_path / "ids.parquet"
    pd.DataFrame({"id": [7, 42], "x": [1.0, 2.0]}).to_parquet(parquet)
    table = ids.load_ids(spark, _params(parquet))
    assert table.id_type == "integer" and sorted(r[ids.ID] for r in table.frame.collect()) == ["42", "7"]


def test_null_and_duplicate_ids_are_refused_or_dropped(spark, tmp_path):
    path = tmp_path / "ids.csv"
    path.write_text("id,x\na,1\n,2\n  ,3\nb,4\nb,5\nc,6\n")
    with pytest.raises(DataError, match="on_null"):
        ids.load_ids(spark, _params(path))
    with pytest.raises(DataError, match="on_duplicate"):
        ids.load_ids(spark, _params(path, on_null="drop"))
    table = ids.load_ids(spark, _params(path, on_null="drop", on_duplicate="drop"))
    assert sorted(r[ids.ID] for r in table.frame.collect()) == ["a", "c"]
    assert table.report == {"rows": 6, "null_ids": 2, "duplicate_ids": 1, "dropped_rows": 4, "ids": 2,
                            "kept_rows": 2, "removed": {"on_null": 2, "on_duplicate": 2},   # rows each rule removed
                            "kept": {"on_duplicate": 0}}
    kept = ids.load_ids(spark, _params(path, on_null="drop", on_duplicate="keep"))
    assert sorted(r[ids.ID] for r in kept.frame.collect()) == ["a", "b", "b", "c"] and kept.repeated
    assert kept.report == {"rows": 6, "null_ids": 2, "duplicate_ids": 1, "dropped_rows": 2, "ids": 3,
                           "kept_rows": 4, "removed": {"on_null": 2, "on_duplicate": 0},
                           "kept": {"on_duplicate": 2}}


def test_missing_or_float_id_column_is_refused(spark, tmp_path):
    path = tmp_path / "ids.csv"
    path.write_text("user,x\na,1\n")
    with pytest.raises(DataError, match=r"job\.params\.id_column"):
        ids.load_ids(spark, _params(path))
    parquet = tmp_path / "floats.parquet"
    pd.DataFrame({"id": [1.5, 2.0]}).to_parquet(parquet)
    with pytest.raises(DataError, match="double"):
        ids.load_ids(spark, _params(parquet))


def test_id_types_that_differ_stop_both_parties_before_any_crypto(psi_pair):
    out = psi_pair([1, 2, 3], ["a", "b", "c"])
    for name in ("guest", "host"):
        assert isinstance(out[name].error, DataError), out[name].error
        assert "job.params.id_type" in str(out[name].error)
        assert [type(v) for v in out[name].received] == [dict, dict]  # settings and id type only


def test_bad_input_at_one_party_stops_the_other(psi_pair, tmp_path):
    guest = tmp_path / "guest.csv"
    guest.write_text("id,x\na,1\na,2\n")
    host = tmp_path / "host.csv"
    host.write_text("id,x\na,1\n")
    out = psi_pair([], [], inputs={"guest": guest, "host": host})
    assert isinstance(out["guest"].error, DataError) and "on_duplicate" in str(out["guest"].error)
    assert isinstance(out["host"].error, PeerError) and "could not use its ids" in str(out["host"].error)


def test_spark_keyed_hash_and_bucket_equal_the_python_definitions(spark):
    """The output contract's psi_hash is HMAC-SHA256: Spark's spelling must match hmac's."""
    import os

    from pyspark.sql import functions as F

    from fedps.algorithms.psi import buckets

    values = ["1", "123456789012", " spaced ", "user-ä漢字", "x" * 200, "-5"]
    key = os.urandom(32)
    frame = spark.createDataFrame([(v,) for v in values], "v string")
    rows = frame.select("v", buckets.keyed_hash_column(key, F.col("v")).alias("h"),
                        buckets.bucket_column(key, F.col("v"), 7).alias("b")).collect()
    assert {r.v: bytes(r.h) for r in rows} == {v: buckets.keyed_hash(key, v) for v in values}
    assert {r.v: r.b for r in rows} == {v: buckets.bucket_of(key, v, 7) for v in values}
    assert len({r.b for r in rows}) > 1


def test_buckets_are_ranges_of_the_hash_and_the_stream_order_is_private(tmp_path):
    """Bucket b holds a contiguous range of psi_hash; within it the ids go out in an order keyed by
    this party's private key: the same under the same key (a restarted party), not psi_hash order."""
    import os

    import pyarrow as pa

    from fedps.algorithms.psi import buckets, driver
    from fedps.algorithms.psi.storage import Folder
    from fedps.algorithms.psi.stream import BucketIO

    values = [f"user{i}" for i in range(3000)]
    key, count = os.urandom(32), 6
    work = Folder.at(tmp_path / "work")
    driver._stage_local(pa.table({ids.ID: values, "x": list(range(len(values)))}), key, count, work.child("ids"))
    highest = -1
    for b in range(count):
        staged = work.child("ids", f"_psi_bucket={b}").read_table()
        hashes = sorted(staged.column("psi_hash").to_pylist())
        assert hashes[0] > (highest.to_bytes(32, "big") if highest >= 0 else b"")   # ranges do not overlap
        highest = int.from_bytes(hashes[-1], "big")
        assert {buckets.bucket_of(key, v, count) for v in staged.column(ids.ID).to_pylist()} == {b}

    def order(shuffle: bytes) -> list[str]:
        return BucketIO(2, work, None, None, 100, 1.0, shuffle_key=shuffle).ids().column("id").to_pylist()

    first, again, other = order(b"a" * 32), order(b"a" * 32), order(b"b" * 32)
    by_hash = sorted(first, key=lambda v: buckets.keyed_hash(key, v))
    assert first == again and sorted(first) == sorted(other) == sorted(by_hash)
    assert first != other and first != by_hash and first != sorted(first)


def test_key_shares_are_committed_before_they_are_revealed(make_parties, job_id):
    """Both parties derive the same keys; a share that differs from its commitment is refused."""
    import os
    import threading

    import numpy as np

    from fedps.algorithms.psi import buckets
    from fedps.errors import ProtocolError
    from fedps.messaging.channel import Channel
    from fedps.messaging.tags import Scope

    configs = make_parties("guest", "host", recv_timeout_s=30.0)
    guest = Channel(job_id, "guest", "host", configs["guest"])
    host = Channel(job_id, "host", "guest", configs["host"])
    opener = threading.Thread(target=guest.open)
    opener.start()
    host.open()
    opener.join()
    results: dict = {}

    def agree(name, channel, scope):
        try:
            results[name] = buckets.agree_keys(channel, scope, name, "host" if name == "guest" else "guest")
        except Exception as exc:  # reported below
            results[name] = exc

    honest = Scope(job_id, "honest")
    threads = [threading.Thread(target=agree, args=("guest", guest, honest)),
               threading.Thread(target=agree, args=("host", host, honest))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results["guest"] == results["host"] and len(results["guest"].bucket) == 32

    cheat = Scope(job_id, "cheat")  # the host commits to one share, then reveals another
    thread = threading.Thread(target=agree, args=("guest", guest, cheat))
    thread.start()
    committed, revealed = os.urandom(32), os.urandom(32)
    host.send(cheat.tag(buckets.COMMIT.name), {"sha256": buckets.commitment(job_id, "host", committed)})
    host.recv(cheat.tag(buckets.COMMIT.name))
    host.send(cheat.tag(buckets.SHARE.name), np.frombuffer(revealed, dtype=np.uint8))
    thread.join()
    guest.close()
    host.close()
    assert isinstance(results["guest"], ProtocolError)
    assert "does not match the commitment" in str(results["guest"])
