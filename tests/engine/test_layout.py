"""The aligned row layout: built with Spark from CSV, Parquet, LibSVM and PSI output, read back with pyarrow.

The oracle is the input file itself, read with pandas in the test: every id
lands in exactly one partition, at the place its hash says, with its own
features and label; the row keys are the ones hetero_lr always computed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import queue
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedps.engine.layout import (LAYOUT, Layout, build_layout, check_layout, load_layout,
                                 read_partition)
from fedps.errors import ConfigError, DataError
from fedps.messaging.tags import Scope


DATA = Path(__file__).parents[2] / "data"
GUEST, HOST = DATA / "breast_hetero_guest.csv", DATA / "breast_hetero_host.csv"
N = 4


def id_hash(ids: pd.Series) -> np.ndarray:
    """Oracle: hetero_lr.data.id_hash as of commit 1638b17 (pandas canonical ids, SHA-256, >> 1)."""
    if pd.api.types.is_integer_dtype(ids):
        text = ids.astype("int64").astype(str)
    else:
        text = ids.astype(str).str.strip()
        numeric = text.str.fullmatch(r"[+-]?\d+")
        text = text.where(~numeric, text[numeric].map(lambda v: str(int(v))))
    return np.array([int.from_bytes(hashlib.sha256(v.encode()).digest()[:8], "big") >> 1 for v in text],
                    dtype=np.int64)


TRICKY_IDS = ["007", " 12 ", "+5", "-0", "abc", " x y ", "12a", "-007", "99999999999999999999999"]


def _partition_of(ids) -> np.ndarray:
    """Oracle: partition of each id from SHA-256 of its canonical form (ids here are plain integers)."""
    return np.array([int.from_bytes(hashlib.sha256(str(int(i)).encode()).digest()[8:12], "big") % N
                     for i in ids])


def _all_rows(layout: Layout) -> list:
    return [read_partition(layout, p) for p in range(layout.partitions)]


@pytest.fixture(scope="module")
def laid_out(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    guest = build_layout(spark, str(GUEST), folder=str(root / "guest"), partitions=N, label_column="y")
    host = build_layout(spark, str(HOST), folder=str(root / "host"), partitions=N)
    return guest, host


def test_guest_and_host_partitions_hold_the_same_ids_in_the_same_order(laid_out):
    guest, host = laid_out

    assert guest.partitions == host.partitions == N
    assert guest.counts == host.counts and guest.digests == host.digests
    assert guest.rows == host.rows == 569
    for g, h in zip(_all_rows(guest), _all_rows(host)):
        np.testing.assert_array_equal(g.row_keys, h.row_keys)
        assert np.all(np.diff(g.row_keys) > 0)
    assert guest.has_label and not host.has_label and not guest.sparse
    assert guest.feature_names == tuple(f"x{i}" for i in range(10))
    assert host.feature_names == tuple(f"x{i}" for i in range(20))


def test_each_id_sits_once_at_its_hashed_partition_with_its_row_key(laid_out):
    guest, _ = laid_out
    frame = pd.read_csv(GUEST)
    expected_keys = id_hash(frame["id"])
    expected_part = _partition_of(frame["id"])

    for p, rows in enumerate(_all_rows(guest)):
        assert rows.row_keys.dtype == np.int64
        np.testing.assert_array_equal(rows.row_keys, np.sort(expected_keys[expected_part == p]))
    all_keys = np.concatenate([r.row_keys for r in _all_rows(guest)])
    assert len(all_keys) == len(set(all_keys.tolist())) == len(frame)


def test_text_ids_are_canonical_before_hashing(spark, tmp_path):
    source = tmp_path / "ids.csv"
    source.write_text("id,x0\n" + "".join(f'"{i}",{n}\n' for n, i in enumerate(TRICKY_IDS)))

    layout = build_layout(spark, str(source), folder=str(tmp_path / "out"), partitions=N)

    keys = np.concatenate([r.row_keys for r in _all_rows(layout)])
    np.testing.assert_array_equal(np.sort(keys), np.sort(id_hash(pd.Series(TRICKY_IDS))))


def test_features_and_labels_stay_with_their_row(laid_out):
    guest, host = laid_out
    for layout, path in ((guest, GUEST), (host, HOST)):
        frame = pd.read_csv(path)
        keys, parts = id_hash(frame["id"]), _partition_of(frame["id"])
        for i in (0, 1, 100, 568):
            rows = read_partition(layout, int(parts[i]))
            at = int(np.searchsorted(rows.row_keys, keys[i]))
            assert rows.row_keys[at] == keys[i]
            np.testing.assert_array_equal(rows.x[at], frame[list(layout.feature_names)].iloc[i].to_numpy())
            if layout.has_label:
                assert rows.y[at] == frame["y"].iloc[i]


def test_partitions_are_cached_and_read_only(laid_out):
    guest, _ = laid_out
    first = read_partition(guest, 1)

    assert read_partition(guest, 1) is first
    with pytest.raises(ValueError):
        first.x[0, 0] = 1.0


def test_file_uri_and_parquet_folder_give_the_same_layout(spark, laid_out, tmp_path):
    _, host = laid_out
    parts = tmp_path / "host_parquet"
    parts.mkdir()
    frame = pd.read_csv(HOST)
    for i, chunk in enumerate((frame.iloc[:200], frame.iloc[200:201], frame.iloc[201:])):
        pq.write_table(pa.Table.from_pandas(chunk, preserve_index=False), parts / f"part-{i}.parquet")

    from_uri = build_layout(spark, HOST.as_uri(), folder=(tmp_path / "uri").as_uri(), partitions=N)
    from_parquet = build_layout(spark, str(parts), folder=str(tmp_path / "pq"), partitions=N)

    for layout in (from_uri, from_parquet):
        assert (layout.counts, layout.digests, layout.feature_names) == (host.counts, host.digests,
                                                                         host.feature_names)
        for a, b in zip(_all_rows(layout), _all_rows(host)):
            np.testing.assert_array_equal(a.x, b.x)
    assert from_uri.folder.startswith("file://")


def test_libsvm_rows_become_csr_over_global_feature_ids(spark, tmp_path):
    source = tmp_path / "rows.libsvm"
    source.write_text("# id label features\n7 1 3:0.5 1099511627775:2\n\n008 0 3:1.5\n9 1 42\n")
    expected = {"7": (1.0, {3: 0.5, 2**40 - 1: 2.0}), "8": (0.0, {3: 1.5}), "9": (1.0, {42: 1.0})}

    layout = build_layout(spark, str(source), folder=str(tmp_path / "out"), partitions=N, label_column="label")

    assert layout.sparse and layout.has_label and layout.feature_names == () and layout.rows == 3
    seen = 0
    for p in range(N):
        rows = read_partition(layout, p)
        assert rows.x.shape == (layout.counts[p], len(rows.feature_keys))
        assert rows.feature_keys.dtype == np.int64 and np.all(np.diff(rows.feature_keys) > 0)
        for ident, (label, features) in expected.items():
            key = id_hash(pd.Series([ident]))[0]
            if key in rows.row_keys:
                at = int(np.searchsorted(rows.row_keys, key))
                dense = rows.x[at].toarray().ravel()
                assert rows.y[at] == label
                assert dict(zip(rows.feature_keys[dense != 0].tolist(), dense[dense != 0].tolist())) == features
                seen += 1
    assert seen == 3
    empty = next(p for p in range(N) if layout.counts[p] == 0)  # 3 rows, 4 partitions
    rows = read_partition(layout, empty)
    assert rows.row_keys.shape == (0,) and rows.y.shape == (0,) and rows.x.shape == (0, 0)


def _write_psi_output(folder: Path, ids: list[str]) -> list[bytes]:
    hashes = [hmac.new(b"order key", i.encode(), hashlib.sha256).digest() for i in ids]
    order = np.argsort(hashes)
    rows = pa.table({"id": [ids[i] for i in order], "y": [float(i % 2) for i in order],
                     "x0": [float(i) for i in order], "psi_hash": pa.array([hashes[i] for i in order], pa.binary()),
                     "psi_index": pa.array(np.arange(len(ids)), pa.int64())})
    (folder / "rows").mkdir(parents=True)
    pq.write_table(rows, folder / "rows" / "part-0.parquet")
    (folder / "manifest.json").write_text(json.dumps({"version": 1, "count": len(ids), "digest": "-"}))
    return hashes


def test_psi_output_rows_are_keyed_by_psi_hash(spark, tmp_path):
    ids = ["a", "b", "c"]
    hashes = _write_psi_output(tmp_path / "psi", ids)

    layout = build_layout(spark, str(tmp_path / "psi"), folder=str(tmp_path / "out"), partitions=N,
                          label_column="y")

    assert layout.feature_names == ("x0",) and layout.rows == 3
    for i, h in enumerate(hashes):
        p = int.from_bytes(h[8:12], "big") % N
        rows = read_partition(layout, p)
        at = int(np.searchsorted(rows.row_keys, int.from_bytes(h[:8], "big") >> 1))
        assert rows.row_keys[at] == int.from_bytes(h[:8], "big") >> 1
        assert (rows.x[at, 0], rows.y[at]) == (float(i), float(i % 2))
    empty = read_partition(layout, next(p for p in range(N) if layout.counts[p] == 0))
    assert empty.x.shape == (0, 1) and empty.y.shape == (0,)


def _csv(tmp_path: Path, **columns) -> Path:
    path = tmp_path / "input.csv"
    pd.DataFrame(columns).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("columns, settings, words", [
    ({"key": [1, 2], "x0": [0.1, 0.2]}, {}, ["'id'", "key, x0"]),
    ({"id": ["7", "007", "8"], "x0": [0.1, 0.2, 0.3]}, {}, ["1 ids occur more than once", "'id'", "2 rows"]),
    ({"id": range(10), "y": range(10), "x0": [0.5] * 10}, {"label_column": "y"}, ["'y'", "0, 1, 2", "9"]),
    ({"id": range(3), "x0": [0.1, None, float("nan")]}, {}, ["'x0'", "2 missing"]),
    ({"id": range(3), "x0": [0.1, 0.2, 0.3], "x1": ["a", "b", "c"]}, {}, ["'x1'", "not numeric"]),
    ({"id": range(3), "x0": [0.1, 0.2, 0.3]}, {"label_column": "y"}, ["label column 'y'", "missing"]),
    ({"id": ["1", " ", "3"], "x0": [0.1, 0.2, 0.3]}, {}, ["1 of 3 rows", "empty id"]),
])
def test_bad_input_is_a_data_error_naming_the_column(spark, tmp_path, columns, settings, words):
    source = _csv(tmp_path, **columns)

    with pytest.raises(DataError) as caught:
        build_layout(spark, str(source), folder=str(tmp_path / "out"), partitions=N, **settings)
    for word in words:
        assert word in str(caught.value)
    assert str(source) in str(caught.value)


def test_malformed_libsvm_token_is_named(spark, tmp_path):
    source = tmp_path / "bad.svm"
    source.write_text("1 3:0.5\n2 4:x\n")

    with pytest.raises(DataError, match=r"'4:x' is not <feature id>:<value>"):
        build_layout(spark, str(source), folder=str(tmp_path / "out"), partitions=N)


def test_partitions_below_one_are_refused(spark, tmp_path):
    with pytest.raises(ConfigError, match="partitions"):
        build_layout(spark, str(HOST), folder=str(tmp_path / "out"), partitions=0)


class _Pipe:
    """One end of an in-test channel pair: send goes to the peer's queue."""

    def __init__(self, inbox: queue.Queue, outbox: queue.Queue) -> None:
        self.inbox, self.outbox = inbox, outbox

    def send(self, tag, value) -> None:
        self.outbox.put((tag, value))

    def recv(self, tag):
        got, value = self.inbox.get(timeout=10)
        assert got == tag
        return value


def _check_both(guest: Layout, host: Layout) -> dict:
    a, b = queue.Queue(), queue.Queue()
    scope, errors = Scope("job", "setup"), {}

    def run(name, channel, layout, peer):
        try:
            check_layout(channel, scope, layout, peer=peer, me=name)
        except DataError as exc:
            errors[name] = str(exc)

    threads = [threading.Thread(target=run, args=("guest", _Pipe(a, b), guest, "host")),
               threading.Thread(target=run, args=("host", _Pipe(b, a), host, "guest"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    return errors


def test_equal_layouts_pass_the_peer_check(laid_out):
    assert _check_both(*laid_out) == {}
    assert LAYOUT.name == "layout"


def test_a_dropped_row_is_named_by_partition_at_both_parties(spark, laid_out, tmp_path):
    guest, _ = laid_out
    frame = pd.read_csv(HOST)
    dropped = int(_partition_of(frame["id"].iloc[[5]])[0])
    frame.drop(index=5).to_csv(tmp_path / "host.csv", index=False)
    host = build_layout(spark, str(tmp_path / "host.csv"), folder=str(tmp_path / "out"), partitions=N)

    errors = _check_both(guest, host)

    assert set(errors) == {"guest", "host"}
    count = guest.counts[dropped]
    assert f"partition {dropped} holds {count} rows at guest and {count - 1} at host" in errors["guest"]
    assert "one PSI run" in errors["host"]


def test_same_count_but_other_ids_is_named(laid_out):
    guest, host = laid_out
    digests = list(host.digests)
    digests[2] = "0" * 64
    other = Layout(host.folder, host.partitions, host.counts, tuple(digests), host.feature_names, False, False)

    errors = _check_both(guest, other)

    assert "partition 2 holds" in errors["guest"] and "not the same ids" in errors["guest"]


def test_a_complete_layout_with_the_same_settings_is_reused(spark, tmp_path):
    folder = tmp_path / "out"
    first = build_layout(spark, str(HOST), folder=str(folder), partitions=2)
    stamp = (folder / "manifest.json").stat().st_mtime_ns
    marker = folder / "part=0" / "_marker"
    marker.write_text("still here")

    again = build_layout(spark, str(HOST), folder=str(folder), partitions=2)

    assert again == first == load_layout(str(folder))
    assert (folder / "manifest.json").stat().st_mtime_ns == stamp and marker.exists()
    (folder / "manifest.json").unlink()  # an incomplete build: no manifest, so it is rebuilt
    assert load_layout(str(folder)) is None
    assert build_layout(spark, str(HOST), folder=str(folder), partitions=2) == first
    assert not marker.exists()
    assert build_layout(spark, str(HOST), folder=str(folder), partitions=3).partitions == 3  # other settings
