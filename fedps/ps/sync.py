"""Step synchronisation on a shard: the per-step push buffer and worker clocks.

Synchronous mode (``staleness = 0``) buffers the pushes of step ``s`` under
``(worker, seq)`` and applies them when the step ends, merged in that order;
so the model after a step is a function of what was pushed, never of when.
A push that repeats a ``(worker, seq)`` of the same step replaces the first
(a retried Spark task does not count twice).

Bounded staleness (``staleness = k``) applies a push at once; each worker
reports the end of its steps, and a pull for step ``s`` may go ahead only when
every worker has finished step ``s - k`` (the stale-synchronous-parallel rule).
"""

from __future__ import annotations

import numpy as np

from fedps.errors import ProtocolError


def merge(keys: np.ndarray, grads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum the gradients of equal keys, in input order; return sorted unique keys and sums."""
    if keys.size == 0:
        return keys, grads
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    if starts.size == keys.size:
        return sorted_keys, grads[order]
    return sorted_keys[starts], np.add.reduceat(grads[order], starts, axis=0)


class StepBuffer:
    """Pushes of not-yet-applied steps, keyed by ``(worker, seq)``."""

    def __init__(self) -> None:
        self._steps: dict[int, dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]] = {}

    def add(self, step: int, worker: int, seq: int, keys: np.ndarray, grads: np.ndarray) -> None:
        self._steps.setdefault(step, {})[(worker, seq)] = (keys, grads)

    def take(self, step: int) -> tuple[np.ndarray, np.ndarray] | None:
        """All pushes of ``step`` in ``(worker, seq)`` order, concatenated; None if there were none."""
        pushes = self._steps.pop(step, {})
        if not pushes:
            return None
        ordered = [pushes[k] for k in sorted(pushes)]
        return np.concatenate([k for k, _ in ordered]), np.concatenate([g for _, g in ordered])

    def pending(self) -> list[int]:
        return sorted(self._steps)


class Clocks:
    """How many steps each of ``num_workers`` workers has finished."""

    def __init__(self, num_workers: int) -> None:
        self.num_workers = num_workers
        self._done = [0] * num_workers

    def finish(self, worker: int, step: int) -> None:
        """Record that ``worker`` finished ``step`` (steps count from 0)."""
        if not 0 <= worker < self.num_workers:
            raise ProtocolError(f"worker {worker} is outside [0, {self.num_workers}) set by ps.num_workers")
        self._done[worker] = max(self._done[worker], step + 1)

    def slowest(self) -> int:
        """Steps finished by the slowest worker."""
        return min(self._done) if self._done else 0

    def everyone_finished(self, step: int) -> bool:
        return bool(self._done) and self.slowest() > step

    def reset(self, step: int) -> None:
        """Every worker has finished ``step`` steps (after a restore)."""
        self._done = [step] * self.num_workers
