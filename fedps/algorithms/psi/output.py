"""The PSI's output, which training reads (DESIGN.md, "PSI output -> training input").

``<output>/`` (a local path or any URI :mod:`fedps.algorithms.psi.storage` reaches):

- ``rows/``: Parquet, the party's input rows whose id is in the intersection,
  with two extra columns: ``psi_hash`` (HMAC-SHA256 of the canonical id under
  the order key both parties derived during the PSI) and ``psi_index``
  (0, 1, 2, ... in ``psi_hash`` order). Row ``i`` of one party and row ``i``
  of the other are the same sample. With ``on_duplicate = "keep"`` a
  repeated id's rows all carry its ``psi_hash`` and ``psi_index``. File
  ``part-<b>.parquet`` holds bucket ``b``'s rows, sorted by ``psi_hash``; the
  buckets are ranges of that hash, so the files in name order are the
  rows in ``psi_index`` order.
- ``manifest.json``, written last: ``{"version": 3, "count": n, "digest": ...,
  "row_count": r, ...}``: ``count`` and ``digest`` are over the distinct ids
  (equal on both sides whatever their repeats), ``row_count`` is this party's
  own number of rows (never sent: :func:`check_manifest` compares only count
  and digest).

The rows are written where they are, never gathered in one process: the
staging step keeps each bucket's rows whole (:func:`~fedps.algorithms.psi.
buckets.staged`), and once every bucket is matched, one task per bucket
keeps the matched rows, sorts them by ``psi_hash``, numbers them from the
bucket's offset (the driver adds up the buckets' match counts) and writes
them, returning the bucket's count and the SHA-256 of its distinct hashes in
order. The digest (version 3) is SHA-256 over a domain tag, the number of
buckets, and for buckets ``0..B-1`` the 8-byte count and that SHA-256. It
depends only on the set of hashes and the agreed number of buckets, so both
parties get the same digest.

Training calls :func:`check_manifest` with its peer before anything else.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fedps.algorithms.psi.buckets import HASH
from fedps.algorithms.psi.ids import ID
from fedps.algorithms.psi.storage import Folder
from fedps.algorithms.psi.stream import IDS, MATCHED, staged_folder, to_matrix
from fedps.errors import DataError, ProtocolError
from fedps.messaging.tags import Message, Scope

log = logging.getLogger(__name__)

MANIFEST = Message("manifest", "either", "other", dict)
MANIFEST_VERSION = 3
#: Versions :func:`load_manifest` reads: a version-2 output (one sorted Spark write) still loads,
#: and a peer whose output has another version fails :func:`check_manifest` by name.
READABLE_VERSIONS = (2, 3)
INDEX = "psi_index"
ROWS = "rows"
_DOMAIN = b"fedps/psi/manifest/v3\0"
_EMPTY = hashlib.sha256(b"").hexdigest()


def combine(buckets: list[tuple[int, str]]) -> tuple[int, str]:
    """The count and the manifest digest from each bucket's ``(count, sha256 hex)``, in bucket order."""
    digest = hashlib.sha256(_DOMAIN + len(buckets).to_bytes(8, "big"))
    for count, hexdigest in buckets:
        digest.update(int(count).to_bytes(8, "big") + bytes.fromhex(hexdigest))
    return sum(int(count) for count, _ in buckets), digest.hexdigest()


def write_output(spark: Any, work: Folder, out: Folder, matched: list[int],
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write each bucket's intersection rows where they are, then the manifest.

    ``matched``: the number of intersection ids of each bucket (the
    protocols' ``matched`` counts). With ``spark`` the buckets are written by
    Spark tasks, one bucket at a time per task; without it (a small run) by
    this process.
    """
    rows = out.child(ROWS)
    rows.remove()
    offsets = np.concatenate([[0], np.cumsum(matched, dtype=np.int64)[:-1]]).tolist() if matched else []
    jobs = [(b, int(offsets[b])) for b in range(len(matched)) if matched[b]]

    def write(job: tuple[int, int]) -> tuple[int, int, int, str]:
        return write_bucket(work, rows, *job)

    if spark is None or not jobs:
        done = [write(job) for job in jobs]
    else:
        slices = min(len(jobs), 4 * int(spark.sparkContext.defaultParallelism))
        spark.sparkContext.setJobDescription(f"fedps psi output: {len(jobs)} buckets")
        done = spark.sparkContext.parallelize(jobs, slices).map(write).collect()
    found = {b: (ids, digest) for b, _, ids, digest in done}
    for b, count in enumerate(matched):
        if found.get(b, (0, _EMPTY))[0] != count:
            raise DataError(f"bucket {b}: wrote {found.get(b, (0,))[0]} intersection ids but matched {count}")
    if not jobs:   # no intersection: one empty file, so that the folder still has the rows' columns
        rows.write_table("part-00000.parquet", empty_rows(work))
    row_count = sum(r for _, r, _, _ in done)
    count, digest = combine([found.get(b, (0, _EMPTY)) for b in range(len(matched))])
    manifest = {"version": MANIFEST_VERSION, "count": count, "digest": digest, "buckets": len(matched),
                "hash": "HMAC-SHA256(order key, canonical id)", "rows": ROWS,
                **(extra or {}), "row_count": row_count}
    out.write_json("manifest.json", manifest)
    return manifest


def write_bucket(work: Folder, rows: Folder, bucket: int, offset: int) -> tuple[int, int, int, str]:
    """Bucket ``bucket``'s intersection rows, sorted by ``psi_hash`` and numbered from ``offset``;
    returns ``(bucket, rows written, distinct ids, SHA-256 hex of the distinct hashes in order)``."""
    staged = staged_folder(work, bucket).read_table()
    matched = work.child(MATCHED, f"bucket={bucket}").read_table(["id"])
    if staged is None or matched is None or not matched.num_rows:
        return bucket, 0, 0, _EMPTY
    keep = pc.is_in(staged.column(ID), value_set=matched.column("id").combine_chunks())
    chosen = staged.filter(keep).drop_columns([ID]).sort_by([(HASH, "ascending")])
    hashes = to_matrix(chosen.column(HASH), 32)
    first = _first_of_each(hashes)
    table = chosen.append_column(INDEX, pa.array(offset + np.cumsum(first, dtype=np.int64) - 1))
    rows.write_table(f"part-{bucket:05d}.parquet", spark_readable(table))
    distinct = np.ascontiguousarray(hashes[first])
    return bucket, table.num_rows, len(distinct), hashlib.sha256(distinct.tobytes()).hexdigest()


def empty_rows(work: Folder) -> pa.Table:
    """No rows, with the columns the output's rows would have (from any staged bucket)."""
    for folder in work.child(IDS).subfolders():
        schema = folder.schema()
        if schema is not None:
            fields = [f for f in schema if f.name != ID]
            return spark_readable(pa.schema([*fields, pa.field(INDEX, pa.int64())]).empty_table())
    return pa.schema([pa.field(HASH, pa.binary()), pa.field(INDEX, pa.int64())]).empty_table()


def spark_readable(table: pa.Table) -> pa.Table:
    """``table`` as Spark reads it back: without the staged files' schema metadata (Spark would take
    its stored schema, the staged columns, for the output's), and with every timestamp, nested ones
    too, in microseconds (Spark cannot read nanoseconds; the staged files' INT96 values, UTC
    instants, are read in microseconds already: :meth:`Folder.read_table`)."""
    schema = pa.schema([pa.field(f.name, _in_micros(f.type), f.nullable, f.metadata) for f in table.schema])
    # ns to us cannot overflow; it drops sub-microsecond digits, which Spark has no room for
    return (table if schema.equals(table.schema) else table.cast(schema, safe=False)).replace_schema_metadata(None)


def _in_micros(kind: pa.DataType) -> pa.DataType:
    """``kind`` with each nanosecond timestamp in it (in structs, lists and maps) in microseconds."""
    if pa.types.is_timestamp(kind):
        return pa.timestamp("us", tz=kind.tz or "UTC") if kind.unit == "ns" else kind
    if pa.types.is_struct(kind):
        return pa.struct([pa.field(f.name, _in_micros(f.type), f.nullable, f.metadata) for f in kind])
    if pa.types.is_map(kind):
        key, item = _in_micros(kind.key_type), _in_micros(kind.item_type)
        if key == kind.key_type and item == kind.item_type:
            return kind
        return pa.map_(key, pa.field(kind.item_field.name, item, kind.item_field.nullable), kind.keys_sorted)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        item = kind.value_field
        item = pa.field(item.name, _in_micros(item.type), item.nullable, item.metadata)
        return pa.list_(item) if pa.types.is_list(kind) else pa.large_list(item)
    return kind


def _first_of_each(hashes: np.ndarray) -> np.ndarray:
    """For rows of 32-byte hashes in order: whether each differs from the one before it."""
    if not len(hashes):
        return np.zeros(0, dtype=bool)
    new = np.empty(len(hashes), dtype=bool)
    new[0] = True
    new[1:] = np.any(hashes[1:] != hashes[:-1], axis=1)
    return new


def load_manifest(folder: str | Path | Folder) -> dict[str, Any]:
    folder = folder if isinstance(folder, Folder) else Folder.at(folder)
    path = f"{folder}/manifest.json"
    manifest = folder.read_json("manifest.json")
    if manifest is None:
        raise DataError(f"{path} does not exist: run the PSI first")
    if manifest.get("version") not in READABLE_VERSIONS:
        raise DataError(f"{path} has manifest version {manifest.get('version')!r}, "
                        f"expected one of {', '.join(map(str, READABLE_VERSIONS))}: rerun the PSI")
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
