"""Row storage of one shard: sparse (touched rows only) or dense.

``SparseRows`` keeps a sorted int64 key array beside the slot of each key;
weights and optimizer state live in 2-D arrays indexed by slot, appended in
the order rows are first touched. A lookup is one ``np.searchsorted`` over the
whole batch; an insert merges the batch's new keys into the sorted index in
one ``np.insert`` (O(rows) copying of 16 bytes a row) and appends their rows,
so weights never move. Memory is ``16 + 4 or 8 * (width + state widths)``
bytes a row, times at most 1.5 for spare capacity.
"""

from __future__ import annotations

import numpy as np

from fedps.ps.config import TableSpec
from fedps.ps.keys import initial_values
from fedps.ps.optimizers import state_layout

_MIN_CAPACITY = 1024
_GROWTH = 1.5


class SparseRows:
    """Rows that exist once touched, found by binary search over sorted keys."""

    def __init__(self, spec: TableSpec) -> None:
        self.spec = spec
        self.dtype = np.dtype(spec.dtype)
        self.layout = state_layout(spec.optimizer, spec.width)
        self.index_keys = np.empty(0, dtype=np.int64)
        self.index_slots = np.empty(0, dtype=np.int64)
        self.count = 0
        self.weights = np.empty((_MIN_CAPACITY, spec.width), dtype=self.dtype)
        self.state = {
            name: np.empty((_MIN_CAPACITY, width), dtype=self.dtype) for name, (width, _) in self.layout.items()
        }

    def find(self, keys: np.ndarray, ascending: bool = False) -> np.ndarray:
        """Slot of each key, or -1 where the key was never touched.

        Searching keys in ascending order is several times faster on large
        tables (the binary searches walk memory in order), so unsorted batches
        are sorted first unless ``ascending`` says they already are.
        """
        if self.count == 0 or keys.size == 0:
            return np.full(keys.size, -1, dtype=np.int64)
        if not ascending and keys.size > 1:
            order = np.argsort(keys)
            found = np.empty(keys.size, dtype=np.int64)
            found[order] = self.find(keys[order], ascending=True)
            return found
        pos = np.searchsorted(self.index_keys, keys)
        np.minimum(pos, self.count - 1, out=pos)
        hit = self.index_keys[pos] == keys
        return np.where(hit, self.index_slots[pos], -1)

    def insert(self, keys: np.ndarray) -> np.ndarray:
        """Create rows for sorted, unique, absent ``keys`` with initial values; return their slots."""
        slots = np.arange(self.count, self.count + keys.size, dtype=np.int64)
        self._reserve(self.count + keys.size)
        self.weights[slots] = initial_values(keys, self.spec.initializer, self.spec.width, self.dtype)
        for name, (_, start) in self.layout.items():
            self.state[name][slots] = start
        at = np.searchsorted(self.index_keys, keys)
        self.index_keys = np.insert(self.index_keys, at, keys)
        self.index_slots = np.insert(self.index_slots, at, slots)
        self.count += keys.size
        return slots

    def slots(self, keys: np.ndarray) -> np.ndarray:
        """Slots of sorted, unique ``keys``, creating the rows that do not exist yet."""
        found = self.find(keys, ascending=True)
        missing = found < 0
        if missing.any():
            found[missing] = self.insert(keys[missing])
        return found

    def _reserve(self, needed: int) -> None:
        capacity = self.weights.shape[0]
        if needed <= capacity:
            return
        capacity = max(needed, int(capacity * _GROWTH))
        self.weights = _grow(self.weights, capacity)
        self.state = {name: _grow(array, capacity) for name, array in self.state.items()}

    def export(self) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """All rows in key order: keys, weights and state (copies)."""
        order = self.index_slots
        return self.index_keys.copy(), self.weights[order], {n: a[order] for n, a in self.state.items()}

    def load(self, keys: np.ndarray, weights: np.ndarray, state: dict[str, np.ndarray]) -> None:
        """Replace every row with ``keys`` (sorted, unique) and their weights and state."""
        self.__init__(self.spec)  # type: ignore[misc]
        self._reserve(keys.size)
        self.count = keys.size
        self.index_keys = keys.astype(np.int64, copy=True)
        self.index_slots = np.arange(keys.size, dtype=np.int64)
        self.weights[: keys.size] = weights
        for name in self.state:
            self.state[name][: keys.size] = state[name]

    def nbytes(self) -> int:
        """Bytes held by the index, the weights and the optimizer state."""
        arrays = [self.index_keys, self.index_slots, self.weights, *self.state.values()]
        return sum(a.nbytes for a in arrays)


class DenseRows(SparseRows):
    """All rows of a shard of a dense table, created at once; key ``k`` is local row ``k // n``."""

    def __init__(self, spec: TableSpec, shard: int = 0, num_shards: int = 1) -> None:
        super().__init__(spec)
        self.shard, self.num_shards = shard, num_shards
        keys = np.arange(shard, spec.dim, num_shards, dtype=np.int64)
        if keys.size:
            self.insert(keys)

    def load(self, keys: np.ndarray, weights: np.ndarray, state: dict[str, np.ndarray]) -> None:
        self.__init__(self.spec, self.shard, self.num_shards)  # type: ignore[misc]
        slots = keys // self.num_shards
        self.weights[slots] = weights
        for name in self.state:
            self.state[name][slots] = state[name]

    def find(self, keys: np.ndarray, ascending: bool = False) -> np.ndarray:
        return keys // self.num_shards


def _grow(array: np.ndarray, capacity: int) -> np.ndarray:
    grown = np.empty((capacity, array.shape[1]), dtype=array.dtype)
    grown[: array.shape[0]] = array
    return grown


def make_rows(spec: TableSpec, shard: int, num_shards: int) -> SparseRows:
    """Storage for one shard of ``spec``."""
    if spec.kind == "dense":
        return DenseRows(spec, shard, num_shards)
    return SparseRows(spec)
