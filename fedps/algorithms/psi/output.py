"""The PSI's output, which training reads (DESIGN.md, "PSI output -> training input").

``<output_dir>/<params.output>/``:

- ``rows/``: Parquet, the party's input rows whose id is in the intersection,
  with two extra columns: ``psi_hash`` (HMAC-SHA256 of the canonical id under
  the order key both parties derived during the PSI) and ``psi_index``
  (0, 1, 2, ... in ``psi_hash`` order). Row ``i`` of one party and row ``i``
  of the other are the same sample.
- ``manifest.json``: ``{"version": 1, "count": n, "digest": sha256 hex of the
  concatenated psi_hash values in index order, ...}``.

Training calls :func:`check_manifest` with its peer before anything else.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fedps.algorithms.psi.buckets import keyed_hash_column
from fedps.algorithms.psi.ids import ID
from fedps.errors import DataError, ProtocolError
from fedps.messaging.tags import Message, Scope

log = logging.getLogger(__name__)

MANIFEST = Message("manifest", "either", "other", dict)
MANIFEST_VERSION = 1
HASH, INDEX = "psi_hash", "psi_index"


def write_output(spark: Any, rows: Any, matched_ids: Any, order_key: bytes, folder: Path,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the intersection rows and the manifest; returns the manifest."""
    from pyspark import TaskContext
    from pyspark.sql import functions as F
    from pyspark.sql.types import LongType, StructField, StructType

    chosen = rows.join(matched_ids.withColumnRenamed("id", ID), on=ID, how="left_semi")
    hashed = chosen.withColumn(HASH, keyed_hash_column(order_key, F.col(ID)))
    ordered = hashed.orderBy(HASH).persist()
    try:
        per_part = dict(ordered.groupBy(F.spark_partition_id().alias("p")).count().collect())
        offsets, total = {}, 0
        for part in sorted(per_part):
            offsets[part], total = total, total + per_part[part]

        def add_index(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            start = offsets.get(TaskContext.get().partitionId(), 0)
            for batch in batches:
                index = pa.array(np.arange(start, start + batch.num_rows, dtype=np.int64))
                start += batch.num_rows
                yield batch.append_column(INDEX, index)

        indexed_schema = StructType([*hashed.schema.fields, StructField(INDEX, LongType(), False)])
        final = ordered.mapInArrow(add_index, indexed_schema).drop(ID)
        final.write.mode("overwrite").parquet(str(folder / "rows"))
    finally:
        ordered.unpersist()
    count, digest = _digest(folder / "rows")
    if count != total:
        raise DataError(f"wrote {count} intersection rows but expected {total}")
    manifest = {"version": MANIFEST_VERSION, "count": count, "digest": digest,
                "hash": "HMAC-SHA256(order key, canonical id)", "rows": "rows", **(extra or {})}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def _digest(rows: Path) -> tuple[int, str]:
    """Stream ``psi_hash`` in index order (file by file) and check the index is dense."""
    files = []
    for file in rows.glob("*.parquet"):
        first = next(pq.ParquetFile(file).iter_batches(batch_size=1, columns=[INDEX]), None)
        if first is not None and first.num_rows:
            files.append((first.column(0)[0].as_py(), file))
    digest, expected = hashlib.sha256(), 0
    for _, file in sorted(files):
        for batch in pq.ParquetFile(file).iter_batches(columns=[INDEX, HASH]):
            index = batch.column(0).to_numpy()
            if not np.array_equal(index, np.arange(expected, expected + len(index))):
                raise DataError(f"{rows}: psi_index is not dense near row {expected}")
            for value in batch.column(1).to_pylist():
                digest.update(value)
            expected += len(index)
    return expected, digest.hexdigest()


def load_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path} does not exist: run the PSI first") from None
    if manifest.get("version") != MANIFEST_VERSION:
        raise DataError(f"{path} has manifest version {manifest.get('version')!r}, "
                        f"expected {MANIFEST_VERSION}")
    return manifest


def check_manifest(channel: Any, scope: Scope, manifest: dict[str, Any] | str | Path) -> dict[str, Any]:
    """Compare this party's PSI manifest with the peer's; ProtocolError if they differ.

    ``manifest`` is a manifest or the PSI output folder. Both parties call it
    with the same scope; it returns the manifest.
    """
    if not isinstance(manifest, dict):
        manifest = load_manifest(manifest)
    mine = {"count": int(manifest["count"]), "digest": str(manifest["digest"])}
    channel.send(scope.tag(MANIFEST.name), MANIFEST.check(mine))
    theirs = MANIFEST.check(channel.recv(scope.tag(MANIFEST.name)))
    if theirs != mine:
        raise ProtocolError(f"the peer's PSI result differs from ours: it has {theirs.get('count')} "
                            f"rows with digest {str(theirs.get('digest'))[:16]}..., we have "
                            f"{mine['count']} with {mine['digest'][:16]}...; rerun the PSI")
    return manifest
