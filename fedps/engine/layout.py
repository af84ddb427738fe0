"""Aligned, co-partitioned rows: the layout every vertical algorithm trains on.

Each party lays its rows out in ``N`` partitions so that partition ``p`` holds
the same ids, in the same order, on every party (DESIGN.md, "Executor
runtime"). Every row gets a 32-byte hash ``h``: the ``psi_hash`` column of PSI
output (HMAC-SHA256 under the key agreed in the PSI), or else SHA-256 of the
canonical id. Then

- ``row_key = int.from_bytes(h[:8], "big") >> 1`` (int64; the validation
  split hashes it, as ``hetero_lr.data.id_hash`` always did),
- ``partition = int.from_bytes(h[8:12], "big") % N``,
- rows are in ``row_key`` order inside a partition.

:func:`build_layout` reads the source with Spark and writes ``folder/part=<p>/``
(Parquet: ``row_key``, ``label``, then the dense feature columns or the sparse
``keys``/``values``) and, last, ``folder/manifest.json``; the driver only
collects per-partition counts and digests. A folder whose manifest was built
from the same source and settings is reused as it is: a resumed job does not
rebuild (delete the folder to force it). :func:`read_partition` reads one
partition on an executor with pyarrow alone and keeps it for the process.
:func:`check_layout` compares counts and digests with the peer before training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
from pyarrow.fs import FileSelector, FileType

from fedps.engine import formats
from fedps.errors import ConfigError, DataError, ProtocolError
from fedps.messaging.tags import Message, Scope

log = logging.getLogger(__name__)

LAYOUT_VERSION = 1
LAYOUT = Message("layout", "either", "other", dict)

#: Columns of PSI output (the contract of fedps.algorithms.psi.output).
PSI_HASH, PSI_INDEX = "psi_hash", "psi_index"
ROW_KEY, LABEL, PART, KEYS, VALUES = "row_key", "label", "part", "keys", "values"
FORMATS = ("auto", "csv", "parquet", "libsvm", "tag_value", "psi")   # tag_value: fedps.engine.formats
_MANIFEST = "manifest.json"
_ID, _HASH, _SLOT, _BAD, _NONFINITE = "_layout_id", "_layout_hash", "_layout_slot", "_layout_bad", "_layout_nonfinite"
_RESERVED = (ROW_KEY, LABEL, PART)
_INTEGER = re.compile(r"[+-]?\d+")
_EMPTY_DIGEST = hashlib.sha256(b"").hexdigest()


@dataclass(frozen=True)
class Layout:
    """Where a party's laid-out rows are and what each partition holds."""

    folder: str
    partitions: int
    counts: tuple[int, ...]
    digests: tuple[str, ...]
    feature_names: tuple[str, ...]
    sparse: bool
    has_label: bool

    @property
    def rows(self) -> int:
        return sum(self.counts)


@dataclass
class PartitionRows:
    """One partition's rows, in layout order (arrays are read-only: they are cached)."""

    row_keys: np.ndarray
    y: np.ndarray | None
    x: Any
    feature_keys: np.ndarray | None

    @property
    def nbytes(self) -> int:
        x = self.x
        size = x.nbytes if isinstance(x, np.ndarray) else x.data.nbytes + x.indices.nbytes + x.indptr.nbytes
        return size + self.row_keys.nbytes + sum(a.nbytes for a in (self.y, self.feature_keys) if a is not None)


# ---------------------------------------------------------------- row hashing
def canonical_id(value: str) -> str:
    """Trimmed text; a run of digits with optional sign becomes its integer's decimal form."""
    text = value.strip()
    return str(int(text)) if _INTEGER.fullmatch(text) else text


def id_digest(value: str) -> bytes:
    """The 32-byte row hash of an id outside PSI output: SHA-256 of the canonical id."""
    return hashlib.sha256(canonical_id(value).encode()).digest()


def _place(hashes: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(row_key, partition) of each 32-byte hash (a uint8 array of shape (rows, 32))."""
    row_keys = (hashes[:, :8].copy().view(">u8")[:, 0] >> np.uint64(1)).astype(np.int64)
    parts = (hashes[:, 8:12].copy().view(">u4")[:, 0] % np.uint32(n)).astype(np.int32)
    return row_keys, parts


def _hasher(n: int, slots: tuple[int, ...]) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """mapInArrow: replace ``_id``/``_hash`` by row_key, part and the shuffle slot of the part."""
    slot_of = np.asarray(slots, dtype=np.int64)

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            first = batch.column(0).to_pylist()
            if batch.schema.names[0] == _HASH:  # checked on the driver: 32 bytes each
                digests, valid = first, np.ones(len(first), dtype=bool)
            else:
                texts = [None if v is None else canonical_id(v) for v in first]
                valid = np.array([bool(t) for t in texts], dtype=bool)
                digests = [hashlib.sha256(t.encode()).digest() if t else bytes(32) for t in texts]
            raw = np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(len(digests), 32)
            row_keys, parts = _place(raw, n)
            columns = [pa.array(row_keys, mask=~valid), pa.array(parts), pa.array(slot_of[parts])]
            rest = batch.schema.names[1:]
            yield pa.RecordBatch.from_arrays(columns + [batch.column(i + 1) for i in range(len(rest))],
                                             names=[ROW_KEY, PART, _SLOT, *rest])

    return run


def _digester(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """mapInArrow over (row_key, part) sorted by part then row_key: count, digest, duplicates per part."""
    state: dict[int, list[Any]] = {}  # part -> [sha, rows, last key, last repeated, dup ids, dup rows, examples]
    for batch in batches:
        keys, parts = batch.column(0).to_numpy(), batch.column(1).to_numpy()
        for part in np.unique(parts):
            k = keys[parts == part]
            s = state.setdefault(int(part), [hashlib.sha256(), 0, None, False, 0, 0, []])
            s[0].update(k.astype(">i8").tobytes())
            s[1] += len(k)
            chain = k if s[2] is None else np.concatenate(([s[2]], k))
            same = chain[1:] == chain[:-1]
            starts = same & ~np.concatenate(([s[3] if s[2] is not None else False], same[:-1]))
            s[4] += int(starts.sum())
            s[5] += int(same.sum() + starts.sum())
            s[6].extend(chain[1:][starts][: 3 - len(s[6])].tolist())
            s[2], s[3] = k[-1], bool(same[-1]) if len(same) else s[3]
    if state:
        parts = sorted(state)
        yield pa.RecordBatch.from_pydict({
            "p": pa.array(parts, pa.int32()),
            "rows": pa.array([state[p][1] for p in parts], pa.int64()),
            "digest": pa.array([state[p][0].hexdigest() for p in parts], pa.string()),
            "dup_ids": pa.array([state[p][4] for p in parts], pa.int64()),
            "dup_rows": pa.array([state[p][5] for p in parts], pa.int64()),
            "examples": pa.array([state[p][6] for p in parts], pa.list_(pa.int64())),
        })


def libsvm_parser(has_label: bool) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """mapInArrow over (line, file): ``<id> [<label>] <feature id>:<value> ...`` to columns."""
    schema = pa.schema([(_ID, pa.string()), (LABEL, pa.float64()), (KEYS, pa.list_(pa.int64())),
                        (VALUES, pa.list_(pa.float64())), (_BAD, pa.string()), (_NONFINITE, pa.int64())])

    def parse_line(tokens: list[str]) -> tuple[float | None, list[int], list[float], str | None]:
        label = None
        if has_label:
            try:
                label = float(tokens[1]) if len(tokens) > 1 else None
            except ValueError:
                return None, [], [], f"the label {tokens[1]!r} after the id is not a number"
            if label is None:
                return None, [], [], "the line has an id but no label"
        keys, values = [], []
        for token in tokens[1 + has_label:]:
            key, sep, value = token.partition(":")
            try:
                keys.append(int(key))
                values.append(float(value) if sep else 1.0)
            except ValueError:
                return label, [], [], f"{token!r} is not <feature id>:<value>"
            if keys[-1] < 0:
                return label, [], [], f"{token!r} has a negative feature id"
        return label, keys, values, None

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            out: dict[str, list[Any]] = {name: [] for name in schema.names}
            for line, file in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                tokens = (line or "").split()
                if not tokens or tokens[0].startswith("#"):
                    continue
                label, keys, values, bad = parse_line(tokens)
                for name, value in zip(schema.names, (tokens[0], label, keys, values)):
                    out[name].append(value)
                out[_BAD].append(None if bad is None else f"{file}: line {line[:60]!r}: {bad}")
                out[_NONFINITE].append(int(np.count_nonzero(~np.isfinite(values))) if values else 0)
            yield pa.RecordBatch.from_pydict(out, schema=schema)

    return run


# ---------------------------------------------------------------- storage
def _filesystem(location: str) -> tuple[Any, str]:
    """A pyarrow filesystem and the path in it, for a local path or a Hadoop-style URI."""
    if "://" not in location:
        return _root("file:///")[0], os.path.abspath(location)
    parsed = urlparse(re.sub(r"^s3[an]://", "s3://", location))  # Hadoop's S3 connectors; pyarrow says s3://
    filesystem, base = _root(f"{parsed.scheme}://{parsed.netloc}/")
    return filesystem, base.rstrip("/") + "/" + parsed.path.lstrip("/")


@lru_cache(maxsize=16)
def _root(uri: str) -> tuple[Any, str]:
    """One filesystem object per scheme and host (or bucket) for the life of the process."""
    from pyarrow import fs

    try:
        return fs.FileSystem.from_uri(uri)
    except (pa.ArrowException, ValueError, OSError) as exc:
        raise DataError(f"cannot open {uri} with pyarrow: {exc}") from exc


def _join(folder: str, name: str) -> str:
    return f"{folder.rstrip('/')}/{name}"


def _read_text(location: str) -> str | None:
    filesystem, path = _filesystem(location)
    try:
        with filesystem.open_input_stream(path) as stream:
            return stream.read().decode()
    except FileNotFoundError:
        return None


def _write_text(location: str, text: str) -> None:
    """Write then move into place, so a reader sees the whole file or none."""
    filesystem, path = _filesystem(location)
    with filesystem.open_output_stream(path + ".tmp") as stream:
        stream.write(text.encode())
    filesystem.move(path + ".tmp", path)


def _remove(location: str) -> None:
    filesystem, path = _filesystem(location)
    if filesystem.get_file_info(path).type != FileType.NotFound:
        filesystem.delete_file(path)


def _detect(source: str, fmt: str) -> str:
    if fmt not in FORMATS:
        raise ConfigError(f"layout format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt != "auto":
        return fmt
    if source.rstrip("/").endswith((".libsvm", ".svm")):
        return "libsvm"
    try:
        filesystem, path = _filesystem(source)
        info = filesystem.get_file_info(path)
    except DataError:
        info = None  # pyarrow cannot reach it; Spark may: go by the name
    if info is not None and info.type == FileType.NotFound and "://" not in source:
        raise DataError(f"training data {source} does not exist")
    if info is not None and info.type == FileType.Directory:
        if _read_text(_join(source, _MANIFEST)) is not None:
            return "psi"
        names = [f.base_name for f in filesystem.get_file_info(FileSelector(path, recursive=True))]
        if any(name.endswith(".parquet") for name in names):
            return "parquet"
    return "parquet" if source.rstrip("/").endswith(".parquet") else "csv"


# ---------------------------------------------------------------- reading the source (driver plans, executors run)
_NUMERIC = ("tinyint", "smallint", "int", "bigint", "float", "double")


def _q(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _read(spark: Any, source: str, kind: str, id_column: str) -> tuple[Any, int | None]:
    """The source as Spark reads it (a CSV's id column as text), and PSI output's stated row count."""
    from pyspark.errors import AnalysisException

    try:
        if kind in ("libsvm", "tag_value"):
            return spark.read.text(source).select("value", "_metadata.file_path"), None
        if kind == "psi":
            manifest = json.loads(_read_text(_join(source, _MANIFEST)) or "{}")
            rows = spark.read.parquet(_join(source, str(manifest.get("rows", "rows"))))
            return rows, int(manifest["count"]) if "count" in manifest else None
        if kind == "parquet":
            return spark.read.parquet(source), None
        from pyspark.sql.types import StringType, StructField, StructType

        schema = spark.read.option("header", True).option("inferSchema", True).csv(source).schema
        text = StructType([StructField(f.name, StringType(), True) if f.name == id_column else f
                           for f in schema.fields])
        return spark.read.option("header", True).schema(text).csv(source), None
    except AnalysisException as exc:
        raise DataError(f"cannot read training data {source} as {kind}: {exc}") from None


def _numeric(raw: Any, name: str, kind: str, source: str) -> Any:
    """The feature column as double; text only if every value is a number (CSV "inf" reads as text)."""
    from pyspark.sql import functions as F

    if kind in _NUMERIC or kind.startswith("decimal"):
        return F.col(_q(name)).cast("double").alias(name)
    as_double = F.expr(f"try_cast({_q(name)} AS DOUBLE)")
    sample = []
    if kind == "string":
        bad = raw.where(F.col(_q(name)).isNotNull() & as_double.isNull())
        sample = [r[0] for r in bad.select(_q(name)).limit(1).collect()]
        if not sample:
            return as_double.alias(name)
    example = f", e.g. {sample[0]!r}" if sample else ""
    raise DataError(f"feature column {name!r} of {source} is not numeric (type {kind}{example}); "
                    "encode it as numbers first")


def _prepare(raw: Any, kind: str, source: str, id_column: str, label_column: str | None,
             feature_columns: tuple[str, ...]) -> tuple[Any, tuple[str, ...]]:
    """(first the id or hash, then label, then features) with the columns checked by name and type."""
    from pyspark.sql import functions as F

    lines = kind == "psi" and next((c for c in raw.columns if c in formats.LINE_COLUMNS), None)
    if kind in ("libsvm", "tag_value") or lines:   # sparse rows: LibSVM or FATE tag:value text
        parser = (formats.psi_lines_parser(lines, label_column is not None, id_column) if lines else
                  formats.tag_value_parser(label_column is not None, id_column) if kind == "tag_value"
                  else libsvm_parser(label_column is not None))
        if lines:
            raw = raw.select(lines, PSI_HASH)
        parsed = raw.mapInArrow(parser, (formats.PSI_SPARSE_DDL if lines else
                                f"{_ID} string, {LABEL} double, {KEYS} array<bigint>, {VALUES} array<double>, "
                                f"{_BAD} string, {_NONFINITE} bigint"))
        return parsed if label_column is not None else parsed.drop(LABEL), ()
    columns, types = raw.columns, dict(raw.dtypes)
    if kind == "psi":
        if PSI_HASH not in columns:
            raise DataError(f"{source} has a manifest but its rows have no {PSI_HASH!r} column; is it PSI output?")
        if raw.where(F.col(PSI_HASH).isNull() | (F.length(PSI_HASH) != 32)).limit(1).count():
            raise DataError(f"{source}: some {PSI_HASH} values are not 32 bytes; is this PSI output?")
        first, excluded = F.col(PSI_HASH).alias(_HASH), {PSI_HASH, PSI_INDEX, id_column}
    elif id_column not in columns:
        raise DataError(f"id column {id_column!r} is missing from {source}; its columns are {', '.join(columns)}")
    else:
        first, excluded = F.col(_q(id_column)).cast("string").alias(_ID), {id_column}
    selected = [first]
    if label_column is not None:
        if label_column not in columns:
            raise DataError(f"label column {label_column!r} is missing from {source}; "
                            f"its columns are {', '.join(columns)}")
        selected.append(F.expr(f"try_cast({_q(label_column)} AS DOUBLE)").alias(LABEL))
        excluded.add(label_column)
    names = tuple(feature_columns) or tuple(c for c in columns if c not in excluded)
    for name in names:
        if name not in columns:
            raise DataError(f"feature column {name!r} is missing from {source}; its columns are {', '.join(columns)}")
        if name in _RESERVED:
            raise DataError(f"feature column {name!r} of {source} has a name the layout reserves "
                            f"({', '.join(_RESERVED)}); rename it")
        selected.append(_numeric(raw, name, types[name], source))
    return raw.select(*selected), names


# ---------------------------------------------------------------- checks over the laid-out frame
def _check_rows(ordered: Any, frame: Any, raw: Any, source: str, id_column: str,
                label_column: str | None, names: tuple[str, ...], sparse: bool,
                labels: str = "binary", missing_ok: bool = False) -> int:
    """One aggregate over the rows: null ids, labels other than 0/1, bad feature values."""
    from pyspark.sql import functions as F

    def one(condition: Any) -> Any:
        return F.sum(F.when(condition, 1).otherwise(0))

    aggs = [F.count(F.lit(1)).alias("rows"), one(F.col(ROW_KEY).isNull()).alias("null_ids")]
    if label_column is not None:
        label = F.col(LABEL)
        good = label.isin(0.0, 1.0) if labels == "binary" else ~F.isnan(label) & (F.abs(label) != float("inf"))
        aggs.append(one(~F.coalesce(good, F.lit(False))).alias("bad_labels"))
    if sparse:
        aggs += [one(F.col(_BAD).isNotNull()).alias("bad_lines"), F.first(_BAD, ignorenulls=True).alias("example"),
                 F.sum(_NONFINITE).alias("nonfinite")]
    for i, name in enumerate(names):
        value = F.col(_q(name))
        bad = F.coalesce(F.abs(value) == float("inf"), F.lit(False)) if missing_ok else \
            value.isNull() | F.isnan(value) | (F.abs(value) == float("inf"))
        aggs.append(one(bad).alias(f"f{i}"))
    stats = ordered.agg(*aggs).collect()[0]
    rows = int(stats["rows"])
    if sparse and stats["bad_lines"]:
        raise DataError(f"{stats['bad_lines']} lines of {source} are malformed LibSVM "
                        f"(<id> [<label>] <feature id>:<value> ...); the first: {stats['example']}")
    if stats["null_ids"]:
        raise DataError(f"{stats['null_ids']} of {rows} rows have a null or empty id in column "
                        f"{id_column!r} of {source}")
    if label_column is not None and stats["bad_labels"]:
        column = LABEL if sparse else label_column
        table = frame if sparse else raw
        value = F.col(_q(column))
        found = (table.select(value.cast("string").alias("v"), F.expr(f"try_cast({_q(column)} AS DOUBLE)").alias("d"))
                 .distinct().orderBy("d", "v").limit(12).collect())
        shown = ", ".join("null" if r["v"] is None else r["v"] for r in found)
        wanted = "only 0 and 1" if labels == "binary" else "finite numbers"
        raise DataError(f"label column {label_column!r} of {source} must hold {wanted}, but "
                        f"{stats['bad_labels']} rows hold other values; values found: {shown}")
    bad = [(name, int(stats[f"f{i}"])) for i, name in enumerate(names) if stats[f"f{i}"]]
    if bad:
        more = f" (and {len(bad) - 1} more column{'s' * (len(bad) > 2)})" if len(bad) > 1 else ""
        raise DataError(f"feature column {bad[0][0]!r} of {source} has {bad[0][1]} missing or non-finite "
                        f"values (null, NaN or infinity){more}; impute them before training")
    if sparse and stats["nonfinite"]:
        raise DataError(f"{source} has {stats['nonfinite']} non-finite feature values (NaN or infinity); "
                        "fix them before training")
    return rows


def _summarise(ordered: Any, frame: Any, source: str, id_column: str, n: int) -> tuple[list[int], list[str]]:
    """Count and digest of every partition, computed by the executors; DataError for duplicate ids."""
    parts = ordered.select(ROW_KEY, PART).mapInArrow(
        _digester, "p int, rows bigint, digest string, dup_ids bigint, dup_rows bigint, examples array<bigint>"
    ).collect()
    counts, digests = [0] * n, [_EMPTY_DIGEST] * n
    for row in parts:
        counts[row["p"]], digests[row["p"]] = int(row["rows"]), row["digest"]
    dup_ids = sum(int(r["dup_ids"]) for r in parts)
    if dup_ids:
        keys = [k for r in parts for k in r["examples"]][:3]
        examples = _ids_of(frame, keys) if _ID in frame.columns else [f"row_key {k}" for k in keys]
        raise DataError(f"{dup_ids} ids occur more than once in column {id_column!r} of {source} "
                        f"({sum(int(r['dup_rows']) for r in parts)} rows in all; for example "
                        f"{', '.join(map(repr, examples))}); every id must name one row")
    return counts, digests


def _ids_of(frame: Any, keys: list[int]) -> list[str]:
    """The ids (as written) whose row key is one of ``keys``: only to quote them in an error."""
    wanted = set(keys)

    def find(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            ids = [v for v in batch.column(0).to_pylist()
                   if v and canonical_id(v) and int.from_bytes(id_digest(v)[:8], "big") >> 1 in wanted]
            yield pa.RecordBatch.from_pydict({"id": pa.array(ids, pa.string())})

    return sorted({r[0] for r in frame.select(_ID).mapInArrow(find, "id string").limit(20).collect()})


_SLOTS: dict[int, tuple[int, ...]] = {}


def _slots(spark: Any, n: int) -> tuple[int, ...]:
    """For each partition p, a value that Spark's hash partitioner sends to shuffle partition p.

    Repartitioning by the part number itself would put several parts in one
    write task and none in others; by these values each task writes one part.
    """
    if n not in _SLOTS:
        found = dict(spark.range(64 * n + 64).selectExpr(f"pmod(hash(id), {n}) AS s", "id")
                     .groupBy("s").min("id").collect())
        _SLOTS[n] = tuple(int(found.get(p, p)) for p in range(n))
    return _SLOTS[n]


# ---------------------------------------------------------------- build and load
def _location(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def build_layout(spark: Any, source: str, *, folder: str, partitions: int, id_column: str = "id",
                 label_column: str | None = None, feature_columns: tuple[str, ...] = (),
                 fmt: str = "auto", labels: str = "binary", missing_ok: bool = False) -> Layout:
    """Lay the rows of ``source`` out in ``partitions`` aligned partitions under ``folder``.

    ``folder`` belongs to the layout (it is overwritten). If it already holds a
    complete layout of the same source with the same settings, that layout is
    returned without reading the source again.
    """
    if not isinstance(partitions, int) or isinstance(partitions, bool) or partitions < 1:
        raise ConfigError(f"partitions must be an integer >= 1, got {partitions!r}")
    source, folder = _location(source), _location(folder).rstrip("/")
    if folder == source.rstrip("/") or source.startswith(folder + "/"):
        raise ConfigError(f"the layout folder {folder} would overwrite the training data {source}")
    kind = _detect(source, fmt)
    if kind in ("libsvm", "tag_value") and feature_columns:
        raise ConfigError("feature_columns name columns of a table; a LibSVM file keeps every feature it has")
    settings = {"source": source, "format": kind, "partitions": partitions, "id_column": id_column,
                "label_column": label_column, "feature_columns": list(feature_columns)}
    # labels = "number": any finite label (multi-class, regression); missing_ok: features may be missing (NaN)
    if labels not in ("binary", "number"):
        raise ConfigError(f"labels must be 'binary' or 'number', got {labels!r}")
    settings.update({k: v for k, v in (("labels", labels), ("missing_ok", missing_ok))
                     if v != {"labels": "binary", "missing_ok": False}[k]})
    found = _read_manifest(folder)
    if found is not None and found.get("version") == LAYOUT_VERSION and found.get("settings") == settings:
        log.info("layout: reusing %s (%d rows in %d partitions)", folder, sum(found["counts"]), partitions)
        return _to_layout(folder, found)
    _remove(_join(folder, _MANIFEST))
    manifest = _build(spark, source, kind, folder, partitions, id_column, label_column, tuple(feature_columns),
                      labels, missing_ok)
    manifest = {"version": LAYOUT_VERSION, **manifest, "source": source, "settings": settings}
    _write_text(_join(folder, _MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))
    log.info("layout: wrote %d rows of %s in %d partitions to %s", sum(manifest["counts"]), source, partitions, folder)
    return _to_layout(folder, manifest)


def _build(spark: Any, source: str, kind: str, folder: str, n: int, id_column: str,
           label_column: str | None, feature_columns: tuple[str, ...], labels: str = "binary",
           missing_ok: bool = False) -> dict[str, Any]:
    from pyspark import StorageLevel
    from pyspark.sql.types import IntegerType, LongType, StructField, StructType

    raw, stated = _read(spark, source, kind, id_column)
    frame, names = _prepare(raw, kind, source, id_column, label_column, feature_columns)
    sparse = KEYS in frame.columns
    schema = StructType([StructField(ROW_KEY, LongType()), StructField(PART, IntegerType()),
                         StructField(_SLOT, LongType()), *frame.schema.fields[1:]])
    hashed = frame.mapInArrow(_hasher(n, _slots(spark, n)), schema)
    ordered = hashed.repartition(n, _SLOT).sortWithinPartitions(PART, ROW_KEY).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        rows = _check_rows(ordered, frame, raw, source, id_column, label_column, names, sparse, labels, missing_ok)
        if stated is not None and stated != rows:
            raise DataError(f"{source} has {rows} rows but its PSI manifest says {stated}; rerun the PSI")
        counts, digests = _summarise(ordered, frame, source, id_column, n)
        ordered.drop(_SLOT, _BAD, _NONFINITE).write.mode("overwrite").partitionBy(PART).parquet(folder)
    finally:
        ordered.unpersist()
    return {"partitions": n, "counts": counts, "digests": digests, "feature_names": list(names),
            "sparse": sparse, "has_label": label_column is not None}


def _read_manifest(folder: str) -> dict[str, Any] | None:
    text = _read_text(_join(folder, _MANIFEST))
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise DataError(f"{_join(folder, _MANIFEST)} is not JSON ({exc}); delete the folder to rebuild") from None


def _to_layout(folder: str, manifest: dict[str, Any]) -> Layout:
    return Layout(folder=folder, partitions=int(manifest["partitions"]),
                  counts=tuple(int(c) for c in manifest["counts"]), digests=tuple(manifest["digests"]),
                  feature_names=tuple(manifest["feature_names"]), sparse=bool(manifest["sparse"]),
                  has_label=bool(manifest["has_label"]))


def load_layout(folder: str) -> Layout | None:
    """The layout in ``folder``, or None if no complete one is there (its manifest is written last)."""
    folder = _location(folder).rstrip("/")
    manifest = _read_manifest(folder)
    if manifest is None:
        return None
    if manifest.get("version") != LAYOUT_VERSION:
        raise DataError(f"{folder} holds a layout of version {manifest.get('version')!r}, this fedps reads "
                        f"{LAYOUT_VERSION}; delete the folder to rebuild it")
    return _to_layout(folder, manifest)


# ---------------------------------------------------------------- executor side
_CACHE: OrderedDict[tuple[str, int, str], PartitionRows] = OrderedDict()


def _cache_bytes() -> int:
    """Per-process cache budget; executors read ``FEDPS_LAYOUT_CACHE_MB`` (spark.executorEnv)."""
    return int(os.environ.get("FEDPS_LAYOUT_CACHE_MB", "4096")) << 20


def read_partition(layout: Layout, p: int) -> PartitionRows:
    """Partition ``p`` of ``layout`` (pyarrow only, no Spark); kept for this process's later calls."""
    if not 0 <= p < layout.partitions:
        raise ValueError(f"partition {p} is outside 0..{layout.partitions - 1}")
    key = (layout.folder, p, layout.digests[p])
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    rows = _load(layout, p)
    _CACHE[key] = rows
    total = sum(r.nbytes for r in _CACHE.values())
    while len(_CACHE) > 1 and total > _cache_bytes():
        total -= _CACHE.popitem(last=False)[1].nbytes
    return rows


def clear_cache() -> None:
    _CACHE.clear()


def _load(layout: Layout, p: int) -> PartitionRows:
    import pyarrow.dataset as ds

    filesystem, path = _filesystem(_join(layout.folder, f"{PART}={p}"))
    infos = filesystem.get_file_info(FileSelector(path, allow_not_found=True))
    files = sorted(i.path for i in infos if i.type == FileType.File and not i.base_name.startswith(("_", ".")))
    table = ds.dataset(files, filesystem=filesystem, format="parquet").to_table() if files else _empty(layout)
    count = table.num_rows
    order = np.argsort(table.column(ROW_KEY).to_numpy(), kind="stable")
    keys = np.ascontiguousarray(table.column(ROW_KEY).to_numpy()[order], dtype=np.int64)
    if count != layout.counts[p] or hashlib.sha256(keys.astype(">i8").tobytes()).hexdigest() != layout.digests[p]:
        raise DataError(f"{path} holds {count} rows that do not match its manifest ({layout.counts[p]} rows): "
                        "the folder changed after it was built; delete it and build the layout again")
    y = table.column(LABEL).to_numpy()[order].astype(np.float64) if layout.has_label else None
    feature_keys = None
    if layout.sparse:
        x, feature_keys = _sparse(table, count, order)
    else:
        x = np.empty((count, len(layout.feature_names)), dtype=np.float64)
        for j, name in enumerate(layout.feature_names):
            x[:, j] = table.column(name).to_numpy()[order]
    rows = PartitionRows(row_keys=keys, y=y, x=x, feature_keys=feature_keys)
    for array in (keys, y, feature_keys, *((x.data, x.indices, x.indptr) if layout.sparse else (x,))):
        if array is not None:
            array.flags.writeable = False
    return rows


def _empty(layout: Layout) -> pa.Table:
    """The columns of a partition that holds no rows (Spark writes no folder for it)."""
    fields = [(ROW_KEY, pa.int64())] + [(LABEL, pa.float64())] * layout.has_label
    if layout.sparse:
        fields += [(KEYS, pa.list_(pa.int64())), (VALUES, pa.list_(pa.float64()))]
    else:
        fields += [(name, pa.float64()) for name in layout.feature_names]
    return pa.schema(fields).empty_table()


def _sparse(table: pa.Table, count: int, order: np.ndarray) -> tuple[Any, np.ndarray]:
    from scipy import sparse

    keys, values = table.column(KEYS).combine_chunks(), table.column(VALUES).combine_chunks()
    indptr = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(keys.value_lengths().fill_null(0).to_numpy(), out=indptr[1:])
    feature_keys, columns = np.unique(keys.flatten().to_numpy(), return_inverse=True)
    x = sparse.csr_matrix((values.flatten().to_numpy().astype(np.float64), columns.ravel(), indptr),
                          shape=(count, len(feature_keys)))
    x = x[order]
    x.sum_duplicates()
    return x, feature_keys.astype(np.int64)


# ---------------------------------------------------------------- the check with the peer
def check_layout(channel: Any, scope: Scope, layout: Layout, peer: str, me: str) -> None:
    """Compare partition counts and digests with ``peer``; DataError naming the first difference.

    Both parties call it with the same scope before any cryptography.
    """
    mine = {"partitions": layout.partitions, "counts": list(layout.counts), "digests": list(layout.digests)}
    channel.send(scope.tag(LAYOUT.name), LAYOUT.check(mine))
    theirs = LAYOUT.check(channel.recv(scope.tag(LAYOUT.name)))
    try:
        n, counts, digests = int(theirs["partitions"]), list(theirs["counts"]), list(theirs["digests"])
    except (KeyError, TypeError, ValueError):
        raise ProtocolError(f"{peer} sent a malformed layout summary (keys {sorted(theirs)})") from None
    if len(counts) != n or len(digests) != n:
        raise ProtocolError(f"{peer} sent a layout summary of {n} partitions with {len(counts)} counts")
    advice = "both parties must lay out the output of one PSI run with the same partitions"
    if n != layout.partitions:
        raise _shared(f"{me} lays its rows out in {layout.partitions} partitions and {peer} in {n}: {advice}")
    for p, (a, b, da, db) in enumerate(zip(layout.counts, counts, layout.digests, digests)):
        if a != b:
            raise _shared(f"partition {p} holds {a} rows at {me} and {b} at {peer} ({layout.rows} and "
                          f"{sum(counts)} rows in all): {advice}")
        if da != db:
            raise _shared(f"partition {p} holds {a} rows at both {me} and {peer}, but not the same ids: {advice}")


def _shared(message: str) -> DataError:
    """A layout difference, told to the peer as it is: it holds only what both sides just swapped."""
    error = DataError(message)
    error.public = message  # type: ignore[attr-defined]  # the sentence a stopping party sends its peers
    return error
