"""Sparse vertical LR models as served: features keyed by id, a store of sparse rows.

A ``hetero_lr`` party trained on sparse rows (LibSVM or FATE tag:value text,
``fedps/engine/formats.py``) writes ``model.json`` with ``feature_ids`` (int64
ids: a LibSVM feature id, or a tag's id from :func:`formats.tag_id`) and their
``weights``. Its store holds each row as the (id, value) pairs it has
(:func:`build_sparse_store`, ``fedps serve --build-store`` of such a file), and
the row's partial score is ``sum(w[id] * value) + intercept``, an id the model
does not know weighing 0, as the batch prediction (``hetero_lr/predict.py``)
scores it.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from fedps.errors import ConfigError, DataError

SPARSE_FORMATS = ("libsvm", "tag_value")


@dataclass(frozen=True)
class SparseLinearModel:
    """One party's part of a sparse vertical LR model."""

    version: str
    party: str
    feature_ids: np.ndarray   # sorted int64
    weights: np.ndarray       # aligned with feature_ids
    intercept: float
    digest: str
    features: tuple[str, ...] = ()
    kind: str = "sparse"

    def score_sparse(self, ids: np.ndarray, values: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Partial scores of rows given as concatenated (ids, values), ``counts[r]`` pairs for row ``r``."""
        at = np.searchsorted(self.feature_ids, ids)
        at[at == len(self.feature_ids)] = 0
        hit = self.feature_ids[at] == ids if len(self.feature_ids) else np.zeros(len(ids), bool)
        contribution = np.where(hit, self.weights[at] if len(self.weights) else 0.0, 0.0) * values
        rows = np.repeat(np.arange(len(counts)), counts)
        return np.bincount(rows, weights=contribution, minlength=len(counts)) + self.intercept


def load_sparse_model(saved: dict, path: Path, version: str, me: str, text: str) -> SparseLinearModel:
    ids, weights = saved.get("feature_ids"), saved.get("weights")
    if not isinstance(ids, list) or not isinstance(weights, list) or len(ids) != len(weights):
        raise DataError(f"{path} must hold as many weights as feature ids")
    try:
        fid = np.asarray(ids, dtype=np.int64)
        w = np.asarray(weights, dtype=np.float64)
        intercept = float(saved.get("intercept") or 0.0)
    except (TypeError, ValueError, OverflowError) as exc:
        raise DataError(f"{path}: unreadable feature ids or weights: {exc}") from None
    if not np.isfinite(w).all() or not np.isfinite(intercept):
        raise DataError(f"{path} holds a weight that is not finite")
    if saved.get("transform"):
        raise ConfigError(f"{path}: a sparse model with a row transform is not served (training writes none)")
    order = np.argsort(fid, kind="stable")
    if len(fid) and (np.diff(fid[order]) == 0).any():
        raise DataError(f"{path} names a feature id twice")
    return SparseLinearModel(version, me, fid[order], w[order], intercept,
                             hashlib.sha256(text.encode()).hexdigest()[:12])


def encode_row(keys: np.ndarray, values: np.ndarray) -> bytes:
    """A stored sparse row: its ids (little-endian int64), then their values (float64)."""
    return np.asarray(keys, dtype="<i8").tobytes() + np.asarray(values, dtype="<f8").tobytes()


def decode_rows(blobs: list[bytes | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, values, counts) of stored rows, a row not held counting 0 pairs."""
    counts = np.fromiter(((len(b) // 16) if b else 0 for b in blobs), dtype=np.int64, count=len(blobs))
    held = [b for b in blobs if b]
    if not held:
        return np.zeros(0, np.int64), np.zeros(0), counts
    ids = np.concatenate([np.frombuffer(b, dtype="<i8", count=len(b) // 16) for b in held])
    values = np.concatenate([np.frombuffer(b, dtype="<f8", offset=len(b) // 2) for b in held])
    return ids, values, counts


def sparse_kind(source: Path, fmt: str) -> str | None:
    """The sparse text format of ``source`` ("libsvm" or "tag_value"), or None for Parquet."""
    if fmt in SPARSE_FORMATS:
        return fmt
    if fmt not in ("auto", "parquet"):
        raise ConfigError(f"--format must be auto, parquet, {' or '.join(SPARSE_FORMATS)}, got {fmt!r}")
    if fmt == "auto" and source.name.endswith((".libsvm", ".svm")):
        return "libsvm"
    return None


def sparse_rows(source: Path, kind: str, id_column: str, labelled: bool) -> Iterator[tuple[list[str], list, list]]:
    """(ids, keys, values) batches of a LibSVM or tag:value file, parsed as the layout parses it."""
    import pyarrow as pa

    from fedps.engine import formats
    from fedps.engine.layout import libsvm_parser   # the layout's own reader: one parse for training and serving

    parser = formats.tag_value_parser(labelled, id_column) if kind == "tag_value" else libsvm_parser(labelled)
    files = sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith((".", "_"))) \
        if source.is_dir() else [source]
    for file in files:
        with file.open() as handle:
            while True:
                lines = [line for _, line in zip(range(10_000), handle)]
                if not lines:
                    break
                batch = pa.RecordBatch.from_pydict({"line": lines, "file": [str(file)] * len(lines)})
                for out in parser(iter([batch])):
                    bad = [b for b in out.column("_layout_bad").to_pylist() if b]
                    if bad:
                        raise DataError(f"{bad[0]} ({len(bad)} bad lines in this batch)")
                    if any(out.column("_layout_nonfinite").to_pylist()):
                        raise DataError(f"{file}: a feature value is not finite")
                    yield (out.column("_layout_id").to_pylist(), out.column("keys").to_pylist(),
                           out.column("values").to_pylist())


def write_sparse_rows(conn: sqlite3.Connection, batches: Iterator[tuple[list[str], list, list]],
                      key_of: Callable[[str], bytes], source: Path) -> int:
    rows = 0
    for ids, keys, values in batches:
        if any(not i for i in ids):
            raise DataError(f"{source}: a line has no id")
        try:
            conn.executemany("INSERT INTO rows VALUES (?, ?)",
                             ((key_of(i), encode_row(k, v)) for i, k, v in zip(ids, keys, values)))
        except sqlite3.IntegrityError:
            raise DataError(f"{source}: an id occurs twice (near row {rows}); ids must be unique") from None
        rows += len(ids)
    return rows


def sparse_meta(rows: int, id_hash: str, source: Any) -> dict[str, Any]:
    return {"features": json.dumps([]), "rows": rows, "id_hash": id_hash, "source": str(source), "sparse": 1}
