"""One-to-many ids (``on_duplicate = "keep"``): every row of a repeated id is kept and matched.

Real parts: two PSI parties as threads (psi_pair: the session's Spark, the
embedded broker); the expected rows are a pandas merge.
"""

from __future__ import annotations

import pandas as pd
import pytest

from fedps.algorithms.psi.preflight import psi_settings
from fedps.engine import config as config_module
from fedps.errors import ConfigError


def _guest_host():
    guest = [f"u{i}" for i in range(30)] + [f"u{i}" for i in range(10)] * 2   # u0..u9: 3 rows each
    host = [f"u{i}" for i in range(5, 45)] + ["u40", "u41", "u7"]            # u40, u41, u7: 2 rows each
    return guest, host


def _expected(mine: list[str], theirs: list[str]) -> list[tuple[str, float]]:
    """My rows whose id the peer has (a pandas inner merge with the peer's distinct ids)."""
    rows = pd.DataFrame({"id": mine, "x0": [float(i) for i in range(len(mine))]})
    merged = rows.merge(pd.DataFrame({"id": sorted(set(theirs))}), on="id", how="inner")
    return sorted(zip(merged["id"], merged["x0"]))


def test_repeated_ids_are_kept_and_matched_one_to_many(psi_pair):
    guest, host = _guest_host()
    out = psi_pair(guest, host, on_duplicate="keep")
    shared = set(guest) & set(host)
    index_of = {}
    for name, mine, theirs in (("guest", guest, host), ("host", host, guest)):
        o = out[name]
        assert o.error is None, o.error
        assert sorted(zip(o.rows["id"], o.rows["x0"])) == _expected(mine, theirs)
        assert o.manifest["count"] == len(shared) == 25            # distinct ids, both sides
        assert o.manifest["row_count"] == len(_expected(mine, theirs)) == o.metrics["psi_rows_written"]
        assert sorted(set(o.rows["psi_index"])) == list(range(25))
        per_id = o.rows.groupby("id")["psi_index"].nunique()
        assert (per_id == 1).all()                                   # rows of one id share its index
        index_of[name] = dict(zip(o.rows["id"], o.rows["psi_index"]))
        assert o.metrics["psi_peer_ids"] == len(set(theirs))       # the peer saw each id once
    assert index_of["guest"] == index_of["host"]
    assert out["guest"].manifest["digest"] == out["host"].manifest["digest"]
    report = out["guest"].metrics["psi_input"]
    assert report == {"rows": 50, "null_ids": 0, "duplicate_ids": 10, "dropped_rows": 0, "ids": 30,
                      "kept_rows": 50, "removed": {"on_null": 0, "on_duplicate": 0},
                      "kept": {"on_duplicate": 30}}
    host_report = out["host"].metrics["psi_input"]
    assert (host_report["ids"], host_report["kept"], host_report["duplicate_ids"]) == (40, {"on_duplicate": 6}, 3)


def test_spark_output_of_repeated_ids_equals_the_local_output(spark, tmp_path):
    """Staged and written by Spark tasks, or by the driver alone: the same rows, index and digest."""
    import hashlib
    import hmac

    import pyarrow as pa

    from fedps.algorithms.psi import driver, ids, output
    from fedps.algorithms.psi.storage import Folder

    values = [f"u{i % 40}" for i in range(100)] + ["z1", "z2"]          # u0..u19: 3 rows, u20..u39: 2
    rows = pd.DataFrame({ids.ID: values, "x0": [float(i) for i in range(len(values))],
                         "when": pd.Timestamp("2024-01-01 10:00:00.123456")
                         + pd.to_timedelta(range(len(values)), unit="s")})
    matched = {f"u{i}" for i in range(0, 40, 3)} | {"z2"}
    key, buckets = b"k" * 32, 5
    manifests = {}
    for name in ("local", "spark"):
        work, out = Folder.at(tmp_path / name / "work"), Folder.at(tmp_path / name / "out")
        if name == "local":
            driver._stage_local(pa.Table.from_pandas(rows, preserve_index=False), key, buckets, work.child("ids"))
        else:
            driver._stage_spark(spark.createDataFrame(rows).repartition(3), key, buckets, work.child("ids"))
        counts = []
        for b in range(buckets):   # what a protocol saves: the bucket's matched ids, each once
            staged = work.child("ids", f"_psi_bucket={b}").read_table([ids.ID])
            found = sorted(set(staged.column(ids.ID).to_pylist()) & matched) if staged is not None else []
            work.child("matched", f"bucket={b}").write_table("part-0.parquet", pa.table({"id": pa.array(found, pa.string())}))
            counts.append(len(found))
        assert sum(counts) == len(matched) and max(counts) < len(matched)   # spread over buckets
        manifests[name] = output.write_output(spark if name == "spark" else None, work, out, counts)
    local, by_spark = manifests["local"], manifests["spark"]
    assert (local["count"], local["digest"], local["row_count"]) == \
           (by_spark["count"], by_spark["digest"], by_spark["row_count"]) == (len(matched), local["digest"], 36)
    a = pd.read_parquet(tmp_path / "local" / "out" / "rows")
    b = pd.read_parquet(tmp_path / "spark" / "out" / "rows")
    # the files in name order are the rows in psi_hash order, numbered densely (repeats share an index)
    for frame in (a, b):
        assert list(frame["psi_hash"]) == sorted(frame["psi_hash"])
        assert list(frame["psi_index"]) == sorted(frame["psi_index"])
        assert sorted(set(frame["psi_index"])) == list(range(len(matched)))
    # Spark reads both back with the output's own columns (not the staged files' stored schema), and
    # the timestamps Spark staged as INT96 come back as Spark timestamps
    for name in ("local", "spark"):
        back = spark.read.parquet(str(tmp_path / name / "out" / "rows"))
        assert back.columns == ["x0", "when", "psi_hash", "psi_index"]
        assert dict(back.dtypes)["when"] == "timestamp"
        assert sorted(r["when"] for r in back.collect()) == sorted(
            w.to_pydatetime() for w in rows[rows[ids.ID].isin(matched)]["when"])
    a, b = a.sort_values("x0").reset_index(drop=True), b.sort_values("x0").reset_index(drop=True)
    assert a[["x0", "psi_index"]].equals(b[["x0", "psi_index"]]) and list(a["psi_hash"]) == list(b["psi_hash"])
    wanted = rows[rows[ids.ID].isin(matched)].sort_values("x0").reset_index(drop=True)
    assert list(a["x0"]) == list(wanted["x0"])
    assert list(a["psi_hash"]) == [hmac.new(key, v.encode(), hashlib.sha256).digest() for v in wanted[ids.ID]]


def _training_config(role: str, on_duplicate: str) -> object:
    return config_module.from_mapping({
        "job": {"id": "j", "algorithm": "psi", "params": {"input": "/tmp/x.csv"}},
        "party": {"name": role, "role": role, "output_dir": "/tmp/out"},
    }), {"input": "/tmp/x.csv", "on_duplicate": on_duplicate}


def test_a_training_job_keeps_repeated_ids_only_on_the_guest(monkeypatch):
    from fedps.algorithms.psi import preflight

    config, raw = _training_config("guest", "keep")
    with pytest.raises(ConfigError, match="training layout does not take repeated ids yet"):
        psi_settings(config, raw, "job.params.psi")   # until fedps.engine.layout takes them
    monkeypatch.setattr(preflight, "LAYOUT_TAKES_REPEATED_IDS", True)
    assert psi_settings(config, raw, "job.params.psi").on_duplicate == "keep"
    config, raw = _training_config("host", "keep")
    with pytest.raises(ConfigError, match=r"job\.params\.psi\.on_duplicate = \"keep\".*only for the guest") as err:
        psi_settings(config, raw, "job.params.psi")
    assert "guest" in err.value.public
    config, raw = _training_config("host", "keep")
    assert psi_settings(config, raw, "job.params").on_duplicate == "keep"   # a PSI job: either side may keep


def test_timestamps_outside_the_nanosecond_range_and_nested_ones_survive_the_output(spark, tmp_path):
    """A 9999-12-31 sentinel, a year-1600 date and a timestamp inside a struct come back from the
    output exactly, read by Spark (pyarrow would read Spark's default INT96 staging as nanoseconds)."""
    import datetime

    import pyarrow as pa

    from fedps.algorithms.psi import driver, ids, output
    from fedps.algorithms.psi.storage import Folder

    when = [datetime.datetime(9999, 12, 31, 23, 59, 59, 999999), datetime.datetime(1600, 1, 1, 12, 0),
            datetime.datetime(2024, 5, 6, 7, 8, 9, 123456)]
    data = [(f"u{i}", float(i), when[i % 3], (when[(i + 1) % 3], i), [when[(i + 2) % 3]]) for i in range(30)]
    frame = spark.createDataFrame(data, f"{ids.ID} string, x0 double, when timestamp, "
                                        "extra struct<at: timestamp, n: int>, seen array<timestamp>")
    work, out = Folder.at(tmp_path / "work"), Folder.at(tmp_path / "out")
    driver._stage_spark(frame.repartition(2), b"k" * 32, 3, work.child("ids"))
    matched = {f"u{i}" for i in range(0, 30, 2)}
    counts = []
    for b in range(3):
        staged = work.child("ids", f"_psi_bucket={b}").read_table([ids.ID])
        found = sorted(set(staged.column(ids.ID).to_pylist()) & matched) if staged is not None else []
        work.child("matched", f"bucket={b}").write_table("part-0.parquet", pa.table({"id": pa.array(found, pa.string())}))
        counts.append(len(found))
    output.write_output(spark, work, out, counts)
    back = spark.read.parquet(str(tmp_path / "out" / "rows"))
    assert dict(back.dtypes)["when"] == "timestamp"
    got = sorted((r["x0"], r["when"], r["extra"]["at"], r["extra"]["n"], list(r["seen"])) for r in back.collect())
    wanted = sorted((x, w, e[0], e[1], s) for name, x, w, e, s in data if name in matched)
    assert got == wanted
