"""Per-party quantile bins, computed by the party's executors over its layout partitions.

Each task summarises its partition per feature (:func:`sketch`: the distinct
values with their counts when there are few, else ``SKETCH`` evenly ranked
quantiles with the weight between them); the driver merges the summaries into
at most ``max_bin - 1`` cut points per feature (:func:`merge`). Bin ``b`` of a
feature holds the values ``cuts[b-1] < x <= cuts[b]``; values above the last
cut are in bin ``len(cuts)``; a missing value (NaN) is in bin ``max_bin``,
the same last bin for every feature, whose rows go to a side learned per split.
A feature declared categorical (``job.params.categorical``) has one bin per
category instead: ``cuts`` lists its categories in increasing order and bin
``b`` holds the value ``cuts[b]`` (at most ``max_bin`` categories). The cut
points and categories never leave the party.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedps.errors import ConfigError, DataError

#: Quantile points each partition keeps per feature.
SKETCH = 1024


@dataclass(frozen=True)
class Bins:
    """The bins of one party's features."""

    names: tuple[str, ...]
    cuts: tuple[np.ndarray, ...]       # per feature, increasing cut points
    has_missing: tuple[bool, ...]      # per feature: a missing value seen in the training rows
    max_bin: int
    categorical: tuple[bool, ...] = ()  # per feature: one bin per category (empty: none)

    @property
    def missing_bin(self) -> int:
        return self.max_bin

    def is_categorical(self, j: int) -> bool:
        return bool(self.categorical) and self.categorical[j]

    def present_bins(self, j: int) -> int:
        """Bins of feature ``j``'s present values: one per category, or one more than its cut points."""
        return len(self.cuts[j]) + (0 if self.is_categorical(j) else 1)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Bin index of every value (rows x features, uint8); missing values in bin ``max_bin``."""
        out = np.empty(x.shape, dtype=np.uint8)
        for j, cuts in enumerate(self.cuts):
            column = x[:, j]
            b = np.searchsorted(cuts, column, side="left")
            if self.is_categorical(j):   # a value that is no category of the training rows counts as missing
                b = np.where((b < len(cuts)) & (cuts[np.minimum(b, len(cuts) - 1)] == column), b, self.max_bin)
            b[np.isnan(column)] = self.max_bin
            out[:, j] = b
        return out

    def to_json(self) -> dict:
        out = {"names": list(self.names), "cuts": [c.tolist() for c in self.cuts],
               "has_missing": list(self.has_missing), "max_bin": self.max_bin}
        if any(self.categorical):
            out["categorical"] = list(self.categorical)
        return out

    @classmethod
    def from_json(cls, data: dict) -> Bins:
        return cls(tuple(data["names"]), tuple(np.asarray(c, dtype=np.float64) for c in data["cuts"]),
                   tuple(bool(m) for m in data["has_missing"]), int(data["max_bin"]),
                   tuple(bool(c) for c in data.get("categorical", ())))


def sketch(x: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Per feature of a partition: (values, weights, missing count)."""
    out = []
    for j in range(x.shape[1]):
        column = x[:, j]
        present = np.sort(column[~np.isnan(column)])
        missing = len(column) - len(present)
        values, counts = np.unique(present, return_counts=True)
        if len(values) > SKETCH:
            ranks = np.linspace(0, len(present) - 1, SKETCH).round().astype(np.int64)
            values = present[ranks]
            counts = np.diff(np.r_[-1, ranks]).astype(np.int64)
        out.append((values, counts.astype(np.float64), missing))
    return out


def merge(parts: list[list[tuple[np.ndarray, np.ndarray, int]]], names: tuple[str, ...], max_bin: int,
          rows: int, party: str = "", categorical: tuple[str, ...] = ()) -> Bins:
    """Cut points (categories) of every feature from the partitions' sketches; DataError for useless features."""
    if max_bin > rows:
        raise ConfigError(f"job.params.max_bin = {max_bin} is more bins than the {rows} training rows; "
                          "lower max_bin")
    unknown = sorted(set(categorical) - set(names))
    if unknown:
        raise ConfigError(f"job.params.categorical names {unknown[0]!r}, which is not a feature of this party's "
                          f"data ({', '.join(names[:8])}{', ...' if len(names) > 8 else ''})")
    cuts, has_missing = [], []
    who = f" of {party}" if party else ""
    for j, name in enumerate(names):
        values = np.concatenate([p[j][0] for p in parts]) if parts else np.zeros(0)
        weights = np.concatenate([p[j][1] for p in parts]) if parts else np.zeros(0)
        missing = sum(p[j][2] for p in parts)
        if len(values) == 0:
            raise DataError(f"feature {name!r}{who} is missing in every row; drop it (job.params.feature_columns)")
        order = np.argsort(values, kind="stable")
        values, weights = values[order], weights[order]
        distinct = np.unique(values)
        if len(distinct) == 1:
            raise DataError(f"feature {name!r}{who} is constant ({distinct[0]:g}) in every row; "
                            "drop it (job.params.feature_columns)")
        if name in categorical:
            if len(distinct) > max_bin:
                raise DataError(f"categorical feature {name!r}{who} has more than max_bin = {max_bin} categories; "
                                "raise job.params.max_bin or merge rare categories")
            feature_cuts = distinct
        elif len(distinct) <= max_bin:
            feature_cuts = distinct[:-1]
        else:
            cumulative = np.cumsum(weights)
            targets = cumulative[-1] * np.arange(1, max_bin) / max_bin
            at = np.minimum(np.searchsorted(cumulative, targets, side="left"), len(values) - 1)
            feature_cuts = np.unique(values[at])
            feature_cuts = feature_cuts[feature_cuts < distinct[-1]]
        cuts.append(np.ascontiguousarray(feature_cuts, dtype=np.float64))
        has_missing.append(bool(missing))
    flags = tuple(name in categorical for name in names) if categorical else ()
    return Bins(tuple(names), tuple(cuts), tuple(has_missing), max_bin, flags)


def compute_bins(spark, layout, max_bin: int, party: str = "", rows: np.ndarray | None = None,
                 categorical: tuple[str, ...] = ()) -> Bins:
    """The bins of ``layout``'s features, sketched by one Spark task per partition."""
    from fedps.engine.layout import read_partition

    if layout.sparse:
        raise ConfigError("SecureBoost needs dense features (a table); sparse LibSVM input is not yet supported")

    def one(p: int):
        return sketch(np.asarray(read_partition(layout, p).x, dtype=np.float64))

    n = layout.partitions
    parts = spark.sparkContext.parallelize(range(n), n).map(one).collect()
    return merge(parts, tuple(layout.feature_names), max_bin, layout.rows, party, categorical)
