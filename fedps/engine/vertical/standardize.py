"""Per-party feature standardisation, computed in the party's own executors.

Each party standardises its own dense feature columns with the mean and
standard deviation of its own training rows: its tasks sum ``count``,
``Σx`` and ``Σx²`` per column over their partitions (:func:`moments`), its
driver adds the per-task sums (one vector per statistic, the same aggregate
size as a batch gradient), and the statistics never leave the party. A
column with no spread keeps scale 1. Optionally every standardised row is
then clipped to an L2 norm (label differential privacy bounds a row's
influence with it). The same transform is stored with the model, so
prediction applies it exactly (clipping is not linear, so it is not folded
into the weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from fedps.engine.vertical.privacy import clip_rows


@dataclass(frozen=True)
class Moments:
    """Column sums of some rows: what a task hands its driver."""

    count: int
    total: np.ndarray
    squares: np.ndarray

    def __add__(self, other: Moments) -> Moments:
        return Moments(self.count + other.count, self.total + other.total, self.squares + other.squares)


def moments(x: Any, features: int) -> Moments:
    """Column sums of ``x`` (dense rows)."""
    x = np.asarray(x, dtype=np.float64)
    if x.shape[0] == 0:
        return Moments(0, np.zeros(features), np.zeros(features))
    return Moments(int(x.shape[0]), x.sum(axis=0), (x * x).sum(axis=0))


def merge(parts: Iterable[Moments | None], features: int) -> Moments:
    out = Moments(0, np.zeros(features), np.zeros(features))
    for part in parts:
        if part is not None:
            out = out + part
    return out


@dataclass(frozen=True)
class RowTransform:
    """``x → clip((x − shift) / scale)`` for one party's dense rows."""

    shift: tuple[float, ...]
    scale: tuple[float, ...]
    clip_norm: float = 0.0          # 0: no clipping

    @classmethod
    def identity(cls, features: int, clip_norm: float = 0.0) -> RowTransform:
        return cls((0.0,) * features, (1.0,) * features, clip_norm)

    @classmethod
    def from_moments(cls, stats: Moments, clip_norm: float = 0.0) -> RowTransform:
        """Standardise by the rows' mean and (population) standard deviation."""
        n = max(stats.count, 1)
        mean = stats.total / n
        var = np.maximum(stats.squares / n - mean * mean, 0.0)
        std = np.sqrt(var)
        scale = np.where(std > 1e-12 * np.maximum(1.0, np.abs(mean)), std, 1.0)
        return cls(tuple(float(v) for v in mean), tuple(float(v) for v in scale), clip_norm)

    def apply(self, x: Any) -> np.ndarray:
        z = (np.asarray(x, dtype=np.float64) - np.asarray(self.shift)) / np.asarray(self.scale)
        return clip_rows(z, self.clip_norm) if self.clip_norm > 0 else z

    def to_json(self) -> dict:
        return {"shift": list(self.shift), "scale": list(self.scale), "clip_norm": self.clip_norm}

    @classmethod
    def from_json(cls, value: dict) -> RowTransform:
        return cls(tuple(float(v) for v in value["shift"]), tuple(float(v) for v in value["scale"]),
                   float(value.get("clip_norm", 0.0)))
