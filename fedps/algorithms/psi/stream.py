"""Bucketed streams of fixed-width values between Parquet on disk and the channel.

Executors do the cryptography over Parquet files partitioned by bucket, one
Spark task per bucket (:meth:`PsiRun.map_buckets`); the driver only moves
bytes: it reads one bucket at a time and sends it in batches, or receives a
bucket batch by batch and appends it to a Parquet file. So the driver and
each task hold at most one bucket, whatever the total number of ids: the
number of buckets is what bounds memory.

A stream is: ``<name>_counts`` (int64 per bucket), then for bucket ``b``
messages ``<name>`` at ``iteration=b, batch=k``, each a ``uint8`` array of
shape ``(rows, width)``, in the order of the sender's ``seq`` column.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fedps.algorithms.psi.params import PsiParams
from fedps.errors import CryptoError, DataError, ProtocolError
from fedps.messaging.tags import Message, Scope

log = logging.getLogger(__name__)

_FILE_SCHEMA = pa.schema([("seq", pa.int64()), ("value", pa.binary())])
#: The staged ids, in the work folder; :func:`read_bucket` gives them in private order.
IDS = "ids"
_EMPTY_TYPES = {"seq": pa.int64(), "id": pa.string()}


@dataclass(frozen=True)
class Stream:
    """A bucketed stream declared beside its protocol: name, direction, value width."""

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
class PsiRun:
    """One party's side of a PSI run: where its files live and whom it talks to."""

    spark: Any
    channel: Any
    scope: Scope
    params: PsiParams
    role: str
    peer: str
    peer_role: str
    work: Path
    #: Waits that span the peer's computation use this, not the channel's default.
    wait_s: float = 3600.0
    #: Values sent and received per stream, for the metrics.
    stats: dict[str, int] = field(default_factory=dict)
    #: Seconds per protocol step, for the metrics.
    timings: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time one protocol step (logged, and kept for the metrics)."""
        started = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - started, 3)
        log.info("psi/%s %s: %s took %.2fs", self.params.protocol, self.role, name, self.timings[name])

    def path(self, name: str) -> Path:
        return self.work / name

    def write(self, frame: Any, name: str) -> Path:
        """Write a frame with a ``bucket`` column as Parquet partitioned by bucket."""
        path = self.path(name)
        frame.write.mode("overwrite").partitionBy("bucket").parquet(str(path))
        return path

    def stage_ids(self, frame: Any) -> None:
        """Write the bucketed ids (``bucket, _order, id``) to ``ids/``, one folder per bucket."""
        with self.step("0_stage_ids"):
            self.write(frame, IDS)

    def read(self, name: str, schema: str) -> Any:
        return self.spark.read.schema(schema).parquet(str(self.path(name)))

    def map_buckets(self, fn: Callable[[int, dict[str, pa.Table]], pa.Table], sources: dict[str, list[str]],
                    target: str) -> int:
        """Run ``fn(bucket, tables)`` as one Spark task per bucket; returns the rows it wrote.

        ``sources`` maps the name of a bucketed folder under the work folder to
        the columns to read; each reaches ``fn`` as one table in stream order
        (:func:`read_bucket`). What ``fn`` returns is written to
        ``<target>/bucket=<b>/`` under a temporary name, then renamed, so a
        retried or speculative task never leaves half a file. A fedps error
        that ``fn`` raises on an executor is raised again here, with its
        class and message.
        One task per bucket keeps the work even across the executors, where
        Spark's own file splitting packs small files into few, uneven tasks.
        The executors read and write the work folder directly, so it must be
        on storage they share with the driver.
        """
        paths = {name: str(self.path(name)) for name in sources}
        out = str(self.path(target))

        def task(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            for batch in batches:
                for bucket in batch.column(0).to_pylist():
                    tables = {name: read_bucket(Path(paths[name]), bucket, columns)
                              for name, columns in sources.items()}
                    result = fn(bucket, tables)
                    folder = Path(out) / f"bucket={bucket}"
                    folder.mkdir(parents=True, exist_ok=True)
                    temporary = folder / f".part-0.{uuid.uuid4().hex}.tmp"
                    pq.write_table(result, temporary)
                    os.replace(temporary, folder / "part-0.parquet")
                    yield pa.RecordBatch.from_arrays([pa.array([result.num_rows], pa.int64())],
                                                     names=["rows"])

        buckets = self.params.buckets
        shutil.rmtree(out, ignore_errors=True)
        try:
            done = (self.spark.range(buckets, numPartitions=buckets)
                    .mapInArrow(task, "rows long").collect())
        except Exception as exc:
            raise _executor_error(exc) from None
        return sum(row["rows"] for row in done)

    def send(self, stream: Stream, name: str, column: str = "value") -> int:
        sent = send_stream(self.channel, self.scope, stream, self.path(name), column,
                           self.params.buckets, self.params.batch_size)
        self.stats[f"{stream.name}_sent"] = sent
        return sent

    def recv(self, stream: Stream, name: str) -> int:
        received = recv_stream(self.channel, self.scope, stream, self.path(name),
                               self.params.buckets, self.wait_s)
        self.stats[f"{stream.name}_received"] = received
        return received

    def cleanup(self) -> None:
        if not self.params.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)


def to_matrix(values: pa.Array | pa.ChunkedArray, width: int) -> np.ndarray:
    """A binary column of equal-width values as a ``(rows, width)`` uint8 array (no copy per row)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks else pa.array([], pa.binary())
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


_ERRORS = {cls.__name__: cls for cls in (DataError, ProtocolError, CryptoError)}
_ERROR_LINE = re.compile(r"fedps\.errors\.(\w+): (.+)")


def _executor_error(exc: Exception) -> Exception:
    """The fedps error an executor raised, rebuilt from Spark's wrapper (else ``exc`` itself)."""
    found = _ERROR_LINE.findall(str(exc))
    if found and found[-1][0] in _ERRORS:
        name, message = found[-1]
        return _ERRORS[name](f"{message} (in a Spark task)")
    return exc


def is_in(values: pa.Array | pa.ChunkedArray, others: pa.Array | pa.ChunkedArray, width: int) -> np.ndarray:
    """For each of ``values`` (``width`` bytes each), whether it is among ``others``."""
    theirs = set(to_matrix(others, width).view(f"V{width}").ravel().tolist())
    mine = to_matrix(values, width).view(f"V{width}").ravel().tolist()
    return np.fromiter((value in theirs for value in mine), dtype=bool, count=len(mine))


def bucket_counts(path: Path, buckets: int) -> np.ndarray:
    counts = np.zeros(buckets, dtype=np.int64)
    for bucket in range(buckets):
        for file in (path / f"bucket={bucket}").glob("*.parquet"):
            counts[bucket] += pq.ParquetFile(file).metadata.num_rows
    return counts


def read_bucket(path: Path, bucket: int, columns: list[str]) -> pa.Table:
    """One bucket's rows in stream order.

    Streams carry ``seq`` (which must run 0, 1, 2, ... without gaps); the
    staged ids (:meth:`PsiRun.stage_ids`) are put in their private order,
    ``_order`` then ``id``.
    """
    files = sorted((path / f"bucket={bucket}").glob("*.parquet"))
    if not files:
        return pa.table({c: pa.array([], _EMPTY_TYPES.get(c, pa.binary())) for c in columns})
    names = pq.ParquetFile(files[0]).schema_arrow.names
    keys = ["seq"] if "seq" in names else ["_order", "id"]
    table = pa.concat_tables(pq.read_table(f, columns=list(dict.fromkeys([*keys, *columns])))
                             for f in files)
    table = table.sort_by([(key, "ascending") for key in keys])
    if keys == ["seq"] and not np.array_equal(table.column("seq").to_numpy(), np.arange(table.num_rows)):
        raise DataError(f"bucket {bucket} of {path} does not hold seq 0..{table.num_rows - 1}")
    return table.select(columns)


def send_stream(channel: Any, scope: Scope, stream: Stream, path: Path, column: str,
                buckets: int, batch_size: int) -> int:
    """Send the ``column`` of every bucket under ``path`` in ``seq`` order; returns the rows sent."""
    counts = bucket_counts(path, buckets)
    channel.send(scope.tag(stream.counts.name), stream.counts.check(counts))
    for bucket in np.flatnonzero(counts):
        matrix = to_matrix(read_bucket(path, int(bucket), [column]).column(column), stream.width)
        for batch, start in enumerate(range(0, len(matrix), batch_size)):
            tag = scope.at(iteration=int(bucket), batch=batch).tag(stream.items.name)
            channel.send(tag, stream.items.check(matrix[start:start + batch_size]))
    channel.flush()
    return int(counts.sum())


def recv_stream(channel: Any, scope: Scope, stream: Stream, path: Path, buckets: int,
                wait_s: float) -> int:
    """Receive a stream into ``path/bucket=<b>/part-0.parquet`` (``seq``, ``value``); returns rows."""
    counts = stream.counts.check(channel.recv(scope.tag(stream.counts.name), timeout=wait_s))
    if counts.shape != (buckets,) or counts.dtype.kind not in "iu" or (counts < 0).any():
        raise ProtocolError(f"{stream.name}: the peer announced counts of shape {counts.shape}, "
                            f"expected {buckets} non-negative integers")
    for bucket in range(buckets):
        folder = path / f"bucket={bucket}"
        folder.mkdir(parents=True, exist_ok=True)
        with pq.ParquetWriter(folder / "part-0.parquet", _FILE_SCHEMA) as writer:
            got, batch = 0, 0
            while got < counts[bucket]:
                tag = scope.at(iteration=bucket, batch=batch).tag(stream.items.name)
                matrix = stream.items.check(channel.recv(tag, timeout=wait_s))
                if (matrix.dtype != np.uint8 or matrix.ndim != 2 or matrix.shape[1] != stream.width
                        or not 0 < len(matrix) <= counts[bucket] - got):
                    raise ProtocolError(f"{stream.name}: bucket {bucket} batch {batch} has shape "
                                        f"{matrix.shape} {matrix.dtype}, expected rows of "
                                        f"{stream.width} bytes")
                seq = pa.array(np.arange(got, got + len(matrix), dtype=np.int64))
                writer.write_batch(pa.RecordBatch.from_arrays([seq, from_matrix(matrix)],
                                                              schema=_FILE_SCHEMA))
                got, batch = got + len(matrix), batch + 1
    return int(counts.sum())


def check_same_counts(run: PsiRun, sent: str, returned: str) -> None:
    """ProtocolError unless the peer returned exactly as many values per bucket as were sent."""
    ours = bucket_counts(run.path(sent), run.params.buckets)
    back = bucket_counts(run.path(returned), run.params.buckets)
    if not np.array_equal(ours, back):
        bad = int(np.flatnonzero(ours != back)[0])
        raise ProtocolError(f"the peer returned {back[bad]} values for bucket {bad}, "
                            f"where {ours[bad]} were sent")
