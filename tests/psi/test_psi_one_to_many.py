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
    """The executors' writer (Spark, digest per range) and the driver's agree row for row."""
    import pyarrow as pa

    from fedps.algorithms.psi import ids, output
    from fedps.algorithms.psi.storage import Folder

    values = [f"u{i % 40}" for i in range(100)] + ["z1", "z2"]          # u0..u19: 3 rows, u20..u39: 2
    rows = pd.DataFrame({ids.ID: values, "x0": [float(i) for i in range(len(values))]})
    matched = [f"u{i}" for i in range(0, 40, 3)] + ["z2"]
    key = b"k" * 32
    local = output.write_output_local(pa.Table.from_pandas(rows, preserve_index=False), matched, key,
                                      Folder.at(tmp_path / "local"))
    frame = spark.createDataFrame(rows).repartition(3)
    by_spark = output.write_output(spark, frame, spark.createDataFrame([(m,) for m in matched], "id string"), key,
                                   Folder.at(tmp_path / "spark"), repeated=True)
    assert (local["count"], local["digest"], local["row_count"]) == \
           (by_spark["count"], by_spark["digest"], by_spark["row_count"]) == (local["count"], local["digest"], 36)
    assert local["count"] == len(matched)
    a = pd.read_parquet(tmp_path / "local" / "rows").sort_values("x0").reset_index(drop=True)
    b = pd.read_parquet(tmp_path / "spark" / "rows").sort_values("x0").reset_index(drop=True)
    assert a[["x0", "psi_index"]].equals(b[["x0", "psi_index"]]) and list(a["psi_hash"]) == list(b["psi_hash"])
    assert sorted(set(a["psi_index"])) == list(range(len(matched)))


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
