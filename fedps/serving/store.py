"""Online feature stores: a party's features by row key, for ``fedps serve``.

A store answers one question, small enough that a production store (Redis,
HBase, Cassandra) is one adapter of a few lines: "the feature vectors of these
row keys, and which of them you hold" (:class:`FeatureStore`). The embedded
default is a SQLite file (:class:`SqliteStore`) that ``fedps serve
--build-store`` writes from the party's Parquet features (:func:`build_store`):
a table ``rows(key BLOB PRIMARY KEY, x BLOB)`` with each row's dense features
as little-endian float64 (NaN for a missing value, with ``--missing-ok``), and a
table ``meta`` with the feature names, how the keys were made and whether
values may be missing.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np

from fedps.errors import ConfigError, DataError

log = logging.getLogger(__name__)

STORE_VERSION = 1
_CHUNK = 900  # keys per query, under SQLite's variable limit on old builds
_SKIP = ("psi_hash", "psi_index")
_FOUND, _NOT_FOUND = np.ones(1, dtype=bool), np.zeros(1, dtype=bool)
_FOUND.flags.writeable = _NOT_FOUND.flags.writeable = False


class FeatureStore(Protocol):
    """What serving needs from an online store."""

    feature_names: tuple[str, ...]

    def lookup(self, keys: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """``(x, found)``: a (rows, features) float64 array (zeros where not found) and a bool mask."""

    def close(self) -> None: ...


class SqliteStore:
    """The embedded store: one read-only SQLite connection per serving thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"serving.store {self.path} does not exist: build it with "
                              "`fedps serve --build-store`")
        self._local = threading.local()
        try:
            meta = dict(self._connection().execute("SELECT name, value FROM meta").fetchall())
        except sqlite3.DatabaseError as exc:
            raise DataError(f"serving.store {self.path} is not a fedps store: {exc}") from None
        if int(meta.get("version", 0)) != STORE_VERSION:
            raise DataError(f"serving.store {self.path} has version {meta.get('version')}, "
                            f"expected {STORE_VERSION}: rebuild it")
        self.feature_names = tuple(json.loads(meta["features"]))
        self.id_hash = meta.get("id_hash", "")
        self.rows = int(meta.get("rows", 0))
        #: Built with --missing-ok: values may be NaN (missing).
        self.missing = meta.get("missing") == "1"
        #: Rows of (feature id, value) pairs, for a sparse LR model (lookup_sparse).
        self.sparse = meta.get("sparse") == "1"

    def _connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
            self._local.conn = conn
        return conn

    def _blobs(self, keys: Sequence[bytes]) -> list[bytes | None]:
        conn = self._connection()
        if len(keys) == 1:   # the common online case: one primary-key probe
            row = conn.execute("SELECT x FROM rows WHERE key = ?", (keys[0],)).fetchone()
            return [row[0] if row else None]
        unique, held = list(dict.fromkeys(keys)), {}
        for start in range(0, len(unique), _CHUNK):
            chunk = unique[start:start + _CHUNK]
            held.update(conn.execute(f"SELECT key, x FROM rows WHERE key IN ({','.join('?' * len(chunk))})", chunk))
        return [held.get(key) for key in keys]

    def lookup_sparse(self, keys: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(ids, values, counts, found)``: every row's (feature id, value) pairs concatenated."""
        from fedps.serving.sparse import decode_rows

        if not self.sparse:
            raise DataError(f"serving.store {self.path} holds dense rows, not sparse ones")
        blobs = self._blobs(keys)
        ids, values, counts = decode_rows(blobs)
        return ids, values, counts, np.fromiter((b is not None for b in blobs), dtype=bool, count=len(keys))

    def lookup(self, keys: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
        if self.sparse:
            raise DataError(f"serving.store {self.path} holds sparse rows (feature id, value), not dense ones")
        width = len(self.feature_names)
        if len(keys) == 1:   # the online case, without the batch path's array work
            row = self._connection().execute("SELECT x FROM rows WHERE key = ?", (keys[0],)).fetchone()
            if row is None:
                return np.zeros((1, width)), _NOT_FOUND
            return np.frombuffer(row[0], dtype="<f8").reshape(1, width).copy(), _FOUND
        blobs = self._blobs(keys)
        found = np.fromiter((blob is not None for blob in blobs), dtype=bool, count=len(keys))
        x = np.zeros((len(keys), width))
        if found.any():
            x[found] = np.frombuffer(b"".join(blob for blob in blobs if blob is not None), dtype="<f8").reshape(-1, width)
        return x, found

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def build_store(source: str | Path, target: str | Path, *, id_column: str, key_of: Callable[[str], bytes],
                id_hash: str, label_column: str = "y", features: Sequence[str] = (),
                missing_ok: bool = False, fmt: str = "auto", labelled: bool = False) -> dict:
    """Write a SQLite store from a Parquet file or folder; returns its summary.

    Keys are the ``psi_hash`` column when the source is PSI output, else
    ``key_of(id)`` of the id column. Features are ``features``, or every
    numeric column but the id, the label and PSI's own columns. With
    ``missing_ok`` a null or NaN value is stored as NaN (a tree model sends it
    where its split sends missing values); a linear model refuses such a store.
    A LibSVM or tag:value file (``fmt``, or a ``.libsvm``/``.svm`` name) makes a
    store of sparse rows, for a sparse LR model (:mod:`fedps.serving.sparse`;
    ``labelled``: its lines have a label after the id).
    """
    from fedps.serving.sparse import sparse_kind

    source, target = Path(source), Path(target)
    if not source.exists():
        raise DataError(f"{source} does not exist (the features to build the store from)")
    kind = sparse_kind(source, fmt)
    if kind is not None:
        return _build_sparse(source, target, kind, id_column, key_of, id_hash, labelled)
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    dataset = ds.dataset(str(source), format="parquet")
    names = dataset.schema.names
    from_psi = "psi_hash" in names
    if not from_psi and id_column not in names:
        raise DataError(f"{source} has neither psi_hash nor the id column {id_column!r} (--id-column); "
                        f"its columns are {', '.join(names)}")
    numeric = [f.name for f in dataset.schema if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)
               or pa.types.is_boolean(f.type)]
    chosen = list(features) or [n for n in numeric if n not in (id_column, label_column, *_SKIP)]
    missing = [n for n in chosen if n not in numeric]
    if missing or not chosen:
        raise DataError(f"{source}: no numeric feature column {', '.join(missing) or 'at all'} to store")
    started, rows = time.perf_counter(), 0
    with _building(target) as conn:
        key_column = "psi_hash" if from_psi else id_column
        for batch in dataset.to_batches(columns=[key_column, *chosen]):
            x = np.column_stack([pc.cast(batch.column(i + 1), pa.float64()).to_numpy(zero_copy_only=False)
                                 for i in range(len(chosen))]).astype("<f8")
            bad = np.isinf(x) if missing_ok else ~np.isfinite(x)
            if bad.any():
                row, col = map(int, np.argwhere(bad)[0])
                what = "infinite" if missing_ok else "null or not finite (--missing-ok keeps missing values)"
                raise DataError(f"{source}: column {chosen[col]!r} is {what} in row {rows + row}")
            raw = batch.column(0).to_pylist()
            if from_psi:
                keys = [bytes(k) for k in raw]
            else:
                if any(v is None for v in raw):
                    raise DataError(f"{source}: the id column {id_column!r} has a null")
                keys = [key_of(str(v)) for v in raw]
            try:
                conn.executemany("INSERT INTO rows VALUES (?, ?)", zip(keys, (r.tobytes() for r in x)))
            except sqlite3.IntegrityError:
                raise DataError(f"{source}: an id occurs twice (near row {rows}); ids must be unique") from None
            rows += len(keys)
        meta = {"version": STORE_VERSION, "sparse": 0, "features": json.dumps(chosen), "rows": rows,
                "id_hash": "psi_hash" if from_psi else id_hash, "source": str(source),
                "missing": int(missing_ok)}
        conn.executemany("INSERT INTO meta VALUES (?, ?)", [(k, str(v)) for k, v in meta.items()])
    log.info("built %s: %d rows, %d features in %.1fs", target, rows, len(chosen), time.perf_counter() - started)
    return {"store": str(target), "rows": rows, "features": chosen, "keys": meta["id_hash"],
            "missing_ok": missing_ok}


@contextmanager
def _building(target: Path) -> Iterator[sqlite3.Connection]:
    """A new store written at ``<target>.partial``: committed and moved to ``target`` (mode 0600) at the
    end of the block, removed if the block fails."""
    partial, conn = _create(target)
    try:
        yield conn
        conn.commit()
    except BaseException:
        conn.close()
        partial.unlink(missing_ok=True)
        raise
    _finish(conn, partial, target)


def _create(target: Path) -> tuple[Path, sqlite3.Connection]:
    if target.exists():
        raise ConfigError(f"{target} already exists; remove it or choose another --build-store path")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    conn = sqlite3.connect(str(partial))
    conn.executescript("CREATE TABLE meta(name TEXT PRIMARY KEY, value TEXT);"
                       "CREATE TABLE rows(key BLOB PRIMARY KEY, x BLOB NOT NULL) WITHOUT ROWID;")
    return partial, conn


def _finish(conn: sqlite3.Connection, partial: Path, target: Path) -> None:
    conn.close()
    partial.chmod(0o600)
    partial.rename(target)


def _build_sparse(source: Path, target: Path, kind: str, id_column: str, key_of: Callable[[str], bytes],
                  id_hash: str, labelled: bool) -> dict:
    from fedps.serving.sparse import sparse_meta, sparse_rows, write_sparse_rows

    with _building(target) as conn:
        rows = write_sparse_rows(conn, sparse_rows(source, kind, id_column, labelled), key_of, source)
        meta = {"version": STORE_VERSION, **sparse_meta(rows, id_hash, source)}
        conn.executemany("INSERT INTO meta VALUES (?, ?)", [(k, str(v)) for k, v in meta.items()])
    log.info("built %s: %d sparse rows (%s)", target, rows, kind)
    return {"store": str(target), "rows": rows, "features": [], "keys": id_hash, "sparse": True}
