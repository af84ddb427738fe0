"""The PSI's output, which training reads (DESIGN.md, "PSI output -> training input").

``<output>/`` (a local path or any URI :mod:`fedps.algorithms.psi.storage` reaches):

- ``rows/``: Parquet, the party's input rows whose id is in the intersection,
  with two extra columns: ``psi_hash`` (HMAC-SHA256 of the canonical id under
  the order key both parties derived during the PSI) and ``psi_index``
  (0, 1, 2, ... in ``psi_hash`` order). Row ``i`` of one party and row ``i``
  of the other are the same sample. With ``on_duplicate = "keep"`` a
  repeated id's rows all carry its ``psi_hash`` and ``psi_index``.
- ``manifest.json``, written last: ``{"version": 2, "count": n, "digest": ...,
  "row_count": r, ...}``: ``count`` and ``digest`` are over the distinct ids
  (equal on both sides whatever their repeats), ``row_count`` is this party's
  own number of rows (never sent: :func:`check_manifest` compares only count
  and digest).

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
                 extra: dict[str, Any] | None = None, repeated: bool = False) -> dict[str, Any]:
    """Write the intersection rows with Spark, the digest computed per range in the executors.

    ``repeated``: some ids name several rows (``on_duplicate = "keep"``); all
    are written, with the same ``psi_hash`` and ``psi_index``, and the
    manifest's count and digest are over the distinct ids.
    """
    from pyspark.sql import functions as F

    chosen = rows.join(matched_ids.withColumnRenamed("id", ID), on=ID, how="left_semi")
    hashed = chosen.withColumn(HASH, keyed_hash_column(order_key, F.col(ID))).drop(ID)
    ranged = hashed.withColumn(_RANGE, F.conv(F.hex(F.substring(HASH, 1, 1)), 16, 10).cast("int"))
    distinct = F.countDistinct(HASH) if repeated else F.count(F.lit(1))
    # the join and the keyed hash run once: the counts are taken from the persisted, arranged rows
    # (the partition count from the matched ids, a few bytes each, instead of a pass over the rows)
    parts = min(RANGES, max(int(spark.sparkContext.defaultParallelism), matched_ids.count() // 2_000_000 + 1))
    arranged = ranged.repartition(parts, _RANGE).sortWithinPartitions(_RANGE, HASH).persist()
    try:
        found_counts = arranged.groupBy(_RANGE).agg(F.count(F.lit(1)).alias("rows"),
                                                    distinct.alias("ids")).collect()
        counts = {int(r[_RANGE]): int(r["ids"]) for r in found_counts}
        row_count = sum(int(r["rows"]) for r in found_counts)
        offsets, total = {}, 0
        for r in range(RANGES):
            offsets[r], total = total, total + counts.get(r, 0)
        schema = f"{', '.join(f'`{f.name}` {f.dataType.simpleString()}' for f in hashed.schema.fields)}, " \
                 f"{INDEX} bigint"
        arranged.mapInArrow(_indexer(offsets), schema).write.mode("overwrite").parquet(
            folder.child("rows").spark_path)
        found = arranged.select(_RANGE, HASH).mapInArrow(_range_digests, "r int, n long, digest string").collect()
    finally:
        arranged.unpersist()
    ranges = {int(row["r"]): (int(row["n"]), row["digest"]) for row in found}
    return _finish(folder, ranges, total, {**(extra or {}), "row_count": row_count})


def write_output_local(rows: pa.Table, matched_ids: list[str], order_key: bytes, folder: Folder,
                       extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the intersection rows of a small run from this process (no Spark job)."""
    wanted = set(matched_ids)
    keep = np.fromiter((i in wanted for i in rows.column(ID).to_pylist()), dtype=bool, count=rows.num_rows)
    chosen = rows.filter(pa.array(keep))
    hashes = [keyed_hash(order_key, i) for i in chosen.column(ID).to_pylist()]
    order = sorted(range(len(hashes)), key=hashes.__getitem__)
    hashes = [hashes[i] for i in order]
    first = np.fromiter((i == 0 or hashes[i] != hashes[i - 1] for i in range(len(hashes))), dtype=bool,
                        count=len(hashes))
    table = chosen.take(pa.array(order, pa.int64())).drop_columns([ID])
    table = table.append_column(HASH, pa.array(hashes, pa.binary()))
    table = table.append_column(INDEX, pa.array(np.cumsum(first, dtype=np.int64) - 1))
    out = folder.child("rows")
    out.remove()
    out.write_table("part-00000.parquet", table)
    distinct = [h for h, new in zip(hashes, first) if new]
    ranges: dict[int, tuple[int, str]] = {}
    for r, group in itertools.groupby(distinct, key=lambda h: h[0]):
        members = list(group)
        ranges[r] = (len(members), range_digest(members))
    return _finish(folder, ranges, len(distinct), {**(extra or {}), "row_count": len(hashes)})


def _finish(folder: Folder, ranges: dict[int, tuple[int, str]], expected: int,
            extra: dict[str, Any] | None) -> dict[str, Any]:
    count, digest = combine(ranges)
    if count != expected:
        raise DataError(f"wrote {count} intersection ids but expected {expected}")
    manifest = {"version": MANIFEST_VERSION, "count": count, "digest": digest,
                "hash": "HMAC-SHA256(order key, canonical id)", "rows": "rows", **(extra or {})}
    folder.write_json("manifest.json", manifest)
    return manifest


def _first_of_each(hashes: np.ndarray, previous: bytes | None) -> np.ndarray:
    """For rows of 32-byte hashes in order: whether each differs from the one before it."""
    if not len(hashes):
        return np.zeros(0, dtype=bool)
    new = np.empty(len(hashes), dtype=bool)
    new[0] = previous is None or hashes[0].tobytes() != previous
    new[1:] = np.any(hashes[1:] != hashes[:-1], axis=1)
    return new


def _indexer(offsets: dict[int, int]) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """mapInArrow over rows sorted by range then hash: ``psi_index`` = the range's offset + the
    rank of the row's hash among the range's distinct hashes (rows of one id share it)."""
    from fedps.algorithms.psi.stream import to_matrix

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        reached: dict[int, tuple[int, bytes]] = {}   # range -> (next index, last hash)
        for batch in batches:
            ranges = batch.column(_RANGE).to_numpy()
            hashes = to_matrix(batch.column(HASH), 32)
            index = np.empty(len(ranges), dtype=np.int64)
            for r in np.unique(ranges):
                where = np.flatnonzero(ranges == r)
                start, last = reached.get(int(r), (offsets[int(r)], None))
                new = _first_of_each(hashes[where], last)
                index[where] = start + np.cumsum(new) - 1
                reached[int(r)] = (start + int(new.sum()), hashes[where[-1]].tobytes())
            names = [n for n in batch.schema.names if n != _RANGE]
            yield pa.RecordBatch.from_arrays([*(batch.column(n) for n in names), pa.array(index)],
                                             names=[*names, INDEX])
    return run


def _range_digests(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """mapInArrow over ``(range, psi_hash)`` sorted: each range's count and SHA-256 of its distinct hashes."""
    done: list[tuple[int, int, str]] = []
    current, count, digest, last = None, 0, hashlib.sha256(), None
    for batch in batches:
        for r, value in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
            if r != current:
                if current is not None:
                    done.append((current, count, digest.hexdigest()))
                current, count, digest, last = r, 0, hashlib.sha256(), None
            if value == last:   # another row of the same id
                continue
            digest.update(value)
            count, last = count + 1, value
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
