"""Read a party's ids with Spark and put them in canonical form.

Canonical ids (DESIGN.md, "Contracts"): strings trimmed, integers as decimal
strings without leading zeros. A null or empty id and an id that occurs more
than once are reported, then refused or dropped as ``job.params`` says; all
of this happens before any cryptographic work. ``on_duplicate = "keep"``
keeps every row of a repeated id (one-to-many, as FATE's sample_id/match_id):
the cryptography sees each id once (``stream.BucketIO.ids``), the
output holds all its rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedps.algorithms.psi.params import PsiParams
from fedps.errors import DataError

log = logging.getLogger(__name__)

#: The canonical id column added to the party's rows.
ID = "_psi_id"
_INTEGER = r"^[+-]?[0-9]{1,38}$"
_INTEGRAL_TYPES = ("byte", "short", "int", "bigint", "tinyint", "smallint")


@dataclass(frozen=True)
class IdTable:
    """The party's rows with their canonical id in column ``_psi_id``."""

    frame: Any  # pyspark DataFrame
    id_type: str  # "string" or "integer"
    report: dict[str, Any] = field(default_factory=dict)
    #: Some ids name more than one row (``on_duplicate = "keep"``): all rows are staged and written,
    #: and the task serving a bucket gives the cryptography each id once (``BucketIO.ids``).
    repeated: bool = False


#: Text formats whose rows a PSI keeps as they are, in a column ``<format>_line`` (fedps.engine.formats).
TEXT_FORMATS = ("libsvm", "tag_value")


def input_format(params: PsiParams) -> str:
    if params.format != "auto":
        return params.format
    path = Path(params.input)
    if params.input.rstrip("/").endswith((".libsvm", ".svm")):
        return "libsvm"
    if params.input.endswith(".parquet") or (path.is_dir() and any(path.glob("*.parquet"))):
        return "parquet"
    return "csv"


def read_rows(spark: Any, params: PsiParams) -> Any:
    """The input as a DataFrame; a CSV's id column is read as text, its other columns typed."""
    fmt = input_format(params)
    if "://" not in params.input and not Path(params.input).exists():
        raise DataError(f"job.params.input {params.input} does not exist")
    if fmt in TEXT_FORMATS:
        return _text_rows(spark, params, fmt)
    if fmt == "parquet":
        frame = spark.read.parquet(params.input)
    else:
        reader = spark.read.option("header", True).option("inferSchema", True)
        schema = reader.csv(params.input).schema
        if params.id_column in schema.fieldNames():
            from pyspark.sql.types import StringType, StructField, StructType

            schema = StructType([StructField(f.name, StringType(), True) if f.name == params.id_column
                                 else f for f in schema.fields])
        frame = spark.read.option("header", True).schema(schema).csv(params.input)
    if params.id_column not in frame.columns:
        raise DataError(f"the id column {params.id_column!r} (job.params.id_column) is not in "
                        f"{params.input}; its columns are {', '.join(frame.columns)}")
    return frame


def _text_rows(spark: Any, params: PsiParams, fmt: str) -> Any:
    """A LibSVM or tag:value file as (id, line): the id is each line's first field; the line is kept whole.

    Empty lines, ``#`` comments and (tag:value) a header line whose first field is
    the id column's name are skipped. Training on the PSI output parses the lines.
    """
    from pyspark.sql import functions as F

    line = F.trim(F.col("value"))
    first = F.split(line, r"\s+").getItem(0) if fmt == "libsvm" else F.trim(F.split(line, ",").getItem(0))
    rows = spark.read.text(params.input).select(first.alias(params.id_column), line.alias(f"{fmt}_line"))
    keep = (F.length(F.col(f"{fmt}_line")) > 0) & ~F.col(f"{fmt}_line").startswith("#")
    if fmt == "tag_value":
        keep = keep & (F.col(params.id_column) != params.id_column)
    return rows.where(keep)


def canonical(frame: Any, params: PsiParams) -> tuple[Any, str]:
    """Add ``_psi_id`` (canonical text or null) and decide whether the ids are integers."""
    from pyspark.sql import functions as F

    column = F.col(f"`{params.id_column}`")
    kind = frame.schema[params.id_column].dataType.simpleString()
    if kind in _INTEGRAL_TYPES or (kind.startswith("decimal") and kind.endswith(",0)")):
        id_type = "string" if params.id_type == "string" else "integer"
        return frame.withColumn(ID, column.cast("decimal(38,0)").cast("string")), id_type
    if kind != "string":
        raise DataError(f"the id column {params.id_column!r} has type {kind}; ids must be integers "
                        f"or strings: cast it before the PSI")
    text = F.trim(column)
    text = F.when(text == "", F.lit(None)).otherwise(text)
    id_type = params.id_type
    if id_type != "string":
        bad = frame.select(text.alias("t")).where(F.col("t").isNotNull() & ~F.col("t").rlike(_INTEGER))
        example = bad.limit(1).collect()
        if example and id_type == "integer":
            raise DataError(f"job.params.id_type is 'integer' but the id {example[0]['t']!r} in "
                            f"{params.input} is not an integer of at most 38 digits")
        id_type = "string" if example else "integer"
    if id_type == "integer":
        text = text.cast("decimal(38,0)").cast("string")
    return frame.withColumn(ID, text), id_type


def load_ids(spark: Any, params: PsiParams) -> IdTable:
    """Read, canonicalise and clean the ids; DataError for refused nulls or duplicates."""
    from pyspark.sql import functions as F

    frame, id_type = canonical(read_rows(spark, params), params)
    per_id = frame.groupBy(ID).count()
    is_null = F.col(ID).isNull()
    repeated = ~is_null & (F.col("count") > 1)
    stats = per_id.agg(
        F.sum("count").alias("rows"),
        F.sum(F.when(is_null, F.col("count")).otherwise(0)).alias("nulls"),
        F.sum(F.when(repeated, 1).otherwise(0)).alias("ids"),
        F.sum(F.when(repeated, F.col("count")).otherwise(0)).alias("repeated_rows"),
    ).collect()[0]
    rows, nulls = int(stats["rows"] or 0), int(stats["nulls"] or 0)
    duplicate_ids, duplicate_rows = int(stats["ids"] or 0), int(stats["repeated_rows"] or 0)
    where = f"column {params.id_column!r} of {params.input}"
    if nulls and params.on_null == "refuse":
        raise DataError(f"{nulls} of {rows} rows have a null or empty id in {where}; fix the data or "
                        f"set job.params.on_null = \"drop\"")
    frame = frame.where(F.col(ID).isNotNull())
    if duplicate_ids and params.on_duplicate == "refuse":
        example = per_id.where(repeated).limit(1).collect()[0][ID]
        raise DataError(f"{duplicate_ids} ids occur more than once in {where} (for example {example!r}, "
                        f"{duplicate_rows} rows in all); fix the data or set "
                        f"job.params.on_duplicate = \"drop\" to drop every row of such ids, or "
                        f"\"keep\" to keep and match every row of such ids (one-to-many)")
    keep = params.on_duplicate == "keep"
    if duplicate_ids and not keep:
        frame = frame.join(per_id.where(repeated).select(ID), on=ID, how="left_anti")
    removed = 0 if keep else duplicate_rows
    kept_rows = rows - nulls - removed
    report = {"rows": rows, "null_ids": nulls, "duplicate_ids": duplicate_ids,
              "dropped_rows": nulls + removed,
              # distinct ids, what the cryptography sees (a kept repeated id counts once)
              "ids": kept_rows - (duplicate_rows - duplicate_ids if keep else 0),
              "kept_rows": kept_rows,
              # rows each rule removed (on_null, on_duplicate) and kept (on_duplicate = "keep")
              "removed": {"on_null": nulls, "on_duplicate": removed},
              "kept": {"on_duplicate": duplicate_rows if keep else 0}}
    if report["dropped_rows"]:
        log.warning("psi: dropped %d rows of %s (%d null ids, %d duplicated ids)",
                    report["dropped_rows"], params.input, nulls, 0 if keep else duplicate_ids)
    if keep and duplicate_ids:
        log.info("psi: kept %d rows of %d repeated ids of %s (on_duplicate = \"keep\": one-to-many)",
                 duplicate_rows, duplicate_ids, params.input)
    return IdTable(frame, id_type, report, repeated=keep and duplicate_ids > 0)
