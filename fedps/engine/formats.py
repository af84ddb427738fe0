"""Input formats as users have them, and one-pass column statistics for the preflight.

Formats (``format = ...`` where a setting names an input):

- ``csv`` (with a header), ``parquet`` (a file or a folder), ``psi`` (the
  output folder of a PSI), chosen by ``auto`` from the name;
- ``libsvm``: ``<id> [<label>] <feature id>:<value> ...`` per line;
- ``tag_value`` (FATE's sparse "tag:value" files): ``<id>[,<label>],<tag>:<value>;<tag>:<value>...``
  per line, an optional header line whose first field is the id column's name.
  A tag that is a non-negative integer is the feature id; any other tag is
  hashed (SHA-256, first 8 bytes, top bit cleared) into the same int64 space.
  A tag without ``:<value>`` has value 1.

Sparse rows are ``(_layout_id, label, keys, values, _layout_bad, _layout_nonfinite)``,
the columns the layout's LibSVM reader produces.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

from fedps.errors import ConfigError

SPARSE = ("libsvm", "tag_value")
#: Columns of PSI output that are not features.
NOT_FEATURES = ("psi_hash", "psi_index")
_SPARSE_SCHEMA = pa.schema([("_layout_id", pa.string()), ("label", pa.float64()), ("keys", pa.list_(pa.int64())),
                            ("values", pa.list_(pa.float64())), ("_layout_bad", pa.string()),
                            ("_layout_nonfinite", pa.int64())])
SPARSE_DDL = ("_layout_id string, label double, keys array<bigint>, values array<double>, "
              "_layout_bad string, _layout_nonfinite bigint")
_NUMERIC = ("tinyint", "smallint", "int", "bigint", "float", "double")


def tag_id(tag: str) -> int:
    """The int64 feature id of a tag: the integer itself, or a hash of the text."""
    if tag.isdigit() and len(tag) < 19:
        return int(tag)
    return int.from_bytes(hashlib.sha256(tag.encode()).digest()[:8], "big") >> 1


def tag_value_parser(has_label: bool, id_column: str,
                     pair_sep: str = ";", value_sep: str = ":") -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """mapInArrow over (line, file): ``<id>[,<label>],<tag>:<value>;...`` to the sparse columns."""

    def parse(line: str) -> tuple[str, float | None, list[int], list[float], str | None]:
        fields = line.split(",", 2 if has_label else 1)
        ident = fields[0].strip()
        label = None
        if has_label:
            if len(fields) < 2:
                return ident, None, [], [], "the line has an id but no label"
            try:
                label = float(fields[1])
            except ValueError:
                return ident, None, [], [], f"the label {fields[1][:20]!r} after the id is not a number"
        pairs = fields[1 + has_label] if len(fields) > 1 + has_label else ""
        keys, values = [], []
        for pair in filter(None, (p.strip() for p in pairs.split(pair_sep))):
            tag, sep, value = pair.partition(value_sep)
            try:
                values.append(float(value) if sep else 1.0)
            except ValueError:
                return ident, label, [], [], f"{pair[:40]!r} is not <tag>{value_sep}<value>"
            keys.append(tag_id(tag.strip()))
        return ident, label, keys, values, None

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            out: dict[str, list[Any]] = {name: [] for name in _SPARSE_SCHEMA.names}
            for line, file in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                text = (line or "").strip()
                if not text or text.startswith("#") or text.split(",", 1)[0].strip() == id_column:
                    continue
                ident, label, keys, values, bad = parse(text)
                for name, value in zip(_SPARSE_SCHEMA.names, (ident or None, label, keys, values)):
                    out[name].append(value)
                out["_layout_bad"].append(None if bad is None else f"{file}: line {text[:60]!r}: {bad}")
                out["_layout_nonfinite"].append(int(np.count_nonzero(~np.isfinite(values))) if values else 0)
            yield pa.RecordBatch.from_pydict(out, schema=_SPARSE_SCHEMA)

    return run


@dataclass(frozen=True)
class Table:
    """An input as Spark reads it: dense columns, or the sparse columns of a LibSVM/tag:value file."""

    frame: Any
    kind: str
    id_column: str
    sparse: bool
    has_label: bool

    @property
    def columns(self) -> list[str]:
        return list(self.frame.columns)


def open_table(spark: Any, path: str, fmt: str, id_column: str, label_column: str | None = None) -> Table:
    """Read ``path`` as ``fmt`` (DataError if it is missing or unreadable)."""
    from fedps.engine import layout

    fmt = fmt or "auto"
    if fmt not in (*layout.FORMATS, "tag_value"):
        raise ConfigError(f"format must be one of auto, csv, parquet, psi, libsvm, tag_value; got {fmt!r}")
    kind = fmt if fmt == "tag_value" else layout._detect(layout._location(path), fmt)
    if kind in SPARSE:
        if "://" not in path:
            from pathlib import Path

            if not Path(path).exists():
                from fedps.errors import DataError

                raise DataError(f"{path} does not exist")
        lines = spark.read.text(path).select("value", "_metadata.file_path")
        has_label = label_column is not None
        parser = (tag_value_parser(has_label, id_column) if kind == "tag_value"
                  else layout.libsvm_parser(has_label))
        return Table(lines.mapInArrow(parser, SPARSE_DDL), kind, "_layout_id", True, has_label)
    raw, _ = layout._read(spark, layout._location(path), kind, id_column)
    return Table(raw, kind, id_column, False, False)


def _q(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def column_stats(table: Table, label: str | None, features: list[str]) -> dict[str, Any]:
    """Rows, null ids, the label's values and each feature's type, missing values and range: one pass."""
    from pyspark.sql import functions as F

    def count(condition: Any) -> Any:
        return F.sum(F.when(condition, 1).otherwise(0))

    def first(condition: Any, value: Any) -> Any:
        return F.first(F.when(condition, value.cast("string")), ignorenulls=True)

    frame = table.frame
    ident = F.col(_q(table.id_column)).cast("string")
    aggs = [F.count(F.lit(1)).alias("rows"), count(ident.isNull() | (F.trim(ident) == "")).alias("null_ids")]
    if table.sparse:
        aggs += [count(F.col("_layout_bad").isNotNull()).alias("bad_lines"),
                 F.first("_layout_bad", ignorenulls=True).alias("bad_example"),
                 F.sum("_layout_nonfinite").alias("nonfinite")]
        label_col = F.col("label") if table.has_label and label else None
    else:
        label_col = F.col(_q(label)) if label else None
    if label_col is not None:
        number = F.expr(f"try_cast({_q(label) if not table.sparse else 'label'} AS DOUBLE)")
        aggs += [count(label_col.isNull()).alias("l_missing"),
                 count(label_col.isNotNull() & number.isNull()).alias("l_bad"),
                 first(label_col.isNotNull() & number.isNull(), label_col).alias("l_example"),
                 F.min(number).alias("l_min"), F.max(number).alias("l_max"),
                 count(number.isNotNull() & ~number.isin(0.0, 1.0)).alias("l_outside"),
                 count(number.isNotNull() & (number != F.floor(number))).alias("l_fraction"),
                 F.approx_count_distinct(number).alias("l_distinct")]
    types = dict(frame.dtypes)
    for i, name in enumerate(features):
        kind = types[name]
        column = F.col(_q(name))
        if kind in _NUMERIC or kind.startswith("decimal"):
            value = column.cast("double")
            aggs.append(count(value.isNull() | F.isnan(value) | (F.abs(value) == float("inf"))).alias(f"m{i}"))
        elif kind == "string":
            value = F.expr(f"try_cast({_q(name)} AS DOUBLE)")
            bad = column.isNotNull() & value.isNull()
            aggs += [count(bad).alias(f"b{i}"), first(bad, column).alias(f"e{i}"),
                     count(value.isNull() | F.isnan(value) | (F.abs(value) == float("inf"))).alias(f"m{i}")]
        else:
            aggs += [first(column.isNotNull(), column).alias(f"e{i}"), F.lit(1).alias(f"b{i}"), F.lit(0).alias(f"m{i}")]
            value = F.lit(None).cast("double")
        aggs += [F.min(value).alias(f"lo{i}"), F.max(value).alias(f"hi{i}")]
    row = frame.agg(*aggs).collect()[0].asDict()
    stats: dict[str, Any] = {"rows": int(row["rows"]), "null_ids": int(row["null_ids"] or 0),
                             "bad_lines": int(row.get("bad_lines") or 0), "bad_example": row.get("bad_example"),
                             "nonfinite": int(row.get("nonfinite") or 0), "features": {}}
    if label_col is not None:
        stats["label"] = {"missing": int(row["l_missing"] or 0), "non_numeric": int(row["l_bad"] or 0),
                          "example": row["l_example"], "min": row["l_min"], "max": row["l_max"],
                          "outside": int(row["l_outside"] or 0), "integral": not row["l_fraction"],
                          "distinct": int(row["l_distinct"] or 0)}
    for i, name in enumerate(features):
        stats["features"][name] = {"type": types[name], "non_numeric": int(row.get(f"b{i}") or 0),
                                   "example": row.get(f"e{i}"), "missing": int(row[f"m{i}"] or 0),
                                   "min": row[f"lo{i}"], "max": row[f"hi{i}"]}
    return stats


# ---------------------------------------------------------------- sparse rows through a PSI
#: A PSI of a LibSVM or tag:value input keeps each row's text in one of these columns.
LINE_COLUMNS = ("libsvm_line", "tag_value_line")
PSI_SPARSE_DDL = ("_layout_hash binary, label double, keys array<bigint>, values array<double>, "
                  "_layout_bad string, _layout_nonfinite bigint")


def psi_lines_parser(column: str, has_label: bool,
                     id_column: str) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """mapInArrow over (line, psi_hash) of PSI output: the sparse columns, keyed by the row's psi_hash."""
    from fedps.engine import layout

    inner = (tag_value_parser(has_label, id_column) if column == "tag_value_line"
             else layout.libsvm_parser(has_label))

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            lines, hashes = batch.column(0), batch.column(1)
            source = pa.RecordBatch.from_arrays([lines, pa.array(["PSI output"] * batch.num_rows)],
                                                names=["value", "file_path"])
            parsed = pa.Table.from_batches(list(inner(iter([source]))), schema=_SPARSE_SCHEMA)
            if parsed.num_rows != batch.num_rows:
                raise ValueError(f"{column}: {batch.num_rows - parsed.num_rows} rows of the PSI output are "
                                 "empty or comments")
            offset = 0
            for out in parsed.to_batches():
                yield pa.RecordBatch.from_arrays([hashes.slice(offset, out.num_rows), *out.columns[1:]],
                                                 names=["_layout_hash", *out.schema.names[1:]])
                offset += out.num_rows

    return run
