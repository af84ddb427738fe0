"""The PSI's output, which training reads (DESIGN.md, "PSI output -> training input").

``<output>/`` (a local path or any URI :mod:`fedps.algorithms.psi.storage` reaches):

- ``rows/``: Parquet, the party's input rows whose id is in the intersection,
  with two extra columns: ``psi_hash`` (HMAC-SHA256 of the canonical id under
  the order key both parties derived during the PSI) and ``psi_index``
  (0, 1, 2, ... in ``psi_hash`` order). Row ``i`` of one party and row ``i``
  of the other are the same sample.
- ``manifest.json``, written last: ``{"version": 2, "count": n, "digest": ..., ...}``.

The digest (version 2) is computed where the rows are, never by streaming
every hash through one process: the hashes fall into 256 *ranges* by their
first byte; each range's count and SHA-256 (of its ``psi_hash`` values in
order) is computed by the task that holds the range (all of a range is in one
task), and the digest is SHA-256 over a domain tag and, for ranges 0..255,
the 8-byte count and the range's SHA-256. It depends only on the set of
hashes, so both parties get the same digest whatever their partitioning.

Training calls :func:`check_manifest` with its peer before anything else.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

from fedps.algorithms.psi.buckets import keyed_hash, keyed_hash_column
from fedps.algorithms.psi.ids import ID
from fedps.errors import DataError, ProtocolError
from fedps.algorithms.psi.storage import Folder
from fedps.messaging.tags import Message, Scope

log = logging.getLogger(__name__)

MANIFEST = Message("manifest", "either", "other", dict)
MANIFEST_VERSION = 2
HASH, INDEX = "psi_hash", "psi_index"
RANGES = 256
_RANGE = "_psi_range"
_DOMAIN = b"fedps/psi/manifest/v2\0"
_EMPTY = hashlib.sha256(b"").hexdigest()


def range_digest(hashes: list[bytes]) -> str:
    return hashlib.sha256(b"".join(hashes)).hexdigest()


def combine(ranges: dict[int, tuple[int, str]]) -> tuple[int, str]:
    """The count and the manifest digest from each range's ``(count, sha256 hex)``."""
    digest = hashlib.sha256(_DOMAIN)
    total = 0
    for r in range(RANGES):
        count, hexdigest = ranges.get(r, (0, _EMPTY))
        digest.update(int(count).to_bytes(8, "big") + bytes.fromhex(hexdigest))
        total += int(count)
    return total, digest.hexdigest()


def write_output(spark: Any, rows: Any, matched_ids: Any, order_key: bytes, folder: Folder,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the intersection rows with Spark, the digest computed per range in the executors."""
    from pyspark.sql import functions as F

    chosen = rows.join(matched_ids.withColumnRenamed("id", ID), on=ID, how="left_semi")
    hashed = chosen.withColumn(HASH, keyed_hash_column(order_key, F.col(ID))).drop(ID)
    ranged = hashed.withColumn(_RANGE, F.conv(F.hex(F.substring(HASH, 1, 1)), 16, 10).cast("int"))
    counts = {int(r): int(n) for r, n in ranged.groupBy(_RANGE).count().collect()}
    offsets, total = {}, 0
    for r in range(RANGES):
        offsets[r], total = total, total + counts.get(r, 0)
    parts = min(RANGES, max(int(spark.sparkContext.defaultParallelism), total // 2_000_000 + 1))
    arranged = ranged.repartition(parts, _RANGE).sortWithinPartitions(_RANGE, HASH).persist()
    try:
        schema = f"{', '.join(f'`{f.name}` {f.dataType.simpleString()}' for f in hashed.schema.fields)}, " \
                 f"{INDEX} bigint"
        arranged.mapInArrow(_indexer(offsets), schema).write.mode("overwrite").parquet(
            folder.child("rows").spark_path)
        found = arranged.select(_RANGE, HASH).mapInArrow(_range_digests, "r int, n long, digest string").collect()
    finally:
        arranged.unpersist()
    ranges = {int(row["r"]): (int(row["n"]), row["digest"]) for row in found}
    return _finish(folder, ranges, total, extra)


def write_output_local(rows: pa.Table, matched_ids: list[str], order_key: bytes, folder: Folder,
                       extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the intersection rows of a small run from this process (no Spark job)."""
    wanted = set(matched_ids)
    keep = np.fromiter((i in wanted for i in rows.column(ID).to_pylist()), dtype=bool, count=rows.num_rows)
    chosen = rows.filter(pa.array(keep))
    hashes = [keyed_hash(order_key, i) for i in chosen.column(ID).to_pylist()]
    order = sorted(range(len(hashes)), key=hashes.__getitem__)
    hashes = [hashes[i] for i in order]
    table = chosen.take(pa.array(order, pa.int64())).drop_columns([ID])
    table = table.append_column(HASH, pa.array(hashes, pa.binary()))
    table = table.append_column(INDEX, pa.array(np.arange(len(hashes), dtype=np.int64)))
    out = folder.child("rows")
    out.remove()
    out.write_table("part-00000.parquet", table)
    ranges: dict[int, tuple[int, str]] = {}
    for r, group in itertools.groupby(hashes, key=lambda h: h[0]):
        members = list(group)
        ranges[r] = (len(members), range_digest(members))
    return _finish(folder, ranges, len(hashes), extra)


def _finish(folder: Folder, ranges: dict[int, tuple[int, str]], expected: int,
            extra: dict[str, Any] | None) -> dict[str, Any]:
    count, digest = combine(ranges)
    if count != expected:
        raise DataError(f"wrote {count} intersection rows but expected {expected}")
    manifest = {"version": MANIFEST_VERSION, "count": count, "digest": digest,
                "hash": "HMAC-SHA256(order key, canonical id)", "rows": "rows", **(extra or {})}
    folder.write_json("manifest.json", manifest)
    return manifest


def _indexer(offsets: dict[int, int]) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """mapInArrow over rows sorted by range then hash: ``psi_index`` = the range's offset + rank."""
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        reached: dict[int, int] = {}
        for batch in batches:
            ranges = batch.column(_RANGE).to_numpy()
            index = np.empty(len(ranges), dtype=np.int64)
            for r in np.unique(ranges):
                where = np.flatnonzero(ranges == r)
                start = reached.get(int(r), offsets[int(r)])
                index[where] = np.arange(start, start + len(where))
                reached[int(r)] = start + len(where)
            names = [n for n in batch.schema.names if n != _RANGE]
            yield pa.RecordBatch.from_arrays([*(batch.column(n) for n in names), pa.array(index)],
                                             names=[*names, INDEX])
    return run


def _range_digests(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """mapInArrow over ``(range, psi_hash)`` sorted: each range's count and SHA-256."""
    done: list[tuple[int, int, str]] = []
    current, count, digest = None, 0, hashlib.sha256()
    for batch in batches:
        for r, value in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
            if r != current:
                if current is not None:
                    done.append((current, count, digest.hexdigest()))
                current, count, digest = r, 0, hashlib.sha256()
            digest.update(value)
            count += 1
    if current is not None:
        done.append((current, count, digest.hexdigest()))
    yield pa.RecordBatch.from_arrays([pa.array([d[0] for d in done], pa.int32()),
                                      pa.array([d[1] for d in done], pa.int64()),
                                      pa.array([d[2] for d in done], pa.string())], names=["r", "n", "digest"])


def load_manifest(folder: str | Path | Folder) -> dict[str, Any]:
    folder = folder if isinstance(folder, Folder) else Folder.at(folder)
    path = f"{folder}/manifest.json"
    manifest = folder.read_json("manifest.json")
    if manifest is None:
        raise DataError(f"{path} does not exist: run the PSI first")
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
