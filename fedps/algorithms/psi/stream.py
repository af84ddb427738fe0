"""One bucket's values between the work folder and the peer's task for the same bucket.

Bucket ``b`` of a party talks to bucket ``b`` of its peer through partition
``b`` of the PSI link (``fedps.messaging.partitioned``: sealed, chunked,
duplicates and replays dropped), from whichever process serves the bucket:
an executor task, or the driver for a small run. The driver's channel never
carries a blinded value.

A stream of bucket ``b`` is ``<name>_counts`` (an int64 array of one value:
the rows), then messages ``<name>`` at ``batch=k``, each a ``uint8`` array of
shape ``(rows, width)``, all at ``iteration=b``, in the sender's ``seq`` order.

:class:`BucketIO` also keeps each step's output in the work folder
(``<name>/bucket=<b>/part-0.parquet``, committed atomically) and reuses it
when the bucket is served again after a restart, so a resent value is the
same bytes as the first time (the peer drops it as a duplicate) and a
blinding factor is never drawn twice for one id.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fedps.algorithms.psi.buckets import BUCKET, HASH, private_order
from fedps.algorithms.psi.ids import ID
from fedps.algorithms.psi.storage import Folder
from fedps.errors import DataError, PeerError, ProtocolError
from fedps.messaging.tags import Message, Scope

#: The staged rows in the work folder, one folder per bucket (``_psi_bucket=<b>``), with each row's
#: ``psi_hash`` (:func:`fedps.algorithms.psi.buckets.staged`).
IDS = "ids"
#: Each bucket's intersection ids (column ``id``, each once), which every protocol saves last.
MATCHED = "matched"
_PART = "part-0.parquet"


def staged_folder(work: Folder, bucket: int) -> Folder:
    return work.child(IDS, f"{BUCKET}={bucket}")


@dataclass(frozen=True)
class Stream:
    """A per-bucket stream declared beside its protocol: name, direction, value width."""

    name: str
    sender: str
    receiver: str
    width: int

    @property
    def counts(self) -> Message:
        return Message(f"{self.name}_counts", self.sender, self.receiver, np.ndarray)

    @property
    def items(self) -> Message:
        return Message(self.name, self.sender, self.receiver, np.ndarray)


@dataclass
class BucketIO:
    """What the protocol's per-bucket function sees: its bucket's files and its link to the peer."""

    bucket: int
    work: Folder
    link: Any                      # messaging.partitioned.PartitionLink, open
    scope: Scope
    batch_size: int
    wait_s: float
    #: Rows sent and received per stream, and anything else the protocol counts.
    stats: dict[str, int] = field(default_factory=dict)
    #: Set by the driver when the peer aborted (a bucket served in the driver stops waiting).
    stop: Any = None
    #: This party's private key of the order its ids are sent in (:func:`buckets.private_order`).
    shuffle_key: bytes = b""

    def folder(self, name: str) -> Folder:
        return self.work.child(name, f"bucket={self.bucket}")

    def ids(self) -> pa.Table:
        """My ids of this bucket (column ``id``), each once, in their private order."""
        return self.in_private_order(self.staged_ids())

    def staged_ids(self) -> pa.Table:
        """My ids of this bucket with their ``psi_hash`` (columns ``_psi_id``, ``psi_hash``), each once."""
        table = staged_folder(self.work, self.bucket).read_table([ID, HASH])
        if table is None:
            return pa.table({ID: pa.array([], pa.string()), HASH: pa.array([], pa.binary())})
        if pc.count_distinct(table.column(ID)).as_py() < table.num_rows:   # on_duplicate = "keep"
            once = table.group_by([ID]).aggregate([(HASH, "min")])   # an id's rows share their hash
            table = pa.table({ID: once.column(ID), HASH: once.column(f"{HASH}_min")})
        return table

    def in_private_order(self, table: pa.Table) -> pa.Table:
        """The ids of ``table`` (:meth:`staged_ids` rows) as column ``id``, in their private order."""
        if not table.num_rows:
            return pa.table({"id": pa.array([], pa.string())})
        order = pa.array(private_order(self.shuffle_key, table.column(HASH).to_pylist()), pa.binary())
        return pa.table({"id": table.column(ID), "_order": order}).sort_by(
            [("_order", "ascending"), ("id", "ascending")]).select(["id"])

    def load(self, name: str) -> pa.Table | None:
        return self.folder(name).read_table()

    def save(self, name: str, table: pa.Table) -> pa.Table:
        self.folder(name).write_table(_PART, table)
        if name == MATCHED:   # the driver places each bucket's output rows from these counts
            self.stats[MATCHED] = table.num_rows
        return table

    def kept(self, name: str, make: Callable[[], pa.Table]) -> pa.Table:
        """The step's output from an earlier serving of this bucket, else ``make()`` saved."""
        table = self.load(name)
        return table if table is not None else self.save(name, make())

    @contextmanager
    def crypto(self) -> Iterator[None]:
        """Count this thread's CPU time in the block as ``crypto_ms`` (the protocol's public-key steps:
        the floor a run is measured against, at the machine's speed during the run)."""
        started = time.thread_time()
        try:
            yield
        finally:
            self.stats["crypto_ms"] = self.stats.get("crypto_ms", 0) + round(1000 * (time.thread_time() - started))

    def send(self, stream: Stream, values: pa.Array | pa.ChunkedArray) -> int:
        started = time.perf_counter()
        try:
            return self._send(stream, values)
        finally:   # sealing and handing the values to the producer
            self.stats["send_ms"] = self.stats.get("send_ms", 0) + round(1000 * (time.perf_counter() - started))

    def _send(self, stream: Stream, values: pa.Array | pa.ChunkedArray) -> int:
        matrix = to_matrix(values, stream.width)
        at = self.scope.at(iteration=self.bucket)
        p = self.bucket
        self.link.send(p, at.tag(stream.counts.name), stream.counts.check(np.array([len(matrix)], np.int64)))
        for batch, start in enumerate(range(0, len(matrix), self.batch_size)):
            chunk = np.ascontiguousarray(matrix[start:start + self.batch_size])
            self.link.send(p, at.at(batch=batch).tag(stream.items.name), stream.items.check(chunk))
        self.stats[f"{stream.name}_sent"] = len(matrix)
        return len(matrix)

    def recv(self, stream: Stream) -> pa.Array:
        at = self.scope.at(iteration=self.bucket)
        counts = stream.counts.check(self._recv(at.tag(stream.counts.name)))
        if counts.shape != (1,) or counts.dtype.kind not in "iu" or counts[0] < 0:
            raise ProtocolError(f"{stream.name}: the peer announced a count of shape {counts.shape} for "
                                f"bucket {self.bucket}, expected one non-negative integer")
        expected, got, parts, batch = int(counts[0]), 0, [], 0
        while got < expected:
            matrix = stream.items.check(self._recv(at.at(batch=batch).tag(stream.items.name)))
            if (matrix.dtype != np.uint8 or matrix.ndim != 2 or matrix.shape[1] != stream.width
                    or not 0 < len(matrix) <= expected - got):
                raise ProtocolError(f"{stream.name}: bucket {self.bucket} batch {batch} has shape "
                                    f"{matrix.shape} {matrix.dtype}, expected rows of {stream.width} bytes")
            parts.append(matrix)
            got, batch = got + len(matrix), batch + 1
        self.stats[f"{stream.name}_received"] = expected
        whole = np.concatenate(parts) if parts else np.empty((0, stream.width), np.uint8)
        return from_matrix(whole)


    def _recv(self, tag: Any) -> Any:
        started = time.perf_counter()
        try:
            return self._wait(tag)
        finally:   # the time this bucket waited for (and decoded) the peer's values
            self.stats["wait_ms"] = self.stats.get("wait_ms", 0) + round(1000 * (time.perf_counter() - started))

    def _wait(self, tag: Any) -> Any:
        if self.stop is None:
            return self.link.recv(self.bucket, tag, timeout=self.wait_s)
        deadline = time.monotonic() + self.wait_s
        while True:   # in slices, so that a peer's abort ends the wait (a timed-out slice loses nothing)
            if self.stop.is_set():
                raise PeerError(f"stopped waiting for {tag}: the peer stopped the job")
            try:
                return self.link.recv(self.bucket, tag, timeout=min(1.0, max(0.01, deadline - time.monotonic())))
            except PeerError:
                if time.monotonic() >= deadline:
                    raise


def with_seq(columns: dict[str, Any]) -> pa.Table:
    """A table of ``columns`` with ``seq`` = 0, 1, 2, ... (the stream order)."""
    rows = len(next(iter(columns.values())))
    return pa.table({"seq": np.arange(rows, dtype=np.int64), **columns})


def to_matrix(values: pa.Array | pa.ChunkedArray, width: int) -> np.ndarray:
    """A binary column of equal-width values as a ``(rows, width)`` uint8 array (no copy per row)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks else pa.array([], pa.binary())
    if values.type == pa.large_binary():
        values = values.cast(pa.binary())
    rows = len(values)
    if rows == 0:
        return np.empty((0, width), dtype=np.uint8)
    offsets = np.frombuffer(values.buffers()[1], dtype=np.int32)[values.offset:values.offset + rows + 1]
    data = np.frombuffer(values.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]
    if data.size != rows * width or values.null_count:
        raise DataError(f"expected {rows} values of {width} bytes")
    return data.reshape(rows, width)


def from_matrix(matrix: np.ndarray) -> pa.Array:
    """A ``(rows, width)`` uint8 array as an Arrow binary column."""
    rows, width = matrix.shape
    offsets = np.arange(0, (rows + 1) * width, width, dtype=np.int32)
    return pa.Array.from_buffers(pa.binary(), rows, [None, pa.py_buffer(offsets),
                                                     pa.py_buffer(np.ascontiguousarray(matrix))])


def is_in(values: pa.Array | pa.ChunkedArray, others: pa.Array | pa.ChunkedArray, width: int) -> np.ndarray:
    """For each of ``values`` (``width`` bytes each), whether it is among ``others`` (Arrow's hash
    table: about 3x a Python set's speed)."""
    mine, theirs = from_matrix(to_matrix(values, width)), from_matrix(to_matrix(others, width))
    return pc.is_in(mine, value_set=theirs).to_numpy(zero_copy_only=False)


def set_digest(values: pa.Array | pa.ChunkedArray, width: int) -> bytes:
    """SHA-256 of a set of ``width``-byte values (sorted, so the order they were kept in does not
    matter): what two parties compare to tell whether they kept the same view of a bucket."""
    ordered = np.sort(to_matrix(values, width).view(f"V{width}").ravel())
    return hashlib.sha256(b"fedps/psi/set\0" + width.to_bytes(2, "big") + ordered.tobytes()).digest()


_STAMPS = "stamps"


def check_stamp(io: BucketIO, cache: Folder) -> str:
    """An incremental PSI's bucket cache must be the one this job found when it first served the
    bucket, or the one it wrote since: a restart reuses what the first serving kept (digests,
    changes, values under the epoch's key), which hold only against those. Each rewrite of the
    cache leaves a fresh stamp (:func:`write_stamp`); returns the one this job writes."""
    found = (cache.child(_STAMPS).read_json(f"bucket={io.bucket}.json") or {}).get("stamp", "")
    stamps = io.kept("cache_stamp", lambda: pa.table({"before": [found], "after": [os.urandom(16).hex()]}))
    before, after = stamps.column("before")[0].as_py(), stamps.column("after")[0].as_py()
    if found not in (before, after):
        raise DataError(f"the incremental cache of bucket {io.bucket} ({cache}) changed since this job first "
                        f"served the bucket (another run with the same key_file, or a new epoch); rerun "
                        f"the PSI under a new job id")
    return after


def keep_cache(cache: Folder, bucket: int, stamp: str, **tables: pa.Table) -> None:
    """Rewrite the bucket's cache (``name=table``; uncompressed: points and tags do not compress,
    and it halves the time), then leave the stamp :func:`check_stamp` looks for."""
    for name, table in tables.items():
        cache.child(name, f"bucket={bucket}").write_table(_PART, table, compression="none")
    cache.child(_STAMPS).write_json(f"bucket={bucket}.json", {"stamp": stamp})


def cache_gone(bucket: int, cache: Folder) -> DataError:
    """The error of a bucket whose cache was there when this job first served it and is gone now."""
    return DataError(f"the incremental cache of bucket {bucket} ({cache}) is gone since this job first "
                     f"served the bucket; rerun the PSI under a new job id")


def plain(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One Arrow array (a received stream, or a table's column)."""
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks() if values.num_chunks else pa.array([], values.type)
    return values


_ERROR_LINE = re.compile(r"fedps\.errors\.(\w+): (.+)")


def executor_error(exc: Exception) -> Exception:
    """The fedps error an executor raised, rebuilt from Spark's wrapper (else ``exc`` itself)."""
    from fedps import errors

    found = _ERROR_LINE.findall(str(exc))
    kind = getattr(errors, found[-1][0], None) if found else None
    if isinstance(kind, type) and issubclass(kind, errors.FedpsError):
        return kind(f"{found[-1][1]} (in a Spark task)")
    return exc
