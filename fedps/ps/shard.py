"""One shard of one table: the Ray actor that stores rows and applies updates.

``Shard`` is a plain class with ``async`` methods; ``start_shard`` makes it a
named Ray actor (an asyncio actor, so a pull can wait for a step barrier
without blocking pushes). All work on keys is vectorised: a pull is one
lookup and one gather, a push one merge, one lookup-or-insert and one
optimizer call over the whole batch.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Callable

import numpy as np

from fedps.errors import PeerError, ProtocolError
from fedps.ps import checkpoint
from fedps.ps.config import PSConfig, TableSpec
from fedps.ps.keys import initial_values, shard_of
from fedps.ps.optimizers import Rows, apply_update
from fedps.ps.sync import Clocks, StepBuffer, merge
from fedps.ps.table import make_rows

log = logging.getLogger(__name__)


def actor_name(ps_name: str, table: str, shard: int) -> str:
    """The Ray actor name of a shard: executors find shards by it."""
    return f"fedps-ps:{ps_name}:{table}:{shard}"


class Shard:
    """Rows ``shard`` of ``num_shards`` of one table, with its optimizer and step state."""

    def __init__(self, config: PSConfig, table: str, shard: int) -> None:
        self.config = config
        self.spec: TableSpec = config.table(table)
        self.shard = shard
        self.rows = make_rows(self.spec, shard, config.num_shards)
        self.step = 0
        self.buffer = StepBuffer()
        self.clocks = Clocks(config.num_workers)
        self._changed: asyncio.Condition | None = None

    # --- reads and writes -------------------------------------------------

    async def pull(self, keys: np.ndarray, step: int | None = None) -> np.ndarray:
        """Rows of ``keys``; never-touched keys get their initial values (not stored)."""
        if step is not None:
            await self._wait_for_step(step)
        slots = self.rows.find(keys)
        out = np.empty((keys.size, self.spec.width), dtype=self.rows.dtype)
        hit = slots >= 0
        out[hit] = self.rows.weights[slots[hit]]
        if not hit.all():
            out[~hit] = initial_values(keys[~hit], self.spec.initializer, self.spec.width, self.rows.dtype)
        return out

    async def push(self, keys: np.ndarray, grads: np.ndarray, step: int | None, worker: int, seq: int) -> None:
        """Add a batch of gradients: buffered until the step ends, or applied now under staleness."""
        step = self.step if step is None else step
        if self.config.staleness:
            self._apply(keys, grads, step)
            return
        if step < self.step:
            raise ProtocolError(
                f"push for step {step} arrived after the step ended (shard is at step {self.step}); "
                "a worker is late or was restarted without restoring"
            )
        self.buffer.add(step, worker, seq, keys, grads)

    async def finish_step(self, worker: int, step: int) -> int:
        """Worker ``worker`` is done with ``step``; ends the step once every worker is."""
        self.clocks.finish(worker, step)
        if not self.config.staleness:
            while self.clocks.everyone_finished(self.step):
                self._commit(self.step)
        await self._notify()
        return self.step

    async def end_step(self, step: int) -> int:
        """The driver's barrier: apply step ``step`` and move to the next one."""
        if step != self.step:
            raise ProtocolError(f"end_step({step}) but shard {self.shard} of {self.spec.name} is at step {self.step}")
        self._commit(step)
        await self._notify()
        return self.step

    # --- checkpoints --------------------------------------------------------

    async def save(self, path: str) -> dict[str, Any]:
        """Write every row and its optimizer state to Parquet at ``path``."""
        if self.buffer.pending():
            raise ProtocolError(f"checkpoint of step {self.step} with unapplied pushes for {self.buffer.pending()}")
        keys, weights, state = self.rows.export()
        meta = {"table": self.spec.name, "shard": self.shard, "num_shards": self.config.num_shards, "step": self.step}
        size = checkpoint.write_rows(path, keys, weights, state, meta)
        return {"path": path, "rows": int(keys.size), "bytes": size}

    async def load(self, paths: list[str], step: int) -> int:
        """Replace all rows with this shard's rows in ``paths`` and set the step."""
        keys, weights, state = checkpoint.read_rows(paths, self.spec, self._mine)
        self.rows.load(keys, weights, state)
        self.step = step
        self.buffer = StepBuffer()
        self.clocks.reset(step)
        await self._notify()
        return int(keys.size)

    # --- introspection ----------------------------------------------------

    async def describe(self) -> dict[str, Any]:
        return {"config": self.config, "table": self.spec.name, "shard": self.shard, "step": self.step}

    async def stats(self) -> dict[str, int]:
        """Rows held, bytes of row storage, and this process's resident memory."""
        return {"rows": self.rows.count, "nbytes": self.rows.nbytes(), "rss": _rss_bytes(), "step": self.step}

    async def dump(self) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Every row in key order with its optimizer state (for tests and export)."""
        return self.rows.export()

    # --- internals ----------------------------------------------------------

    def _mine(self, keys: np.ndarray) -> np.ndarray:
        return shard_of(keys, self.spec, self.config.num_shards) == self.shard

    def _commit(self, step: int) -> None:
        pushed = self.buffer.take(step)
        if pushed is not None:
            self._apply(*pushed, step)
        self.step = step + 1

    def _apply(self, keys: np.ndarray, grads: np.ndarray, step: int) -> None:
        keys, grads = merge(keys, grads)
        if keys.size == 0:
            return
        slots = self.rows.slots(keys)
        rows = Rows(self.rows.weights[slots], {n: a[slots] for n, a in self.rows.state.items()})
        apply_update(self.spec.optimizer, rows, grads, step)
        self.rows.weights[slots] = rows.weights
        for name, array in rows.state.items():
            self.rows.state[name][slots] = array

    async def _wait_for_step(self, step: int) -> None:
        if self.config.staleness:
            ready: Callable[[], bool] = lambda: self.clocks.slowest() >= step - self.config.staleness
        else:
            ready = lambda: self.step >= step
        if ready():
            return
        changed = self._condition()
        async with changed:
            try:
                await asyncio.wait_for(changed.wait_for(ready), self.config.wait_timeout_s)
            except asyncio.TimeoutError:
                raise PeerError(
                    f"pull for step {step} waited {self.config.wait_timeout_s}s: shard {self.shard} of "
                    f"{self.spec.name} is at step {self.step}, slowest worker finished {self.clocks.slowest()}"
                ) from None

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def _notify(self) -> None:
        changed = self._condition()
        async with changed:
            changed.notify_all()


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def start_shard(config: PSConfig, table: str, shard: int) -> Any:
    """Create the named actor for ``shard`` of ``table``; returns its handle."""
    import ray

    actor = ray.remote(Shard).options(
        name=actor_name(config.name, table, shard),
        namespace=config.namespace,
        num_cpus=config.shard_num_cpus,
        max_restarts=0,
    )
    return actor.remote(config, table, shard)
